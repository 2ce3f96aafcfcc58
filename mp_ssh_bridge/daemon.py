"""A container session's way to its container's daemon: find it (fast), or elect and start it (slow).

Why: alone, every container session imported asyncssh, opened its own SSH connection and, without a
fresh broker.json through the mount, ran a remote `--ensure`: 673-683 ms from spawn to first status
against 28-29 ms on the host (measured at 8dee0d3). And with no SSH path, the second session of a
container got no memory at all (the first ran the engine itself). Now one daemon per container
(`python -m mp_ssh_bridge.containerd`, which decides its mode) does that work once: it relays every
session over one SSH connection to the host's broker, or, with no bridge, runs the one engine for
the container as the palace's `local` owner. A session after the first only connects to its socket.

Where: `config.daemon_dir_for(state dir)` — `/tmp/mp-bridge-<uid>/daemon-<key>`, a directory of the
container's own, never the bind-mounted state directory (its broker.sock and broker.lock are the host
broker's). The daemon keeps its broker.lock (the election's flock), broker.sock and broker.json there
(`state.StatePaths.daemon_paths`).

`fast_connect` is the shim's fast path (stdlib; the daemon's broker.json names its socket). `connect`
is discovery's: the same, else the flock election (the winner spawns the daemon with the locked
descriptor, as `election.spawn_detached` does for the host broker; the rest wait), bounded by
`ensure_timeout` (and, through a relay, the SSH path's own bound for the first handshake). Either proves
the link (`handshake.prove`): through a relay the host broker answers the palace identity check, in
local-owner mode the daemon does — and, being on this side, its files are compared as a host broker's.
The daemon's directory and its parent must be this user's and not writable by others, or its records are
not trusted.
"""

from __future__ import annotations

import json
import os

from mp_ssh_bridge import endpoints, handshake
from mp_ssh_bridge.config import Config, daemon_dir_for
from mp_ssh_bridge.links import Link

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mp_ssh_bridge import state
    from mp_ssh_bridge.settings import Settings

RECORD = "broker.json"
SPAWN_WAIT_S = 30.0  # the --detach parent exits right after its fork


def record_path(state_dir: str) -> str:
    return os.path.join(daemon_dir_for(state_dir), RECORD)


def read_record(state_dir: str) -> dict[str, Any] | None:
    """The daemon's broker.json (its pid, mode, socket, SSH connection and sessions), or None: none there, or its
    directory (or that directory's parent) is not this user's private one (`_ours`: never act on a planted record)."""
    path = record_path(state_dir)
    here = os.path.dirname(path)
    try:
        _ours(os.path.dirname(here))
        _ours(here)
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):  # ConnectionError (not ours) is an OSError
        return None
    return record if isinstance(record, dict) else None


def _endpoint(record: dict[str, Any] | None) -> str:
    endpoint = record.get("endpoint") if record else None
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        raise ConnectionError(f"the container daemon's {RECORD} names no unix endpoint ({endpoint!r})")
    return endpoint


def _ours(path: str) -> None:
    """Refuse a directory someone else could have planted or can write (another user of the container pre-creating
    /tmp/mp-bridge-<uid> with a record naming their socket): ours, and no group or other write. A stat each."""
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ConnectionError(f"{path} is not this user's private directory (owner uid {st.st_uid}, mode "
                              f"{st.st_mode & 0o777:o}): its records are not trusted")


def _link(cfg: Config, record: dict[str, Any] | None, timeout: float) -> Link:
    """Dial the daemon the record names and prove it (palace identity included); a relayed session says "ssh" to
    the host broker (its status, `mp-bridge status`), a local owner's "unix"."""
    link = endpoints.dial(cfg, _endpoint(record), timeout=timeout)
    if record and record.get("mode") == "relay":
        link.transport = "ssh"
    handshake.prove(link, cfg, "container", timeout)
    return link


def fast_connect(cfg: Config) -> Link:
    """The running daemon's socket, proven. Raises OSError (FileNotFoundError: no daemon), ShimError (NoAnswer: try
    the slow path, which waits longer), ValueError."""
    path = record_path(cfg.state_dir)
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    here = os.path.dirname(path)
    _ours(os.path.dirname(here))
    _ours(here)
    return _link(cfg, record if isinstance(record, dict) else None, cfg.connect_timeout)


# --------------------------------------------------------------------------- slow path: elect and start
def daemon_environment() -> dict[str, str]:
    """The electing session's environment minus its own session settings; unlike a host broker, the daemon keeps
    the client settings that say how to reach the host (MP_BRIDGE_SSH_HOST, MP_BRIDGE_SSH_CONFIG, ...)."""
    from mp_ssh_bridge import config
    from mp_ssh_bridge.election import broker_environment

    keep = {config.env_name(f) for f in config.SCOPES["client"] if f not in ("broker", "broker_token")}
    env = broker_environment()
    env.update({k: v for k, v in os.environ.items() if k in keep})
    return env


def daemon_argv(settings: Settings, lock_fd: int) -> list[str]:

    from mp_ssh_bridge.election import elected_argv

    return elected_argv("mp_ssh_bridge.containerd", "--detach", settings, lock_fd)


def spawn(settings: Settings, paths: state.StatePaths, lock_fd: int) -> None:
    """Start the daemon holding our locked descriptor; returns once its --detach parent has forked."""
    import subprocess

    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            daemon_argv(settings, lock_fd), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            pass_fds=(lock_fd,), start_new_session=True, cwd="/", env=daemon_environment(),
        )
    finally:
        os.close(log_fd)
    try:
        proc.wait(timeout=SPAWN_WAIT_S)
    except subprocess.TimeoutExpired:
        pass


def alive(record: dict[str, Any] | None) -> bool:
    """The record's daemon runs on this machine (pid alive, same start time when recorded)."""
    from mp_ssh_bridge import liveness

    return bool(record) and liveness.pid_gone(record) is None  # type: ignore[arg-type]


def connect(cfg: Config, settings: Settings) -> Link:
    """A proven link through this container's daemon, starting it when none runs. Raises ShimError: the
    daemon's own refusal (a host key it could not verify, another palace, ...), or why none could be started,
    with the end of its log."""
    import random
    import time

    from mp_ssh_bridge import brokerlog, state
    from mp_ssh_bridge.diag import log
    from mp_ssh_bridge.election import open_lock, try_lock
    from mp_ssh_bridge.errors import EndpointError, NoAnswer, ShimError
    from mp_ssh_bridge.protocol import BROKER_UNREACHABLE

    paths = settings.paths.daemon_paths()
    try:
        state.ensure_private_dir(state.runtime_dir())  # created 0700 whatever the umask, and refused if not ours
        state.ensure_private_dir(paths.own)
    except (state.UnsafeDirectory, OSError) as exc:
        raise ShimError(BROKER_UNREACHABLE, f"cannot use the container daemon's directory {paths.own}: {exc}") from exc
    # Through a relay the first handshake may wait for an SSH connection and a remote --ensure: the relay's own bound.
    handshake_bound = settings.connect_timeout + settings.ensure_timeout + 30
    limit = settings.ensure_timeout + handshake_bound
    deadline = time.monotonic() + limit
    spawned = False
    pause = 0.01
    last = ""
    while True:
        record = state.read_broker_json(paths.json)
        if record is not None and alive(record):
            try:
                return _link(cfg, record, min(handshake_bound, max(1.0, deadline - time.monotonic())))
            except (EndpointError, NoAnswer) as exc:  # not listening yet, just gone, or slow: any refusal is final
                last = str(exc)
            except (OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        else:
            fd = open_lock(paths)
            try:
                if try_lock(fd):
                    if spawned:
                        raise ShimError(BROKER_UNREACHABLE, f"the container daemon exited before it was ready; "
                                        f"its log {paths.log}:\n{brokerlog.tail(paths.log, 15)}")
                    log(20, f"starting this container's daemon ({paths.own})")
                    spawn(settings, paths, fd)
                    spawned = True
            except OSError as exc:
                raise ShimError(BROKER_UNREACHABLE, f"cannot elect the container daemon in {paths.own}: "
                                f"{exc.strerror or exc}") from exc
            finally:
                os.close(fd)  # the daemon keeps the lock through its own copy
        if time.monotonic() >= deadline:
            raise ShimError(
                BROKER_UNREACHABLE,
                f"no container daemon answered within {limit:.0f} s (MP_BRIDGE_ENSURE_TIMEOUT + the SSH path's bound)"
                + (f": {last}" if last else "") + f"; its log {paths.log}:\n{brokerlog.tail(paths.log, 15)}",
            )
        time.sleep(pause + random.uniform(0, pause))
        pause = min(pause * 1.5, 0.1)
