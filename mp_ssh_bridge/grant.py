"""`mp-bridge run [--timeout S] -- CMD ARGS…`: run a writer that is not an MCP session as the palace's one owner.

Why: `mempalace mine`, mempalace's session hooks and cron jobs open the palace themselves. Beside
a broker's engine that is two writers (what loses vectors), and across a bind mount no file lock
keeps them apart. `run` makes such a command wait its turn instead: it requests a `grant`
(docs/PROTOCOL.md "Ownership"), the holder — a host broker, a container's daemon —
finishes its running call, stops its engine and releases; CMD then runs as the only writer, and
the palace is released when CMD has exited. It works through the state directory alone, so the
host and the container side of a bind mount use it alike.

The order, so that CMD never writes without the grant and never after it:

1. CMD is looked up first (exit 127 when it cannot be found: no holder is disturbed for nothing).
2. The grant is requested and claimed (`owner.acquire`), bounded by `owner_wait` or `--timeout`,
   with a progress line on stderr; not had in time: exit 75 (EX_TEMPFAIL), naming the holder. The
   record names `run`'s own pid for now: alive, so the claim holds. SIGINT/SIGTERM/SIGHUP end the
   wait (exit 128+N) at the next refused claim, never halfway through one; a claim made meanwhile
   is released (token-checked) before `run` exits.
3. The guardian (mp_ssh_bridge/guardian.py) forks CMD's process — its own session and process
   group — which waits before exec; the guardian sends its pid.
4. `run` beats the record with that pid and its start time (`pid` = CMD's), the guardian's
   (`guardian_pid`, and `engine_pid`/`engine_proc_start`: on this machine the grant lives while
   CMD or its guardian does, and the guardian outlives CMD's whole group), and `expires` (now +
   `grant_max_duration`); only then does it send CMD's process the byte that lets it exec. That
   beat is retried a few times when owner.lock stays busy; if it still is not written, or the
   record is no longer ours, CMD's process gets EOF instead and never runs.
5. While CMD runs — and while it is being stopped — `run` beats every `heartbeat_interval` (a
   holder that stops beating is judged gone across a VM boundary; a beat that cannot be written,
   owner.lock busy, is said once and tried again at the next), forwards SIGINT/SIGTERM/SIGHUP to
   CMD's group, stops CMD (SIGTERM, then SIGKILL) at `grant_max_duration` or at once if the
   record is no longer ours, and says so. The guardian stops CMD if `run` dies. A grant cannot be
   suspended: `run` ignores SIGTSTP (Ctrl-Z), since a stopped `run` would stop beating while CMD,
   in its own session, writes on — and the other side would take the palace beside it.
6. When CMD has exited, the guardian SIGKILLs what is left of CMD's process group, reaps CMD and
   waits until no member of the group remains (at most 10 s); then it reports CMD's wait status
   and only then is the grant released. `run` exits with CMD's status (128+N for a signal; 70
   when the status was lost). If the group does not empty in time (a member in uninterruptible
   I/O), the grant is kept — `run` says so and exits; it ends when the guardian does, once the
   group is empty. If the guardian itself dies without a word, `run` kills CMD's group itself —
   only after proving by its start time that CMD's pid is still CMD's — and waits the same way
   before releasing.

A `mp-bridge run` inside CMD's own process group (a script run under `run` that calls the
`mempalace` shim, configs/mempalace-cli-shim) finds MP_BRIDGE_GRANT set to the live grant's token
and runs its command at once: the grant is already held for it, and waiting would deadlock.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, TextIO

from mp_ssh_bridge import guardian as guardian_mod
from mp_ssh_bridge import hostinfo, hub, liveness, owner, state

EX_TEMPFAIL = 75  # sysexits.h: the grant could not be had in time; try again later
EX_NOTFOUND = 127
EX_NOEXEC = 126
EX_SOFTWARE = 70
GRANT_ENV = "MP_BRIDGE_GRANT"  # CMD's environment: the token of the grant it runs under
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL when run stops CMD (grant_max_duration, palace lost)
POLL_S = 0.1
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")
GO_BEAT_TRIES = 3  # the beat naming CMD, before CMD may exec: each waits up to owner.LOCK_WAIT_S for owner.lock
DRAIN_S = guardian_mod.DRAIN_S  # the guardian died: how long run waits for CMD's group to be empty


def say(text: str) -> None:
    print(f"mp-bridge run: {text}", file=sys.stderr, flush=True)


def resolve_command(word: str) -> tuple[str | None, int, str]:
    """(the executable CMD names, 0, "") or (None, exit status, why): 127 not found, 126 not executable."""
    if os.sep in word:
        if not os.path.exists(word):
            return None, EX_NOTFOUND, f"{word}: no such file"
        if os.path.isdir(word) or not os.access(word, os.X_OK):
            return None, EX_NOEXEC, f"{word}: not an executable file"
        return word, 0, ""
    found = shutil.which(word)
    if found is None:
        return None, EX_NOTFOUND, f"{word}: command not found on PATH"
    return found, 0, ""


class Progress:
    """The waiting line on stderr: rewritten in place on a terminal (at most every second, or when the
    holder changes); elsewhere (a log, cron's mail) one line each time the holder changes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.key: Any = None
        self.shown_at = 0.0
        self.open_line = False

    @staticmethod
    def what(busy: owner.Busy) -> tuple[Any, str]:
        record = busy.record
        if not record or record.get("unreadable"):
            return None, str(busy)
        who = owner.describe(record)
        if "ahead of this" in str(busy):
            return ("ahead", record.get("token")), f"{who} waits for it ahead of this grant"
        kind = record.get("kind")
        doing = ("runs until its command ends" if kind == "grant" else
                 "is finishing its running call and stopping its engine" if kind in ("broker", "local") else
                 "is upstream's hub, which mp-bridge run does not stop" if kind == "hub" else
                 "holds it")
        return ("holder", record.get("token")), f"{who} {doing}"

    def __call__(self, busy: owner.Busy, waited: float) -> None:
        key, text = self.what(busy)
        now = time.monotonic()
        changed = key != self.key
        if not changed and (not self.tty or now - self.shown_at < 1.0):
            return
        self.key, self.shown_at = key, now
        line = f"mp-bridge run: waiting for the palace: {text} … {waited:.1f} s"
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
            self.open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.open_line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.open_line = False


def _inside_grant(paths: state.StatePaths, stale_after: float) -> bool:
    """Is this process inside the process group of the live grant MP_BRIDGE_GRANT names (run by it)?"""
    token = os.environ.get(GRANT_ENV)
    if not token:
        return False
    record = owner.live_holder(paths, stale_after)
    return (record is not None and record.get("kind") == "grant" and record.get("token") == token
            and liveness.same_machine(record) and record.get("pid") == os.getpgrp())


class _Signals:
    """SIGINT/SIGTERM/SIGHUP: while waiting, end the wait; while CMD runs, forward them to its group.
    Only noted here, acted on where `run` can (never an exception halfway through a claim). SIGTSTP is
    ignored: a grant cannot be suspended."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}
        for name in FORWARDED:
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._on)
        tstp = getattr(signal, "SIGTSTP", None)
        if tstp is not None:
            self.previous[tstp] = signal.signal(tstp, signal.SIG_IGN)

    def _on(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        out, self.pending = self.pending, []
        return out

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


HUB_ADVICE = ("mp-bridge run cannot stop a hub it did not start. mempalace ≥ 3.11's own CLI sends its writes to the "
              "hub: run the command without mp-bridge run; or stop the hub, then run it again")


class _HubOwned(Exception):
    """Upstream's hub owns the palace: no grant can be had."""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _live_hub(settings: Any) -> hub.Hub | None:
    """On the host: upstream's hub on this palace, if one lives (its registry is this machine's; a container cannot
    judge a host's pid, and asks the host broker, which refuses the grant while it routes to a hub)."""
    if settings.resolved_role() != "host":
        return None
    try:
        palace = str(settings.memory.palace)
    except Exception:  # noqa: BLE001 - an unresolvable palace: the claim below says what is wrong
        return None
    found = hub.live(palace)
    return found if found is not None and not found.read_only else None  # a read-only hub writes nothing


def _exit_status(raw: int) -> int:
    code = os.waitstatus_to_exitcode(raw)
    return 128 - code if code < 0 else code


def run(settings: Any, argv: list[str], timeout: float | None = None) -> int:
    """`mp-bridge run`: CMD's exit status, or 75 / 126 / 127 / 1 as described in the module docstring."""
    if not argv:
        say("no command given: mp-bridge run [--timeout S] -- CMD ARGS…")
        return 2
    path, code, why = resolve_command(argv[0])
    if path is None:
        say(f"cannot run {why}; nothing was run")
        return code
    paths = settings.paths
    stale = settings.heartbeat_stale_after
    if _inside_grant(paths, stale):
        os.execv(path, argv)  # already the palace's owner: this runs inside that grant's process group
    found = _live_hub(settings)
    if found is not None:
        say(f"upstream's hub (pid {found.pid}, {found.url}) owns this palace; nothing was run. {HUB_ADVICE}")
        return EX_TEMPFAIL
    try:
        state.ensure_private_dir(paths.root)
    except (OSError, state.UnsafeDirectory) as exc:
        say(f"cannot use the state directory {paths.root}: {exc}")
        return 1
    bound = settings.owner_wait if timeout is None else timeout
    what = shlex.join(argv)
    signals = _Signals()
    progress = Progress()

    def waiting(busy: owner.Busy, waited: float) -> None:
        record = busy.record or {}
        if owner.hub_of(record) is not None:
            raise _HubOwned(owner.describe(record))
        progress(busy, waited)
        if signals.pending:  # between two refused claims: nothing of ours is in owner.json
            raise _Interrupted(signals.pending[0])

    try:
        try:
            claim = owner.acquire(paths, "grant", stale, bound, fields={"what": what}, progress=waiting)
        finally:
            progress.done()
    except owner.Busy as exc:
        signals.restore()
        say(f"the palace was not handed over within {bound:g} s: {exc}. Nothing was run; try again later, or "
            "wait longer with --timeout (or owner_wait)")
        return EX_TEMPFAIL
    except _HubOwned as exc:
        signals.restore()
        say(f"{exc} owns this palace through the hub; nothing was run. {HUB_ADVICE}")
        return EX_TEMPFAIL
    except _Interrupted as exc:
        signals.restore()
        say(f"interrupted ({signal.Signals(exc.signum).name}) while waiting for the palace; nothing was run")
        return 128 + exc.signum
    except OSError as exc:
        signals.restore()
        say(f"cannot claim the palace in {paths.root}: {exc}")
        return 1
    if signals.pending:  # came while the claim was being made: give it back (token-checked), run nothing
        claim.release()
        signals.restore()
        signum = signals.pending[0]
        say(f"interrupted ({signal.Signals(signum).name}) while waiting for the palace; nothing was run")
        return 128 + signum
    try:
        return _run_granted(settings, claim, path, argv, signals)
    finally:
        signals.restore()


def _run_granted(settings: Any, claim: owner.Claim, path: str, argv: list[str], signals: _Signals) -> int:
    """CMD under its guardian, the grant held; released once CMD's group is gone."""
    info_r, info_w = os.pipe()
    go_r, go_w = os.pipe()
    env = dict(os.environ, **{GRANT_ENV: claim.token})
    guardian_mod.become_subreaper()  # should the guardian die, what is left of CMD's group is ours to reap
    try:
        guardian = subprocess.Popen(
            [sys.executable, "-m", "mp_ssh_bridge.guardian", str(os.getpid()), str(info_w), str(go_r), path, *argv],
            pass_fds=(info_w, go_r), env=env, stdin=None, stdout=None, stderr=None,
        )
    except OSError as exc:
        for fd in (info_r, info_w, go_r, go_w):
            os.close(fd)
        claim.release()
        say(f"cannot start the guardian ({sys.executable} -m mp_ssh_bridge.guardian): {exc}; nothing was run")
        return 1
    os.close(info_w)
    os.close(go_r)
    reader = _Lines(info_r)
    pid: int | None = None
    status: int | None = None
    try:
        first = reader.line(10.0)
        if first is None or not first.startswith("pid "):
            os.close(go_w)
            say("the guardian did not start CMD; nothing was run")
            return _finish(claim, guardian, reader, None, None, EX_SOFTWARE)
        pid = int(first.split()[1])
        started = time.time()
        expires = started + settings.grant_max_duration
        ours, why = _go_beat(claim, pid=pid, proc_start=hostinfo.proc_start(pid), expires=expires,
                             guardian_pid=guardian.pid, engine_pid=guardian.pid,
                             engine_proc_start=hostinfo.proc_start(guardian.pid))
        if not ours:
            os.close(go_w)  # EOF: CMD's process exits without running CMD
            say(f"{why}; nothing was run")
            return _finish(claim, guardian, reader, pid, None, EX_TEMPFAIL)
        try:
            os.write(go_w, b"g")
        except BrokenPipeError:
            pass  # CMD's process is already gone (its guardian died): its status says so
        os.close(go_w)
        status = _supervise(settings, claim, os.path.basename(argv[0]), pid, expires, reader, signals)
    except BaseException:
        if pid is not None:  # an error of run's own: CMD stops first; the grant ends after it
            if not reader.done:
                _stop(pid, STOP_GRACE_S, lambda: reader.done, reader)
            _finish(claim, guardian, reader, pid, None, EX_SOFTWARE)
        raise
    return _finish(claim, guardian, reader, pid, status, None)


def _go_beat(claim: owner.Claim, **fields: Any) -> tuple[bool, str]:
    """The beat that names CMD, which must be definite before CMD may exec: (written, why not)."""
    failure: OSError | None = None
    for attempt in range(GO_BEAT_TRIES):
        try:
            if claim.beat(**fields):
                return True, ""
            return False, "lost the palace before CMD started (another side judged this grant gone)"
        except OSError as exc:  # owner.BeatSkipped (owner.lock busy), or the state directory failing
            failure = exc
            time.sleep(0.1 * (attempt + 1))
    return False, f"could not write the owner record naming CMD ({failure})"


class _Lines:
    """The guardian's info pipe: `pid N`, later `status N` (`status ?`: lost), after `stuck S` when CMD's
    group did not empty within S seconds."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False
        self.status: int | None = None
        self.unknown = False  # `status ?`: the guardian could not have CMD's wait status
        self.stuck = False

    @property
    def done(self) -> bool:
        """The guardian has reported (or is gone)."""
        return self.status is not None or self.unknown or self.eof

    def line(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], min(left, POLL_S))
            if ready:
                chunk = os.read(self.fd, 4096)
                self.eof = not chunk
                self.buf += chunk
        if b"\n" not in self.buf:
            return None
        text, self.buf = self.buf.split(b"\n", 1)
        line = text.decode("ascii", "replace")
        if line.startswith("status "):
            word = line.split()[1]
            if word.lstrip("-").isdigit():
                self.status = int(word)
            else:
                self.unknown = True
        elif line.startswith("stuck "):
            self.stuck = True
        return line

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _stop(pid: int, grace: float, gone: Any, reader: _Lines) -> None:
    """SIGTERM CMD's group, SIGKILL it after `grace` unless `gone()`."""
    _killpg(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if gone():
            return
        reader.line(POLL_S)
    _killpg(pid, signal.SIGKILL)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(settings: Any, claim: owner.Claim, name: str, pid: int, expires: float, reader: Any,
               signals: Any) -> int | None:
    """While CMD runs: beat (also while stopping it), forward signals, enforce grant_max_duration, watch the
    record. CMD's wait status."""
    schedule = liveness.BeatSchedule(settings.heartbeat_interval)
    kill_at: float | None = None  # stopping CMD: when its group gets SIGKILL
    lost = warned = False
    while not reader.done:
        reader.line(POLL_S)
        if reader.done:
            break
        for sig in signals.take():
            _killpg(pid, sig)
        now = time.monotonic()
        if kill_at is not None and now >= kill_at:
            _killpg(pid, signal.SIGKILL)
            kill_at = float("inf")
        if kill_at is None and time.time() >= expires:
            say(f"{name} has held the palace for grant_max_duration ({settings.grant_max_duration:g} s): stopping it "
                f"(SIGTERM, then SIGKILL after {STOP_GRACE_S:g} s) and releasing the palace")
            _killpg(pid, signal.SIGTERM)
            kill_at = now + STOP_GRACE_S
        if lost or not schedule.due():
            continue
        schedule.beaten()
        try:
            ours = claim.beat()
        except OSError as exc:  # owner.BeatSkipped (owner.lock busy) or a failing write: the next beat tries again
            if not warned:
                warned = True
                say(f"could not write the heartbeat ({exc}); {name} goes on, the next beat tries again")
            continue
        if not ours:
            lost = True
            say(f"lost the palace while {name} ran (owner.json no longer names this grant: another side judged "
                f"it gone): stopping {name} at once")
            if kill_at is None:
                _killpg(pid, signal.SIGTERM)
            kill_at = min(kill_at if kill_at is not None else float("inf"), now + 1.0)
    return reader.status


def _finish(claim: owner.Claim, guardian: subprocess.Popen[Any], reader: _Lines, pid: int | None,
            status: int | None, fallback: int | None) -> int:
    """Wait for the guardian (it reports once CMD's group is gone), then release; the exit status."""
    while not reader.done:
        reader.line(POLL_S)
    status = reader.status if status is None else status
    if reader.stuck:  # the guardian waits on; the record names it: the grant ends when it does
        reader.close()
        say(f"CMD's process group (pgid {pid}) still has a member {DRAIN_S:g} s after CMD exited (uninterruptible "
            f"I/O?): the palace stays held until it is gone (the guardian, pid {guardian.pid}, waits for it)")
        return EX_SOFTWARE if status is None else _exit_status(status)
    try:
        guardian.wait(timeout=30)
    except subprocess.TimeoutExpired:
        guardian.kill()
        guardian.wait()
    reader.close()
    if status is None and not reader.unknown and pid is not None and not _end_orphaned_group(claim, pid):
        return EX_SOFTWARE
    claim.release()
    if fallback is not None:  # CMD never ran: its process only exited on EOF
        return fallback
    if status is None:
        say("the guardian could not have CMD's exit status (was it reaped by another process?); "
            "whether CMD succeeded is unknown" if reader.unknown else "the guardian exited without CMD's exit status")
        return EX_SOFTWARE
    return _exit_status(status)


def _end_orphaned_group(claim: owner.Claim, pgid: int) -> bool:
    """The guardian died without a word: stop what is left of CMD's group and wait until it is empty. True when
    it is (the grant may end); False when it is kept: a member lives on, or CMD's pid is not provably CMD's."""
    if hostinfo.pid_alive(pgid):
        recorded, now = claim.record.get("proc_start"), hostinfo.proc_start(pgid)
        if recorded is not None and now is not None and now != recorded:
            # Reused: CMD is gone, and with it its group (a pid is not reused while a group of that id exists).
            return True
        if recorded is None or now is None:
            if not _group_exists(pgid):
                return True
            say(f"CMD (pid {pgid}) outlived its guardian and cannot be proved to be CMD (no start time); the "
                "palace is left to end with it")
            return False
    elif not _group_exists(pgid):
        return True
    # CMD's own pid (its start time matches), or its group without it: CMD's pid cannot have been reused
    # while a group of that id exists.
    with_run = {"pid": os.getpid(), "proc_start": hostinfo.proc_start(os.getpid()), "engine_pid": None,
                "engine_proc_start": None}
    try:
        claim.beat(**with_run)  # the grant now lives as long as run, which waits for the group below
    except OSError:
        pass
    _killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + 1.0
    while _group_exists(pgid) and time.monotonic() < end:
        time.sleep(POLL_S)
    _killpg(pgid, signal.SIGKILL)
    if guardian_mod.drain(pgid, DRAIN_S, tick=POLL_S):
        return True
    say(f"CMD's process group (pgid {pgid}) still has a member {DRAIN_S:g} s after its guardian died "
        "(uninterruptible I/O?): the palace is left held")
    return False


def _group_exists(pgid: int) -> bool:
    guardian_mod.reap_group(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
