"""Spawn -> `tools/list` answered, and -> first `mempalace_status` result, on a COLD broker (real engine).

No broker runs when each measured `mp-shim` starts: it elects one, which starts the engine. Two
cases: (a) the broker's very first start for this engine (no engine-cache.json: `initialize`
waits for the engine), (b) a cold broker that answers `initialize` and `tools/list` from the
last run's engine-cache.json while the engine loads. The status call waits for the engine in
both; the start-up notices (`notifications/message`) it got on the way are counted.
Throwaway HOME with a palace of 5 drawers (`.cache` linked to the offline model in .test-home); nothing is written.

    .venv/bin/python benchmarks/bench_coldstart.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}


def send(proc: subprocess.Popen, msg: dict) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


def read_id(proc: subprocess.Popen, msg_id: int, seen: list[dict]) -> dict:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("EOF from mp-shim")
        msg = json.loads(line)
        if msg.get("id") == msg_id and "method" not in msg:
            return msg
        seen.append(msg)


def stop_broker(state_dir: Path) -> None:
    """Stop this HOME's broker (and with it its engine); bounded."""
    try:
        pid = json.loads((state_dir / "broker.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + 30
    while (state_dir / "broker.json").exists() and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)  # let the engine's exit and the lock release settle


def fill_palace(env: dict) -> None:
    """A few drawers, so each engine start really opens (and, with eager warm-up, warms) a palace."""
    proc = subprocess.Popen([str(BIN / "mp-shim")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        send(proc, INIT)
        read_id(proc, 1, [])
        for i in range(5):
            send(proc, {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call", "params": {
                "name": "mempalace_add_drawer",
                "arguments": {"wing": "bench", "room": "cold", "content": f"Cold-start benchmark drawer {i}."}}})
            assert "result" in read_id(proc, 10 + i, [])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def one_run(env: dict, state_dir: Path, keep_cache: bool) -> dict[str, float]:
    stop_broker(state_dir)
    if not keep_cache:
        (state_dir / "engine-cache.json").unlink(missing_ok=True)
    seen: list[dict] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "mp-shim")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        send(proc, INIT)
        assert "result" in read_id(proc, 1, seen)
        t_init = time.perf_counter() - t0
        send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        listed = read_id(proc, 2, seen)
        t_list = time.perf_counter() - t0
        assert len(listed["result"]["tools"]) > 10, listed
        send(proc, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                    "params": {"name": "mempalace_status", "arguments": {}}})
        status = read_id(proc, 3, seen)
        t_status = time.perf_counter() - t0
        assert "result" in status, status
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    notices = sum(1 for m in seen if m.get("method") == "notifications/message")
    return {"initialize": t_init, "tools/list": t_list, "status": t_status, "notices": notices}


def report(name: str, runs: list[dict[str, float]]) -> None:
    print(f"{name}  (n={len(runs)})")
    for key in ("initialize", "tools/list", "status"):
        values = [r[key] * 1000 for r in runs]
        print(f"  spawn -> {key:<11} p50 {statistics.median(values):7.0f} ms  "
              f"(min {min(values):.0f}, max {max(values):.0f})")
    print(f"  start-up notices before the status result: {[int(r['notices']) for r in runs]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mpb-cold-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    (home / ".cache").symlink_to(REPO / ".test-home" / ".cache")
    state_dir = home / ".mempalace"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_BRIDGE_", "MEMPALACE_"))}
    env.update(HOME=str(home), MEMPALACE_PATH=str(state_dir), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               MP_BRIDGE_CONFIG=str(home / "none.toml"), MP_BRIDGE_ROLE="host")
    try:
        fill_palace(env)  # also warms the page cache; not counted
        first: list[dict[str, float]] = []
        cached: list[dict[str, float]] = []
        for _ in range(args.runs):  # interleaved, so a change in the machine's load hits both alike
            first.append(one_run(env, state_dir, keep_cache=False))
            cached.append(one_run(env, state_dir, keep_cache=True))
    finally:
        stop_broker(state_dir)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    report("(a) cold broker, no engine-cache.json (its first start)", first)
    report("(b) cold broker, engine-cache.json from the last run", cached)
    return 0


if __name__ == "__main__":
    sys.exit(main())
