"""Benchmark: a container session through its container daemon against a host session and a direct engine.

The targets of the container daemon (issue "The container daemon"), all measured in one run:
- container session spawn → first `mempalace_status` result, daemon and broker warm: ≤ 2× a host session's;
- the first container session (daemon cold, broker warm): ≤ a direct engine's start (`mempalace-mcp` spawned
  by the agent itself);
- per call: the container path (mp-shim → daemon → one SSH connection → broker) ≤ +0.5 ms over the host path
  (mp-shim → broker) at p50.

Everything is throwaway (HOME, palace, sshd on 127.0.0.1 with its own keys, see tests/sshd.py); both sides run on
this machine. The container side runs in its own mount namespace with its own runtime directory (Linux, root:
`unshare -m`), so it cannot reach the host broker's socket and goes through its daemon, which relays over SSH:

  .venv/bin/python benchmarks/bench_container.py [--spawns 10] [--calls 300] [--out docs/bench-container.md]

Every session, and the direct engine, gets the same messages: initialize, notifications/initialized, then
tools/call mempalace_status; the time is from spawn to that call's result. Runs of the different kinds are
interleaved, so they share the machine's conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mp_ssh_bridge import protocol, state  # noqa: E402
from tests.platforms import cpu_model  # noqa: E402
from tests.sshd import SSHServer, write_broker_wrapper  # noqa: E402

MODEL_CACHE = REPO / ".test-home" / ".cache"
BIN = Path(sys.executable).parent
INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}


class Session:
    """A stdio MCP server process (mp-shim or mempalace-mcp) driven with raw JSON-RPC lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.n = 0

    @classmethod
    async def spawn(cls, argv: list[str], env: dict[str, str]) -> Session:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL, env=env, limit=64 * 1024 * 1024)
        return cls(proc)

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(protocol.encode(msg))
        await self.proc.stdin.drain()

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        self.n += 1
        await self.send(protocol.request(self.n, method, params))
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
            if not line:
                raise EOFError(method)
            msg = json.loads(line)
            if msg.get("id") == self.n:
                return msg

    async def status(self) -> None:
        reply = await self.call("tools/call", {"name": "mempalace_status", "arguments": {}})
        assert "result" in reply and not reply["result"].get("isError"), reply

    async def start(self) -> None:
        """initialize, initialized, and the first mempalace_status."""
        assert "result" in await self.call("initialize", INIT)
        await self.send(protocol.notification("notifications/initialized"))
        await self.status()

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def time_start(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    s = await Session.spawn(argv, env)
    try:
        await s.start()
        return time.perf_counter() - t
    finally:
        await s.close()


BLOCK = 50  # calls in a row on one path before the other's, in the steady-stream pattern


async def time_calls(s: Session, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await s.status()
        out.append(time.perf_counter() - t)
    return out


def cpu_times(relay_pid: Any, server: SSHServer) -> dict[str, float]:
    """CPU seconds (user + system) so far of the container daemon and of sshd's per-connection processes."""
    import psutil

    def used(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    relay = used(psutil.Process(relay_pid)) if isinstance(relay_pid, int) else 0.0
    sshd = 0.0
    if server.proc is not None:
        sshd = sum(used(c) for c in psutil.Process(server.proc.pid).children(recursive=True))
    return {"relay": relay, "sshd": sshd}


def daemon_record(ctr_dir: Path) -> dict[str, Any] | None:
    """The container daemon's record, as the container sees it (its directory bound over /tmp/mp-bridge-<uid>)."""
    for path in ctr_dir.glob("daemon-*/broker.json"):
        record = state.read_broker_json(path)
        if record:
            return record
    return None


def stop_daemon(ctr_dir: Path) -> None:
    pid = (daemon_record(ctr_dir) or {}).get("pid")
    if not isinstance(pid, int):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise RuntimeError(f"container daemon {pid} did not exit")


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    home = root / "home"
    home.mkdir()
    (home / ".cache").symlink_to(MODEL_CACHE)
    # One state directory, seen by both sides (the bind mount), with a path too long for a socket: the host broker
    # binds its stand-in in this machine's /tmp/mp-bridge-<uid>, which the container side (its own mount namespace,
    # its own directory over that path) cannot see — as across a VM boundary — so it goes through its daemon.
    host_state = home / ("state-" + "s" * 110)
    state.ensure_private_dir(host_state)
    state.palace_id(state.StatePaths(host_state))
    ctr_state = host_state
    wrapper = write_broker_wrapper(root / "remote-broker.sh", home, host_state)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MP_BRIDGE_") and not k.startswith("MEMPALACE")}
    base.update(HOME=str(home), MP_BRIDGE_CONFIG=str(home / "mp-bridge.toml"), MEMPALACE_MCP_TIMEOUT_MS="60000")
    host_env = dict(base, MEMPALACE_PATH=str(host_state), MP_BRIDGE_ROLE="host")
    server = SSHServer(root / "sshd")
    server.start()
    ctr_env = dict(base, **server.container_env(ctr_state, wrapper), MP_BRIDGE_UVLOOP=str(args.relay_loop == "uvloop"))
    ctr_dir = root / "ctr-runtime"
    ctr_dir.mkdir(mode=0o700)
    runtime = str(state.runtime_dir())
    # Every kind of session starts through the same `unshare -m sh -c` wrapper (its cost counts alike for all);
    # the container's also binds its own directory over the runtime directory.
    host_side = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'exec "$0" "$@"']
    ctr_side = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mkdir -p '{runtime}' && mount --bind '{ctr_dir}' '{runtime}' && exec \"$0\" \"$@\""]
    engine_env = dict(base)  # the agent spawning mempalace-mcp itself: HOME decides the palace
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        # the broker, warm, with a few drawers (the host session elects it)
        first = await Session.spawn(host_side + [str(BIN / "mp-shim")], host_env)
        await first.start()
        for i in range(args.drawers):
            await first.call("tools/call", {"name": "mempalace_add_drawer", "arguments": {
                "wing": "bench", "room": "r", "content": f"benchmark drawer {i} about containers and latency"}})
        # The direct engine gets a copy of the palace: beside the broker's engine it would be a second writer.
        palace = (state.read_broker_json(host_state / "broker.json") or {})["palace"]
        shutil.copytree(palace, root / "engine-palace")
        shim = [str(BIN / "mp-shim")]
        host_shim, ctr_shim = host_side + shim, ctr_side + shim
        engine = host_side + [str(BIN / "mempalace-mcp"), "--palace", str(root / "engine-palace")]
        await time_start(ctr_shim, ctr_env)  # the container daemon, warm, and every code path once
        await time_start(engine, engine_env)
        runs: dict[str, list[float]] = {"host": [], "ctr_warm": [], "ctr_cold": [], "engine": []}
        for _ in range(args.spawns):
            runs["host"].append(await time_start(host_shim, host_env))
            runs["ctr_warm"].append(await time_start(ctr_shim, ctr_env))
            stop_daemon(ctr_dir)
            runs["ctr_cold"].append(await time_start(ctr_shim, ctr_env))
            runs["engine"].append(await time_start(engine, engine_env))
        record = daemon_record(ctr_dir) or {}
        # per call: two long-lived sessions; their calls alternate one by one (an agent's calls come with work between
        # them: each hop wakes up for each call), then in blocks of 50 (a steady stream: every hop stays hot)
        host_s, ctr_s = await Session.spawn(host_shim, host_env), await Session.spawn(ctr_shim, ctr_env)
        await host_s.start()
        await ctr_s.start()
        await time_calls(host_s, args.warmup)
        await time_calls(ctr_s, args.warmup)
        calls: dict[str, list[float]] = {"host": [], "ctr": [], "host_blocks": [], "ctr_blocks": []}
        cpu: dict[str, dict[str, float]] = {}
        relay_pid = (daemon_record(ctr_dir) or {}).get("pid")
        for pattern, block in (("", 1), ("_blocks", BLOCK)):
            before = cpu_times(relay_pid, server)
            for _ in range(max(1, args.calls // block)):
                calls["host" + pattern] += await time_calls(host_s, block)
                calls["ctr" + pattern] += await time_calls(ctr_s, block)
            after = cpu_times(relay_pid, server)
            cpu["ctr" + pattern] = {k: (after[k] - before[k]) / max(1, len(calls["ctr" + pattern])) for k in before}
        for s in (host_s, ctr_s, first):
            await s.close()
        stop_daemon(ctr_dir)
        broker = state.read_broker_json(host_state / "broker.json") or {}
        if isinstance(broker.get("pid"), int):
            os.kill(broker["pid"], signal.SIGTERM)
        return {"runs": runs, "calls": calls, "load": load, "transport": (record.get("ssh") or {}).get("transport_detail"),
                "loop": record.get("loop", "?"), "cpu": cpu}
    finally:
        server.stop()


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in r["runs"].items()}
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    rows = [("host session (mp-shim → broker)", "host"), ("container session, daemon warm", "ctr_warm"),
            ("container session, daemon cold (first of a container)", "ctr_cold"),
            ("direct engine (`mempalace-mcp` spawned by the agent)", "engine")]
    p50 = {k: pct(v, 50) for k, v in r["calls"].items()}
    p99 = {k: pct(v, 99) for k, v in r["calls"].items()}
    over = (p50["ctr"] - p50["host"]) * 1000
    over_blocks = (p50["ctr_blocks"] - p50["host_blocks"]) * 1000
    cpu = lambda k: (f"the daemon {r['cpu'][k]['relay'] * 1000:.2f} ms, sshd "  # noqa: E731
                     f"{r['cpu'][k]['sshd'] * 1000:.2f} ms")
    warm_ratio, cold_ratio = med["ctr_warm"] / med["host"], med["ctr_cold"] / med["engine"]
    out = [
        "# Container daemon benchmark",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} cores ({cpu_model() or platform.machine()}), Python "
        f"{platform.python_version()}; load average at the start {r['load']} (1/5/15 min).",
        f"`.venv/bin/python benchmarks/bench_container.py --spawns {args.spawns} --calls {args.calls}` (sshd and broker "
        f"on this machine, 127.0.0.1; the pinned mempalace engine; the relay's channel: {r['transport']}, its event loop: "
        f"{r['loop']}).",
        "",
        "## Spawn → first `mempalace_status` result (initialize, initialized, tools/call)",
        "",
        "| session | runs | median ms | min ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        v = r["runs"][key]
        out.append(f"| {label} | {len(v)} | {ms(med[key])} | {ms(min(v))} | {ms(max(v))} |")
    out += [
        "",
        "## Per call: `mempalace_status` through a long-lived session",
        "",
        "| pattern | path | calls | p50 ms | p99 ms | container − host at p50 | CPU per container call (mean) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        f"| alternating | host: mp-shim → broker | {len(r['calls']['host'])} | {ms(p50['host'])} | {ms(p99['host'])} | | |",
        f"| alternating | container: mp-shim → daemon → SSH → broker | {len(r['calls']['ctr'])} | {ms(p50['ctr'])} | "
        f"{ms(p99['ctr'])} | {over:+.2f} ms | {cpu('ctr')} |",
        f"| blocks of {BLOCK} | host | {len(r['calls']['host_blocks'])} | {ms(p50['host_blocks'])} | "
        f"{ms(p99['host_blocks'])} | | |",
        f"| blocks of {BLOCK} | container | {len(r['calls']['ctr_blocks'])} | {ms(p50['ctr_blocks'])} | "
        f"{ms(p99['ctr_blocks'])} | {over_blocks:+.2f} ms | {cpu('ctr_blocks')} |",
        "",
        "Alternating: one call on each path in turn, as an agent's calls come (work between them), so every process on",
        "the path wakes up for each call. Blocks: a steady stream, every hop stays hot. CPU is user + system time",
        "(psutil) of the container daemon and of sshd's per-connection processes, divided by the container calls.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        f"| container session, daemon warm ≤ 2× a host session | {warm_ratio:.2f}× | {'yes' if warm_ratio <= 2 else 'NO'} |",
        f"| first container session (daemon cold) ≤ a direct engine's start | {cold_ratio:.2f}× "
        f"({ms(med['ctr_cold'])} vs {ms(med['engine'])} ms) | {'yes' if cold_ratio <= 1 else 'NO'} |",
        f"| per call, container path ≤ +0.5 ms over the host path at p50 (alternating; blocks of {BLOCK}: "
        f"{over_blocks:+.2f} ms) | {over:+.2f} ms | {'yes' if over <= 0.5 else 'NO'} |",
        "",
        "A cold daemon pays a Python start-up, its imports (asyncssh, the settings model), the SSH connection and",
        "the host's `--ensure` or a fresh broker.json seen through the mount; a warm one only a UNIX connect. Per call,",
        "the container path adds the daemon's byte copy and the SSH channel (encryption, one sshd hop each way).",
        "How low that can go with asyncssh, the SSH the bridge uses in-process, against one relay process with no",
        "SSH and against OpenSSH's C client in the same place: docs/bench-relay-floor.md",
        "(`benchmarks/bench_relay_floor.py`).",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spawns", type=int, default=10)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--relay-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the container daemon's loop")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--drawers", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "docs" / "bench-container.md"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpb-bench-", dir="/tmp") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    text = report(result, args)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
