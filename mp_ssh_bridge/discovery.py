"""The shim's slow path: find or elect a broker, or, as a last resort, run the engine directly.

Loaded only when the fast path (broker.json -> socket) did not give a
connection, so it may import the settings model and the election client.
in order (README "How it works", docs/PROTOCOL.md):

1. `MEMPALACE_BROKER` set: that endpoint, verbatim (`endpoints.dial`), no election.
2. `broker.json`: connect, `broker/status` round trip, palace identity.
3. Host role: `election.ensure_broker()` — the flock election (the winner
   spawns a detached broker, the rest wait), bounded by `ensure_timeout`.
   When broker.json names a live broker on another machine (the other side
   of a VM boundary, `liveness`): the SSH path if one is configured
   (`ssh_host` set), else a bounded wait watching its heartbeat, then a
   refusal that names it.
   Container role: the socket in broker.json if it happens to work, else
   `mp_ssh_bridge.ssh.connect_container(settings)` (its TCP + token fallback is
   dialed by `endpoints`, like every other TCP link).
4. Degraded mode, only after proving no broker can be alive (pid dead on this
   machine, or a heartbeat seen standing still for `heartbeat_stale_after` by
   this machine's clock; and nobody holds broker.lock): the real engine as our
   own child. When a broker may be alive
   but does not answer, refuse (BROKER_UNREACHABLE) — never a second writer.

Runs in the shim's `connect` thread; everything here is blocking.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from mp_ssh_bridge import endpoints, handshake, liveness, state
from mp_ssh_bridge.config import ENGINE_CHILD_ENV, Config
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import PalaceMismatch, ShimError
from mp_ssh_bridge.links import AsyncLink, Link, run_async
from mp_ssh_bridge.protocol import BROKER_UNREACHABLE, LINE_TOO_LONG, PALACE_MISMATCH, FrameBuffer, LineTooLong
from mp_ssh_bridge.settings import Settings, load

CONTAINER_DIRECT_TIMEOUT = 0.5  # the socket in broker.json from a container: works on a plain bind mount, or not at all


def load_settings(palace_flag: str | None) -> Settings:
    return load(palace=palace_flag)


def discover(cfg: Config, fast_failure: str = "") -> Link:
    """A Link to the broker for our palace, or to a degraded-mode engine; raises ShimError."""
    settings = load_settings(cfg.palace_flag)
    if settings.broker:
        return endpoints.connect(cfg, settings.broker, settings=settings, role=settings.resolved_role())
    if settings.resolved_role() == "container":
        return _container(cfg, settings)
    return _host(cfg, settings, fast_failure)


# --------------------------------------------------------------------------- host
def _direct(cfg: Config, settings: Settings, timeout: float, role: str) -> Link:
    """The broker broker.json names (and, in a container, `<state dir>/broker.sock`)."""
    record = state.read_broker_json(settings.paths.json)
    candidates = []
    if record and isinstance(record.get("endpoint"), str) and record["endpoint"].startswith("unix://"):
        candidates.append(record["endpoint"])
    if role == "container":
        local = f"unix://{settings.paths.socket()}"
        if local not in candidates:
            candidates.append(local)
    if not candidates:
        raise ConnectionError(f"no broker.json in {settings.paths.root}")
    problems = []
    for url in candidates:
        try:
            return endpoints.connect(cfg, url, settings=settings, timeout=timeout, role=role)
        except PalaceMismatch:
            raise
        except ShimError as exc:
            problems.append(str(exc))
    raise ConnectionError("; ".join(problems))


def _host(cfg: Config, settings: Settings, fast_failure: str) -> Link:
    first = fast_failure
    if not first:  # the fast path did not run (settings-only configuration): try broker.json now
        try:
            return _direct(cfg, settings, settings.connect_timeout, "host")
        except PalaceMismatch:
            raise
        except (OSError, ShimError, ValueError) as exc:
            first = str(exc)
    log(20, f"no broker answered ({first}); electing one (bounded by {settings.ensure_timeout:g}s)")
    from mp_ssh_bridge.election import EnsureError, ForeignOwner, MemoryConflict, ensure_broker

    ssh_way = ssh_configured(settings)
    try:
        info = ensure_broker(settings, wait_foreign=not ssh_way)
    except MemoryConflict as exc:
        raise PalaceMismatch(f"palace mismatch: {exc}") from exc
    except ForeignOwner as exc:
        if ssh_way:
            log(20, f"{exc}; taking the SSH path to it (MP_BRIDGE_SSH_HOST={settings.ssh_host})")
            return _container(cfg, settings)
        return degraded_or_refuse(cfg, settings, f"no broker could be started: {exc}", "host")
    except EnsureError as exc:
        return degraded_or_refuse(cfg, settings, f"no broker could be started: {exc}", "host")
    try:
        return _direct(cfg, settings, settings.connect_timeout, "host")
    except PalaceMismatch:
        raise
    except (OSError, ShimError, ValueError) as exc:
        raise ShimError(
            BROKER_UNREACHABLE,
            f"a broker was ensured at {info.get('endpoint')} (pid {info.get('pid')}) but this session could not "
            f"use it: {exc}",
        ) from exc


def ssh_configured(settings: Settings) -> bool:
    """An SSH path was set up on purpose (`ssh_host` from the environment or the config file), not just
    the default alias: a host-role session facing a live broker on another machine then takes it."""
    return "ssh_host" in settings.model_fields_set


# --------------------------------------------------------------------------- container
def _container(cfg: Config, settings: Settings) -> Link:
    try:
        return _direct(cfg, settings, CONTAINER_DIRECT_TIMEOUT, "container")
    except PalaceMismatch:
        raise
    except (OSError, ShimError, ValueError):
        pass  # the usual case across a VM boundary: the host's socket is not connectable from here
    from mp_ssh_bridge import ssh

    try:
        conn = run_async(ssh.connect_container(settings), settings.connect_timeout + settings.ensure_timeout + 30)
    except ssh.TcpFallback as fallback:
        try:
            return endpoints.connect(cfg, fallback.url, settings=settings, role="container")
        except ShimError as exc:
            if exc.code == PALACE_MISMATCH:
                raise
            return degraded_or_refuse(cfg, settings, f"{fallback}; and TCP {fallback.url}: {exc}", "container")
    except ShimError as exc:  # SSHBridgeError included: its code survives
        if exc.code == PALACE_MISMATCH or getattr(exc, "refuse", False):
            raise  # another palace, or a host we could not verify: neither proves that no broker runs
        return degraded_or_refuse(cfg, settings, f"cannot reach the host broker over SSH: {exc}", "container")
    except TimeoutError as exc:
        return degraded_or_refuse(cfg, settings, f"the SSH path to the host broker did not finish: {exc}", "container")
    link = AsyncLink(conn)
    handshake.prove(link, cfg, "container", settings.connect_timeout)
    return link


# --------------------------------------------------------------------------- degraded mode
def hold_lock(paths: state.StatePaths) -> tuple[int | None, str | None]:
    """(fd holding broker.lock, None) when we took it, else (None, why not). A lock that cannot be opened
    or taken counts as held: when in doubt, no engine of our own (never two writers)."""
    from mp_ssh_bridge.election import open_lock, try_lock

    try:
        fd = open_lock(paths)
    except OSError as exc:
        return None, f"{paths.lock} cannot be opened ({exc.strerror or exc}), so this session cannot prove no broker runs"
    try:
        if try_lock(fd):
            return fd, None
    except OSError as exc:
        os.close(fd)
        return None, f"{paths.lock} cannot be locked ({exc.strerror or exc}), so this session cannot prove no broker runs"
    os.close(fd)
    return None, (f"another process holds {paths.lock} (a broker starting, or a session already in degraded mode), "
                  "which may still be alive but does not answer")


def orphan_engine(paths: state.StatePaths) -> str | None:
    """Why not to start an engine: engine.json names a broker's engine that still runs on this machine
    (its broker was killed; on macOS nothing kills the engine with it), or None.

    An engine recorded on another machine cannot be checked from here; its broker is dead by the
    broker.json rule, and the engine follows it once its stdin closes."""
    record = state.read_broker_json(paths.engine)
    if record is None or not liveness.same_machine(record) or liveness.pid_gone(record) is not None:
        return None
    return (f"{paths.engine} names engine pid {record['pid']} of a broker that is gone, and it still runs "
            "(finishing its last call, or stuck)")


def resolve_engine(settings: Settings) -> list[str]:
    """The real engine's argv (MP_BRIDGE_ENGINE), never the shim itself."""
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    try:
        return resolve(settings.engine_argv)
    except EngineNotFound as exc:
        raise ShimError(BROKER_UNREACHABLE, str(exc)) from None


class ProcessLink(Link):
    """Degraded mode: the engine as our own child, over its stdio; holds broker.lock while it runs."""

    transport = "engine"
    degraded = True

    def __init__(
        self, proc: subprocess.Popen, reason: str, lock_fd: int | None, max_line_bytes: int,
        beacon: DegradedBeacon | None = None,
    ) -> None:
        self.proc = proc
        self.reason = reason
        self.lock_fd = lock_fd
        self._frames = FrameBuffer(max_line_bytes)
        self.beacon = beacon
        self.endpoint = f"engine pid {proc.pid}"
        self._send_lock = threading.Lock()
        self._closed = False

    def recv(self, timeout: float | None = None) -> bytes | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                frame = self._frames.next_frame()
            except LineTooLong as exc:
                raise ShimError(LINE_TOO_LONG, f"the engine sent a line above {exc.limit} bytes") from exc
            if frame is not None:
                return frame
            chunk = os.read(fd, 262144)
            if not chunk:
                return self._frames.rest()
            self._frames.feed(chunk)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._send_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the engine exits at EOF
        except OSError:
            pass
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        if self.beacon is not None:
            self.beacon.stop()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class DegradedBeacon:
    """Keeps `degraded.json` fresh while this session's own engine runs, and removes it after.

    flock does not reach across a VM boundary; this heartbeat does, so a broker
    (or another session) on the other side will not become a second writer.
    Best effort: an unwritable state directory only costs the warning.
    """

    def __init__(self, settings: Settings, engine_pid: int) -> None:
        self.path = settings.paths.degraded
        self.schedule = liveness.BeatSchedule(settings.heartbeat_interval)  # a wake from sleep beats within 1 s
        self.record = {
            "pid": os.getpid(), "engine_pid": engine_pid, **liveness.writer_identity(),
            "palace": str(settings.palace_path), "heartbeat": time.time(),
        }
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._run, name="degraded-beacon", daemon=True).start()

    def _beat(self) -> None:
        self.record["heartbeat"] = time.time()
        try:
            state.write_json_atomic(self.path, self.record)
        except OSError as exc:
            log(30, f"cannot write {self.path} ({exc}): a broker on the other side of a VM boundary "
                         "would not know this session writes the palace")

    def _run(self) -> None:
        while not self._stop.wait(self.schedule.tick):
            if self.schedule.due():
                self.schedule.beaten()
                self._beat()

    def stop(self) -> None:
        self._stop.set()
        current = state.read_broker_json(self.path)
        if current is not None and current.get("pid") == self.record["pid"]:
            try:
                self.path.unlink()
            except OSError:
                pass


def degraded_or_refuse(cfg: Config, settings: Settings, reason: str, role: str) -> Link:
    """Run the engine directly — only when no broker can be alive; otherwise refuse."""
    paths = settings.paths
    record, verdict = liveness.record_alive(paths, settings.heartbeat_stale_after)
    alive = verdict is not None and verdict.alive
    other = liveness.live_degraded_writer(paths, settings.heartbeat_stale_after)
    if other is not None and other.get("pid") != os.getpid():
        raise ShimError(BROKER_UNREACHABLE, f"{reason}; and {liveness.describe_degraded(other, paths)}")
    lock_fd, held = hold_lock(paths)
    if held is None:
        held = orphan_engine(paths)
    if alive or held is not None:
        if lock_fd is not None:
            os.close(lock_fd)
        if alive and record is not None and verdict is not None:
            where = liveness.describe_machine(record) if verdict.foreign else "this machine"
            who = (f"broker.json names broker pid {record.get('pid')} ({where}): {verdict.why}, which may still be "
                   "alive but does not answer")
        else:
            who = str(held)
        raise ShimError(
            BROKER_UNREACHABLE,
            f"{reason}; {who}, so this session will NOT start its own "
            f"memory engine (that would make a second writer on the palace). Check it with `mp-bridge status`, "
            f"or stop it (its log: {paths.log})",
        )
    try:
        argv = resolve_engine(settings) + (["--palace", str(settings.palace)] if settings.palace else [])
        if cfg.read_only:
            argv.append("--read-only")  # the engine enforces it itself here
    except ShimError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise ShimError(exc.code, f"{reason}; and degraded mode is impossible: {exc}") from exc
    from mp_ssh_bridge import walrecover
    from mp_ssh_bridge.election import broker_environment

    for line in walrecover.recover_all(settings.memory.palace, settings.memory.kg):
        log(30, f"before starting the engine: {line}")
    env = broker_environment()  # no token or other session/client variable; read-only is the --read-only flag
    env["MEMPALACE_HUB_FORWARD"] = "0"  # a stdio server, never a proxy of some hub
    env[ENGINE_CHILD_ENV] = "1"  # a shim started as this engine refuses instead of recursing
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=2, env=env, bufsize=-1, close_fds=True
        )
    except OSError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise ShimError(BROKER_UNREACHABLE, f"{reason}; and the engine {argv[0]} could not be started: {exc}") from exc
    log(30, f"{reason}; no broker is alive, so this session runs its own engine (pid {proc.pid}): {' '.join(argv)}")
    time.sleep(0)  # let the child start before the first request
    return ProcessLink(proc, reason, lock_fd, cfg.max_line_bytes, DegradedBeacon(settings, proc.pid))
