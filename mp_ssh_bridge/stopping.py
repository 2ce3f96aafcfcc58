"""Stop the broker of one state directory, and signal nothing that is not proven to be it.

Why this module exists: `broker.json` lives in a state directory that a
container may share with its host through a bind mount, so the pid it names
can be a process of the *other* machine, or a pid this machine has since
reused. Signalling that pid blindly once killed an unrelated host process
from a container, and against a hung broker it reported success while the
broker stayed. Here a pid is signalled only when all of these hold:

1. broker.json was written on this machine: its `host`, `boot_id` and
   `pid_ns` are this machine's (liveness.same_machine);
2. the pid's start identity (`hostinfo.proc_start`) equals the `proc_start`
   the broker recorded (a record without it, from an older broker, can only
   be proven by 3a);
3. a. (plain stop) a `broker/status` round trip over the socket broker.json
      names answers with that same pid, or
   b. (`--force`, for a hung broker) broker.lock is held by someone: a
      non-blocking flock on a fresh descriptor fails.

A plain stop sends SIGTERM (the broker drains and cleans up after itself) and
waits, bounded, for the pid to go. `--force` sends SIGTERM, waits briefly,
then SIGKILLs the broker; its engine (only a pid whose parent was the broker
before the kill) gets a moment to exit on the EOF of its stdin, then SIGKILL;
broker.json and its socket are removed if they still name that pid, holding
broker.lock while doing so. A record that is surely stale (its pid is dead,
or now belongs to a process that started later) is never signalled; `--force`
removes it under the same lock.

`mp-bridge stop` (host role) and `mempalace-broker --stop` (what the container
role runs on the host over SSH) both call `stop_broker()`. It prints nothing:
it returns a `StopResult` (exit code and one message). Exit codes: 0 done or
nothing to do (no broker.json), 1 refused or failed, 2 unusable input (a
malformed broker.json). Stdlib only; the election client's probe is imported lazily.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mp_ssh_bridge import hostinfo, liveness, state

if TYPE_CHECKING:
    from mp_ssh_bridge.settings import Settings

OK, REFUSED, INVALID = 0, 1, 2
PROBE_TIMEOUT = 2.0  # a `broker/status` round trip; a healthy broker answers in milliseconds
FORCE_TERM_WAIT = 2.0  # --force: how long SIGTERM gets before SIGKILL (unless --timeout says otherwise)
KILL_WAIT = 5.0  # how long a SIGKILLed process may take to disappear
ENGINE_EOF_WAIT = 2.0  # --force: how long the engine gets to exit on its own once the broker is gone
POLL = 0.05
NOTHING = "nothing was signalled"
FORCE_HINT = "`mp-bridge stop --force`"


@dataclass(frozen=True)
class StopResult:
    """What happened: the exit code for the command and one line for the person."""

    code: int
    message: str


@dataclass(frozen=True)
class Proof:
    """The outcome of checking a live pid: proven (how), or not (why), and whether the record is surely stale."""

    proven: bool
    detail: str
    stale: bool = False


# --- settings errors (shared by the CLI commands) ------------------------------------------
def describe_settings_error(exc: BaseException, hint: str = "") -> str:
    """One line for a settings error: pydantic's multi-line ValidationError folded to `field: problem`."""
    parts: list[str] = []
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
        except Exception:  # noqa: BLE001 - not pydantic's errors(): fall back to str()
            items = []
        for item in items if isinstance(items, list) else []:
            loc = ".".join(str(x) for x in item.get("loc", ())) or "settings"
            got = repr(item.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            parts.append(f"{loc}: {item.get('msg')} (got {got})")
    text = "; ".join(parts) or " ".join(str(exc).split()) or type(exc).__name__
    return f"invalid settings: {text}" + (f" — {hint}" if hint else "")


# --- reading broker.json -------------------------------------------------------------------
def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) when there is no file, or (None, why it is unusable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    try:
        data = json.loads(text)
    except ValueError:
        return None, f"{path} is not valid JSON; nothing was signalled (if no broker runs, delete it)"
    if not isinstance(data, dict):
        return None, f"{path} is not valid JSON (not an object); nothing was signalled"
    return data, None


def _record_pid(record: dict[str, Any]) -> int | None:
    pid = record.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _socket_of(record: dict[str, Any]) -> Path | None:
    endpoint = record.get("endpoint")
    if isinstance(endpoint, str) and endpoint.startswith("unix://") and len(endpoint) > len("unix://"):
        return Path(endpoint[len("unix://") :])
    return None


# --- processes -----------------------------------------------------------------------------
def _gone(pid: int, start: str | None) -> bool:
    """The process that had `start` as its start identity no longer runs (exited, zombie, or pid reused)."""
    if not hostinfo.pid_alive(pid) or hostinfo.is_zombie(pid):
        return True
    return start is not None and hostinfo.proc_start(pid) != start


def _wait_gone(pid: int, start: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid, start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _signal(pid: int, sig: signal.Signals) -> str | None:
    """Send `sig`; None on success (or when the pid is already gone), else why it failed."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    except OSError as exc:
        return f"cannot send {sig.name} to pid {pid}: {exc.strerror or exc}"
    return None


def _engine_of(record: dict[str, Any], broker_pid: int) -> tuple[int | None, str | None]:
    """The engine pid broker.json names, and its start identity, if it is the broker's child now."""
    engine = record.get("engine")
    pid = engine.get("pid") if isinstance(engine, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None, None
    if hostinfo.parent_pid(pid) != broker_pid:
        return None, None
    return pid, hostinfo.proc_start(pid)


# --- broker.lock -----------------------------------------------------------------------------
@contextmanager
def _try_lock(paths: state.StatePaths) -> Iterator[str]:
    """Yield "free" (we hold broker.lock until the block ends), "held", or why it could not be tried."""
    from mp_ssh_bridge.election import open_lock, try_lock

    try:
        fd = open_lock(paths)
    except OSError as exc:
        yield f"cannot open {paths.lock}: {exc.strerror or exc}"
        return
    try:
        try:
            got = try_lock(fd)
        except OSError as exc:
            yield f"cannot lock {paths.lock}: {exc.strerror or exc}"
            return
        yield "free" if got else "held"
    finally:
        os.close(fd)  # releases the flock if we took it


def _remove_state(paths: state.StatePaths, record: dict[str, Any], pid: int, patience: float = 0.0) -> str:
    """Remove broker.json and its socket if they still name `pid`; only while broker.lock is ours.

    `patience`: how long to retry a held lock. A SIGKILLed multi-threaded process
    shows as a zombie before its last thread has closed its files (the lock).
    """
    deadline = time.monotonic() + patience
    while True:
        with _try_lock(paths) as lock:
            if lock == "free":
                return _remove_locked(paths, record, pid)
        if lock != "held" or time.monotonic() >= deadline:
            why = "broker.lock is held by another process (a new broker?)" if lock == "held" else lock
            return f"left broker.json and the socket alone: {why}"
        time.sleep(POLL)


def _remove_locked(paths: state.StatePaths, record: dict[str, Any], pid: int) -> str:
    """The removal itself, with broker.lock held by the caller."""
    current, problem = read_record(paths.json)
    if problem is not None:
        return f"left broker.json alone: {problem}"
    if current is not None and _record_pid(current) != pid:
        return f"left broker.json alone: it now names pid {current.get('pid')}"
    removed = []
    if current is not None and _unlink(paths.json):
        removed.append(str(paths.json))
    sock = _socket_of(record)
    if sock is not None and _is_socket(sock) and _unlink(sock):
        removed.append(str(sock))
    return "removed " + " and ".join(removed) if removed else "no broker.json or socket was left to remove"


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


# --- the proof ---------------------------------------------------------------------------------
def _foreign(record: dict[str, Any], pid: int) -> StopResult | None:
    """A refusal when broker.json was written on another machine (host, boot or pid namespace) than this one."""
    me = liveness.this_machine()
    if liveness.same_machine(record, me):
        return None
    mine = f"this machine is {me.host}, boot {me.boot_id or 'unknown'}" + (f", pid namespace {me.pid_ns}" if me.pid_ns else "")
    return StopResult(
        REFUSED,
        f"broker.json names pid {pid} on {liveness.describe_machine(record)}, not this "
        f"machine ({mine}): it belongs to the other side of a shared mount; stop it there, or from a container "
        f"with the SSH path (MP_BRIDGE_ROLE=container: `mp-bridge stop` runs `mempalace-broker --stop` on the "
        f"host over SSH); {NOTHING}",
    )


def _prove(paths: state.StatePaths, record: dict[str, Any], pid: int, force: bool, probe_timeout: float) -> Proof:
    """Is live `pid` the broker broker.json describes? (host and boot already match)"""
    recorded = record.get("proc_start")
    current = hostinfo.proc_start(pid)
    if recorded is not None:
        if current is None:
            return Proof(False, "its start time cannot be read")
        if current != str(recorded):
            return Proof(
                False,
                f"it started at {current!r}, broker.json's broker at {recorded!r}: the broker is gone and its pid was reused",
                stale=True,
            )
    elif force:
        return Proof(
            False,
            "broker.json has no proc_start (written by an older broker), so --force cannot tell the broker from a "
            "reused pid; try `mp-bridge stop` without --force",
        )
    if force:
        with _try_lock(paths) as lock:
            if lock == "held":
                return Proof(True, "its start time matches and broker.lock is held")
            why = "broker.lock is free, so no broker holds this state directory" if lock == "free" else lock
            return Proof(False, why)
    return _round_trip(record, pid, probe_timeout)


def _probe(endpoint: str, timeout: float) -> dict[str, Any] | None:
    """The broker's `broker/status` over `endpoint`, or None (the election client's probe)."""
    from mp_ssh_bridge.election import probe

    return probe(endpoint, timeout)


def _round_trip(record: dict[str, Any], pid: int, probe_timeout: float) -> Proof:
    endpoint = record.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        return Proof(False, f"broker.json names no unix:// socket to ask (endpoint {endpoint!r})")
    status = _probe(endpoint, probe_timeout)
    if status is None:
        return Proof(
            False,
            f"it does not answer broker/status on {endpoint} within {probe_timeout:g} s — hung or stopped? "
            f"If it is the broker, {FORCE_HINT} kills it",
        )
    answered = (status.get("broker") or {}).get("pid")
    if answered != pid:
        return Proof(False, f"the broker answering on {endpoint} is pid {answered}")
    return Proof(True, "it answered broker/status")


# --- the two ways to stop -----------------------------------------------------------------------
def _palace(record: dict[str, Any]) -> str:
    return str(record.get("palace") or "?")


def _terminate(record: dict[str, Any], pid: int, start: str | None, timeout: float) -> StopResult:
    """SIGTERM, then wait (bounded) for the broker to drain and exit."""
    t0 = time.monotonic()
    failed = _signal(pid, signal.SIGTERM)
    if failed:
        return StopResult(REFUSED, failed)
    if _wait_gone(pid, start, timeout):
        took = time.monotonic() - t0
        return StopResult(OK, f"stopped broker pid {pid} (palace {_palace(record)}) in {took:.1f} s")
    return StopResult(
        REFUSED,
        f"broker pid {pid} (palace {_palace(record)}) got SIGTERM but did not exit within {timeout:g} s (a long call "
        f"still finishing, or hung); {FORCE_HINT} kills it",
    )


def _kill(paths: state.StatePaths, record: dict[str, Any], pid: int, start: str | None, wait: float) -> StopResult:
    """--force: SIGTERM, a short wait, SIGKILL the broker and its engine, then remove what still names it."""
    engine_pid, engine_start = _engine_of(record, pid)  # before the broker dies: then it is still its parent
    done: list[str] = []
    failed = _signal(pid, signal.SIGTERM)
    if failed:
        return StopResult(REFUSED, failed)
    if _wait_gone(pid, start, wait):
        done.append(f"broker pid {pid} (palace {_palace(record)}) exited on SIGTERM")
    else:
        failed = _signal(pid, signal.SIGKILL)
        if failed:
            return StopResult(REFUSED, failed)
        if not _wait_gone(pid, start, KILL_WAIT):
            return StopResult(REFUSED, f"broker pid {pid} is still there {KILL_WAIT:g} s after SIGKILL; state left in place")
        done.append(f"killed broker pid {pid} (palace {_palace(record)}) with SIGKILL ({wait:g} s after SIGTERM)")
    if engine_pid is not None:
        done.append(_end_engine(engine_pid, engine_start))
    done.append(_remove_state(paths, record, pid, patience=KILL_WAIT))
    return StopResult(OK, "; ".join(done))


def _end_engine(pid: int, start: str | None) -> str:
    """The broker is gone, so the engine's stdin is closed: let it exit on that EOF (a clean close of
    the palace) for ENGINE_EOF_WAIT, then SIGKILL it."""
    if _wait_gone(pid, start, ENGINE_EOF_WAIT):
        return f"its engine pid {pid} exited"
    failed = _signal(pid, signal.SIGKILL)
    if failed is None and _wait_gone(pid, start, KILL_WAIT):
        return f"killed its engine pid {pid}"
    return f"engine pid {pid} survived: {failed or 'still there after SIGKILL'}"


def _stale(paths: state.StatePaths, record: dict[str, Any], pid: int, why: str, force: bool) -> StopResult:
    if not force:
        return StopResult(REFUSED, f"{why}: broker.json is stale; {NOTHING} ({FORCE_HINT} removes the stale record)")
    return StopResult(OK, f"{why}: broker.json was stale; {NOTHING}; {_remove_state(paths, record, pid)}")


def stop_broker(
    settings: Settings, *, force: bool = False, timeout: float | None = None, probe_timeout: float = PROBE_TIMEOUT,
    paths: state.StatePaths | None = None,
) -> StopResult:
    """Stop the broker of `settings`' state directory, if it is proven to be ours (see the module docstring).

    `paths`: another broker's records (a container's local-owner daemon: `settings.paths.daemon_paths()`).

    `timeout`: how long to wait after SIGTERM (default shutdown_grace + 5 s; with
    `force`, FORCE_TERM_WAIT before SIGKILL). Never raises: an unexpected error
    becomes a result with exit code 1 (the command must not end in a traceback).
    """
    try:
        return _stop(settings, force, timeout, probe_timeout, paths or settings.paths)
    except Exception as exc:  # noqa: BLE001 - reported as one line, with what it was
        return StopResult(REFUSED, f"stop failed unexpectedly ({type(exc).__name__}: {exc}); please report this")


def _stop(settings: Settings, force: bool, timeout: float | None, probe_timeout: float,
          paths: state.StatePaths) -> StopResult:
    record, problem = read_record(paths.json)
    if problem is not None:
        return StopResult(INVALID, problem)
    if record is None:
        return StopResult(OK, f"no broker is running for {paths.root} (no broker.json)")
    pid = _record_pid(record)
    if pid is None:
        return StopResult(INVALID, f"{paths.json} names no valid pid ({record.get('pid')!r}); {NOTHING}")
    foreign = _foreign(record, pid)
    if foreign is not None:
        return foreign
    if not hostinfo.pid_alive(pid) or hostinfo.is_zombie(pid):
        return _stale(paths, record, pid, f"broker.json names pid {pid}, which is not running", force)
    proof = _prove(paths, record, pid, force, probe_timeout)
    if not proof.proven:
        why = f"pid {pid} is alive but is not proven to be this broker ({proof.detail})"
        if proof.stale:
            return _stale(paths, record, pid, why, force)
        return StopResult(REFUSED, f"{why}; {NOTHING}")
    start = hostinfo.proc_start(pid)
    manager = record.get("manager")
    if not force and isinstance(manager, dict) and manager.get("stop"):
        return StopResult(REFUSED, f"broker pid {pid} runs under {manager.get('kind')} ({manager.get('unit')}), which "
                          f"would start it again; stop it there: {manager['stop']} ({FORCE_HINT} kills it anyway); "
                          f"{NOTHING}")
    if force:
        return _kill(paths, record, pid, start, FORCE_TERM_WAIT if timeout is None else timeout)
    return _terminate(record, pid, start, settings.shutdown_grace + 5.0 if timeout is None else timeout)


def reclaim_stale(settings: Settings) -> str | None:
    """`mp-bridge doctor --fix`: remove a broker.json (and its socket) that no live broker owns — its pid is gone
    on this host and boot, or the file is not valid JSON — only while broker.lock is free. What was done, or None
    when there was nothing to reclaim."""
    paths = settings.paths
    record, problem = read_record(paths.json)
    if problem is not None:
        with _try_lock(paths) as lock:
            if lock != "free":
                return f"left the unreadable {paths.json} alone: broker.lock is {lock}"
            return f"removed the unreadable {paths.json}" if _unlink(paths.json) else None
    if record is None:
        return None
    pid = _record_pid(record)
    if pid is None or _foreign(record, pid) is not None:
        return None
    from mp_ssh_bridge import liveness

    gone = liveness.pid_gone(record)
    if gone is None and not hostinfo.is_zombie(pid):
        return None
    return f"stale broker.json ({gone or f'pid {pid} has exited'}): {_remove_state(paths, record, pid)}"
