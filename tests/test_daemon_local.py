"""The container daemon's local-owner mode (broker/daemon.py), with real parts: the pinned engine, the official
`mcp` SDK as every session's client through `mp-shim`, and the host broker a host-role `mp-shim` elects.

Why: before the daemon, a container session with no SSH path ran its own engine as the palace's `local` owner,
so a second session of that container got no memory. Now one daemon per container runs the one engine for all of
them, and hands the palace over to the host's broker when the host asks, then exits.

The two sides share one kernel here (as in tests/test_ownership_e2e.py): liveness judges by pid. The daemon is
spawned as the electing shim spawns it (`--container-daemon --detach --lock-fd N`, holding its broker.lock), and
the container sessions reach it through `MEMPALACE_BROKER=unix://<its socket>` (the shim's own way to the daemon
is tested with the shim). Not depended on: mp_ssh_bridge/relay.py (no SSH path is configured, so the daemon never
takes the relay path here).

Figures go to .reliability/ (tests/reliability.record): hand-over time, writes acknowledged and stored.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

from mp_ssh_bridge import containerd, liveness, owner, state
from mp_ssh_bridge.daemon import daemon_argv
from mp_ssh_bridge.election import open_lock, probe, try_lock
from mp_ssh_bridge.settings import load
from mp_ssh_bridge_broker import daemon, lifecycle
from tests.conftest import BIN
from tests.helpers import RawClient, kill_pid, pid_alive, wait_for
from tests.reliability import record
from tests.sshd import SSHServer
from tests.test_ownership_e2e import HANDOVER_LIMIT_S, Session, Sides, Watch, first_ack_after, stop_broker
from tests.test_reliability_storm import make_writes, verify_directly

DRAWERS = ("mempalace_add_drawer",)
SHARED_RECORDS = ("broker.json", "broker.sock", "broker.lock", "engine.json")  # the host broker's, never the daemon's


# --- the container daemon, spawned as the electing session spawns it ------------------------------------
@dataclass
class Daemon:
    paths: state.StatePaths
    env: dict[str, str]

    @property
    def record(self) -> dict[str, Any] | None:
        return state.read_broker_json(self.paths.json)

    @property
    def pid(self) -> int:
        rec = self.record
        assert rec is not None, f"no {self.paths.json}; log:\n{self.log()}"
        return int(rec["pid"])

    @property
    def endpoint(self) -> str:
        rec = self.record
        assert rec is not None
        return str(rec["endpoint"])

    def log(self) -> str:
        try:
            return self.paths.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def status(self) -> dict[str, Any]:
        found = probe(self.endpoint, 5.0)
        assert found is not None, self.log()
        return found


def spawn_daemon(env: dict[str, str]) -> Daemon:
    """What the electing shim does: flock the daemon's broker.lock, spawn the daemon (`daemon_argv`: it decides its
    mode, then, in local-owner mode, execs `mempalace-broker --container-daemon --lock-fd N`)
    with its output in the daemon's log, wait for its broker.json and an answer on its socket."""
    settings = load()
    paths = settings.paths.daemon_paths()
    state.ensure_private_dir(paths.own)
    fd = open_lock(paths)
    try:
        assert try_lock(fd), "another daemon holds the lock"
        argv = daemon_argv(settings, fd)
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, pass_fds=(fd,),
                                    start_new_session=True, cwd="/", env=env)
        finally:
            os.close(log_fd)
        assert proc.wait(30) == 0  # the --detach parent exits once it has forked
    finally:
        os.close(fd)  # the daemon keeps the lock through its own copy
    d = Daemon(paths, env)

    def ready() -> bool:
        rec = d.record
        return rec is not None and probe(str(rec["endpoint"]), 1.0) is not None

    wait_for(ready, 60, 0.05, f"the daemon's broker.json and socket ({paths.own}); log:\n{d.log()}")
    return d


@pytest.fixture
def ctr_env(home: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The container side's environment: no SSH path at all (no MP_BRIDGE_SSH_HOST, no SSH config)."""
    env = dict(os.environ, MP_BRIDGE_ROLE="container", MP_BRIDGE_SSH_CONFIG=str(tmp_path / "no-ssh-config"),
               MEMPALACE_MCP_TIMEOUT_MS="60000", MP_BRIDGE_LOG_LEVEL="INFO")
    yield env
    own = load().paths.daemon_paths()
    rec = state.read_broker_json(own.json)
    if rec is not None:
        kill_pid(int(rec["pid"]))
    subprocess.run(["rm", "-rf", str(own.own)], check=False)


def engines_of(home: Path) -> list[int]:
    """Live mempalace-mcp processes of this test (their HOME is the test's)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if any("mempalace-mcp" in part for part in proc.cmdline()[:3]) and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("HOME") == str(home):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def shared_records(root: Path) -> dict[str, float | None]:
    return {name: (root / name).stat().st_mtime if (root / name).exists() else None for name in SHARED_RECORDS}


# --- 1. three container sessions, one engine; then the host takes the palace ---------------------------
@pytest.mark.timeout(240)
def test_three_sessions_share_one_local_owner_daemon_then_the_host_takes_over(
    home: Path, ctr_env: dict[str, str], tmp_path: Path,
) -> None:
    settings = load()
    root = settings.paths.root
    state.ensure_private_dir(root)
    memory = settings.memory
    before = shared_records(root)
    d = spawn_daemon(ctr_env)
    dpid, sock = d.pid, Path(d.endpoint[len("unix://"):])
    assert sock.parent == d.paths.own, sock
    assert d.record is not None and d.record.get("mode") == "local-owner", d.record
    assert "local-owner mode: no SSH path to the host is configured" in d.log(), d.log()
    sess_env = dict(ctr_env, MEMPALACE_BROKER=d.endpoint)
    host_env = dict(os.environ, MEMPALACE_MCP_TIMEOUT_MS="60000", MP_BRIDGE_LOG_LEVEL="INFO")
    sides = Sides(home, root, settings.paths, host_env, sess_env, [str(BIN / "mp-shim")], state.runtime_dir(),
                  cast(SSHServer, None),
                  memory.palace, memory.kg)
    ctr = [Session(f"c{i}", [str(BIN / "mp-shim")], sess_env, home, make_writes(f"c{i}", 45, DRAWERS),
                   tmp_path / f"c{i}.err", pace=0.1) for i in range(3)]
    host = Session("h", [str(BIN / "mp-shim")], host_env, home, make_writes("h", 12, DRAWERS), tmp_path / "h.err")
    watch = Watch(sides)
    figures: dict[str, Any] = {}
    try:
        async def scenario() -> float:
            tasks = [asyncio.create_task(s.run()) for s in ctr]
            await asyncio.to_thread(wait_for, lambda: all(s.acked() >= 3 for s in ctr) or any(s.failure for s in ctr),
                                    120, 0.05, "every container session's first writes")
            assert all(s.acked() >= 3 for s in ctr), [(s.failure, s.errlog.read_text()[-1500:]) for s in ctr]
            # one engine for the three sessions: the daemon's child, and no other engine of this test anywhere
            st = d.status()
            engine_pid = st["engine"]["pid"]
            assert engines_of(home) == [engine_pid], (engines_of(home), engine_pid)
            assert engine_pid in [c.pid for c in psutil.Process(dpid).children()]
            assert st["broker"]["daemon"]["mode"] == "local-owner" and st["ownership"]["kind"] == "local", st
            assert st["ownership"]["state"] == "holding", st["ownership"]
            held = state.read_json_object(settings.paths.owner) or {}
            assert held.get("kind") == "local" and held.get("pid") == dpid, held
            assert held.get("what") == lifecycle.DAEMON_WHAT, held
            await asyncio.to_thread(wait_for, lambda: (state.read_json_object(settings.paths.owner) or {})
                                    .get("engine_pid") == engine_pid, 15, 0.1, "owner.json to name the engine")
            assert all(held.get(k) for k in ("host", "boot_id", "pid_ns")), held  # where the host sees it
            # the daemon's records are its own: nothing of it in the shared state directory
            assert shared_records(root) == before, (before, shared_records(root))
            figures["engines_for_3_sessions"] = len(engines_of(home))
            # the host: a host-role mp-shim elects the host broker, which requests the palace
            t0 = time.monotonic()
            host_task = asyncio.create_task(host.run())
            await asyncio.to_thread(wait_for, lambda: not pid_alive(dpid), HANDOVER_LIMIT_S + 30, 0.05,
                                    "the daemon to exit after the hand-over")
            figures["daemon_exit_s"] = round(time.monotonic() - t0, 2)
            assert not pid_alive(engine_pid), "the daemon's engine stopped before the palace was handed over"
            assert not d.paths.json.exists() and not sock.exists(), "the daemon removed its broker.json and socket"
            assert "handed the palace over to the broker" in d.log(), d.log()
            # The sessions' shims re-elect a daemon (done here as mp_ssh_bridge/daemon.py does it): with no SSH
            # path it serves at once and waits for the palace, which the host broker keeps while it runs.
            d2 = await asyncio.to_thread(spawn_daemon, ctr_env)
            d2_own = d2.status()["ownership"]
            assert d2_own["kind"] == "local" and d2_own["state"] != "holding", d2_own
            await host_task
            assert (state.read_json_object(settings.paths.owner) or {}).get("kind") == "broker"
            # The host's broker stops: the waiting daemon claims the palace, the container sessions go on.
            t1 = time.monotonic()
            await asyncio.to_thread(stop_broker, sides)
            await asyncio.gather(*tasks)
            figures["back_to_the_container_s"] = round((watch.first("local", t1) or t1) - t1, 2)
            assert [s.calls[-1][2] for s in ctr] == ["acked"] * 3, [s.errlog.read_text()[-1500:] for s in ctr]
            kill_pid(d2.pid)  # SIGTERM: a graceful exit, the palace released
            return t0

        t0 = asyncio.run(scenario())
    finally:
        watch.stop()
    took_owner = watch.first("broker", t0)
    took = first_ack_after(host, t0)
    assert host.failure == "" and all(s.failure == "" for s in ctr), [host.failure, *[s.failure for s in ctr]]
    assert took is not None and took < HANDOVER_LIMIT_S, (took, host.errlog.read_text()[-2000:])
    assert took_owner is not None and took_owner - t0 < HANDOVER_LIMIT_S
    assert all(w.outcome == "acked" for w in host.writes), [w.detail for w in host.writes if w.outcome != "acked"]
    assert watch.two_writers == [], watch.two_writers[:3]
    assert owner.live_holder(settings.paths, 30.0) is None, "every owner released the palace"
    writes = [w for s in [*ctr, host] for w in s.writes]
    direct = verify_directly(writes, memory.palace, memory.kg, tmp_path)
    acked = [w for w in writes if w.outcome == "acked"]
    lost = [w.marker for w in acked if not w.stored_direct]
    unknown = [w.detail for w in writes if w.outcome in ("unknown", "exception", "pending")]
    ctr_acked = sum(s.acked() for s in ctr)
    figures.update(handover_s=round(took, 2), owner_moved_s=round(took_owner - t0, 2), writes=len(writes),
                   acked=len(acked),
                   acked_container=ctr_acked, acked_host=host.acked(), stored=len(acked) - len(lost),
                   not_executed=sum(1 for w in writes if w.outcome == "not_executed"), unknown=len(unknown),
                   max_writers_seen=watch.max_writers, samples=watch.samples)
    record("daemon-handover", "3 container sessions write through one local-owner container daemon (one engine); "
           "a host session starts: the host broker requests the palace, the daemon finishes its running call, "
           "stops its engine, releases and exits; a re-elected daemon waits for the palace and takes it back once "
           "the host broker stops",
           f"host session's first write {took:.2f} s after it started; {len(acked) - len(lost)}/{len(acked)} "
           f"acknowledged drawers stored", figures)
    assert lost == [] and unknown == [], (lost[:5], unknown[:5])
    assert ctr_acked >= 9 and direct["integrity_chroma"] == "ok" and direct["scars"] == [], (figures, direct)


# --- 2. idle exit, and nothing left behind ----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_an_idle_daemon_exits_and_leaves_nothing_behind(home: Path, ctr_env: dict[str, str], tmp_path: Path) -> None:
    settings = load()
    root = settings.paths.root
    state.ensure_private_dir(root)
    before = shared_records(root)
    d = spawn_daemon(dict(ctr_env, MP_BRIDGE_IDLE_EXIT_MINUTES="0.1"))  # 6 s without clients
    dpid = d.pid
    sock = Path(d.endpoint[len("unix://"):])
    assert sock.parent == d.paths.own, sock

    async def one_session() -> dict[str, Any]:
        client = await RawClient.connect(d.endpoint)
        try:
            await client.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                             "clientInfo": {"name": "idle-test", "version": "1"}}, timeout=60)
            return await client.tool("mempalace_status", {}, timeout=60)
        finally:
            await client.close()

    reply = asyncio.run(one_session())
    assert "result" in reply, reply
    engine_pid = d.status()["engine"]["pid"]
    assert isinstance(engine_pid, int) and pid_alive(engine_pid)
    left = time.monotonic()
    wait_for(lambda: not pid_alive(dpid), 30, 0.1, f"the idle daemon to exit; log:\n{d.log()}")
    took = time.monotonic() - left
    assert not d.paths.json.exists() and not sock.exists(), list(d.paths.own.iterdir())
    assert not pid_alive(engine_pid), "the engine stops with the daemon"
    assert owner.live_holder(settings.paths, 30.0) is None and not settings.paths.owner.exists(), "palace released"
    assert shared_records(root) == before, (before, shared_records(root))
    assert "idle for" in d.log(), d.log()
    record("daemon-idle-exit", "a local-owner container daemon with MP_BRIDGE_IDLE_EXIT_MINUTES=0.1 after its one "
           "session left", f"exited {took:.1f} s after the session left (limit 6 s); its broker.json and socket "
           "removed, owner.json released, nothing written in the shared state directory", {"exit_after_s": round(took, 2)})


def test_the_engine_dies_with_a_killed_daemon(home: Path, ctr_env: dict[str, str]) -> None:
    """pdeathsig (broker/enginerecord.py) applies to the daemon's engine: forked by the detached daemon's loop."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    d = spawn_daemon(ctr_env)
    engine_pid = wait_for(lambda: d.status()["engine"]["pid"], 60, 0.1, "the daemon's engine")
    kill_pid(d.pid, 9)
    wait_for(lambda: not pid_alive(engine_pid), 10, 0.05, "the engine of a killed daemon to exit")


def test_mp_bridge_restart_and_stop_in_the_container_act_on_its_local_owner_daemon(
    home: Path, ctr_env: dict[str, str],
) -> None:
    """`mp-bridge restart` / `stop` in a container whose daemon owns the palace replace / stop that daemon (proven
    ours, as a host broker is), not a broker over SSH (there is no SSH path): after stop the daemon and its engine
    are gone and the palace is free."""
    settings = load()
    first = spawn_daemon(ctr_env)
    old = first.pid
    again = subprocess.run([str(BIN / "mp-bridge"), "restart"], env=ctr_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, (again.stdout, again.stderr)  # restart: the daemon replaced, no SSH involved
    assert "local-owner mode" in again.stdout and not pid_alive(old), (again.stdout, again.stderr)
    d = Daemon(first.paths, first.env)
    dpid = d.pid
    assert dpid != old
    engine_pid = wait_for(lambda: d.status()["engine"]["pid"], 60, 0.1, "the daemon's engine")
    out = subprocess.run([str(BIN / "mp-bridge"), "stop"], env=ctr_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert str(dpid) in out.stdout and "SSH" not in out.stdout + out.stderr, (out.stdout, out.stderr)
    wait_for(lambda: not pid_alive(dpid) and not pid_alive(engine_pid), 20, 0.1, "the daemon and its engine to exit")
    assert not d.paths.json.exists() and owner.live_holder(settings.paths, 30.0) is None


def test_a_daemon_record_in_a_directory_others_can_write_is_not_trusted(home: Path, tmp_path: Path) -> None:
    """`mp-bridge stop` (and status) read the daemon's record only from this user's private directory: a record
    planted where others can write could name any of our pids, and stop would signal it."""
    from mp_ssh_bridge import daemon as client_daemon

    state_dir = str(tmp_path / "planted-state")
    here = Path(client_daemon.record_path(state_dir)).parent
    state.ensure_private_dir(here.parent)
    here.mkdir(mode=0o700)
    try:
        state.write_json_atomic(here / "broker.json", {"pid": os.getpid(), "mode": "local-owner"})
        assert (client_daemon.read_record(state_dir) or {}).get("mode") == "local-owner"  # ours: trusted
        os.chmod(here, 0o777)
        assert client_daemon.read_record(state_dir) is None  # writable by others: not trusted
    finally:
        subprocess.run(["rm", "-rf", str(here)], check=False)


# --- 3. the mode decision ---------------------------------------------------------------------------------
def _settings(tmp_path: Path, **overrides: Any) -> daemon.DaemonSettings:
    return daemon.load_settings(ssh_config=tmp_path / "ssh_config", **overrides)


def _never(_settings: Any) -> str | None:
    raise AssertionError("no liveness check is needed for this decision")


def test_a_refused_host_key_never_gives_local_owner_mode(home: Path, tmp_path: Path) -> None:
    from mp_ssh_bridge.ssh import SSHBridgeError

    calls: list[str] = []

    async def refused(settings: Any) -> Any:
        calls.append(settings.ssh_host)
        raise SSHBridgeError("SSH host key of 127.0.0.1:22 could not be verified", refuse=True)

    got = asyncio.run(containerd.decide(_settings(tmp_path, ssh_host="host"), connect=refused, broker_alive=_never))
    assert got.mode == containerd.RELAY and got.conn is None and "refused" in got.why, got
    assert calls == ["host"]  # and no liveness proof asked for: a refusal is never a way to local-owner mode


def test_the_mode_decision(home: Path, tmp_path: Path) -> None:
    from mp_ssh_bridge.ssh import SSHBridgeError

    async def unreachable(_settings: Any) -> Any:
        raise SSHBridgeError("SSH connection to 127.0.0.1:1 refused: no sshd listens there", unreachable=True)

    async def answered(_settings: Any) -> Any:  # sshd spoke (MaxAuthTries, a kex failure): not "unreachable"
        raise SSHBridgeError("SSH connection to 127.0.0.1:22 failed: Too many authentication failures")

    async def hangs(_settings: Any) -> Any:
        await asyncio.sleep(60)

    async def works(_settings: Any) -> Any:
        return "conn"

    async def odd(_settings: Any) -> Any:
        raise RuntimeError("something new")

    def decide(settings: daemon.DaemonSettings, connect: Any, alive: Any = _never) -> containerd.Decision:
        return asyncio.run(containerd.decide(settings, connect=connect, broker_alive=alive))

    configured = _settings(tmp_path, ssh_host="host", connect_timeout=0.2)
    # no SSH path at all: local-owner without trying SSH, once no broker can be alive; a live one rules it out
    got = decide(_settings(tmp_path), odd, lambda _s: None)
    assert got.mode == containerd.LOCAL_OWNER and "no SSH path" in got.why, got
    got = decide(_settings(tmp_path), odd, lambda _s: "broker.json names broker pid 7 (this machine), which may be alive")
    assert got.mode == containerd.RELAY and "pid 7" in (got.note or ""), got
    # sshd answered but would not let us in: never local-owner, whatever liveness says
    assert decide(configured, answered).mode == containerd.RELAY
    # connected: relay, with the connection
    got = decide(configured, works)
    assert (got.mode, got.conn) == (containerd.RELAY, "conn"), got
    # unreachable (refused, or hung past the bound): local-owner only when no broker can be alive
    for connect in (unreachable, hangs):
        got = decide(configured, connect, lambda _s: None)
        assert got.mode == containerd.LOCAL_OWNER and "unreachable" in got.why, got
        got = decide(configured, connect, lambda _s: "broker.json names broker pid 7 (mac), which may be alive")
        assert got.mode == containerd.RELAY and "pid 7" in got.why, got
    # an error not known to mean "unreachable": the safe side
    assert decide(configured, odd).mode == containerd.RELAY
    # the alias in the SSH config counts as a configured path (the default alias, MP_BRIDGE_SSH_HOST unset)
    (tmp_path / "ssh_config").write_text("Host *\n  ServerAliveInterval 5\nHost other host\n  HostName 10.0.0.1\n")
    assert decide(_settings(tmp_path), works).mode == containerd.RELAY
    (tmp_path / "ssh_config").write_text("Host *\n  User me\nHost h* !host\n  HostName 10.0.0.1\n")
    assert decide(_settings(tmp_path), works, lambda _s: None).mode == containerd.LOCAL_OWNER
    assert containerd.alias_in_config(tmp_path / "ssh_config", "hx") == "h*"


def test_live_broker_reads_the_shared_broker_json(home: Path, ctr_env: dict[str, str]) -> None:
    """The proof discovery's `_try_claim` uses, on the SHARED state directory (never the daemon's own)."""
    settings = daemon.load_settings()
    assert settings.paths.private is not None and settings.paths.json.parent == settings.paths.private
    state.ensure_private_dir(settings.paths.root)
    assert containerd.live_broker(settings) is None
    shared = settings.paths.root / "broker.json"
    state.write_json_atomic(shared, {"pid": os.getpid(), "heartbeat": time.time(), **liveness.writer_identity()})
    try:
        assert "may be alive" in (containerd.live_broker(settings) or ""), containerd.live_broker(settings)
    finally:
        shared.unlink()
