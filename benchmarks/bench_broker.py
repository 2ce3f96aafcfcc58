"""Benchmark: mempalace_status latency on the engine directly vs through the broker.

Same run, same palace, same HOME: (a) a raw JSON-RPC client on a directly
spawned `mempalace-mcp`'s stdio; (b) the same client on the broker's UNIX
socket. Prints p50/p90/p99 and the ratio, and writes docs/bench-broker.md.

usage: .venv/bin/python benchmarks/bench_broker.py [--calls 300] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from mp_ssh_bridge import protocol  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def time_calls(reader, writer, calls: int, warmup: int = 20) -> list[float]:
    out = []
    for i in range(warmup + calls):
        msg = protocol.request(i + 1000, "tools/call", {"name": "mempalace_status", "arguments": {}})
        t0 = time.perf_counter()
        writer.write(protocol.encode(msg))
        await writer.drain()
        line = await reply(reader)
        dt = time.perf_counter() - t0
        assert b'"result"' in line, line[:300]
        if i >= warmup:
            out.append(dt * 1000)
    return out


async def spawn_direct(env: dict[str, str], palace: Path):
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mempalace-mcp"), "--palace", str(palace), env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, limit=2**24,
    )
    init = protocol.request(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}})
    proc.stdin.write(protocol.encode(init))
    await proc.stdout.readline()
    return proc


async def compare(env: dict[str, str], palace: Path, endpoint: str, calls: int, rounds: int = 6) -> tuple[list[float], list[float]]:
    """Alternate batches on the two paths so drift in machine load hits both alike (reads only)."""
    proc = await spawn_direct(env, palace)
    reader, writer = await asyncio.open_unix_connection(endpoint[len("unix://"):], limit=2**24)
    direct_ms: list[float] = []
    via_ms: list[float] = []
    try:
        per = max(1, calls // rounds)
        for _ in range(rounds):
            direct_ms += await time_calls(proc.stdout, proc.stdin, per)
            via_ms += await time_calls(reader, writer, per)
    finally:
        writer.close()
        proc.stdin.close()
        await proc.wait()
    return direct_ms, via_ms


async def seed(endpoint: str, n: int) -> None:
    reader, writer = await asyncio.open_unix_connection(endpoint[len("unix://"):], limit=2**24)
    for i in range(n):
        args = {"wing": "bench", "room": f"r{i % 5}", "content": f"benchmark drawer {i}: the quick brown fox {i * 7}"}
        writer.write(protocol.encode(protocol.request(i, "tools/call", {"name": "mempalace_add_drawer", "arguments": args})))
        await writer.drain()
        line = await reply(reader)
        assert b'"success": true' in line.replace(b"\\", b""), line[:500]
    writer.close()


async def reply(reader) -> bytes:
    """The next response line: the broker's notices (engine starting) are notifications, skipped."""
    while True:
        line = await reader.readline()
        if not line or b'"id"' in line:
            return line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--drawers", type=int, default=50)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mpb-bench-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    (home / ".cache").symlink_to(REPO / ".test-home/.cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_BRIDGE_", "MEMPALACE_"))}
    env.update(HOME=str(home), MEMPALACE_PATH=str(home / ".mempalace"), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               MP_BRIDGE_CONFIG=str(home / "none.toml"))
    broker_pid = None
    try:
        info = json.loads(subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], env=env, capture_output=True, check=True).stdout)
        broker_pid = info["pid"]
        asyncio.run(seed(info["endpoint"], args.drawers))
        direct_ms, via = asyncio.run(compare(env, Path(info["palace"]), info["endpoint"], args.calls))
    finally:
        if broker_pid:
            subprocess.run(["kill", str(broker_pid)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    rows = [("direct (engine stdio)", direct_ms), ("through broker socket", via)]
    lines = ["| path | p50 ms | p90 ms | p99 ms |", "| --- | --- | --- | --- |"]
    for name, vals in rows:
        lines.append(f"| {name} | {statistics.median(vals):.3f} | {pct(vals, 0.9):.3f} | {pct(vals, 0.99):.3f} |")
    ratio = statistics.median(via) / statistics.median(direct_ms)
    summary = (f"broker/direct p50 ratio: {ratio:.2f}x ({len(via)} calls each, alternating batches, "
               f"{args.drawers} drawers)")
    print("\n".join(lines))
    print(summary)
    if not args.no_write:
        doc = REPO / "docs/bench-broker.md"
        doc.write_text(
            "# Benchmark: mempalace_status direct vs through the broker\n\n"
            f"Run {datetime.date.today()} on {platform.machine()} Linux, {os.cpu_count()} cores, "
            f"mempalace {importlib.metadata.version('mempalace')}; `benchmarks/bench_broker.py`.\n\n"
            + "\n".join(lines) + f"\n\n{summary}\n\n"
            "Both paths were measured in the same run, in alternating batches of reads against the same palace\n"
            "(a direct engine started beside the broker's). The broker adds one UNIX-socket hop and a JSON\n"
            "parse/serialize per message; the engine's own status call dominates.\n"
        )
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
