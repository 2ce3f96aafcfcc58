"""Who may write the palace now: one owner record that both sides of a VM boundary see.

Why: flock keeps a second writer off the palace on one kernel only. Across a bind mount (a
container, a Mac's Linux VM) the single-writer rule used to hold by refusing — whoever held the
palace first kept everyone else out, until it exited — and writers that are not MCP sessions
(`mempalace mine`, session hooks, cron) were not in it at all. Here ownership moves instead, by
request and release (docs/PROTOCOL.md "Ownership"):

- `owner.json` in the state directory names the one owner: a host broker (`broker`), upstream's
  hub (`hub`: `mempalace serve` owns the palace; the broker that routes to it keeps the record and
  its heartbeat, and `hub` names the hub's pid and url), a process on the container side running
  the engine itself (`local`), or a command run by `mp-bridge run` (`grant`). Only its holder writes it. A claim creates it exclusively, as palace.id
  is created (`state.create_new`: atomic through a bind mount, where flock is not), and on one
  kernel claims are serialized by `owner.lock` as well. The holder rewrites it every heartbeat
  and removes it — the explicit release — only after its engine (or command) has exited.
- A record whose writer is gone by `liveness`' rule (this machine: its pid; another machine:
  its heartbeat seen standing still for `heartbeat_stale_after`) is moved aside by the next claim.
- Whoever wants the palace writes a request, `owner.requests/<kind>-<token>.json`, kept alive by
  a heartbeat, and withdraws it once it holds the palace or gives up. A holder yields to a live
  request that outranks it (grant > broker > local): it finishes its running call, stops its
  engine, then releases. A claim never overtakes a live request that outranks it, so a waiting
  grant is served before the broker it displaced comes back.
- `degraded.json` of a live session not of this process counts as a holder: a bridge from
  before this record only writes that one.

Stdlib only: the shim's slow path, the broker and mp-bridge all import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mp_ssh_bridge import hostinfo, liveness, state

RANK = {"local": 1, "broker": 2, "hub": 2, "grant": 3}
BROKER_KINDS = ("broker", "hub")  # a host broker's record: with its own engine, or routing to upstream's hub
LOCK_WAIT_S = 2.0  # owner.lock is held for a few file operations at most
REQUEST_BEAT_S = 2.0  # a waiting request's heartbeat (judged like every record: pid here, heartbeat elsewhere)
UNREADABLE_STALE_FACTOR = 2  # an owner.json without a complete record (O_EXCL fallback, crash) is moved aside
# once its mtime is this many heartbeat_stale_after old


class BeatSkipped(OSError):
    """owner.lock stayed busy past its bound: this beat was not written (the record is unchanged)."""


class Busy(Exception):
    """The palace is held, or a request that outranks this claim waits; `record` is that holder or request."""

    def __init__(self, record: dict[str, Any] | None, why: str) -> None:
        super().__init__(why)
        self.record = record


def hub_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The hub (`{pid, url}`) a broker's record says it routes to: kind `hub`, or a bridge before that kind
    (kind `broker` with a `hub` field); None otherwise."""
    via = record.get("hub")
    if record.get("kind") in BROKER_KINDS and isinstance(via, dict):
        return via
    return None


def describe(record: dict[str, Any]) -> str:
    """The holder (or requester) in words: what it is, its pid and machine, since when."""
    kind, pid, host = record.get("kind"), record.get("pid"), record.get("host") or "?"
    age = time.time() - float(record["since"]) if isinstance(record.get("since"), (int, float)) else None
    held = (f", waiting {age:.0f} s" if record.get("request") else f", for {age:.0f} s") if age is not None and age >= 0 else ""
    via = hub_of(record)
    if kind == "hub" or via is not None:
        via = via or {}
        return (f"upstream's hub (pid {via.get('pid')}, {via.get('url')}), which the broker (pid {pid} on "
                f"{host}{held}) routes to")
    if kind == "broker":
        return f"the broker (pid {pid} on {host}{held})"
    if kind == "local":
        what = record.get("what")  # the container daemon names itself; an older bridge's session does not
        return f"the {what} (pid {pid} on {host}{held})" if what and "daemon" in str(what) else \
            f"a session running its own engine (pid {pid} on {host}{held})"
    if kind == "grant":
        what = record.get("what") or "a command"
        until = record.get("expires")
        limit = f", at most until {time.strftime('%H:%M:%S', time.localtime(until))}" if isinstance(until, (int, float)) else ""
        return f"`{what}` under `mp-bridge run` (pid {pid} on {host}{held}{limit})"
    return f"an owner of unknown kind {kind!r} (pid {pid} on {host}{held})"


def new_record(kind: str, pid: int | None = None, **fields: Any) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    now = time.time()
    return {
        "kind": kind, "pid": pid, **liveness.writer_identity(), "proc_start": hostinfo.proc_start(pid),
        "token": uuid.uuid4().hex, "since": now, "heartbeat": now, **fields,
    }


# --------------------------------------------------------------------------- reading
def holder(paths: state.StatePaths, stale_after: float, **rules: Any) -> tuple[dict[str, Any], liveness.Verdict] | None:
    """owner.json and liveness' verdict on it (alive or not), or None when there is none."""
    record, verdict = liveness.check(paths, "owner", stale_after, **rules)
    if record is not None and verdict is not None:
        if not verdict.alive and not verdict.foreign:
            running = _engine_still_runs(record)
            if running:  # its writer died, its engine did not (yet): that engine still writes
                return record, liveness.Verdict(True, False, f"{verdict.why}, but its engine {running}")
        return record, verdict
    try:
        st = paths.owner.stat()
    except OSError:
        return None
    # There but no complete record: a claim between its O_EXCL create and its write, or one that crashed there.
    age = time.time() - st.st_mtime
    alive = age < stale_after * UNREADABLE_STALE_FACTOR
    stub = {"kind": "unknown", "pid": 0, "token": None, "unreadable": True}
    return stub, liveness.Verdict(alive, False, f"{paths.owner} holds no complete record ({age:.0f} s old)")


def _engine_still_runs(record: dict[str, Any]) -> str | None:
    """For a record of this machine: "pid N still runs" when the engine it names (`engine_pid`, and
    `engine_proc_start` when recorded: not a reused pid) is alive, else None."""
    pid = record.get("engine_pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    engine = {"pid": pid, "proc_start": record.get("engine_proc_start")}
    if liveness.pid_gone(engine) is not None:  # gone, reused, or a zombie (which writes nothing)
        return None
    return f"pid {pid} still runs"


def live_holder(paths: state.StatePaths, stale_after: float, **rules: Any) -> dict[str, Any] | None:
    found = holder(paths, stale_after, **rules)
    return found[0] if found is not None and found[1].alive else None


def live_requests(paths: state.StatePaths, stale_after: float, **rules: Any) -> list[dict[str, Any]]:
    """The requests whose writers live, oldest first; those of gone writers are removed."""
    try:
        names = sorted(e.name for e in os.scandir(paths.owner_requests) if e.name.endswith(".json"))
    except OSError:
        return []
    out = []
    for name in names:
        path = paths.owner_requests / name
        record, verdict = liveness.check(paths, f"request-{name[:-5]}", stale_after, path=path, **rules)
        if record is None or verdict is None:
            continue
        if verdict.alive and record.get("kind") in RANK:
            out.append(record)
        elif not verdict.alive:
            _unlink(path)
    out.sort(key=lambda r: float(r["since"]) if isinstance(r.get("since"), (int, float)) else 0.0)
    return out


def outranking(requests: list[dict[str, Any]], kind: str, exclude: str | None = None) -> dict[str, Any] | None:
    """The first request of a higher rank than `kind` (the one a holder of `kind` yields to), or None."""
    mine = RANK[kind]
    ahead = [r for r in requests if r.get("token") != exclude and RANK.get(str(r.get("kind")), 0) > mine]
    if not ahead:
        return None
    top = max(RANK[str(r["kind"])] for r in ahead)
    return next(r for r in ahead if RANK[str(r["kind"])] == top)


def wanted_by(paths: state.StatePaths, kind: str, stale_after: float, **rules: Any) -> dict[str, Any] | None:
    """The live request a holder of `kind` must yield to, or None."""
    return outranking(live_requests(paths, stale_after, **rules), kind)


# --------------------------------------------------------------------------- claiming
@contextlib.contextmanager
def _owner_flock(paths: state.StatePaths, wait: float | None = None) -> Iterator[None]:
    """owner.lock, bounded (LOCK_WAIT_S): claims on one kernel one at a time."""
    fd = os.open(paths.owner_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        end = time.monotonic() + (LOCK_WAIT_S if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= end:
                    raise Busy(None, f"{paths.owner_lock} is held by another claim ({exc.strerror or exc})") from exc
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the flock


def claim(
    paths: state.StatePaths, kind: str, stale_after: float, *, pid: int | None = None,
    request_token: str | None = None, fields: dict[str, Any] | None = None, **rules: Any,
) -> Claim:
    """Take the palace for `kind` now, or raise Busy naming who holds it (or who waits ahead).

    `request_token`: this claimer's own request, which does not count against it.
    :raises Busy: held by a live owner, outranked by a waiting request, or just claimed by someone else.
    :raises OSError: the state directory cannot be written.
    """
    me = os.getpid() if pid is None else pid
    with _owner_flock(paths):
        found = holder(paths, stale_after, **rules)
        if found is not None:
            record, verdict = found
            if verdict.alive:
                raise Busy(record, f"{describe(record)} holds the palace ({verdict.why})")
            _move_aside(paths, record)
        ahead = outranking(live_requests(paths, stale_after, **rules), kind, request_token)
        if ahead is not None:
            raise Busy(ahead, f"{describe(ahead)} waits for the palace ahead of this {kind}")
        legacy = liveness.live_degraded_writer(paths, stale_after, **rules)
        if legacy is not None and not (legacy.get("pid") == me and liveness.same_machine(legacy)):
            raise Busy(dict(legacy, kind="local"), liveness.describe_degraded(legacy, paths))
        record = new_record(kind, me, **(fields or {}))
        if not state.create_new(paths.owner, json.dumps(record, indent=1, sort_keys=True) + "\n"):
            now = holder(paths, stale_after, **rules)
            raise Busy(now[0] if now else None, f"{describe(now[0]) if now else 'another process'} has just "
                                                 "claimed the palace")
    return Claim(paths, record)


class Claim:
    """The palace, held: beat while writing, release after the engine (or command) has exited."""

    def __init__(self, paths: state.StatePaths, record: dict[str, Any]) -> None:
        self.paths = paths
        self.record = record
        self.released = False

    @property
    def token(self) -> str:
        return str(self.record["token"])

    @property
    def kind(self) -> str:
        return str(self.record["kind"])

    def ours(self) -> bool:
        """False only when owner.json is gone or names another holder, seen twice 50 ms apart: a read that
        fails (EMFILE, a flaky mount) or a moment's absence (another side moving a record aside and back)
        is no proof that the palace was lost."""
        for attempt in range(2):
            token = _read_token(self.paths.owner)
            if token is _UNREADABLE or token == self.token:
                return True
            if attempt == 0:
                time.sleep(0.05)
        return False

    def beat(self, **fields: Any) -> bool:
        """Refresh the heartbeat (and `fields`); False when the record is no longer ours (never rewritten then).

        Across a bind mount there is no compare-and-swap: a claim landing between our check and our rename
        would be overwritten. It can only come from a side that judged us gone, i.e. after our heartbeat stood
        still for `heartbeat_stale_after` — and then we beat late; the holder that lost finds out at its next
        beat. On one kernel, owner.lock closes the gap."""
        if self.released or not self.ours():
            return False
        self.record.update(fields, heartbeat=time.time())
        try:
            with _owner_flock(self.paths):
                if not self.ours():
                    return False
                state.write_json_atomic(self.paths.owner, self.record)
        except Busy as exc:
            raise BeatSkipped(f"{self.paths.owner_lock} busy: heartbeat not written") from exc
        return True

    def release(self) -> bool:
        """Remove owner.json if it is still ours; True when it was. Idempotent."""
        if self.released:
            return False
        self.released = True
        if _read_token(self.paths.owner) != self.token:  # only a record we can read as ours is removed
            return False
        _unlink(self.paths.owner)
        return True


def names(record: dict[str, Any] | None, claim: Claim) -> bool:
    """Does `record` (owner.json as read) name this very claim? (An owner token identifies a claim; it is
    no secret — owner.json is readable by its owner — so it is compared plainly, here, in one place.)"""
    return record is not None and record.get("token") == claim.token


class Request:
    """A waiting claimer's request: makes the holder yield to it when it outranks the holder."""

    def __init__(self, paths: state.StatePaths, kind: str, pid: int | None = None, **fields: Any) -> None:
        self.paths = paths
        self.record = new_record(kind, pid, request=True, **fields)
        self.path = paths.owner_requests / f"{kind}-{self.record['token']}.json"
        self._beaten = 0.0
        try:
            paths.owner_requests.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            pass
        self.beat(force=True)

    @property
    def token(self) -> str:
        return str(self.record["token"])

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._beaten < REQUEST_BEAT_S:
            return
        self._beaten = now
        self.record["heartbeat"] = time.time()
        try:
            state.write_json_atomic(self.path, self.record)
        except OSError:
            pass  # the holder then does not yield: the claimer waits its bound and says who holds the palace

    def withdraw(self) -> None:
        _unlink(self.path)


def acquire(
    paths: state.StatePaths, kind: str, stale_after: float, timeout: float, *, pid: int | None = None,
    fields: dict[str, Any] | None = None, progress: Callable[[Busy, float], None] | None = None,
    poll: float = 0.1, **rules: Any,
) -> Claim:
    """Request the palace and claim it as soon as it is released (bounded by `timeout`).

    `progress(busy, waited_s)` is called after each refused claim.
    :raises Busy: still held when `timeout` ran out (the last refusal).
    """
    request = Request(paths, kind, pid, **({"what": fields["what"]} if fields and "what" in fields else {}))
    start = time.monotonic()
    try:
        while True:
            try:
                return claim(paths, kind, stale_after, pid=pid, request_token=request.token, fields=fields, **rules)
            except Busy as exc:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise
                if progress is not None:
                    progress(exc, waited)
            request.beat()
            time.sleep(min(poll, max(0.0, timeout - (time.monotonic() - start))))
    finally:
        request.withdraw()


# --------------------------------------------------------------------------- files
def _move_aside(paths: state.StatePaths, record: dict[str, Any]) -> None:
    """Remove a gone owner's record — only if owner.json still holds that record (a rename, then a check)."""
    aside = paths.owner.with_name(f"owner.json.gone-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(paths.owner, aside)
    except FileNotFoundError:
        return
    moved = state.read_json_object(aside)
    if moved is not None and record.get("token") is not None and moved.get("token") != record.get("token"):
        # A fresh claim from the other side landed between our reading and the rename: put it back.
        with contextlib.suppress(OSError):
            os.link(aside, paths.owner)
    _unlink(aside)


_UNREADABLE = object()


def _read_token(path: Path) -> object:
    """owner.json's token; None when there is no such file (or it holds no token); _UNREADABLE when it
    could not be read or parsed (which proves nothing either way)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return _UNREADABLE
    return data.get("token") if isinstance(data, dict) else _UNREADABLE


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
