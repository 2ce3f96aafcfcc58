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
   (`ssh_host` set: through this machine's container daemon, as below), else a
   bounded wait watching its heartbeat, then a refusal that names it.
   Container role: the socket in broker.json if it happens to work, else this
   container's daemon (`mp_ssh_bridge.daemon.connect`: found, or elected and
   started), which relays to the host's broker over one SSH connection or owns
   the palace for the whole container. A container session never runs an
   engine of its own.
4. Host role only — degraded mode, only after proving no broker can be alive (pid dead on this
   machine, or a heartbeat seen standing still for `heartbeat_stale_after` by
   this machine's clock; and nobody holds broker.lock) and claiming the palace
   as its `local` owner (owner.json, docs/PROTOCOL.md "Ownership"): the real
   engine as our own child (`localowner`, which hands it over on request). An
   owner that will release the palace — a grant; the host's broker, from where
   no SSH path is configured — is waited for, bounded by `owner_wait`. When a
   broker may be alive but does not answer, or another session runs its own
   engine, refuse (BROKER_UNREACHABLE) — never a second writer.

Runs in the shim's `connect` thread; everything here is blocking.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

from mp_ssh_bridge import endpoints, liveness, localowner, owner, state
from mp_ssh_bridge.config import ENGINE_CHILD_ENV, Config
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import PalaceMismatch, ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.protocol import BROKER_UNREACHABLE, SHIM_BACKSTOP_GRACE_S
from mp_ssh_bridge.settings import Settings, load

OnWait = Callable[[str | None], None]  # told what the session waits for (None: no longer waiting)

CONTAINER_DIRECT_TIMEOUT = 0.5  # the socket in broker.json from a container: works on a plain bind mount, or not at all


def load_settings(palace_flag: str | None) -> Settings:
    return load(palace=palace_flag)


def discover(cfg: Config, fast_failure: str = "", on_wait: OnWait | None = None) -> Link:
    """A Link to the broker for our palace, or to a degraded-mode engine; raises ShimError.

    `on_wait(text)`: what this session is waiting for while the palace's owner has yet to release it (None
    once it no longer waits), for the session's own deadline errors."""
    settings = load_settings(cfg.palace_flag)
    if settings.broker:
        return endpoints.connect(cfg, settings.broker, settings=settings, role=settings.resolved_role())
    if settings.resolved_role() == "container":
        return _container(cfg, settings, on_wait)
    return _host(cfg, settings, fast_failure, on_wait)


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


def _host(cfg: Config, settings: Settings, fast_failure: str, on_wait: OnWait | None = None) -> Link:
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
            return _container(cfg, settings, on_wait)
        return degraded_or_refuse(cfg, settings, f"no broker could be started: {exc}", "host", on_wait)
    except EnsureError as exc:
        return degraded_or_refuse(cfg, settings, f"no broker could be started: {exc}", "host", on_wait)
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
def _container(cfg: Config, settings: Settings, on_wait: OnWait | None = None) -> Link:
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


WAIT_POLL_S = 0.2  # while waiting for the palace: how often to try the claim again
CHECK_IT = "Check it with `mp-bridge status`, or stop it (its log: {log})"


class _Blocked(Exception):
    """Why this session may not run its engine now.

    `fact` for a refusal (skipped when the reason given already names one of `keys`), `holding` (who holds the
    palace and since when, for a wait; `whom` without the time), `advice` (what to do), and `waitable`: an
    owner that will release the palace.
    """

    def __init__(self, fact: str, *, keys: tuple[str, ...] = (), advice: str = "", waitable: bool = False,
                 holding: str = "", whom: str = "") -> None:
        super().__init__(fact)
        self.fact = fact
        self.keys = keys
        self.advice = advice
        self.waitable = waitable
        self.holding = holding or fact
        self.whom = whom or "the palace's owner"  # who is waited for, without how long it has held the palace


def _names_it(reason: str, blocked: _Blocked) -> bool:
    return any(k and k in reason for k in blocked.keys)


def _refusal(reason: str, blocked: _Blocked) -> str:
    """Each fact once: the reason, the obstacle (unless the reason already names it), the consequence, advice."""
    text = reason if _names_it(reason, blocked) else f"{reason}; {blocked.fact}"
    text += ". This session will NOT start its own memory engine"
    if "second writer" not in text:
        text += " (that would make a second writer on the palace)"
    if blocked.advice and blocked.advice not in text:
        text += f". {blocked.advice}"
    return text


def _gave_up(reason: str, blocked: _Blocked, spent: float, limit: float) -> str:
    held = "that owner still holds the palace" if _names_it(reason, blocked) else blocked.holding
    text = (f"{reason}; {held}, and this session waited {spent:.0f} s for it (MP_BRIDGE_OWNER_WAIT={limit:g}), so it "
            "will NOT start its own memory engine")
    return text + (f". {blocked.advice}" if blocked.advice else "")


def _may_wait_for_broker(settings: Settings, role: str, record: dict) -> bool:
    """A broker releases the palace only when it exits: worth waiting for from where it cannot be reached (no SSH
    path configured: a container, or a session on another machine than the broker's)."""
    return not ssh_configured(settings) and (role == "container" or liveness.from_another_machine(record))


def _owner_blocked(settings: Settings, role: str, record: dict | None, holds: bool) -> _Blocked:
    """owner.json's live holder (`holds`), or a waiting request that outranks a `local` claim."""
    if record is None or record.get("kind") not in owner.RANK:  # another claim under way, or a half-written one
        return _Blocked(f"another process is claiming the palace ({settings.paths.owner})", waitable=True,
                        whom="another claim")
    kind, pid = record.get("kind"), record.get("pid")
    whom = localowner.who(record)
    desc = owner.describe(record) if holds else whom
    holding = f"{desc} holds the palace" if holds else f"{desc} waits for the palace ahead of this session"
    keys = (f"pid {pid}",) if isinstance(pid, int) and kind != "grant" else ()
    if kind == "grant":
        return _Blocked(holding, advice="It ends when its command exits: try again then, or raise MP_BRIDGE_OWNER_WAIT",
                        waitable=True, whom=whom)
    if kind == "broker":
        if _may_wait_for_broker(settings, role, record):
            advice = ("Set MP_BRIDGE_SSH_HOST (the SSH alias of the broker's host) so that this session reaches that "
                      "broker over SSH, or stop it on its machine (`mp-bridge stop`)")
            return _Blocked(holding, keys=keys, advice=advice, waitable=True, whom=whom)
        return _Blocked(holding, keys=keys, advice=CHECK_IT.format(log=settings.paths.log))
    return _Blocked(holding, keys=keys, advice="End that session, or check it with `mp-bridge status`")


def _try_claim(settings: Settings, role: str, waiting: bool, request_token: str | None) -> tuple[int | None, owner.Claim]:
    """(broker.lock fd, owner.Claim of kind local) once no broker can be alive and the palace is free; else _Blocked."""
    paths, stale = settings.paths, settings.heartbeat_stale_after
    other = liveness.live_degraded_writer(paths, stale)
    if other is not None and other.get("pid") != os.getpid():
        raise _Blocked(liveness.describe_degraded(other, paths), keys=(f"pid {other.get('pid')}",))
    current = owner.live_holder(paths, stale)
    if current is not None:
        raise _owner_blocked(settings, role, current, holds=True)
    ahead = owner.outranking(owner.live_requests(paths, stale), "local", request_token)
    if ahead is not None:
        raise _owner_blocked(settings, role, ahead, holds=False)
    record, verdict = liveness.record_alive(paths, stale)
    if record is not None and verdict is not None and verdict.alive:
        pid = record.get("pid")
        where = liveness.describe_machine(record) if verdict.foreign else "this machine"
        fact = f"broker.json names broker pid {pid} ({where}): {verdict.why}, which may still be alive but does not answer"
        # Waited for only once it has held owner.json: a broker from before owner.json never hands the palace over.
        waitable = waiting and _may_wait_for_broker(settings, role, record)
        whom = f"the broker (pid {pid} on {record.get('host') or '?'})"
        raise _Blocked(fact, keys=(f"pid {pid}",), advice=CHECK_IT.format(log=paths.log), waitable=waitable,
                       holding=f"{whom} is still running", whom=whom)
    lock_fd, held = hold_lock(paths)
    key = str(paths.lock)
    if held is None:
        held, key = orphan_engine(paths), str(paths.engine)
    if held is not None:
        if lock_fd is not None:
            os.close(lock_fd)
        raise _Blocked(held, keys=(key,), advice=CHECK_IT.format(log=paths.log))
    try:
        claim = owner.claim(paths, "local", stale, pid=os.getpid(), request_token=request_token,
                            fields={"what": localowner.WHAT})
    except owner.Busy as busy:
        if lock_fd is not None:
            os.close(lock_fd)
        raise _owner_blocked(settings, role, busy.record, holds="waits for the palace ahead" not in str(busy)) from None
    except OSError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise _Blocked(f"{paths.owner} cannot be written ({exc.strerror or exc}), so this session cannot claim the "
                       "palace", keys=(str(paths.owner),)) from None
    return lock_fd, claim


def _own_the_palace(
    settings: Settings, reason: str, role: str, on_wait: OnWait | None,
) -> tuple[int | None, owner.Claim, tuple[float, str] | None]:
    """broker.lock, the `local` claim, and (when it had to wait) how long, for whom. Waits, bounded by
    `owner_wait`, for an owner that will release the palace (a grant; the host's broker seen from where it
    cannot be reached); refuses at once otherwise. Never an engine without the claim: never two writers."""
    start = time.monotonic()
    request: owner.Request | None = None
    blocked: _Blocked | None = None
    try:
        while True:
            try:
                lock_fd, claim = _try_claim(settings, role, blocked is not None, request.token if request else None)
            except _Blocked as now:
                if not now.waitable:
                    raise ShimError(BROKER_UNREACHABLE, _refusal(reason, now)) from None
                spent = time.monotonic() - start
                if spent >= settings.owner_wait:
                    raise ShimError(BROKER_UNREACHABLE, _gave_up(reason, now, spent, settings.owner_wait)) from None
                if request is None:
                    _engine_argv(settings, reason)  # no wait for a palace this session could not use anyway
                    log(30, f"{reason}; {now.holding}: waiting for it to release the palace (at most "
                            f"{settings.owner_wait:g} s, MP_BRIDGE_OWNER_WAIT)")
                    request = owner.Request(settings.paths, "local", what=localowner.WHAT)
                blocked = now
                request.beat()
                if on_wait is not None:
                    on_wait(f"{now.holding} (this session waits for it at most MP_BRIDGE_OWNER_WAIT="
                            f"{settings.owner_wait:g} s)")
                time.sleep(WAIT_POLL_S)
                continue
            if blocked is None:
                return lock_fd, claim, None
            spent = time.monotonic() - start
            log(30, f"the palace is free after waiting {spent:.0f} s for {blocked.whom}: this session claims it")
            return lock_fd, claim, (spent, blocked.whom)
    finally:
        if request is not None:
            request.withdraw()
        if on_wait is not None and blocked is not None:
            on_wait(None)


def _engine_argv(settings: Settings, reason: str, read_only: bool = False) -> list[str]:
    try:
        argv = resolve_engine(settings) + (["--palace", str(settings.palace)] if settings.palace else [])
    except ShimError as exc:
        raise ShimError(exc.code, f"{reason}; and degraded mode is impossible: {exc}") from exc
    if read_only:
        argv.append("--read-only")  # the engine enforces it itself here
    return argv


def degraded_or_refuse(cfg: Config, settings: Settings, reason: str, role: str, on_wait: OnWait | None = None) -> Link:
    """Run the engine directly, as the palace's `local` owner — only when no broker can be alive and this session
    holds the claim (waiting for it when its holder will release it); otherwise refuse."""
    paths = settings.paths
    lock_fd, claim, waited = _own_the_palace(settings, reason, role, on_wait)

    def give_back() -> None:
        if lock_fd is not None:
            os.close(lock_fd)
        claim.release()

    try:
        argv = _engine_argv(settings, reason, cfg.read_only)
        from mp_ssh_bridge import walrecover
        from mp_ssh_bridge.election import broker_environment

        for line in walrecover.recover_all(settings.memory.palace, settings.memory.kg):
            log(30, f"before starting the engine: {line}")
        env = broker_environment()  # no token or other session/client variable; read-only is the --read-only flag
        env["MEMPALACE_HUB_FORWARD"] = "0"  # a stdio server, never a proxy of some hub
        env[ENGINE_CHILD_ENV] = "1"  # a shim started as this engine refuses instead of recursing
        try:
            # Forked from localowner's long-lived spawner thread with a parent-death signal (Linux): a killed
            # session's engine stops its running call too. Never from this `connect` thread, which soon ends.
            proc = localowner.spawn(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=2, env=env, bufsize=-1, close_fds=True
            )
        except OSError as exc:
            raise ShimError(BROKER_UNREACHABLE, f"{reason}; and the engine {argv[0]} could not be started: {exc}") from exc
    except BaseException:
        give_back()
        raise
    log(30, f"{reason}; no broker is alive, so this session runs its own engine (pid {proc.pid}): {' '.join(argv)}")
    holder = localowner.LocalOwner(paths, claim, settings.heartbeat_stale_after, settings.heartbeat_interval,
                                   str(settings.palace_path))
    # How long a hand-over lets the running call finish: the session's own deadline (+ grace), or, when it set
    # none, the bound the broker gives a silent engine (stall_timeout), capped by how long a waiting grant is
    # patient (owner_wait). Past it the engine is stopped and that call's outcome is unknown (never retried).
    if cfg.timeout_ms > 0:
        call_bound = cfg.timeout_ms / 1000 + SHIM_BACKSTOP_GRACE_S
    else:
        call_bound = min(settings.stall_timeout, settings.owner_wait)
    return localowner.ProcessLink(proc, reason, lock_fd, cfg.max_line_bytes, holder, call_bound, waited)
