"""The shim's slow path: find or elect a broker (a container: its daemon); never an engine of its own.

Loaded only when the fast path (broker.json -> socket) did not give a
connection, so it may import the settings model and the election client.
In order (README "How it works", docs/PROTOCOL.md):

1. `MEMPALACE_BROKER` set: that endpoint, verbatim (`endpoints.dial`), no election.
2. `broker.json`: connect, `broker/status` round trip, palace identity.
3. Host role: `election.ensure_broker()` — the flock election (the winner
   spawns a detached broker, the rest wait), bounded by `ensure_timeout`.
   When broker.json names a live broker on another machine (the other side
   of a VM boundary, `liveness`): the SSH path if one is configured
   (`ssh_host` set: through this machine's daemon, as below).
   Container role: the socket in broker.json if it happens to work, else this
   container's daemon (`mp_ssh_bridge.daemon.connect`: found, or elected and
   started), which relays to the host's broker over one SSH connection or owns
   the palace for the whole container.
4. Host role, when no broker could be started (or one on another machine
   cannot be reached): a refusal that says why (BROKER_UNREACHABLE). A session
   never runs an engine of its own (the old "degraded mode" is gone): a
   second writer is never the answer. The checks that stop a broker (a state
   directory it may not trust, an engine it cannot run) would stop a
   local-owner daemon just the same.

Runs in the shim's `connect` thread; everything here is blocking.
"""

from __future__ import annotations

from mp_ssh_bridge import endpoints, state
from mp_ssh_bridge.config import Config
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import PalaceMismatch, ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.protocol import BROKER_UNREACHABLE
from mp_ssh_bridge.settings import Settings, load

CONTAINER_DIRECT_TIMEOUT = 0.5  # the socket in broker.json from a container: works on a plain bind mount, or not at all


def load_settings(palace_flag: str | None) -> Settings:
    return load(palace=palace_flag)


def discover(cfg: Config, fast_failure: str = "") -> Link:
    """A Link to the broker for our palace (a container: through its daemon); raises ShimError."""
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
        raise _refuse(f"no broker could be started: {exc}") from exc
    except EnsureError as exc:
        raise _refuse(f"no broker could be started: {exc}") from exc
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


def _refuse(reason: str) -> ShimError:
    """No broker for this host session: the reason, and that this session runs no engine of its own (a second
    writer). The broker's own checks (a state directory it may not trust, an engine it cannot run) would stop a
    local-owner daemon just the same, so there is no other owner to try."""
    why = "" if "second writer" in reason else " (that would make a second writer on the palace)"  # each fact once
    return ShimError(BROKER_UNREACHABLE, f"{reason}. This session will NOT start its own memory engine{why}")


def ssh_configured(settings: Settings) -> bool:
    """An SSH path was set up on purpose (`ssh_host` from the environment or the config file), not just
    the default alias: a host-role session facing a live broker on another machine then takes it."""
    return "ssh_host" in settings.model_fields_set


# --------------------------------------------------------------------------- container
def _container(cfg: Config, settings: Settings) -> Link:
    """The host broker's socket through the mount if it happens to work, else this container's daemon (started
    when none runs): it relays to the host broker over its one SSH connection, or, with no bridge, owns the
    palace for the whole container (mp_ssh_bridge.daemon). Never an engine of this session's own."""
    try:
        return _direct(cfg, settings, CONTAINER_DIRECT_TIMEOUT, "container")
    except PalaceMismatch:
        raise
    except (OSError, ShimError, ValueError):
        pass  # the usual case across a VM boundary: the host's socket is not connectable from here
    from mp_ssh_bridge import daemon

    return daemon.connect(cfg, settings)
