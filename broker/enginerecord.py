"""Never two engines on one palace: the engine dies with its broker, and a broker waits for an old engine.

Why: a broker killed with -9 while its engine was busy left that engine running (its parent gone,
its stdin still open until the kernel closed it, its current call still going), and the next
session's broker started a second engine on the same palace; the first engine's queued write
never landed. Two writers on one palace is the loss this project exists to prevent.

Two defences, each cheap:

- Linux: the engine is spawned with PR_SET_PDEATHSIG = SIGTERM (`pdeathsig_hook`), so the kernel
  terminates it the moment its broker dies. macOS has no such thing: there the engine reads EOF
  on its stdin when the broker dies and exits after its current call — which may take a while.
- Everywhere: the broker records its engine in `engine.json` (pid, process start time, boot id,
  host; owner-only, written atomically, like broker.json) and removes it once that engine has
  exited. A broker about to start an engine first reads the record (`clear`): if it names a live
  process PROVEN to be that engine (same pid, same start time, this boot), it waits a bounded time
  for it to exit on its own, then SIGTERM, then SIGKILL, and only then starts its own. A process it
  cannot prove is that engine is never signalled; if such a process also holds the palace's files
  for writing (mp_ssh_bridge.holders — or that cannot be told), the start is refused with the
  reason (clients see -32062 ENGINE_UNAVAILABLE), rather than risking two writers.

Reading one small file costs well under a millisecond per engine start; the holders scan runs only
for a record that cannot be proven either way (rare: a start time this host cannot read).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mp_ssh_bridge import hostinfo, liveness, state

log = logging.getLogger("broker.enginerecord")

RECORD_VERSION = 1
EXIT_WAIT_S = 10.0  # an old engine's own exit (EOF on stdin / PDEATHSIG) after its current call
TERM_WAIT_S = 5.0  # after SIGTERM (mempalace-mcp exits 0 on it)
KILL_WAIT_S = 5.0  # after SIGKILL
POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class OldEngineLives(Exception):
    """An engine that may still write the palace lives and cannot be cleared: starting another is refused."""


# --------------------------------------------------------------------------- Linux: die with the broker
def pdeathsig_hook(
    platform: str | None = None,
    load_libc: Callable[[], Any] | None = None,
    parent: int | None = None,
    getppid: Callable[[], int] = os.getppid,
    exit_now: Callable[[int], None] = os._exit,
) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send the engine SIGTERM when its broker dies (Linux), else None.

    Runs in the child between fork and exec. If the broker already died in between (the child's
    parent is no longer `parent`), the child exits at once instead of becoming an orphan engine.
    The death signal follows the forking THREAD: asyncio forks from the event loop's thread, which
    lives as long as the broker. A libc that cannot be loaded costs only this defence (engine.json
    still guards the next start).
    """
    if not (platform or sys.platform).startswith("linux"):
        return None
    if load_libc is None:
        load_libc = _load_libc
    try:
        libc = load_libc()
        prctl = libc.prctl
    except (OSError, AttributeError) as exc:
        log.warning("cannot load libc's prctl (%s): an engine may outlive a killed broker", exc)
        return None
    expected = os.getpid() if parent is None else parent

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if getppid() != expected:  # the broker died before prctl took effect
            exit_now(1)

    return hook


@functools.lru_cache(maxsize=1)
def _load_libc() -> Any:
    """libc, loaded once: find_library runs `ldconfig -p`, which every engine start would otherwise pay."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# --------------------------------------------------------------------------- the record
def make(pid: int, broker_pid: int, palace: str | None, proc_start: Callable[[int], str | None] = hostinfo.proc_start) -> dict[str, Any]:
    """The record of engine `pid`, started by broker `broker_pid` on `palace` (None: the engine's default)."""
    return {
        "version": RECORD_VERSION,
        "pid": pid,
        "proc_start": proc_start(pid),
        "broker_pid": broker_pid,
        "palace": palace,
        "started_at": time.time(),
        **liveness.writer_identity(),  # host, boot_id, pid_ns: where the pid means this process
    }


def write(paths: state.StatePaths, record: dict[str, Any]) -> None:
    state.write_json_atomic(paths.engine, record)


def remove(paths: state.StatePaths, pid: int) -> None:
    """Remove the record if it names engine `pid` (a newer broker's record is left alone)."""
    current = state.read_broker_json(paths.engine)
    if current is not None and current.get("pid") != pid:
        return
    try:
        paths.engine.unlink()
    except FileNotFoundError:
        pass


@dataclass
class ProcessTable:
    """How the record is checked against this machine's processes; replaced by a fake in tests."""

    alive: Callable[[int], bool] = hostinfo.pid_alive
    start: Callable[[int], str | None] = hostinfo.proc_start
    zombie: Callable[[int], bool] = hostinfo.is_zombie
    send: Callable[[int, int], None] = os.kill
    machine: Callable[[], liveness.Machine] = liveness.this_machine
    # does `pid` hold the palace's files for writing? None: this host cannot tell
    holds_palace: Callable[[int, dict[str, Any]], bool | None] = field(default=lambda pid, record: None)


@dataclass(frozen=True)
class Judgement:
    """`none` (no record), `gone` (its engine no longer runs), `ours` (proven: that engine still runs),
    `unproven` (a live pid this machine cannot prove is that engine), `elsewhere` (another machine's)."""

    kind: str
    why: str


def judge(record: dict[str, Any] | None, table: ProcessTable) -> Judgement:
    """What the record says about an old engine, proven by pid AND start time AND this boot, or not at all."""
    if record is None:
        return Judgement("none", "no engine recorded")
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return Judgement("gone", f"the record names no valid pid ({pid!r})")
    me = table.machine()
    theirs = record.get("boot_id")
    if theirs and me.boot_id and theirs == me.boot_id:  # this boot (a renamed host is still this machine)
        ns = record.get("pid_ns")
        if ns is not None and me.pid_ns is not None and str(ns) != me.pid_ns:  # a container on this kernel
            return Judgement("elsewhere", f"engine pid {pid} was recorded in another pid namespace ({liveness.describe_machine(record)})")
    elif theirs and me.boot_id and (not record.get("host") or record.get("host") == me.host):
        return Judgement("gone", f"engine pid {pid} was recorded before this machine's last boot")
    elif record.get("host") and record.get("host") != me.host:
        # Another boot under another name: a Mac renamed by the network it joined after a restart, far more
        # often than a second machine (brokers run on the host only, and lifecycle has just checked that
        # broker.json names no live broker anywhere). engine.json has no heartbeat, so refusing here would
        # refuse every engine start for good.
        return Judgement("gone", f"engine pid {pid} was recorded under another host name and boot "
                                 f"({liveness.describe_machine(record)}); its broker is not alive")
    if not table.alive(pid) or table.zombie(pid):
        return Judgement("gone", f"engine pid {pid} is gone")
    recorded = record.get("proc_start")
    now = table.start(pid)
    if recorded is not None and now is not None:
        if now != recorded:
            return Judgement("gone", f"pid {pid} now belongs to another process (it started at another time)")
        if me.boot_id is not None and record.get("boot_id") == me.boot_id:
            return Judgement("ours", f"engine pid {pid} of broker {record.get('broker_pid')} still runs")
    return Judgement("unproven", f"pid {pid} is alive, but this machine cannot prove it is the recorded engine "
                                 f"(start time recorded {recorded!r}, now {now!r})")


async def clear(
    paths: state.StatePaths,
    table: ProcessTable | None = None,
    waits: tuple[float, float, float] = (EXIT_WAIT_S, TERM_WAIT_S, KILL_WAIT_S),
    poll: float = POLL_S,
) -> str | None:
    """Before an engine starts: make sure the recorded one is gone (waiting, then SIGTERM, then SIGKILL — only
    a proven one); remove the record. Returns what was done (for the log), None when there was nothing.

    Raises OldEngineLives when an old engine may still write and cannot be cleared.
    """
    table = table or ProcessTable()
    record = state.read_broker_json(paths.engine)
    if record is None:
        return None
    verdict = await _judge(record, table)
    pid = int(record.get("pid") or 0)
    if verdict.kind == "elsewhere":
        raise OldEngineLives(
            f"{verdict.why}, which this machine can neither see nor stop; if it no longer runs there, remove {paths.engine}"
        )
    if verdict.kind == "unproven":
        holds = await asyncio.get_running_loop().run_in_executor(None, table.holds_palace, pid, record)
        if holds is False:
            remove(paths, pid)
            return f"{verdict.why}; it holds none of the palace's files for writing, so it is no engine of ours"
        how = "it holds the palace's files for writing" if holds else "whether it holds the palace's files cannot be told"
        raise OldEngineLives(
            f"an engine recorded in {paths.engine} may still write the palace: {verdict.why}, and {how}. "
            f"Not starting a second engine; stop pid {pid} if it is a mempalace-mcp, then retry"
        )
    if verdict.kind == "ours":
        log.warning("%s: waiting up to %.0fs for it to exit before starting a new engine", verdict.why, waits[0])
        for sig, wait in ((None, waits[0]), (signal.SIGTERM, waits[1]), (signal.SIGKILL, waits[2])):
            if sig is not None:
                now = await _judge(record, table)  # proven again right before every signal
                if now.kind == "gone":
                    break
                if now.kind != "ours":
                    raise OldEngineLives(f"{verdict.why}, but no longer provably ({now.why}); not signalling it, "
                                         f"and not starting a second engine")
                log.warning("old engine pid %s did not exit; sending %s", pid, sig.name)
                try:
                    table.send(pid, sig)
                    if sig == signal.SIGTERM:
                        table.send(pid, signal.SIGCONT)  # a stopped engine cannot act on SIGTERM
                except ProcessLookupError:
                    break
                except PermissionError as exc:
                    raise OldEngineLives(f"{verdict.why} and cannot be stopped ({exc}); not starting a second engine") from exc
            if await _gone_within(record, table, wait, poll):
                break
        else:
            raise OldEngineLives(
                f"{verdict.why} and did not exit even after SIGKILL; not starting a second engine on the palace"
            )
        verdict = Judgement("gone", f"old engine pid {pid} stopped before this engine started")
    remove(paths, pid)
    return verdict.why


async def _judge(record: dict[str, Any], table: ProcessTable) -> Judgement:
    """`judge` off the event loop: on macOS a start time is a `ps` run (up to 2 s)."""
    return await asyncio.get_running_loop().run_in_executor(None, judge, record, table)


async def _gone_within(record: dict[str, Any], table: ProcessTable, seconds: float, poll: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if (await _judge(record, table)).kind == "gone":
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)


def holds_palace_files(pid: int, record: dict[str, Any], palace: str | None, kg: str | None) -> bool | None:
    """Does `pid` hold the palace's files open for writing (mp_ssh_bridge.holders)? None when this host cannot tell."""
    if not palace or not kg:
        return None
    from mp_ssh_bridge import holders

    found, _note = holders.holders(palace, kg)
    if found is None:
        return None
    return any(h.pid == pid for h in found)
