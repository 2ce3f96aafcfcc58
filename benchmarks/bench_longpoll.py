"""Benchmark: what a pending `mempalace_event_wait` costs the other sessions, and how fast a matching event wakes it.

Why: the engine answers one request at a time, and `event_wait` used to hold it in 0.5 s slices, so another
session's `mempalace_status` took ~450 ms at p50 instead of ~4 ms while anyone waited (#14). The broker now holds
the wait itself (broker/mux.py `_park`) and the engine only takes looks. Measured in one run, through mp-shim
sessions on one broker with the real engine:

- B's `mempalace_status`, alternating blocks with no wait pending and with A's `event_wait` pending (a filter that
  matches nothing, so it stays pending): p50 / p99 of each and their ratio (target: ≤ 2×);
- wake-up: A waits on a room; B appends a matching event; the time from B sending the append to A's answer
  arriving (an upper bound: it includes the append itself, given beside it; target: ≤ 100 ms at p50);
- status over time while waits come and go (the CSV behind a plot: `--series FILE`).

  .venv/bin/python benchmarks/bench_longpoll.py [--calls 200] [--wakes 20] [--out docs/bench-longpoll.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_container import BIN, Session  # noqa: E402
from benchmarks.bench_hub import pct, side  # noqa: E402
from mp_ssh_bridge import protocol, state  # noqa: E402
from tests.platforms import cpu_model  # noqa: E402

BLOCK = 20  # B's calls in a row in one condition before the other


def wait_call(room: str, timeout_ms: int) -> dict[str, Any]:
    return {"name": "mempalace_event_wait", "arguments": {"stream": "bench", "room": room, "timeout_ms": timeout_ms}}


async def read_reply(s: Session, msg_id: int) -> tuple[float, dict[str, Any]]:
    """The answer to `msg_id`, and when it arrived (perf_counter)."""
    assert s.proc.stdout is not None
    while True:
        line = await asyncio.wait_for(s.proc.stdout.readline(), 120)
        if not line:
            raise EOFError("the session closed its stdout")
        msg = protocol.decode(line)
        if isinstance(msg, dict) and msg.get("id") == msg_id:
            return time.perf_counter(), msg


async def timed_status(b: Session) -> float:
    t = time.perf_counter()
    await b.status()
    return time.perf_counter() - t


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    home, _, env = side(root, "lp")
    shim = [str(BIN / "mp-shim")]
    a, b = await Session.spawn(shim, env), await Session.spawn(shim, env)
    series: list[tuple[float, str, float]] = []
    t0 = time.perf_counter()
    try:
        await a.start()
        await b.start()
        for _ in range(20):
            await timed_status(b)
        idle: list[float] = []
        pending: list[float] = []
        next_id = 1000
        while len(idle) < args.calls:
            for _ in range(BLOCK):
                v = await timed_status(b)
                idle.append(v)
                series.append((time.perf_counter() - t0, "idle", v))
            next_id += 1
            a.n = next_id
            await a.send(protocol.request(next_id, "tools/call", wait_call("nobody-writes-here", 60_000)))
            await asyncio.sleep(0.05)  # its first look is taken: it is held by the broker from here on
            for _ in range(BLOCK):
                v = await timed_status(b)
                pending.append(v)
                series.append((time.perf_counter() - t0, "wait pending", v))
            await a.send(protocol.notification("notifications/cancelled", {"requestId": next_id}))
        wakes: list[float] = []  # from B sending its append to A's answer arriving
        appends: list[float] = []  # B's append alone, for scale
        for i in range(args.wakes):
            next_id += 1
            room = f"wake-{i}"
            await a.send(protocol.request(next_id, "tools/call", wait_call(room, 60_000)))
            answer = asyncio.create_task(read_reply(a, next_id))
            await asyncio.sleep(0.2)
            sent = time.perf_counter()
            reply = await b.call("tools/call", {"name": "mempalace_event_append", "arguments": {
                "type": "note", "stream": "bench", "room": room, "from_agent": "b", "body": f"wake {i}"}})
            appended = time.perf_counter() - sent
            assert "result" in reply and not reply["result"].get("isError"), reply
            arrived, got = await answer
            wakes.append(arrived - sent)
            appends.append(appended)
            assert f"wake {i}" in protocol.encode(got).decode(), got
        await a.close()
        await b.close()
        rec = state.read_broker_json(home / ".mempalace" / "broker.json") or {}
        if isinstance(rec.get("pid"), int):
            os.kill(rec["pid"], signal.SIGTERM)
        return {"idle": idle, "pending": pending, "wakes": wakes, "appends": appends, "series": series}
    finally:
        for s in (a, b):
            if s.proc.returncode is None:
                s.proc.kill()


def report(r: dict[str, Any], args: argparse.Namespace, load: str) -> str:
    ms = 1000.0
    idle, pending, wakes = r["idle"], r["pending"], r["wakes"]
    ratio = pct(pending, 50) / pct(idle, 50)
    return "\n".join([
        "# Long polls: what a pending `mempalace_event_wait` costs the others",
        "",
        f"Measured {datetime.date.today()} on {platform.system()} {platform.machine()} ({cpu_model()}, "
        f"{os.cpu_count()} CPUs, load {load}), mempalace's engine through mp-shim → broker, one run, alternating "
        f"blocks of {BLOCK}. Command: `.venv/bin/python benchmarks/bench_longpoll.py --calls {args.calls} "
        f"--wakes {args.wakes}`.",
        "",
        "| another session's `mempalace_status` | p50 | p99 |",
        "|---|---|---|",
        f"| no wait pending | {pct(idle, 50) * ms:.2f} ms | {pct(idle, 99) * ms:.2f} ms |",
        f"| a `mempalace_event_wait` pending | {pct(pending, 50) * ms:.2f} ms | {pct(pending, 99) * ms:.2f} ms |",
        f"| ratio (target ≤ 2×) | {ratio:.2f}× | {pct(pending, 99) / pct(idle, 99):.2f}× |",
        "",
        f"Woken by a matching event appended through the broker ({len(wakes)} times), from the append sent to the "
        f"wait's answer: p50 {pct(wakes, 50) * ms:.1f} ms, max {max(wakes) * ms:.1f} ms (target ≤ 100 ms); the "
        f"append alone took p50 {pct(r['appends'], 50) * ms:.1f} ms.",
        "",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--wakes", type=int, default=20)
    p.add_argument("--out", default=str(REPO / "docs" / "bench-longpoll.md"))
    p.add_argument("--series", default="", help="also write status latency over time as CSV here")
    args = p.parse_args()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="mpb-lp-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    text = report(result, args, load)
    print(text)
    Path(args.out).write_text(text)
    if args.series:
        Path(args.series).write_text("t_s,condition,status_ms\n" + "".join(
            f"{t:.4f},{c},{v * 1000:.3f}\n" for t, c, v in result["series"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
