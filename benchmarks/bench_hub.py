"""Benchmark: the bridge in hub mode (routing to upstream's `mempalace serve`) against the bridge with its own engine.

Why: a user who runs upstream's hub for multi-machine coordination gets hub mode (the broker opens no engine and
sends every call to the hub over HTTP); this says what that costs per call and at session start, and how long the
broker needs to take the palace over when the hub dies — measured in one run:

- two throwaway homes, each with its palace and its broker: A with its own engine, B routing to a hub on loopback;
- per call: `mempalace_status` through a long-lived mp-shim session on A and on B, one call each in turn;
- spawn → first status: a fresh mp-shim on A and on B in turn (brokers warm);
- take-over: the hub is killed with -9 while a session on B calls status in a loop; the time from the kill to
  the first answer served by the broker's own engine (which starts then).

  .venv/bin/python benchmarks/bench_hub.py [--calls 300] [--spawns 10] [--out docs/bench-hub.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_container import BIN, MODEL_CACHE, Session, time_calls, time_start  # noqa: E402
from mp_ssh_bridge import hub, state  # noqa: E402
from tests.platforms import cpu_model  # noqa: E402
from tests.sshd import free_port  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def side(root: Path, name: str) -> tuple[Path, Path, dict[str, str]]:
    home = root / name
    home.mkdir()
    (home / ".cache").symlink_to(MODEL_CACHE)
    palace = home / "palace"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MP_BRIDGE_") and not k.startswith("MEMPALACE")}
    env = dict(
        base,
        HOME=str(home),
        MEMPALACE_PATH=str(home / ".mempalace"),
        MEMPALACE_PALACE_PATH=str(palace),
        MP_BRIDGE_CONFIG=str(home / "mp-bridge.toml"),
        MP_BRIDGE_ROLE="host",
        MEMPALACE_MCP_TIMEOUT_MS="60000",
    )
    return home, palace, env


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    home_a, _, env_a = side(root, "own")
    home_b, palace_b, env_b = side(root, "hub")
    port = free_port()
    hub_log = open(root / "hub.log", "wb")
    hub_proc = subprocess.Popen(
        [str(BIN / "mempalace"), "serve", "--palace", str(palace_b), "--port", str(port)],
        env=env_b,
        stdout=hub_log,
        stderr=hub_log,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while hub.live(str(palace_b), home_b) is None:
        if hub_proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the hub did not start: {(root / 'hub.log').read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    shim = [str(BIN / "mp-shim")]
    try:
        proxy = [str(BIN / "mempalace-mcp")]  # upstream's own: a plain engine on the hub's palace proxies to it
        a, b = await Session.spawn(shim, env_a), await Session.spawn(shim, env_b)
        u = await Session.spawn(proxy, env_b)
        await a.start()
        await b.start()
        await u.start()
        record = state.read_broker_json(home_b / ".mempalace" / "broker.json") or {}
        calls: dict[str, list[float]] = {"own": [], "hub": [], "upstream": []}
        for sess in (a, b, u):
            await time_calls(sess, 20)
        for _ in range(args.calls):
            calls["own"] += await time_calls(a, 1)
            calls["hub"] += await time_calls(b, 1)
            calls["upstream"] += await time_calls(u, 1)
        await u.close()
        spawns: dict[str, list[float]] = {"own": [], "hub": [], "upstream": []}
        for _ in range(args.spawns):
            spawns["own"].append(await time_start(shim, env_a))
            spawns["hub"].append(await time_start(shim, env_b))
            spawns["upstream"].append(await time_start(proxy, env_b))
        # take-over: kill the hub while B calls in a loop; the first answer after the kill comes from the engine
        hub_proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        hub_proc.wait()
        failures = 0
        while True:
            reply = await b.call("tools/call", {"name": "mempalace_status", "arguments": {}})
            if "result" in reply and not reply["result"].get("isError"):
                break
            failures += 1
        takeover = time.perf_counter() - killed
        await a.close()
        await b.close()
        for h in (home_a, home_b):
            rec = state.read_broker_json(h / ".mempalace" / "broker.json") or {}
            if isinstance(rec.get("pid"), int):
                os.kill(rec["pid"], signal.SIGTERM)
        return {
            "calls": calls,
            "spawns": spawns,
            "takeover": takeover,
            "takeover_failures": failures,
            "hub_pid": hub_proc.pid,
            "broker_b": record.get("pid"),
        }
    finally:
        if hub_proc.poll() is None:
            hub_proc.kill()
            hub_proc.wait()


def report(r: dict[str, Any], args: argparse.Namespace, load: str) -> str:
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    c, s = r["calls"], r["spawns"]
    rows = []
    for key, label in (
        ("own", "the bridge alone: mp-shim → broker → its own engine"),
        ("hub", "hub with the bridge: mp-shim → broker → upstream's hub (HTTP)"),
        ("upstream", "upstream's hub alone: a plain `mempalace-mcp` proxying to it (HTTP)"),
    ):
        rows.append(
            f"| {label} | {ms(statistics.median(c[key]))} | {ms(pct(c[key], 99))} | {ms(statistics.median(s[key]))} |"
        )
    return (
        "\n".join(
            [
                "# Hub mode against the broker's own engine",
                "",
                f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.system()} "
                f"{platform.release()}, {os.cpu_count()} cores ({cpu_model() or platform.machine()}), Python "
                f"{platform.python_version()}; load average at the start {load}.",
                f"`.venv/bin/python benchmarks/bench_hub.py --calls {args.calls} --spawns {args.spawns}` — two throwaway "
                "homes with their palaces, brokers warm; calls and spawns alternate between the paths.",
                "",
                "| path | status p50 ms | status p99 ms | spawn → first status, median ms |",
                "| --- | ---: | ---: | ---: |",
                *rows,
                "",
                f"The hub killed with -9 while a session called `mempalace_status` in a loop: the first answer from the "
                f"broker's own engine came **{r['takeover']:.2f} s** after the kill ({r['takeover_failures']} calls in "
                "between were answered with an error that says whether they ran; none was lost). That is the engine's start: the broker sees the hub's pid gone "
                "within 0.25 s and starts its own engine at once.",
                "",
                "In hub mode every call is one HTTP request to the hub (a new loopback connection each: the hub closes it "
                "after one answer) instead of a line on the engine's pipe.",
            ]
        )
        + "\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--spawns", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "docs" / "bench-hub.md"))
    args = p.parse_args()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="mpb-hub-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    text = report(result, args, load)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
