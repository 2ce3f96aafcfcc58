"""Benchmark: every way an agent reaches the palace, side by side, in ONE run (issue #14 "Harness and report").

Why: the issue's targets compare paths against each other — the bridge against a direct engine (per-call overhead)
and against upstream's hub (cold start, memory, writes under concurrency, long polls). Figures from separate scripts
run at different times on a shared machine cannot be compared honestly, so this runs every path in one process, on
copies of ONE pre-filled palace, with the paths' samples interleaved (a call on each path in turn, blocks of calls
where a figure needs a steady state), and writes one report with the ratios the issue asks for.

The paths, each with its own HOME and its own copy of the palace (the broker holds mempalace's writer lease on its
palace, so nothing else could write beside it; the hub's registry lives in HOME):
  (a) direct     `mempalace-mcp --palace P`, spawned by the client itself (what an agent does without the bridge);
  (b) broker     `mp-shim --palace P` on the host → one warm `mempalace-broker` → its `mempalace-mcp`;
  (c) container  `mp-shim` in the container role (its own mount namespace, `unshare -m`, as benchmarks/
                 bench_container.py) → the container daemon → OpenSSH sshd on 127.0.0.1 → the broker;
                 skipped, with a note, without sshd or without root/unshare;
  (d) hub        upstream's `mempalace serve --palace P --port N` and a plain `mempalace-mcp --palace P` per
                 session, which proxies to it; skipped, with a note, when the engine has no `serve`;
  (e) floor      figure 1 only: the engine behind two processes that only move bytes (benchmarks/floor_relay.py
                 in the shim's and the broker's places), what any two-process design costs at least here.

Figures: (1) per-call latency of status, search and add_drawer through one warm session per path, and the CPU the
processes between client and engine spend per status call (benchmarks/proc_cpu.py); (2) cold start, spawn → first
status / first search (background processes warm; the paths in a balanced order, a short pause before each spawn);
(3) RSS and PSS summed over 1, 4, 8 sessions with every background process of the path; (4) 4 and 8 concurrent
writers × 25 add_drawer: acknowledged, stored (a fresh session's drawer count), wall time, ack latency; (5) a
reader's status latency while 4 writers are busy; (5b) a read sent right behind a pipelined burst of 50 writes,
against one write's time; (6) another session's status latency while one session's `mempalace_event_wait` is
pending, against idle, as a time series.

  .venv/bin/python benchmarks/bench_all.py [--smoke] [--out docs/BENCHMARKS.md] [--plots-dir docs] [sizes…]
  make bench BENCH_ARGS="--calls 100 --spawns 4"

Needs the offline embedding model in .test-home (scripts/setup-tests.sh), psutil, and matplotlib for the plots
(without it the report says so). `--smoke` runs every path and every figure at tiny sizes (tests/
test_benchmarks_smoke.py), so the harness cannot rot; its numbers mean nothing. Every wait is bounded and every
process started here is stopped in `finally`, also when a figure fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest  # only for tests/platforms' skips, which say why the container side cannot run here

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import proc_cpu  # noqa: E402
from benchmarks.bench_coldstart import stop_broker  # noqa: E402
from benchmarks.bench_container import BIN, INIT, MODEL_CACHE, Session, daemon_record, stop_daemon  # noqa: E402
from mp_ssh_bridge import hub, protocol, state  # noqa: E402
from tests.platforms import LINUX, container_argv, cpu_model  # noqa: E402
from tests.sshd import SSHServer, free_port, sshd_available, write_broker_wrapper  # noqa: E402

PATHS = ("direct", "broker", "container", "hub")
LABELS = {
    "direct": "(a) direct",
    "broker": "(b) shim → broker",
    "container": "(c) container daemon",
    "hub": "(d) hub",
    "floor": "(e) floor: two byte relays",
    "wrapper": "(c)'s container stand-in",
}
LONGER = {
    "direct": "`mempalace-mcp --palace P` spawned by the client",
    "broker": "`mp-shim --palace P` → warm broker → its engine",
    "container": "`mp-shim` (container role) → container daemon → sshd (127.0.0.1) → broker → engine",
    "hub": "plain `mempalace-mcp --palace P` proxying to `mempalace serve --palace P` (HTTP)",
    "floor": "figure 1 only: `benchmarks/floor_relay.py` twice, in the shim's and the broker's places (agent stdio ↔ "
             "UNIX socket ↔ the engine's stdio), moving bytes and nothing else: what any design with two processes "
             "between agent and engine costs at least on this machine",
}
TOPICS = ("containers", "latency", "ssh tunnels", "embeddings", "writers", "long polls", "memory", "brokers",
          "hubs", "palaces", "drawers", "search", "agents", "sessions", "locks", "leases")
SMOKE = dict(bursts=1, burst=5, drawers=10, status_calls=5, calls=5, warmup=1, rest_s=0.5, spawns=1, sessions="1,2",
             writers="2", writes=3, block=3, fair_writers=2, fair_calls=5, fair_block=5, fair_timeout=2.0, lp_calls=5,
             lp_block=5, wait_ms=500)
DEFAULTS = dict(bursts=5, burst=50, drawers=200, status_calls=300, calls=100, warmup=10, rest_s=5.0, spawns=10,
                sessions="1,4,8", writers="4,8", writes=25, block=5, fair_writers=4, fair_calls=100, fair_block=25,
                fair_timeout=10.0, lp_calls=100, lp_block=20, wait_ms=2000)
CALL_TIMEOUT = 120.0
SETTLE_S = 0.1  # figure 2: the pause before each spawn, so the one before has finished exiting


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# --------------------------------------------------------------------------- sessions
LIVE: set[Sess] = set()  # every session process not yet closed: killed in `finally`


class Sess(Session):
    """A stdio MCP server process (mp-shim or mempalace-mcp) driven with raw JSON-RPC lines; every read bounded."""

    @classmethod
    async def open(cls, argv: list[str], env: dict[str, str]) -> Sess:
        s = await cls.spawn(argv, env)
        LIVE.add(s)
        try:
            reply = await s.call("initialize", INIT)
            if "result" not in reply:
                raise RuntimeError(f"initialize refused: {reply}")
            await s.send(protocol.notification("notifications/initialized"))
        except BaseException:
            await s.close()
            raise
        return s

    async def call(self, method: str, params: Any = None, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        self.n += 1
        await self.send(protocol.request(self.n, method, params))
        return await self.reply(self.n, timeout)

    async def reply(self, msg_id: int, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError(f"no answer to request {msg_id} in {timeout:g} s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise EOFError(f"the session closed its stdout before answering {msg_id}")
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("id") == msg_id and "method" not in msg:
                return msg

    async def replies(self, ids: list[int], timeout: float = CALL_TIMEOUT) -> dict[int, dict[str, Any]]:
        """The answers to pipelined requests `ids`, in whatever order they come."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        want, got = set(ids), {}
        while want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError(f"{len(want)} of {len(ids)} pipelined requests unanswered in {timeout:g} s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise EOFError("the session closed its stdout before answering every pipelined request")
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("id") in want and "method" not in msg:
                want.discard(msg["id"])
                got[msg["id"]] = msg
        return got

    async def tool(self, name: str, arguments: dict[str, Any] | None = None,
                   timeout: float = CALL_TIMEOUT) -> tuple[bool, Any, float]:
        """(ok, payload or error, seconds) of one tools/call."""
        t = time.perf_counter()
        reply = await self.call("tools/call", {"name": name, "arguments": arguments or {}}, timeout)
        dt = time.perf_counter() - t
        ok, payload = judge(name, reply)
        return ok, payload, dt

    async def close(self) -> None:
        LIVE.discard(self)
        try:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.close()
        except (OSError, RuntimeError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            self.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


def judge(name: str, reply: dict[str, Any]) -> tuple[bool, Any]:
    """Whether a tools/call succeeded the way the benchmark needs (a new drawer for add_drawer), and its payload."""
    if "error" in reply:
        return False, reply["error"]
    result = reply.get("result") or {}
    if result.get("isError"):
        return False, result
    payload: Any = None
    for item in result.get("content") or []:
        try:
            payload = json.loads(item.get("text", ""))
            break
        except (ValueError, TypeError, AttributeError):
            continue
    if not isinstance(payload, dict):
        return False, result
    if "error" in payload and name != "mempalace_event_wait":
        return False, payload
    if name == "mempalace_add_drawer":
        return bool(payload.get("success")) and payload.get("reason") != "already_exists", payload
    if name == "mempalace_status":
        return "total_drawers" in payload, payload
    if name == "mempalace_search":
        return "results" in payload, payload
    return True, payload


async def open_many(lane: Lane, n: int) -> list[Sess]:
    """n sessions on `lane`, started concurrently (all or none)."""
    got = await asyncio.gather(*(Sess.open(lane.argv, lane.env) for _ in range(n)), return_exceptions=True)
    ok = [s for s in got if isinstance(s, Sess)]
    bad = [e for e in got if not isinstance(e, Sess)]
    if bad:
        await close_all(ok)
        raise RuntimeError(f"{lane.label}: {len(bad)} of {n} sessions did not start: {bad[0]!r}")
    return ok


async def close_all(sessions: list[Sess]) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


def add_args(tag: str) -> dict[str, Any]:
    topic = TOPICS[hash(tag) % len(TOPICS)]
    return {"wing": "bench", "room": "writes", "content": f"Benchmark write {tag} about {topic} ({uuid.uuid4().hex})."}


def search_args(i: int) -> dict[str, Any]:
    return {"query": f"notes about {TOPICS[i % len(TOPICS)]}", "limit": 5}


def wait_args(timeout_ms: int) -> dict[str, Any]:
    return {"name": "mempalace_event_wait",
            "arguments": {"stream": "bench", "room": "nobody-writes-here", "timeout_ms": timeout_ms}}


# --------------------------------------------------------------------------- paths
@dataclass
class Lane:
    """One path: how a session is started on it, and which background processes it has."""

    key: str
    home: Path
    palace: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    background: Callable[[], list[int]] = list
    skipped: str = ""  # why this path did not run ("" = it ran)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.key]


def scrubbed_env(home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MP_BRIDGE_", "MEMPALACE"))}
    base.update(HOME=str(home), MP_BRIDGE_CONFIG=str(home / "mp-bridge.toml"), MEMPALACE_MCP_TIMEOUT_MS="60000",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    return base


def make_home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir()
    (home / ".cache").symlink_to(MODEL_CACHE)
    return home


def tree(pid: Any) -> list[int]:
    """`pid` and every descendant of it (psutil), [] when gone."""
    import psutil

    if not isinstance(pid, int):
        return []
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def record_pid(path: Path) -> Any:
    return (state.read_broker_json(path) or {}).get("pid")


def container_prefix(ctr_dir: Path) -> tuple[list[str], str]:
    """The argv prefix that runs a command as a process of one container beside this machine (its own mount
    namespace, `ctr_dir` over this machine's runtime directory: tests/platforms.container_argv), and '' — or [] and
    why the container side cannot be stood in for here (not Linux, not root, no sshd)."""
    try:
        prefix = container_argv([], str(state.runtime_dir()), str(ctr_dir))
    except pytest.skip.Exception as exc:
        return [], str(exc.msg)
    if not sshd_available():
        return [], "OpenSSH sshd is not installed (scripts/install-sshd.sh)"
    return prefix, ""


def has_serve() -> bool:
    try:
        out = subprocess.run([str(BIN / "mempalace"), "serve", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "--port" in out.stdout


class Rig:
    """Everything started for the run, and how to stop it (`stop()`, from `finally`)."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.lanes: dict[str, Lane] = {}
        self.server: SSHServer | None = None
        self.ctr_dir: Path | None = None
        self.ctr_state: Path | None = None
        self.hub_proc: subprocess.Popen[bytes] | None = None
        self.floor: Lane | None = None  # figure 1 only (`start_floor`)
        self.floor_proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, float] = {}  # background pids seen (pid → create time): stopped at the end if alive
        self.loop_note = ""
        self.wrapper: list[str] = []  # (c)'s stand-in for being in a container, which its spawns pay (`fig_cold`)
        self.notes: list[str] = []

    # ---- set-up
    async def fill(self, drawers: int) -> Path:
        """One palace with `drawers` drawers, written by a direct engine in its own HOME; copied to every path."""
        home = make_home(self.root, "fill")
        palace = home / ".mempalace" / "palace"
        s = await Sess.open([str(BIN / "mempalace-mcp"), "--palace", str(palace)], scrubbed_env(home))
        try:
            for i in range(drawers):
                a, b = TOPICS[i % len(TOPICS)], TOPICS[(i * 7 + 3) % len(TOPICS)]
                ok, payload, _ = await s.tool("mempalace_add_drawer", {
                    "wing": f"wing{i % 4}", "room": f"room{i % 8}",
                    "content": f"Drawer {i} on {a} and {b}: benchmark note {i}, filed to give search some work."})
                if not ok:
                    raise RuntimeError(f"pre-fill drawer {i} refused: {payload}")
        finally:
            await s.close()
        return palace

    def lane_home(self, key: str, palace0: Path) -> tuple[Path, Path]:
        home = make_home(self.root, key)
        palace = home / ".mempalace" / "palace"
        shutil.copytree(palace0, palace)
        return home, palace

    def setup(self, palace0: Path) -> None:
        """Every path's HOME and palace copy, before anything of any path starts."""
        self.ctr_dir = self.root / "ctr-runtime"
        ctr_prefix, wrap_reason = container_prefix(self.ctr_dir)
        # Only (c) starts through a wrapper (its own mount namespace, its directory over this machine's runtime
        # directory): an agent in a real container pays none of it, so figure 2 measures it alone and says so.
        plain: list[str] = []
        self.wrapper = ctr_prefix
        for key in PATHS:
            home, palace = self.lane_home(key, palace0)
            lane = Lane(key, home, palace)
            self.lanes[key] = lane
            env = scrubbed_env(home)
            if key == "direct":
                lane.argv, lane.env = plain + [str(BIN / "mempalace-mcp"), "--palace", str(palace)], env
            elif key == "broker":
                lane.env = dict(env, MEMPALACE_PATH=str(home / ".mempalace"), MP_BRIDGE_ROLE="host")
                lane.argv = plain + [str(BIN / "mp-shim"), "--palace", str(palace)]
                record = home / ".mempalace" / "broker.json"
                lane.background = lambda record=record: tree(record_pid(record))
            elif key == "container":
                if wrap_reason:
                    lane.skipped = wrap_reason
                    continue
                self.setup_container(lane, env, ctr_prefix)
            elif key == "hub":
                if not has_serve():
                    lane.skipped = "this engine has no `mempalace serve` (upstream's hub, mempalace ≥ 3.6)"
                    continue
                lane.argv, lane.env = plain + [str(BIN / "mempalace-mcp"), "--palace", str(palace)], env
                lane.background = lambda: tree(self.hub_proc.pid if self.hub_proc and self.hub_proc.poll() is None
                                               else None)
        self.setup_floor(palace0, plain)

    def setup_floor(self, palace0: Path, prefix: list[str]) -> None:
        """(e): the engine behind two byte relays (benchmarks/floor_relay.py), for figure 1; started by `start_floor`."""
        home, palace = self.lane_home("floor", palace0)
        lane = Lane("floor", home, palace)
        lane.env = scrubbed_env(home)
        lane.argv = prefix + [sys.executable, str(REPO / "benchmarks" / "floor_relay.py"), "connect",
                              str(self.root / "floor.sock")]
        lane.background = lambda: tree(self.floor_proc.pid if self.floor_proc else None)
        self.floor = lane

    async def start_floor(self) -> Lane:
        """The broker's place: one connection ↔ a direct engine on the floor's own palace copy."""
        assert self.floor is not None
        sock = self.root / "floor.sock"
        with open(self.root / "floor.log", "wb") as out:
            self.floor_proc = subprocess.Popen(
                [sys.executable, str(REPO / "benchmarks" / "floor_relay.py"), "serve", str(sock), "--",
                 str(BIN / "mempalace-mcp"), "--palace", str(self.floor.palace)],
                env=self.floor.env, stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.floor_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor relay did not start: {(self.root / 'floor.log').read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        return self.floor

    def setup_container(self, lane: Lane, env: dict[str, str], prefix: list[str]) -> None:
        """As benchmarks/bench_container.py: one state directory seen by both sides, with a path too long for a
        socket, so the host broker binds its stand-in in this machine's /tmp/mp-bridge-<uid>, which the container
        side (its own mount namespace, its own directory over that path) cannot see — as across a VM boundary."""
        home = lane.home
        host_state = home / ("state-" + "s" * 110)
        state.ensure_private_dir(host_state)
        state.palace_id(state.StatePaths(host_state))
        self.ctr_state = host_state
        wrapper = write_broker_wrapper(self.root / "remote-broker.sh", home, host_state)
        self.server = SSHServer(self.root / "sshd")
        self.server.start()
        lane.env = dict(env, **self.server.container_env(host_state, wrapper),
                        MP_BRIDGE_UVLOOP=str(self.args.relay_loop == "uvloop"))
        lane.argv = prefix + [str(BIN / "mp-shim")]
        server, ctr_dir = self.server, self.ctr_dir
        assert ctr_dir is not None

        def background() -> list[int]:
            pids = tree((daemon_record(ctr_dir) or {}).get("pid"))  # the container daemon
            if server.proc is not None:  # sshd's per-connection processes (not the listener: the host's own sshd)
                pids += tree(server.proc.pid)[1:]
            return pids + tree(record_pid(host_state / "broker.json"))  # the broker and its engine

        lane.background = background

    async def start_hub(self, lane: Lane) -> None:
        port = free_port()
        with open(self.root / "hub.log", "wb") as out:
            self.hub_proc = subprocess.Popen(
                [str(BIN / "mempalace"), "serve", "--palace", str(lane.palace), "--port", str(port)],
                env=lane.env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while hub.live(str(lane.palace), lane.home) is None:
            if self.hub_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not start: {(self.root / 'hub.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)

    async def warm(self, drawers: int) -> None:
        """Start each path's background processes (the paths at once: they are independent) and check, with one
        session each, that it serves ITS copy of the palace."""

        async def one(lane: Lane) -> None:
            t = time.perf_counter()
            if lane.key == "hub":
                await self.start_hub(lane)
            s = await Sess.open(lane.argv, lane.env)
            try:
                ok, payload, _ = await s.tool("mempalace_status")
                if not ok or payload.get("total_drawers") != drawers:
                    raise RuntimeError(f"{lane.label}: status {payload} (expected {drawers} drawers)")
                ok, payload, _ = await s.tool("mempalace_search", search_args(0))
                if not ok:
                    raise RuntimeError(f"{lane.label}: search refused: {payload}")
            finally:
                await s.close()
            log(f"{lane.label}: ready in {time.perf_counter() - t:.1f} s ({drawers} drawers)")

        done = await asyncio.gather(*(one(lane) for lane in self.running()), return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        if "container" in self.lanes and not self.lanes["container"].skipped and self.ctr_dir is not None:
            record = daemon_record(self.ctr_dir) or {}
            self.loop_note = f"daemon event loop {record.get('loop', '?')}, " \
                             f"channel {(record.get('ssh') or {}).get('transport_detail', '?')}"

    def running(self) -> list[Lane]:
        return [lane for key in PATHS if (lane := self.lanes.get(key)) is not None and not lane.skipped]

    def path_cpu(self, lane: Lane, session: Sess) -> dict[str, Any]:
        """CPU seconds so far of each process of the path, split: the hops between the client and the engine,
        and the engine (the process that runs the tools, with its children)."""
        mine = tree(session.proc.pid)
        if lane.key == "direct":
            hops, engine = [], mine
        elif lane.key == "hub":
            hops, engine = mine, self.bg_pids(lane)  # the hub's own routing runs inside the engine's process
        else:  # the broker (or the floor's second relay) runs the engine as its child
            top = {"broker": lambda: record_pid(lane.home / ".mempalace" / "broker.json"),
                   "container": lambda: record_pid(self.ctr_state / "broker.json") if self.ctr_state else None,
                   "floor": lambda: self.floor_proc.pid if self.floor_proc else None}[lane.key]()
            engine = tree(top)[1:]
            hops = [p for p in mine + self.bg_pids(lane) if p not in engine]
        times, coarse = proc_cpu.cpu_seconds(hops + engine)
        return {"hops": {pid: times[pid] for pid in hops if pid in times},
                "engine": sum(times[pid] for pid in engine if pid in times), "coarse": coarse}

    def bg_pids(self, lane: Lane) -> list[int]:
        import psutil

        pids = lane.background()
        for pid in pids:
            try:
                self.seen.setdefault(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                continue
        return pids

    # ---- tear-down
    async def stop(self) -> None:
        for s in list(LIVE):
            s.kill()
        for s in list(LIVE):
            try:
                await asyncio.wait_for(s.proc.wait(), 10)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass
            LIVE.discard(s)
        broker = self.lanes.get("broker")
        steps: list[tuple[str, Callable[[], Any]]] = []
        if broker is not None:
            steps.append(("broker (b)", lambda: stop_broker(broker.home / ".mempalace")))
        if self.ctr_dir is not None:
            ctr_dir = self.ctr_dir
            steps.append(("container daemon", lambda: stop_daemon(ctr_dir)))
        if self.ctr_state is not None:
            ctr_state = self.ctr_state
            steps.append(("broker (c)", lambda: stop_broker(ctr_state)))
        if self.hub_proc is not None:
            steps.append(("hub", self.stop_hub))
        if self.floor_proc is not None:
            floor_proc = self.floor_proc
            steps.append(("floor relay", lambda: floor_proc.poll() is None and floor_proc.terminate()))
        if self.server is not None:
            steps.append(("sshd", self.server.stop))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # one failed stop must not keep the others from running
                log(f"stopping the {name}: {exc!r}")
        self.stop_seen()

    def stop_hub(self) -> None:
        assert self.hub_proc is not None
        if self.hub_proc.poll() is None:
            self.hub_proc.terminate()
            try:
                self.hub_proc.wait(15)
            except subprocess.TimeoutExpired:
                self.hub_proc.kill()
                self.hub_proc.wait(10)

    def stop_seen(self) -> None:
        """Background processes of ours (seen above: same pid, same start time) that outlived their stop."""
        import psutil

        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    p.terminate()
                    left.append(p)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(left, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        if left:
            log(f"stopped {len(left)} leftover background process(es): {[p.pid for p in left]}")


# --------------------------------------------------------------------------- statistics
def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def fmt_ms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    v = seconds * 1000
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def ratio(a: float, b: float) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return "–"
    return f"{a / b:.2f}×"


def balanced_order(n: int, k: int) -> list[int]:
    """Round `k`'s order of `n` paths, a row of a Williams design: over n rounds (2n when n is odd) each path
    comes right after each other path equally often, so none always follows the same neighbour."""
    base = [0]
    lo, hi = 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    row = [(x + k) % n for x in base]
    return row[::-1] if n % 2 and (k // n) % 2 else row


def blocks(total: int, size: int) -> list[int]:
    size = max(1, size)
    return [min(size, total - i) for i in range(0, total, size)]


def by_role(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds each hop role spent between two `Rig.path_cpu` samples (processes alive at both)."""
    roles: dict[str, float] = {}
    for pid, t in after["hops"].items():
        if pid in before["hops"]:
            name = proc_cpu.role(pid)
            roles[name] = roles.get(name, 0.0) + t - before["hops"][pid]
    return roles


def cpu_per_call(before: dict[str, Any], after: dict[str, Any], calls: int, wall: float,
                 rest: dict[str, float]) -> dict[str, Any]:
    """CPU seconds per call between two `Rig.path_cpu` samples `wall` seconds apart, each hop role's net of what
    it spends at rest (`rest`: CPU seconds per second with no call on any path, e.g. the broker's timers)."""
    n = max(1, calls)
    spent = by_role(before, after)
    roles = {name: (t - rest.get(name, 0.0) * wall) / n for name, t in spent.items()}
    return {"roles": roles, "hops": sum(roles.values()), "raw": sum(spent.values()) / n,
            "engine": (after["engine"] - before["engine"]) / n, "rest": sum(rest.values()),
            "coarse": before["coarse"] or after["coarse"], "calls": calls}


# --------------------------------------------------------------------------- figures
async def fig_latency(rig: Rig) -> dict[str, Any]:
    """(1) one warm session per path; each call type in turn, one call on each path in turn."""
    a = rig.args
    lanes = rig.running() + [await rig.start_floor()]
    sessions: dict[str, Sess] = {}
    samples: dict[str, dict[str, list[float]]] = {lane.key: {"status": [], "search": [], "add": []} for lane in lanes}
    errors: dict[str, dict[str, list[str]]] = {lane.key: {"status": [], "search": [], "add": []} for lane in lanes}
    try:
        for lane in lanes:
            sessions[lane.key] = await Sess.open(lane.argv, lane.env)
        rig.bg_pids(lanes[-1])  # the floor's relay and engine: stopped at the end whatever happens
        kinds = (("status", a.status_calls), ("search", a.calls), ("add", a.calls))
        cpu: dict[str, Any] = {}
        rest: dict[str, dict[str, float]] = {}
        work: dict[str, Any] = {}
        t_cpu = time.perf_counter()
        for kind, n in kinds:
            for i in range(-a.warmup, n):
                if kind == "status" and i == 0:  # what the hops spend with no call at all, then the calls' own
                    at_rest = {lane.key: rig.path_cpu(lane, sessions[lane.key]) for lane in lanes}
                    t_rest = time.perf_counter()
                    await asyncio.sleep(a.rest_s)
                    rested = {lane.key: rig.path_cpu(lane, sessions[lane.key]) for lane in lanes}
                    span = time.perf_counter() - t_rest
                    rest = {lane.key: {name: t / span for name, t in by_role(at_rest[lane.key], rested[lane.key]).items()}
                            for lane in lanes}
                    cpu = {lane.key: rig.path_cpu(lane, sessions[lane.key]) for lane in lanes}
                    t_cpu = time.perf_counter()
                for lane in lanes:
                    s = sessions[lane.key]
                    if kind == "status":
                        ok, payload, dt = await s.tool("mempalace_status")
                    elif kind == "search":
                        ok, payload, dt = await s.tool("mempalace_search", search_args(i))
                    else:
                        ok, payload, dt = await s.tool("mempalace_add_drawer", add_args(f"lat-{lane.key}-{i}"))
                    if i < 0:
                        continue
                    if ok:
                        samples[lane.key][kind].append(dt)
                    else:
                        errors[lane.key][kind].append(str(payload)[:200])
            if kind == "status" and n > 0:
                wall = time.perf_counter() - t_cpu
                work = {lane.key: cpu_per_call(cpu[lane.key], rig.path_cpu(lane, sessions[lane.key]), n, wall,
                                               rest[lane.key]) for lane in lanes}
        return {"samples": samples, "errors": errors, "cpu": work}
    finally:
        await close_all(list(sessions.values()))


async def fig_cold(rig: Rig) -> dict[str, dict[str, list[float]]]:
    """(2) spawn → first status result, and spawn → first search result; one spawn on each path in turn. (c)'s
    spawns go through its container stand-in (`unshare`, a bind mount): that wrapper's own spawn → exit is timed
    beside them (key "wrapper"), as what (c) pays and an agent in a real container does not."""
    lanes = rig.running()
    out: dict[str, dict[str, list[float]]] = {lane.key: {"status": [], "search": []} for lane in lanes}
    if rig.wrapper and "container" in out:
        out["wrapper"] = {"status": [], "search": []}
    for k in range(rig.args.spawns):
        # What ran just before matters: a spawn right after the direct engine's (300 MB freed as it exits) was
        # ~2 ms slower here. So each path follows each other path equally often (`balanced_order`), and every
        # spawn starts after a short pause.
        turn = [lanes[i] for i in balanced_order(len(lanes), k)]
        for kind in ("status", "search"):
            if "wrapper" in out:
                t = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(*rig.wrapper, "true", stdin=asyncio.subprocess.DEVNULL,
                                                            stdout=asyncio.subprocess.DEVNULL)
                await asyncio.wait_for(proc.wait(), 30)
                out["wrapper"][kind].append(time.perf_counter() - t)
            for lane in turn:
                await asyncio.sleep(SETTLE_S)
                t = time.perf_counter()
                s = await Sess.open(lane.argv, lane.env)
                try:
                    if kind == "status":
                        ok, payload, _ = await s.tool("mempalace_status")
                    else:
                        ok, payload, _ = await s.tool("mempalace_search", search_args(k))
                    took = time.perf_counter() - t
                finally:
                    await s.close()
                if not ok:
                    raise RuntimeError(f"{lane.label}: cold {kind} failed: {payload}")
                out[lane.key][kind].append(took)
    return out


def measure_memory(pids: list[int]) -> dict[str, Any]:
    import psutil

    rss = pss = 0
    n = 0
    have_pss = True
    for pid in sorted(set(pids)):
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if LINUX:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
            else:
                rss += p.memory_info().rss
                have_pss = False
            n += 1
        except psutil.Error:
            continue
    return {"processes": n, "rss": rss, "pss": pss if have_pss else None}


async def use(s: Sess, label: str) -> None:
    """A status and a search, as a session's first calls usually are (the search loads the embedding model)."""
    for name, arguments in (("mempalace_status", {}), ("mempalace_search", search_args(1))):
        ok, payload, _ = await s.tool(name, arguments)
        if not ok:
            raise RuntimeError(f"{label}: {name} failed: {payload}")


async def fig_memory(rig: Rig) -> dict[str, dict[int, dict[str, Any]]]:
    """(3) n sessions per path, each after a status and a search (the embedding model loaded where it loads);
    RSS and PSS summed over the sessions' process trees and every background process of the path."""
    out: dict[str, dict[int, dict[str, Any]]] = {lane.key: {} for lane in rig.running()}
    for n in rig.args.session_sizes:
        for lane in rig.running():
            sessions = await open_many(lane, n)
            try:
                await asyncio.gather(*(use(s, lane.label) for s in sessions))
                await asyncio.sleep(0.5)
                pids = [p for s in sessions for p in tree(s.proc.pid)] + rig.bg_pids(lane)
                out[lane.key][n] = measure_memory(pids)
            finally:
                await close_all(sessions)
            m = out[lane.key][n]
            log(f"  memory {lane.label} × {n}: {m['processes']} processes, RSS {m['rss'] / 2**20:.0f} MB"
                + (f", PSS {m['pss'] / 2**20:.0f} MB" if m["pss"] is not None else ""))
    return out


async def fresh_count(lane: Lane) -> int | None:
    """The drawer count through a fresh session on the path (a read after the fact)."""
    s = await Sess.open(lane.argv, lane.env)
    try:
        ok, payload, _ = await s.tool("mempalace_status")
    finally:
        await s.close()
    return int(payload["total_drawers"]) if ok else None


@dataclass
class Writes:
    acked: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def add(self, ok: bool, payload: Any, dt: float) -> None:
        if ok:
            self.acked += 1
            self.latencies.append(dt)
            return
        self.errors += 1
        text = payload.get("message") or payload.get("error") if isinstance(payload, dict) else None
        key = str(text or payload)[:90]
        self.kinds[key] = self.kinds.get(key, 0) + 1


async def write_loop(s: Sess, w: Writes, tag: str, count: int | None, stop: asyncio.Event | None = None) -> None:
    i = 0
    while (count is None or i < count) and not (stop is not None and stop.is_set()):
        try:
            ok, payload, dt = await s.tool("mempalace_add_drawer", add_args(f"{tag}-{i}-{uuid.uuid4().hex[:8]}"))
        except (asyncio.TimeoutError, EOFError, OSError) as exc:
            ok, payload, dt = False, {"error": repr(exc)}, 0.0
        w.add(ok, payload, dt)
        if not ok:
            await asyncio.sleep(0.05)  # a refused writer does not spin (an agent would not retry at once either)
        i += 1


async def fig_writers(rig: Rig) -> dict[str, dict[int, dict[str, Any]]]:
    """(4) n sessions per path, each `writes` add_drawer in a row; the paths take turns in blocks (each block: all
    n writers of one path at once), so every path's writers see the same machine and only their own load."""
    a = rig.args
    out: dict[str, dict[int, dict[str, Any]]] = {lane.key: {} for lane in rig.running()}
    for n in a.writer_sizes:
        lanes = rig.running()
        before = {lane.key: await fresh_count(lane) for lane in lanes}
        sessions: dict[str, list[Sess]] = {}
        stats = {lane.key: [Writes() for _ in range(n)] for lane in lanes}
        wall = {lane.key: 0.0 for lane in lanes}
        try:
            for lane in lanes:
                sessions[lane.key] = await open_many(lane, n)
            for b, size in enumerate(blocks(a.writes, a.block)):
                for lane in lanes:
                    t = time.perf_counter()
                    await asyncio.gather(*(write_loop(s, stats[lane.key][j], f"w{n}-{lane.key}-{j}-{b}", size)
                                           for j, s in enumerate(sessions[lane.key])))
                    wall[lane.key] += time.perf_counter() - t
        finally:
            await close_all([s for ss in sessions.values() for s in ss])
        for lane in lanes:
            after = await fresh_count(lane)
            ws = stats[lane.key]
            kinds: dict[str, int] = {}
            for w in ws:
                for k, v in w.kinds.items():
                    kinds[k] = kinds.get(k, 0) + v
            stored = after - before[lane.key] if after is not None and before[lane.key] is not None else None
            out[lane.key][n] = {"sent": n * a.writes, "acked": sum(w.acked for w in ws),
                                "errors": sum(w.errors for w in ws), "stored": stored, "wall": wall[lane.key],
                                "lat": [x for w in ws for x in w.latencies], "kinds": kinds,
                                "acked_by": sorted((w.acked for w in ws), reverse=True)}
            r = out[lane.key][n]
            log(f"  writers {lane.label} {n}×{a.writes}: {r['acked']} acknowledged, {r['stored']} stored, "
                f"{r['errors']} errors, {r['wall']:.2f} s, ack p50 {fmt_ms(pct(r['lat'], 50))} ms "
                f"p99 {fmt_ms(pct(r['lat'], 99))} ms")
    return out


async def fig_fairness(rig: Rig) -> dict[str, dict[str, Any]]:
    """(5) `fair_writers` writer sessions busy (add_drawer in a loop) while a separate reader times status; the
    paths take turns in blocks of `fair_block` reader calls (writers run only during their path's block). A reader
    call with no answer in `fair_timeout` seconds counts as that long (a lower bound) and ends the block: the writers
    stop, and its late answer is skipped."""
    a = rig.args
    lanes = rig.running()
    writers: dict[str, list[Sess]] = {}
    readers: dict[str, Sess] = {}
    out = {lane.key: {"lat": [], "writes": Writes(), "busy": 0.0, "starved": 0} for lane in lanes}
    try:
        for lane in lanes:
            writers[lane.key] = await open_many(lane, a.fair_writers)
            readers[lane.key] = await Sess.open(lane.argv, lane.env)
        for b, size in enumerate(blocks(a.fair_calls, a.fair_block)):
            for lane in lanes:
                stop = asyncio.Event()
                w: Writes = out[lane.key]["writes"]
                t = time.perf_counter()
                tasks = [asyncio.create_task(write_loop(s, w, f"fair-{lane.key}-{j}-{b}", None, stop))
                         for j, s in enumerate(writers[lane.key])]
                try:
                    await asyncio.sleep(0.05)  # the writers' first calls are in
                    for _ in range(size):
                        try:
                            ok, payload, dt = await readers[lane.key].tool("mempalace_status", None, a.fair_timeout)
                        except asyncio.TimeoutError:
                            out[lane.key]["starved"] += 1
                            out[lane.key]["lat"].append(float(a.fair_timeout))
                            log(f"  {lane.label}: the reader got no answer in {a.fair_timeout:g} s while the writers "
                                "were busy")
                            break
                        if not ok:
                            raise RuntimeError(f"{lane.label}: reader's status failed: {payload}")
                        out[lane.key]["lat"].append(dt)
                finally:
                    stop.set()
                    done, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT)
                    for task in pending:
                        task.cancel()
                    for task in done:
                        failed = task.exception()
                        if failed is not None:
                            raise failed
                out[lane.key]["busy"] += time.perf_counter() - t
    finally:
        await close_all([s for ss in writers.values() for s in ss] + list(readers.values()))
    return out


async def fig_burst(rig: Rig) -> dict[str, dict[str, Any]]:
    """(5b) one session pipelines `burst` add_drawer calls (all sent at once); another session's status is sent right
    behind them. Its latency, against one write's time (that path's add_drawer p50 in figure 1), says whether a read
    waits for a turn or for the whole burst. `bursts` times, the paths in turn. n/a for (a): there a second session
    is a second engine."""
    a = rig.args
    lanes = [lane for lane in rig.running() if lane.key != "direct"]
    out = {lane.key: {"read": [], "wall": [], "sent": 0, "acked": 0} for lane in lanes}
    sessions: dict[str, tuple[Sess, Sess]] = {}
    try:
        for lane in lanes:
            sessions[lane.key] = (await Sess.open(lane.argv, lane.env), await Sess.open(lane.argv, lane.env))
        for b in range(a.bursts):
            for lane in lanes:
                writer, reader = sessions[lane.key]
                ids = []
                t = time.perf_counter()
                for i in range(a.burst):
                    writer.n += 1
                    ids.append(writer.n)
                    await writer.send(protocol.request(writer.n, "tools/call", {
                        "name": "mempalace_add_drawer", "arguments": add_args(f"burst-{lane.key}-{b}-{i}")}))
                ok, payload, dt = await reader.tool("mempalace_status")
                if not ok:
                    raise RuntimeError(f"{lane.label}: the read behind the burst failed: {payload}")
                got = await writer.replies(ids)
                out[lane.key]["wall"].append(time.perf_counter() - t)
                out[lane.key]["read"].append(dt)
                out[lane.key]["sent"] += len(ids)
                out[lane.key]["acked"] += sum(judge("mempalace_add_drawer", reply)[0] for reply in got.values())
    finally:
        await close_all([s for pair in sessions.values() for s in pair])
    return out


async def fig_longpoll(rig: Rig) -> dict[str, Any]:
    """(6) session A parks a `mempalace_event_wait` (a filter nothing matches, `wait_ms`); session B's status is
    timed in blocks, idle and with A's wait pending, alternately, the paths in turn. The pending block ends when
    the wait's answer (its timeout) arrives; the next idle block starts only after it arrived. The time series'
    clock is per path: it runs only during that path's turns (the other paths' turns are cut out)."""
    a = rig.args
    lanes = [lane for lane in rig.running() if lane.key != "direct"]
    pairs: dict[str, tuple[Sess, Sess]] = {}
    samples = {lane.key: {"idle": [], "pending": []} for lane in lanes}
    series: list[tuple[str, float, str, float]] = []  # (path, t on the path's clock, condition, seconds)
    cut = {lane.key: 0 for lane in lanes}  # pending blocks the wait's own answer cut short
    clock = {lane.key: 0.0 for lane in lanes}
    try:
        for lane in lanes:
            pairs[lane.key] = (await Sess.open(lane.argv, lane.env), await Sess.open(lane.argv, lane.env))
        for lane in lanes:  # warm: B's first calls
            for _ in range(max(1, a.warmup)):
                await pairs[lane.key][1].tool("mempalace_status")
        for size in blocks(a.lp_calls, a.lp_block):
            for lane in lanes:
                waiter, b = pairs[lane.key]
                turn = time.perf_counter()

                async def timed(condition: str, lane: Lane = lane, b: Sess = b, turn: float = turn) -> None:
                    ok, payload, dt = await b.tool("mempalace_status")
                    if not ok:
                        raise RuntimeError(f"{lane.label}: status failed: {payload}")
                    samples[lane.key]["pending" if condition == "wait pending" else "idle"].append(dt)
                    series.append((lane.key, clock[lane.key] + time.perf_counter() - turn, condition, dt))

                for _ in range(size):
                    await timed("idle")
                waiter.n += 1
                wid = waiter.n
                await waiter.send(protocol.request(wid, "tools/call", wait_args(a.wait_ms)))
                answer = asyncio.create_task(waiter.reply(wid, a.wait_ms / 1000 + 60))
                try:
                    await asyncio.sleep(0.05)  # its first look is taken: it is pending from here on
                    for _ in range(size):
                        if answer.done():
                            cut[lane.key] += 1
                            break
                        await timed("wait pending")
                    reply = await answer
                finally:
                    answer.cancel()
                if "result" not in reply:
                    lane.notes.append(f"event_wait answered {str(reply)[:160]}")
                clock[lane.key] += time.perf_counter() - turn
        return {"samples": samples, "series": series, "cut": cut}
    finally:
        await close_all([s for pair in pairs.values() for s in pair])


# --------------------------------------------------------------------------- report
def machine() -> dict[str, str]:
    try:
        engine = importlib.metadata.version("mempalace")
    except importlib.metadata.PackageNotFoundError:
        engine = "?"
    ssh_v = ""
    if shutil.which("ssh"):
        ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "mempalace": engine, "ssh": ssh_v,
            "load": " / ".join(f"{x:.2f}" for x in os.getloadavg())}


def plot(r: dict[str, Any], plots_dir: Path) -> tuple[list[Path], str]:
    """The PNGs, or why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed here (`pip install 'matplotlib>=3.8,<4'`): no plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    colors = {"direct": "tab:gray", "broker": "tab:blue", "container": "tab:green", "hub": "tab:red",
              "floor": "tab:purple"}
    written = []
    lat = r["latency"]["samples"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (kind, title) in zip(axes, (("status", "mempalace_status"), ("search", "mempalace_search"),
                                        ("add", "mempalace_add_drawer")), strict=True):
        for key, per in lat.items():
            xs = sorted(v * 1000 for v in per[kind])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=LABELS[key],
                        color=colors[key], linestyle=":" if key == "floor" else "-")
        ax.set_xlim(left=0)
        ax.set_title(f"{title} (warm session)")
        ax.set_xlabel("latency, ms")
        ax.set_ylabel("fraction of calls ≤ x")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Per-call latency, CDF per path (one run, calls interleaved)")
    fig.tight_layout()
    path = plots_dir / "bench-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    lp = r["longpoll"]
    keys = list(lp["samples"])
    fig, axes = plt.subplots(max(1, len(keys)), 1, figsize=(11, 2.6 * max(1, len(keys))), squeeze=False)
    for ax, key in zip(axes[:, 0], keys or [None], strict=False):
        if key is None:
            ax.text(0.5, 0.5, "no path with long polls ran", ha="center")
            continue
        for cond, marker, color in (("idle", "o", "tab:blue"), ("wait pending", "x", "tab:red")):
            pts = [(t, v * 1000) for k, t, c, v in lp["series"] if k == key and c == cond]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, marker=marker, color=color, label=cond)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{LABELS[key]}: another session's mempalace_status", fontsize=10)
        ax.set_ylabel("status, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("time on this path's clock, s (it runs only during the path's turns)")
    fig.tight_layout()
    path = plots_dir / "bench-longpoll.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written, ""


def cpu_table(cpu: dict[str, Any], lanes: list[Lane]) -> list[str]:
    """Figure 1's CPU per status call: what the processes between the client and the engine spend, by role."""
    if not cpu:
        return []
    floor = cpu.get("floor", {}).get("hops")
    lines = ["CPU per `mempalace_status` call, over the same calls (`benchmarks/proc_cpu.py`: the scheduler's run "
             "time of every thread, not wall time; the client's own CPU is not counted). Hops are the processes "
             "between the client and the engine; (d)'s hub routes inside its engine's process, so only its proxy "
             "is a hop. What the hops spend at rest (no call on any path, measured just before; the broker's "
             "ownership watch and heartbeat, sshd's and the daemon's keepalives) is taken out of the calls' "
             "figures. On a VM a thread woken from idle is charged for its wake-up too, the more the longer it slept, "
             "so each figure includes its processes' wake-ups.", "",
             "| path | calls | hops µs per call | by process, µs | engine µs per call | hops − (e) µs "
             "| hops at rest, ms CPU per s | hops µs per call, rest included |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    coarse = False
    for lane in lanes:
        w = cpu.get(lane.key)
        if not w:
            continue
        coarse = coarse or w["coarse"]
        split = ", ".join(f"{name} {v * 1e6:.0f}" for name, v in sorted(w["roles"].items())) or "–"
        vs = f"{(w['hops'] - floor) * 1e6:+.0f}" if floor is not None and lane.key not in ("floor", "direct") else "–"
        lines.append(f"| {lane.label} | {w['calls']} | {w['hops'] * 1e6:.0f} | {split} | {w['engine'] * 1e6:.0f} "
                     f"| {vs} | {w['rest'] * 1e3:.1f} | {w['raw'] * 1e6:.0f} |")
    lines.append("")
    if coarse:
        lines += ["- Some figures are psutil's user + system time, in ticks of 10 ms: coarse over this few calls.", ""]
    return lines


def report(r: dict[str, Any], rig: Rig, plots: list[Path], plot_note: str, out: Path) -> str:
    a = rig.args
    m = r["machine"]
    lanes = [rig.lanes[k] for k in PATHS]
    ran = {lane.key for lane in rig.running()}

    def skip_row(lane: Lane, cols: int, why: str | None = None) -> str:
        return f"| {lane.label} | " + " | ".join([f"skipped: {why or lane.skipped}"] + ["–"] * (cols - 2)) + " |"

    def not_run(lane: Lane, cols: int, direct_why: str) -> str | None:
        """The row of a path a figure between sessions has none for ((a): `direct_why`) or that did not run."""
        if lane.key == "direct":
            return skip_row(lane, cols, f"n/a — on a direct engine {direct_why}")
        return skip_row(lane, cols) if lane.key not in ran else None

    lines = [
        "# Benchmarks: every path in one run",
        "",
        "All figures below come from ONE run of `benchmarks/bench_all.py`, with the paths' samples interleaved (a call",
        "on each path in turn, or blocks of calls in turn where a figure needs a steady state), each path on its own",
        f"copy of one palace pre-filled with {a.drawers} drawers, in its own HOME. Ratios are this run's own.",
        "",
        "## Machine and command",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m['os']}; Python {m['python']}; mempalace {m['mempalace']}"
        + (f"; {m['ssh']}" if m["ssh"] else ""),
        f"- load average (1/5/15 min): {m['load']} at the start, {r['load_end']} at the end; run took "
        f"{r['duration']:.0f} s ({r['when']} UTC)",
        f"- command: `{r['command']}`",
        f"- sizes: {a.drawers} drawers; calls {a.status_calls} status / {a.calls} search / {a.calls} add_drawer "
        f"(+{a.warmup} warm-up each); {a.spawns} spawns per kind; sessions {a.sessions}; writers {a.writers} × "
        f"{a.writes}; fairness {a.fair_writers} writers, {a.fair_calls} reader calls; long poll {a.lp_calls} calls "
        f"per condition in blocks of {a.lp_block}, waits of {a.wait_ms} ms" + (" (`--smoke`: numbers mean nothing)"
                                                                                if a.smoke else ""),
        "",
        "| path | what it is |",
        "| --- | --- |",
    ]
    floor = [rig.floor] if rig.floor is not None and "floor" in r["latency"]["samples"] else []
    for lane in lanes + floor:
        lines.append(f"| {lane.label} | {LONGER[lane.key]}" + (f" — **skipped: {lane.skipped}**" if lane.skipped
                                                                 else "") + " |")
    lines += [
        "",
        "Sessions are spawned as an agent spawns them; (c)'s through its stand-in for a container (`unshare -m`, "
        "its own directory bound over this machine's runtime directory, as benchmarks/bench_container.py): figure 2 "
        "times that wrapper alone, which an agent in a real container does not pay."
        + (f" The container daemon: {rig.loop_note}." if rig.loop_note else ""),
        "",
    ]
    # (1)
    lat = r["latency"]
    lines += ["## 1. Per-call latency (one warm session per path)", "",
              "Each call type in turn; within it one call on each path in turn. `add_drawer` files new content each "
              "time.", ""]
    for kind, title in (("status", "`mempalace_status`"), ("search", "`mempalace_search`"),
                        ("add", "`mempalace_add_drawer`")):
        lines += [f"{title}:", "", "| path | calls | errors | p50 ms | p99 ms | p50 vs (a) | p99 vs (a) | "
                  "p50 − (a) ms | p99 − (a) ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base = lat["samples"].get("direct", {}).get(kind, [])
        b50, b99 = pct(base, 50), pct(base, 99)
        for lane in lanes + floor:
            if lane.key not in ran and lane.key != "floor":
                lines.append(skip_row(lane, 9))
                continue
            v = lat["samples"][lane.key][kind]
            e = lat["errors"][lane.key][kind]
            p50, p99 = pct(v, 50), pct(v, 99)
            lines.append(f"| {lane.label} | {len(v)} | {len(e)} | {fmt_ms(p50)} | {fmt_ms(p99)} | {ratio(p50, b50)} "
                         f"| {ratio(p99, b99)} | {(p50 - b50) * 1000:+.2f} | {(p99 - b99) * 1000:+.2f} |")
        lines.append("")
        errs = {lane.key: lat["errors"][lane.key][kind] for lane in lanes + floor if lane.key in lat["errors"] and
                lat["errors"][lane.key][kind]}
        for key, e in errs.items():
            lines.append(f"- {LABELS[key]}: first error: `{e[0][:160]}`")
        if errs:
            lines.append("")
    lines += cpu_table(lat.get("cpu") or {}, [lane for lane in lanes + floor if lane.key in ran or lane.key == "floor"])
    # (2)
    cold = r["cold"]
    lines += ["## 2. Cold start: spawn → first result", "",
              "Background processes warm: the broker for (b), the daemon and the broker for (c), the hub for (d). "
              "Each spawn runs initialize, notifications/initialized and ONE tools/call; the time is from spawn to "
              "that call's result. Spawns alternate between the paths, in an order that changes each round so "
              "that each path comes right after each other path equally often (the direct engine's exit slows "
              "whatever comes next), with a 0.1 s pause before each.", "",
              "| path | spawns | → status median ms | min | max | vs (a) | vs (d) | → search median ms | min | max "
              "| vs (a) | vs (d) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    med = {k: {kind: statistics.median(v[kind]) if v[kind] else math.nan for kind in v} for k, v in cold.items()}
    for lane in lanes:
        if lane.key not in ran:
            lines.append(skip_row(lane, 12))
            continue
        cells = [lane.label, str(len(cold[lane.key]["status"]))]
        for kind in ("status", "search"):
            v = cold[lane.key][kind]
            cells += [fmt_ms(med[lane.key][kind]), fmt_ms(min(v)), fmt_ms(max(v)),
                      ratio(med[lane.key][kind], med.get("direct", {}).get(kind, math.nan)),
                      ratio(med[lane.key][kind], med.get("hub", {}).get(kind, math.nan))]
        lines.append("| " + " | ".join(cells) + " |")
    if "wrapper" in cold:
        w = cold["wrapper"]
        lines.append(f"| (c)'s container stand-in alone (`unshare -m`, bind mount, `true`) | {len(w['status'])} | "
                     f"{fmt_ms(med['wrapper']['status'])} | {fmt_ms(min(w['status']))} | {fmt_ms(max(w['status']))} "
                     f"| – | – | {fmt_ms(med['wrapper']['search'])} | {fmt_ms(min(w['search']))} | "
                     f"{fmt_ms(max(w['search']))} | – | – |")
    lines.append("")
    # (3)
    mem = r["memory"]
    have_pss = LINUX
    lines += ["## 3. Memory: sessions plus every background process of the path", "",
              "After a status and a search on every session. Summed over the sessions' process trees and the path's "
              "background processes: (a) the engines only; (b) the broker and its engine; (c) the container daemon, "
              "sshd's per-connection processes (not the listener) and the broker with its engine; (d) the hub and "
              "its proxies. "
              + ("PSS (psutil `memory_full_info().pss`) shares each page among the processes that map it, so it "
                 "adds up; RSS counts shared pages once per process." if have_pss
                 else "RSS only: PSS is not available on this OS (RSS counts shared pages once per process)."), "",
              "| path | sessions | processes | RSS MB | PSS MB | PSS vs (a) | PSS vs (d) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    key_mem = "pss" if have_pss else "rss"
    for n in a.session_sizes:
        for lane in lanes:
            if lane.key not in ran:
                lines.append(skip_row(lane, 7))
                continue
            x = mem[lane.key].get(n)
            if x is None:
                continue
            base = (mem.get("direct", {}).get(n) or {}).get(key_mem)
            hubv = (mem.get("hub", {}).get(n) or {}).get(key_mem)
            mine = x[key_mem]
            pss = f"{x['pss'] / 2**20:.0f}" if x["pss"] is not None else "n/a"
            lines.append(f"| {lane.label} | {n} | {x['processes']} | {x['rss'] / 2**20:.0f} | {pss} | "
                         f"{ratio(mine, base or math.nan)} | {ratio(mine, hubv or math.nan)} |")
    lines.append("")
    # (4)
    wr = r["writers"]
    lines += ["## 4. Concurrent writers", "",
              f"n sessions × {a.writes} `mempalace_add_drawer` each (new content every time), in blocks of {a.block} "
              "per session with the paths taking turns (one path's writers at a time). Stored: the drawer count "
              "through a fresh session afterwards minus the count before. An error counts as not acknowledged. "
              "For (a) the n sessions are n separate engines on one palace.", "",
              "| path | writers × writes | acknowledged | stored | errors | wall s | ack p50 ms | ack p99 ms | "
              "p99 vs (a) | p99 vs (d) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in a.writer_sizes:
        for lane in lanes:
            if lane.key not in ran:
                lines.append(skip_row(lane, 10))
                continue
            x = wr[lane.key][n]
            p99 = pct(x["lat"], 99)
            dp99 = pct(wr.get("direct", {}).get(n, {}).get("lat", []), 99)
            hp99 = pct(wr.get("hub", {}).get(n, {}).get("lat", []), 99)
            lines.append(f"| {lane.label} | {n} × {a.writes} | {x['acked']}/{x['sent']} | {x['stored']} | "
                         f"{x['errors']} | {x['wall']:.2f} | {fmt_ms(pct(x['lat'], 50))} | {fmt_ms(p99)} | "
                         f"{ratio(p99, dp99)} | {ratio(p99, hp99)} |")
    lines.append("")
    for lane in lanes:
        if lane.key not in ran:
            continue
        for n in a.writer_sizes:
            x = wr[lane.key][n]
            if x["kinds"]:
                top = sorted(x["kinds"].items(), key=lambda kv: -kv[1])[:2]
                lines.append(f"- {lane.label}, {n} writers: acknowledged per session {x['acked_by']}; errors: "
                             + "; ".join(f"{v}× `{k}`" for k, v in top))
    lines.append("")
    # (5)
    fair = r["fairness"]
    lines += ["## 5. Fairness: a reader while writers are busy", "",
              f"{a.fair_writers} writer sessions call `mempalace_add_drawer` in a loop while a separate reader session "
              f"times `mempalace_status` (up to {a.fair_calls} calls, in blocks of {a.fair_block} with the paths "
              "taking turns; the writers run only during their path's block). A reader call unanswered after "
              f"{a.fair_timeout:g} s counts as {a.fair_timeout:g} s (a lower bound, shown as ≥) and ends its block. "
              "Idle: the same path's status from figure 1.", "",
              "| path | reader calls | unanswered | status p50 ms | p99 ms | p50 vs idle | p99 vs idle | "
              "writes acknowledged meanwhile | writes refused |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lane in lanes:
        if lane.key not in ran:
            lines.append(skip_row(lane, 9))
            continue
        x = fair[lane.key]
        idle = lat["samples"][lane.key]["status"]
        w: Writes = x["writes"]
        f50, f99 = pct(x["lat"], 50), pct(x["lat"], 99)
        ge = lambda v: "≥" if v >= a.fair_timeout else ""  # noqa: E731
        lines.append(f"| {lane.label} | {len(x['lat'])} | {x['starved']} | {ge(f50)}{fmt_ms(f50)} | "
                     f"{ge(f99)}{fmt_ms(f99)} | {ge(f50)}{ratio(f50, pct(idle, 50))} | "
                     f"{ge(f99)}{ratio(f99, pct(idle, 99))} | "
                     f"{w.acked} ({w.acked / max(x['busy'], 1e-9):.1f}/s) | {w.errors} |")
    lines.append("")
    if fair.get("hub", {}).get("starved"):
        lines += ["(d): the hub's request lock (mempalace 3.11 `mcp_server/http.py` `_RWLock`) prefers writers: while "
                  "one write runs, the next writer is already queued, so a queued reader waits until the writers "
                  "stop.", ""]
    if "direct" in ran:
        lines += ["(a): the reader is one more engine; the writers are separate engines, of which only the one "
                  "holding mempalace's writer lease gets its writes in (the others are refused at once and retry "
                  "after 50 ms).", ""]
    # (5b)
    burst = r["burst"]
    lines += ["## 5b. A read behind a burst of writes", "",
              f"One session pipelines {a.burst} `mempalace_add_drawer` calls (all sent at once); another session's "
              "`mempalace_status` is sent right behind them. Target: the read waits at most 2 write-times (one write "
              f"is the path's `add_drawer` p50 from figure 1), not the whole burst. {a.bursts} bursts per path, the "
              "paths in turn.", "",
              "| path | bursts | read median ms | read max ms | one write (p50) ms | read / write-time (median, max) "
              "| burst wall median s | acknowledged |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lane in lanes:
        if (row := not_run(lane, 8, "a second session is a second engine")) is not None:
            lines.append(row)
            continue
        x = burst[lane.key]
        write = pct(lat["samples"][lane.key]["add"], 50)
        med_read = statistics.median(x["read"])
        lines.append(f"| {lane.label} | {len(x['read'])} | {fmt_ms(med_read)} | {fmt_ms(max(x['read']))} | "
                     f"{fmt_ms(write)} | {med_read / write:.2f}, {max(x['read']) / write:.2f} | "
                     f"{statistics.median(x['wall']):.1f} | {x['acked']}/{x['sent']} |")
    lines.append("")
    # (6)
    lp = r["longpoll"]
    lines += ["## 6. Long-poll interference", "",
              f"Session A parks a `mempalace_event_wait` (a filter nothing matches, timeout {a.wait_ms} ms) while "
              "session B's `mempalace_status` is timed; blocks with the wait pending alternate with idle blocks, the "
              "paths in turn. A pending block ends early when the wait's own answer arrives. The time series (each path's "
              "clock running only during its turns) is "
              "plotted below.", "",
              "| path | idle calls | idle p50 ms | idle p99 ms | pending calls | pending p50 ms | pending p99 ms | "
              "p50 pending/idle | p99 pending/idle |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lane in lanes:
        if (row := not_run(lane, 9, "two sessions are two engines")) is not None:
            lines.append(row)
            continue
        s = lp["samples"][lane.key]
        i, p = s["idle"], s["pending"]
        lines.append(f"| {lane.label} | {len(i)} | {fmt_ms(pct(i, 50))} | {fmt_ms(pct(i, 99))} | {len(p)} | "
                     f"{fmt_ms(pct(p, 50))} | {fmt_ms(pct(p, 99))} | {ratio(pct(p, 50), pct(i, 50))} | "
                     f"{ratio(pct(p, 99), pct(i, 99))} |")
    lines.append("")
    cut = {k: v for k, v in lp["cut"].items() if v}
    if cut:
        lines += ["Pending blocks ended by the wait's own answer before the block's calls were done: "
                  + ", ".join(f"{LABELS[k]} {v}" for k, v in cut.items()) + ".", ""]
    # targets
    lines += ["## Targets (issue #14)", "", "| target | path | measured | met |", "| --- | --- | --- | --- |"]

    def target(name: str, key: str, value: float, limit: float, text: str) -> None:
        met = "–" if math.isnan(value) else ("yes" if value <= limit else "NO")
        lines.append(f"| {name} | {LABELS[key]} | {text} | {met} |")

    bridge = [k for k in ("broker", "container") if k in ran]

    def start_of(key: str, kind: str) -> tuple[float, str]:
        """A path's median spawn → first result, (c)'s net of what its container stand-in costs."""
        if key == "container" and "wrapper" in med:
            stand_in = med["wrapper"][kind]
            return med[key][kind] - stand_in, f", net of the container stand-in's {fmt_ms(stand_in)} ms"
        return med[key][kind], ""

    if "container" in ran and "broker" in ran:  # the container daemon's own target: against a host session
        mine, net = start_of("container", "status")
        w = mine / med["broker"]["status"]
        target("container session (daemon warm) ≤ 2× a host session, spawn → first status", "container", w, 2.0,
               f"{w:.2f}× ({fmt_ms(mine)} vs {fmt_ms(med['broker']['status'])} ms{net})")
    if "hub" in ran:
        for key in bridge:
            for kind in ("status", "search"):
                mine, net = start_of(key, kind)
                v = mine / med["hub"][kind]
                text = f"{v:.2f}× ({fmt_ms(mine)} vs {fmt_ms(med['hub'][kind])} ms{net})"
                if kind == "status" and key == "broker":
                    target("cold start (spawn → first status) ≤ 0.5× the hub proxy's", key, v, 0.5, text)
                elif kind == "status":  # reported: the container's own target is against a host session (above)
                    lines.append(f"| cold start, spawn → first status, against the hub's (reported, no limit) "
                                 f"| {LABELS[key]} | {text} | – |")
                else:  # the search itself (~the same on every path) is most of it: reported, not judged
                    lines.append(f"| cold start, spawn → first search (reported, no limit) | {LABELS[key]} | {text} "
                                 "| – |")
        top = max(a.session_sizes)
        for key in bridge:
            mine, theirs = mem[key][top][key_mem], mem["hub"][top][key_mem]
            target(f"{top}-session memory ({key_mem.upper()}) below the hub's", key, mine / theirs, 0.999999,
                   f"{mine / 2**20:.0f} vs {theirs / 2**20:.0f} MB ({mine / theirs:.2f}×)")
        for n in a.writer_sizes:
            for key in bridge:
                x, h = wr[key][n], wr["hub"][n]
                v = pct(x["lat"], 99) / pct(h["lat"], 99) if x["lat"] and h["lat"] else math.nan
                all_stored = x["acked"] == x["sent"] and x["stored"] == x["acked"]
                target(f"ack p99 under {n} writers ≤ 0.5× the hub's, every write stored", key,
                       v if all_stored else math.inf, 0.5,
                       f"{v:.2f}× ({fmt_ms(pct(x['lat'], 99))} vs {fmt_ms(pct(h['lat'], 99))} ms); "
                       f"{x['acked']}/{x['sent']} acknowledged, {x['stored']} stored")
    else:
        lines.append(f"| the hub comparisons | {LABELS['hub']} | skipped: {rig.lanes['hub'].skipped} | – |")
    if "direct" in ran:
        d = lat["samples"]["direct"]["status"]
        f = lat["samples"].get("floor", {}).get("status", [])
        for q, limit in ((50, 0.2), (99, 0.5)):
            floor_text = (f"; the floor (e): {(pct(f, q) - pct(d, q)) * 1000:+.2f} ms" if f else "")
            for key in [k for k in ("broker",) if k in ran]:
                over = (pct(lat["samples"][key]["status"], q) - pct(d, q)) * 1000
                target(f"per-call overhead through the shim over (a), `mempalace_status` p{q} ≤ +{limit} ms", key,
                       over, limit, f"{over:+.2f} ms{floor_text}")
        if "broker" in ran and "container" in ran:
            over = (pct(lat["samples"]["container"]["status"], 50) - pct(lat["samples"]["broker"]["status"], 50)) * 1000
            target("per call, the container path ≤ +0.5 ms over the host path, `mempalace_status` p50", "container",
                   over, 0.5, f"{over:+.2f} ms")
        for key in [k for k in ("broker", "container", "floor") if k in lat["samples"]]:
            for kind in ("search", "add"):
                v, d = lat["samples"][key][kind], lat["samples"]["direct"][kind]
                lines.append(f"| per-call overhead over (a), `{kind}` (reported, no limit) | {LABELS[key]} | "
                             f"p50 {(pct(v, 50) - pct(d, 50)) * 1000:+.2f} ms ({ratio(pct(v, 50), pct(d, 50))}), "
                             f"p99 {(pct(v, 99) - pct(d, 99)) * 1000:+.2f} ms ({ratio(pct(v, 99), pct(d, 99))}) | – |")
    for key in [k for k in ("broker", "container", "hub") if k in ran]:
        x = burst[key]
        v = max(x["read"]) / pct(lat["samples"][key]["add"], 50)
        target("a read behind a burst of writes ≤ 2 write-times (the slowest of the bursts)", key, v, 2.0,
               f"{v:.2f}× ({fmt_ms(max(x['read']))} ms behind {a.burst} writes; one write {fmt_ms(pct(lat['samples'][key]['add'], 50))} ms)")
    for key in [k for k in ("broker", "container", "hub") if k in ran]:
        s = lp["samples"][key]
        v = pct(s["pending"], 50) / pct(s["idle"], 50) if s["pending"] and s["idle"] else math.nan
        target("another client's status p50 while a long poll is pending ≤ 2× its idle p50", key, v, 2.0,
               f"{v:.2f}× ({fmt_ms(pct(s['pending'], 50))} vs {fmt_ms(pct(s['idle'], 50))} ms)")
    lines.append("")
    f = lat["samples"].get("floor", {}).get("status", [])
    if f and "broker" in ran and "direct" in ran:
        d, b = lat["samples"]["direct"]["status"], lat["samples"]["broker"]["status"]
        over_b, over_f = (pct(b, 50) - pct(d, 50)) * 1000, (pct(f, 50) - pct(d, 50)) * 1000
        lines += [f"Per-call overhead: (b) adds {over_b:+.2f} ms to `mempalace_status` at p50 over (a); two processes that "
                  f"move bytes and do nothing else, in the shim's and the broker's places, add {over_f:+.2f} ms on this "
                  "machine (e). No design with two processes between the agent and its engine can go below (e)'s "
                  f"figure here; the bridge's own work is the difference, {over_b - over_f:+.2f} ms."]
        cpu = lat.get("cpu") or {}
        if "broker" in cpu and "floor" in cpu:
            cb, cf = cpu["broker"], cpu["floor"]
            lines[-1] += (f" In CPU rather than wall time (the table under figure 1): the shim and the broker spend "
                          f"{cb['hops'] * 1e6:.0f} µs per call net of what they spend at rest "
                          f"({cb['raw'] * 1e6:.0f} µs with it), the two byte relays {cf['hops'] * 1e6:.0f} µs (they "
                          "spend nothing at rest). A thread that wakes from a long rest is charged more per wake-up "
                          "than one that is busy, so the net figure is a lower bound and the other an upper one.")
        lines.append("")
    # plots and notes
    lines += ["## Plots", ""]
    if plots:
        for p in plots:
            rel = os.path.relpath(p, out.parent)
            lines.append(f"![{p.stem}]({rel})")
            lines.append("")
    else:
        lines += [plot_note, ""]
    notes = [f"{lane.label}: {n}" for lane in lanes for n in lane.notes]
    notes += rig.notes
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
async def bench(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], Rig]:
    rig = Rig(root, args)
    r: dict[str, Any] = {"machine": machine()}
    t_start = time.perf_counter()
    try:
        log(f"pre-filling one palace with {args.drawers} drawers …")
        palace0 = await rig.fill(args.drawers)
        log(f"pre-filled in {time.perf_counter() - t_start:.1f} s; starting every path …")
        rig.setup(palace0)
        for lane in rig.lanes.values():
            if lane.skipped:
                log(f"{lane.label}: skipped ({lane.skipped})")
        await rig.warm(args.drawers)
        steps: list[tuple[str, str, Callable[[Rig], Any]]] = [
            ("latency", "1. per-call latency", fig_latency), ("cold", "2. cold start", fig_cold),
            ("memory", "3. memory", fig_memory), ("writers", "4. writers", fig_writers),
            ("fairness", "5. fairness", fig_fairness), ("burst", "5b. a read behind a burst", fig_burst),
            ("longpoll", "6. long poll", fig_longpoll)]
        for key, title, fn in steps:
            t = time.perf_counter()
            log(f"== {title} …")
            r[key] = await fn(rig)
            log(f"== {title}: {time.perf_counter() - t:.1f} s")
            show(key, r[key])
    finally:
        t = time.perf_counter()
        await rig.stop()
        log(f"everything stopped in {time.perf_counter() - t:.1f} s")
    r["duration"] = time.perf_counter() - t_start
    r["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return r, rig


def show(key: str, data: Any) -> None:
    """A figure's summary on stdout as soon as it is measured."""
    if key == "latency":
        for path, per in data["samples"].items():
            log(f"  {LABELS[path]:<24} " + "  ".join(
                f"{kind} p50 {fmt_ms(pct(v, 50))} p99 {fmt_ms(pct(v, 99))} ms" for kind, v in per.items()))
        for path, w in data["cpu"].items():
            log(f"  {LABELS[path]:<24} CPU per status call: hops {w['hops'] * 1e6:.0f} µs ("
                + ", ".join(f"{name} {v * 1e6:.0f}" for name, v in sorted(w["roles"].items()))
                + f"), engine {w['engine'] * 1e6:.0f} µs; hops at rest {w['rest'] * 1e3:.1f} ms/s"
                + (" (coarse)" if w["coarse"] else ""))
    elif key == "cold":
        for path, per in data.items():
            log(f"  {LABELS[path]:<24} " + "  ".join(
                f"→{kind} median {fmt_ms(statistics.median(v))} ms" for kind, v in per.items() if v))
    elif key == "fairness":
        for path, x in data.items():
            log(f"  {LABELS[path]:<24} reader status p50 {fmt_ms(pct(x['lat'], 50))} p99 {fmt_ms(pct(x['lat'], 99))} ms"
                f" ({x['starved']} unanswered); {x['writes'].acked} writes acknowledged, {x['writes'].errors} refused")
    elif key == "burst":
        for path, x in data.items():
            log(f"  {LABELS[path]:<24} read behind the burst: median {fmt_ms(statistics.median(x['read']))} ms, max "
                f"{fmt_ms(max(x['read']))} ms; {x['acked']}/{x['sent']} writes acknowledged")
    elif key == "longpoll":
        for path, s in data["samples"].items():
            log(f"  {LABELS[path]:<24} idle p50 {fmt_ms(pct(s['idle'], 50))} ms, pending p50 "
                f"{fmt_ms(pct(s['pending'], 50))} ms (p99 {fmt_ms(pct(s['idle'], 99))} / "
                f"{fmt_ms(pct(s['pending'], 99))} ms)")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every path and figure (the test suite's run)")
    p.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: next to --out)")
    p.add_argument("--drawers", type=int, help="drawers in the pre-filled palace (200; smoke 10)")
    p.add_argument("--status-calls", type=int, help="figure 1: status calls per path (300; smoke 5)")
    p.add_argument("--calls", type=int, help="figure 1: search and add_drawer calls per path (100; smoke 5)")
    p.add_argument("--warmup", type=int, help="figure 1: warm-up calls per type and path (10; smoke 1)")
    p.add_argument("--rest-s", type=float, help="figure 1: seconds with no call, for the CPU the hops spend at rest "
                   "(5; smoke 0.5)")
    p.add_argument("--spawns", type=int, help="figure 2: spawns per path and kind (10; smoke 1)")
    p.add_argument("--sessions", help="figure 3: concurrent session counts (1,4,8; smoke 1,2)")
    p.add_argument("--writers", help="figure 4: concurrent writer counts (4,8; smoke 2)")
    p.add_argument("--writes", type=int, help="figure 4: add_drawer per writer (25; smoke 3)")
    p.add_argument("--block", type=int, help="figure 4: writes per writer before the next path's turn (5; smoke 3)")
    p.add_argument("--fair-writers", type=int, help="figure 5: busy writer sessions (4; smoke 2)")
    p.add_argument("--fair-calls", type=int, help="figure 5: the reader's status calls (100; smoke 5)")
    p.add_argument("--fair-block", type=int, help="figure 5: reader calls per path's turn (25; smoke 5)")
    p.add_argument("--fair-timeout", type=float, help="figure 5: seconds a reader call may wait (10; smoke 2)")
    p.add_argument("--bursts", type=int, help="figure 5b: bursts per path (5; smoke 1)")
    p.add_argument("--burst", type=int, help="figure 5b: pipelined add_drawer calls per burst (50; smoke 5)")
    p.add_argument("--lp-calls", type=int, help="figure 6: status calls per condition and path (100; smoke 5)")
    p.add_argument("--lp-block", type=int, help="figure 6: calls per block (20; smoke 5)")
    p.add_argument("--wait-ms", type=int, help="figure 6: the parked event_wait's timeout (2000; smoke 500)")
    p.add_argument("--relay-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the container daemon's loop")
    p.add_argument("--keep", action="store_true", help="keep the throwaway directory (logs, palaces)")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else DEFAULTS
    for name, default in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.warmup < 0 or args.status_calls < 0 or args.rest_s <= 0:
        p.error("--warmup and --status-calls must be ≥ 0 and --rest-s > 0")
    args.session_sizes = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    args.writer_sizes = [int(x) for x in str(args.writers).split(",") if x.strip()]
    args.argv = argv
    return args


def compile_bytecode() -> None:
    """Every session of every path starts from bytecode, as an installed wheel (and mempalace's own install) does:
    under PYTHONDONTWRITEBYTECODE an editable install would compile the bridge's modules at every spawn (~25 ms of
    mp-shim's start here), which no user pays."""
    # As the console scripts import them (from /, not from this checkout: an editable install has its own tree).
    code = ("import compileall, os, mempalace, mp_ssh_bridge, mp_ssh_bridge_broker\n"
            "for m in (mp_ssh_bridge, mp_ssh_bridge_broker, mempalace):\n"
            "    compileall.compile_dir(os.path.dirname(m.__file__), quiet=1)\n")
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True, timeout=300,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    compile_bytecode()
    if not (MODEL_CACHE / "chroma").exists():
        print(f"embedding model missing under {MODEL_CACHE}: run scripts/setup-tests.sh", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    plots_dir = Path(args.plots_dir).resolve() if args.plots_dir else out.parent
    root = Path(tempfile.mkdtemp(prefix="mpb-all-", dir="/tmp"))  # short: socket paths must fit
    started = datetime.datetime.now(datetime.timezone.utc)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`: everything is stopped

    signal.signal(signal.SIGTERM, on_term)
    try:
        result, rig = asyncio.run(bench(args, root))
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    result["when"] = f"{started:%Y-%m-%d %H:%M}"
    result["command"] = ".venv/bin/python benchmarks/bench_all.py" + (f" {shlex.join(argv)}" if argv else "")
    plots, note = plot(result, plots_dir)
    text = report(result, rig, plots, note, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out}" + (f" and {', '.join(str(p) for p in plots)}" if plots else f" ({note})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
