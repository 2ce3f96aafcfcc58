"""Is the writer a record names still alive? One rule for every election, on every side of a VM boundary.

Why this module exists: flock does not cross a VM boundary (a VM or container that shares the
state directory through a bind mount has its own kernel), so there `broker.json` and
`degraded.json` are all that keep a second writer off the palace. A pid recorded on another
machine means nothing here, and the two sides' clocks drift apart (most after a Mac sleeps: its
VMs stop with it and their clocks are stepped later), so a heartbeat's *value* cannot be compared
with this machine's clock either. The rule (docs/PROTOCOL.md, "Who owns the palace"):

- Same machine — host name, boot id and pid namespace all equal (`same_machine`): the pid decides.
- Another machine: the writer is alive while its heartbeat moves. It is dead only when the
  heartbeat has not changed between two readings taken on THIS machine's monotonic clock more
  than `heartbeat_stale_after` apart, and one more reading a moment later (`CONFIRM_S`, above a
  writer's one-second tick) still shows it unchanged: both sides may just have woken, and the
  writer beats within a second of waking. A reader with a single reading says alive.

Readings outlive the process that took them: they are kept per state directory in this
machine's own `/tmp/mp-bridge-<uid>` (`state.runtime_dir`), stamped with this machine's identity
(a monotonic clock reading means nothing after a reboot or on another machine). So `--ensure`,
which refuses at once, and a later run together prove a gone writer dead, and the broker that
second run starts agrees with it.

Writers beat by `BeatSchedule`: every `interval` of wall-clock OR monotonic time, looked at every
second. time.monotonic() does not advance while a Mac sleeps; a schedule counted by it alone left
the heartbeat as old as the sleep for up to one interval after every wake.

Stdlib only (imported by the shim's slow path, the election, the broker and mp-bridge).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mp_ssh_bridge import hostinfo, state

CONFIRM_S = 2.0  # the confirming reading's delay: above a writer's 1 s tick (BeatSchedule)
SEEN_KEEP_S = 7 * 86400  # reading files untouched this long are removed (a state directory gone, a boot long past)
KINDS = {"broker": "broker.json", "degraded": "degraded.json", "owner": "owner.json"}


class Machine(NamedTuple):
    """What makes a recorded pid meaningful here: the same host, boot and pid namespace."""

    host: str
    boot_id: str | None
    pid_ns: str | None


def this_machine() -> Machine:
    return Machine(hostinfo.host_name(), hostinfo.boot_id(), hostinfo.pid_namespace())


def writer_identity() -> dict[str, Any]:
    """The fields a writer records so that readers can apply the rule: host, boot_id, pid_ns."""
    me = this_machine()
    return {"host": me.host, "boot_id": me.boot_id, "pid_ns": me.pid_ns}


def same_machine(record: dict[str, Any], me: Machine | None = None) -> bool:
    """Was `record` written on this machine, where its pid names the same process?

    Host name and boot id must be equal (and known). A container on a native Linux host shares
    the host's boot id and may share its host name, so the pid namespace must be equal too when
    both sides know it (a record without `pid_ns`, from an older bridge, is judged by host and boot).
    """
    me = this_machine() if me is None else me
    if me.boot_id is None or record.get("host") != me.host or record.get("boot_id") != me.boot_id:
        return False
    theirs = record.get("pid_ns")
    return theirs is None or me.pid_ns is None or str(theirs) == me.pid_ns


def from_another_machine(record: dict[str, Any], me: Machine | None = None) -> bool:
    """Does `record` name another machine? Every bridge records its host; a record naming none (written by
    hand, or cut short) is judged as this machine's, by its pid, as it always was."""
    return bool(record.get("host")) and not same_machine(record, me)


def pid_gone(
    record: dict[str, Any],
    pid_alive: Callable[[int], bool] = hostinfo.pid_alive,
    proc_start: Callable[[int], str | None] = hostinfo.proc_start,
    zombie: Callable[[int], bool] = hostinfo.is_zombie,
) -> str | None:
    """Why the pid a record of THIS machine names is no longer its writer — "is gone", "has exited" (a
    zombie, which writes nothing), or "now belongs to another process" (the record's `proc_start`
    differs: a reused pid) — or None while it runs.

    One rule for elections (`judge`), `mp-bridge doctor`, `--fix` and the stray-writer check. A start
    time that cannot be read (no such process, no `ps`) is no proof of reuse.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return f"names no valid pid ({pid!r})"
    if not pid_alive(pid):
        return f"pid {pid} is gone"
    if zombie(pid):  # exited, not yet reaped (its parent may never reap it: a test runner, a container's pid 1)
        return f"pid {pid} has exited (a zombie not yet reaped)"
    recorded = record.get("proc_start")
    if recorded is not None:
        now = proc_start(pid)
        if now is not None and now != recorded:
            return f"pid {pid} now belongs to another process (it started at another time)"
    return None


def describe_machine(record: dict[str, Any]) -> str:
    where = f"host {record.get('host')}, boot {record.get('boot_id')}"
    return where + (f", pid namespace {record['pid_ns']}" if record.get("pid_ns") else "")


@dataclass(frozen=True)
class Verdict:
    """The rule's answer for one record: alive or not, written on another machine or not, and why (for people)."""

    alive: bool
    foreign: bool
    why: str


# --- readings, on this machine's monotonic clock -------------------------------------------------
def signature(record: dict[str, Any]) -> str:
    """What must stay equal for a heartbeat to count as "not moving": the writer and its heartbeat value."""
    keys = ("host", "boot_id", "pid_ns", "pid", "started_at", "heartbeat")
    return json.dumps([record.get(k) for k in keys], default=str)


class Seen:
    """This machine's last reading of one state directory's records (per kind), kept in a reader-local file.

    A file that cannot be used costs only persistence: the readings then live in this process
    (`_MEMORY`), which is never less safe (fewer readings only keep a writer "alive" longer).
    """

    _MEMORY: dict[str, dict[str, Any]] = {}

    def __init__(self, root: Path, directory: Path | None = None, me: Machine | None = None) -> None:
        self.dir = state.runtime_dir() if directory is None else directory
        self.key = hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:20]
        self.me = this_machine() if me is None else me

    def _file(self, kind: str) -> Path:
        return self.dir / f"seen-{self.key}-{kind}.json"

    def _usable(self) -> bool:
        """Only a directory of our own (0700, ours): a reading planted by someone else must never count."""
        try:
            state.ensure_private_dir(self.dir)
        except (OSError, state.UnsafeDirectory):
            return False
        return True

    def get(self, kind: str) -> dict[str, Any] | None:
        path = self._file(kind)
        entry = (state.read_json_object(path) if self._usable() else None) or self._MEMORY.get(str(path))
        if entry is None or entry.get("reader") != list(self.me):
            return None  # another boot's (or machine's) clock: a reading that means nothing now
        return entry

    def put(self, kind: str, entry: dict[str, Any]) -> None:
        path = self._file(kind)
        entry = dict(entry, reader=list(self.me))
        self._MEMORY[str(path)] = entry
        if not self._usable():
            return
        try:
            state.write_json_atomic(path, entry)
        except OSError:
            return
        self._prune()

    def _prune(self) -> None:
        limit = time.time() - SEEN_KEEP_S
        try:
            for old in self.dir.glob("seen-*.json"):
                if old.stat().st_mtime < limit:
                    old.unlink()
        except OSError:
            pass


def judge(
    record: dict[str, Any],
    stale_after: float,
    *,
    seen: Seen,
    kind: str,
    me: Machine | None = None,
    clock: Callable[[], float] = time.monotonic,
    pid_alive: Callable[[int], bool] = hostinfo.pid_alive,
) -> Verdict:
    """The rule for one reading of `record` (module docstring); records the reading in `seen`."""
    me = seen.me if me is None else me
    pid = record.get("pid")
    if not from_another_machine(record, me) and isinstance(pid, int) and not isinstance(pid, bool):
        gone = pid_gone(record, pid_alive)
        if gone is None:
            return Verdict(True, False, f"pid {pid} runs on this machine")
        return Verdict(False, False, f"{gone} on this machine")
    now = clock()
    sig = signature(record)
    last = seen.get(kind)
    first = last.get("first") if last else None
    if last is None or last.get("sig") != sig or not isinstance(first, (int, float)) or now < first:
        seen.put(kind, {"sig": sig, "first": now})
        why = ("its heartbeat moved since this machine last read it" if last is not None else
               f"first reading here: it counts as alive until its heartbeat is seen standing still for "
               f"{stale_after:g} s")
        return Verdict(True, True, why)
    still = now - first
    if still < stale_after:
        return Verdict(True, True, f"its heartbeat has stood still for {still:.0f} s by this machine's clock "
                                   f"(gone only after {stale_after:g} s)")
    return Verdict(False, True, f"its heartbeat has stood still for {still:.0f} s by this machine's clock "
                                f"(limit {stale_after:g} s)")


def check(
    paths: state.StatePaths,
    kind: str,
    stale_after: float,
    *,
    seen: Seen | None = None,
    me: Machine | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    pid_alive: Callable[[int], bool] = hostinfo.pid_alive,
    confirm: float | None = None,
    path: Path | None = None,
) -> tuple[dict[str, Any] | None, Verdict | None]:
    """Read `kind`'s record (broker.json, degraded.json, owner.json; or `path`, whose readings are kept
    under `kind`) and judge it; (None, None) when there is none.

    A foreign record about to be declared dead is read once more `confirm` seconds later
    (default min(CONFIRM_S, stale_after)); a change then means alive. Once confirmed, the
    same reading is not confirmed again (every later reader of this machine agrees at once).
    """
    path = paths.root / KINDS[kind] if path is None else path
    record = state.read_broker_json(path)
    if record is None:
        return None, None
    seen = Seen(paths.root, me=me) if seen is None else seen
    rules: dict[str, Any] = {"seen": seen, "kind": kind, "me": me, "clock": clock, "pid_alive": pid_alive}
    verdict = judge(record, stale_after, **rules)
    entry = seen.get(kind)
    if verdict.alive or not verdict.foreign or entry is None or entry.get("dead"):
        return record, verdict
    sleep(min(CONFIRM_S, stale_after) if confirm is None else confirm)
    again = state.read_broker_json(path)
    if again is None:
        return None, None
    if signature(again) != signature(record):
        return again, judge(again, stale_after, **rules)
    seen.put(kind, dict(entry, dead=True))
    return record, verdict


# --- what elections ask ----------------------------------------------------------------------
def live_foreign_owner(paths: state.StatePaths, stale_after: float, **rules: Any) -> tuple[dict[str, Any], Verdict] | None:
    """broker.json and its verdict when it names a live broker on ANOTHER machine: never start beside it,
    never remove the socket it names. None when there is no record, it is this machine's (flock and the
    pid decide here), or its heartbeat has been seen standing still for the stale limit."""
    record, verdict = check(paths, "broker", stale_after, **rules)
    if record is None or verdict is None or not (verdict.alive and verdict.foreign):
        return None
    return record, verdict


def live_degraded_writer(paths: state.StatePaths, stale_after: float, **rules: Any) -> dict[str, Any] | None:
    """The record of a degraded-mode session that may still be writing the palace (either machine), or None."""
    record, verdict = check(paths, "degraded", stale_after, **rules)
    return record if record is not None and verdict is not None and verdict.alive else None


def record_alive(paths: state.StatePaths, stale_after: float, **rules: Any) -> tuple[dict[str, Any] | None, Verdict | None]:
    """broker.json and its verdict (this machine's or another's), for a decision that needs "may it be alive?"."""
    return check(paths, "broker", stale_after, **rules)


def describe_owner(record: dict[str, Any], verdict: Verdict, paths: state.StatePaths, stale_after: float) -> str:
    """Why nobody may start a broker beside the live owner on another machine, and what to do."""
    return (
        f"broker.json in {paths.root} names a live broker on another machine ({describe_machine(record)}; pid "
        f"{record.get('pid')} at {record.get('endpoint')}): {verdict.why}. Starting a broker here would make a "
        "second writer on the palace (flock does not reach across a VM boundary). Reach that broker over SSH "
        "(MP_BRIDGE_SSH_HOST names the way) or stop it on its machine; if that machine is gone, its record is "
        f"reclaimed once its heartbeat has been seen standing still for {stale_after:g} s"
    )


def describe_degraded(record: dict[str, Any], paths: state.StatePaths) -> str:
    age = state.heartbeat_age(record)
    beat = f", heartbeat {age:.0f}s ago" if age is not None else ""
    return (
        f"a session on {record.get('host')} (pid {record.get('pid')}{beat}) runs its own memory engine on this "
        f"palace (degraded mode, recorded in {paths.degraded}); starting a broker now would make a second writer. "
        "End that session (or let its heartbeat go stale) and try again"
    )


# --- writers -----------------------------------------------------------------------------------
class BeatSchedule:
    """When a heartbeat writer (the broker, a degraded-mode session) writes its next beat.

    Due once `interval` has passed by the wall clock OR by the monotonic clock since the last
    beat, or when the wall clock went back; the writer looks every `tick` (at most 1 s). After a
    sleep the wall clock has moved on while macOS's monotonic clock has not, so the first look
    after waking (within one tick) writes the beat.
    """

    def __init__(
        self, interval: float, *, tick: float | None = None,
        wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.tick = min(1.0, interval) if tick is None else tick
        self._wall, self._mono = wall, mono
        self._last = (wall(), mono())

    def due(self) -> bool:
        wall, mono = self._wall(), self._mono()
        last_wall, last_mono = self._last
        return wall - last_wall >= self.interval or mono - last_mono >= self.interval or wall < last_wall

    def beaten(self) -> None:
        self._last = (self._wall(), self._mono())
