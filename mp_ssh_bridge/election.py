"""The election client: make sure one healthy broker serves this palace.

What a client needs to elect a broker, without loading the broker itself
(the server is ~300 modules): probe, lock, spawn. Idempotent and race-free:
whoever wins a non-blocking flock on broker.lock spawns the broker and hands
it the locked descriptor (the lock travels with the open file, so there is no
gap in which a second process could win), the rest wait for broker.json and a
health round trip. Every wait is bounded. The shim's election calls
`ensure_broker()` in-process; `mempalace-broker --ensure` (run over SSH from a
container) calls the same function on the host.

flock is coherent on one kernel only. A VM or container sharing the state
directory through a bind mount has its own, so there broker.json decides
(`mp_ssh_bridge.liveness`, one rule on every side): a live broker on another
machine is refused by name, never started beside, and its socket never
removed. Who may *write* the palace is owner.json's to say
(`mp_ssh_bridge.owner`): a live degraded-mode session or a grant is no reason
to refuse a broker — it is started (or found) as usual, and its engine waits
until the palace is handed over.

The broker is configured by its own start, never by the session that happens
to elect it: it gets the palace's identity as flags, and an environment from
which every per-session and client variable (`config.session_only_env_names`)
has been removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import subprocess
import sys
import time
from typing import Any

from mp_ssh_bridge import config, handshake, hostinfo, liveness, palace, state
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.links import connect_unix
from mp_ssh_bridge.settings import Settings

BROKER_MODULE = "mp_ssh_bridge_broker"  # the import name of the repository's broker/ folder (pyproject)


class EnsureError(Exception):
    """No healthy broker could be reached or started (the message says why)."""


class MemoryConflict(EnsureError):
    """The broker of this state directory serves other files than the ones asked for (-32067 to an agent)."""


class ForeignOwner(EnsureError):
    """broker.json names a live broker on another machine (liveness): never start a second one beside it."""


def open_lock(paths: state.StatePaths) -> int:
    return os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_lock(fd: int) -> bool:
    """Non-blocking exclusive flock; False when someone else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def probe(endpoint: str, timeout: float) -> dict[str, Any] | None:
    """`broker/status` over a unix:// endpoint; the status, or None when it does not answer."""
    if not endpoint.startswith("unix://"):
        return None
    try:
        link = connect_unix(endpoint[len("unix://") :], timeout, config.DEFAULT_MAX_LINE_BYTES, endpoint)
    except OSError:
        return None
    try:
        return handshake.broker_status(link, timeout, {"probe": True})
    except (OSError, ValueError, ShimError):  # no answer, or a refusal: not a healthy broker either way
        return None
    finally:
        link.close()


def healthy_record(settings: Settings, timeout: float = 1.0) -> dict[str, Any] | None:
    """broker.json, if the broker it names answers on its socket."""
    record = state.read_broker_json(settings.paths.json)
    if record is None or not isinstance(record.get("endpoint"), str):
        return None
    status = probe(record["endpoint"], timeout)
    if status is None or (status.get("broker") or {}).get("pid") != record.get("pid"):
        return None
    return record


def describe(record: dict[str, Any], started: bool) -> dict[str, Any]:
    return {
        "endpoint": record["endpoint"],
        "pid": record.get("pid"),
        "palace": record.get("palace"),
        "palace_id": record.get("palace_id"),
        "state_dir": record.get("state_dir"),
        "version": record.get("broker_version"),
        "started": started,
    }


def check_palace(settings: Settings, record: dict[str, Any]) -> None:
    why = palace.mismatch(settings.memory, record)
    if why:
        raise MemoryConflict(
            f"the broker in {settings.paths.root} (pid {record.get('pid')}) does not serve the memory asked for: "
            f"{why}; one state directory serves one set of files — leave MEMPALACE_PATH unset (each set of files "
            "gets its own state directory) or point it elsewhere"
        )


# Variables mempalace reads as paths: a relative one means "from the agent's cwd" to a plain engine, and the
# broker (and its engine) run in "/": they get the absolute path the electing session meant.
PATH_VARIABLES = (*palace.PALACE_ENV, "MEMPALACE_CONFIG_DIR")


def broker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The electing process's environment minus everything that belongs to one session."""
    drop = config.session_only_env_names() | {config.ENGINE_CHILD_ENV} | set(hostinfo.SERVICE_MANAGER_ENV)
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in drop}
    for name in PATH_VARIABLES:
        if env.get(name) and not os.path.isabs(os.path.expanduser(env[name])):
            env[name] = os.path.abspath(os.path.expanduser(env[name]))
    return env


def elected_argv(module: str, mode_flag: str, settings: Settings, lock_fd: int) -> list[str]:
    """`python -m <module> <mode_flag> --lock-fd N` with the palace's identity as flags (nothing else travels):
    the one command line of every process an election starts holding its lock (the host broker, the container
    daemon, the daemon's local-owner broker)."""
    argv = [sys.executable, "-m", module, mode_flag, "--lock-fd", str(lock_fd), "--mempalace-path", str(settings.state_dir)]
    if settings.palace is not None:
        argv += ["--palace", str(settings.palace)]
    return argv


def broker_argv(settings: Settings, lock_fd: int) -> list[str]:
    """`python -m <broker> --detach`: the host broker the election starts."""
    return elected_argv(BROKER_MODULE, "--detach", settings, lock_fd)


def spawn_detached(settings: Settings, lock_fd: int) -> None:
    """Start the broker holding our locked fd; returns once it forked."""
    paths = settings.paths
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            broker_argv(settings, lock_fd),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(lock_fd,),
            start_new_session=True,
            cwd="/",
            env=broker_environment(),
        )
    finally:
        os.close(log_fd)
    try:
        proc.wait(timeout=30)  # the --detach parent exits right after its fork
    except subprocess.TimeoutExpired:
        pass


def log_tail(settings: Settings, lines: int = 15) -> str:
    from mp_ssh_bridge import brokerlog

    return brokerlog.tail(settings.paths.log, lines)


def ensure_broker(settings: Settings, timeout: float | None = None, *, wait_foreign: bool = False) -> dict[str, Any]:
    """Return the running broker's description, starting one if needed (bounded wait).

    A live broker on another machine (liveness.live_foreign_owner) is refused with ForeignOwner,
    naming it: at once, or, with `wait_foreign` (a shim, which has no other way), after watching
    its heartbeat up to the same bound — a broker whose heartbeat stands still long enough is
    reclaimed like any dead one.
    """
    paths = settings.paths
    try:
        state.ensure_private_dir(paths.root)
    except (state.UnsafeDirectory, OSError) as exc:
        raise EnsureError(f"cannot use state directory {paths.root}: {exc}") from exc
    limit = settings.ensure_timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    spawned = False
    pause = 0.02
    while True:
        record = healthy_record(settings)
        if record is not None:
            check_palace(settings, record)
            return describe(record, spawned)
        # A live degraded-mode session (degraded.json) no longer refuses: the broker's engine starts only once it
        # owns the palace, which such a session hands over (docs/PROTOCOL.md "Ownership").
        owner = liveness.live_foreign_owner(paths, settings.heartbeat_stale_after)
        if owner is not None:
            if not wait_foreign or time.monotonic() >= deadline:
                watched = f" (watched for {limit:.0f} s)" if wait_foreign else ""
                raise ForeignOwner(liveness.describe_owner(*owner, paths, settings.heartbeat_stale_after) + watched)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        try:
            fd = open_lock(paths)
        except OSError as exc:
            raise EnsureError(f"cannot open {paths.lock}: {exc.strerror or exc}") from exc
        try:
            if try_lock(fd):
                if spawned:
                    raise EnsureError(
                        f"the broker we started exited before it was ready; see {paths.log}:\n{log_tail(settings)}"
                    )
                spawn_detached(settings, fd)
                spawned = True
        except OSError as exc:
            raise EnsureError(f"cannot elect a broker in {paths.root}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)  # the broker keeps the lock through its own copy
        if time.monotonic() >= deadline:
            holder = state.read_broker_json(paths.json) or {}
            raise EnsureError(
                f"no healthy broker for {paths.root} after {limit:.0f}s"
                + (f" (broker.json names pid {holder.get('pid')} at {holder.get('endpoint')}, which does not answer)" if holder else "")
                + (f"; log {paths.log}:\n{log_tail(settings)}" if spawned else "")
            )
        time.sleep(pause + random.uniform(0, pause))
        pause = min(pause * 1.5, 0.2)
