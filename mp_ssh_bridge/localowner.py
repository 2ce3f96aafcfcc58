"""The session's own engine as the palace's `local` owner: run it, keep the claim, hand it over when asked.

Why a module of its own: degraded mode used to be "run the engine until the session ends". Under the
ownership protocol (docs/PROTOCOL.md "Ownership") such a session is an owner that must yield: when a
broker or a grant asks for the palace it finishes the call its engine is running, answers what arrives
meanwhile with "not executed" (the session sends those again on its next link), stops the engine and
releases — engine exited, then degraded.json removed, then owner.json released. That state machine (the
engine pipe, its in-flight table, the drain, the release order) lives here; `discovery` decides whether
the engine may run at all, and `session` stays free of the slow path's imports.

- `ProcessLink`: the engine as our child over its stdio, seen as a `Link`. A reader thread reads the
  engine's output, so that a reply this side makes up (while draining) and the engine's own come out
  of `recv` in order. `recv` returns None once the palace is released: the session's link_lost ->
  reconnect path then runs discovery again (the SSH path to the host broker, or a bounded wait).
- `LocalOwner`: owner.json (kind local, naming the engine's pid and start time) and degraded.json
  (which bridges from before owner.json read), beaten together; looks at owner.requests/ every `POLL_S`.
  A lost claim (another side judged this session gone) stops the engine at once. An engine that cannot
  be reaped even after SIGKILL keeps both records beaten until it is: it may still write.
- `spawn`: the engine is forked from one long-lived thread with a parent-death signal (Linux), so that a
  `kill -9` of this session stops the engine's running call too, not only at its next read of stdin.

Stdlib only (the shim's slow path).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mp_ssh_bridge import hostinfo, liveness, owner, state
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.protocol import LINE_TOO_LONG, SHUTTING_DOWN, FrameBuffer, LineTooLong, encode, error, valid_id

POLL_S = 0.2  # how often the owner looks for a request that outranks it (docs/PROTOCOL.md "Yield")
STOP_WAIT_S = 3.0  # after EOF on its stdin, and again after SIGTERM, the engine gets this long to exit
KILL_WAIT_S = 10.0  # after SIGKILL: an engine not reaped by then keeps both records beaten until it is (never two
# writers: the other side claims only once they stand still)
WHAT = "mp-shim (degraded mode)"


def _key(value: object) -> tuple[str, object]:
    return (type(value).__name__, value)  # as session.id_key: 1 and "1" are different ids


def _parse(frame: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(frame)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def who(record: dict[str, Any]) -> str:
    """A holder or requester in words, without how long it has waited (a request's `since` is not a hold)."""
    return owner.describe({k: v for k, v in record.items() if k != "since"})


# --------------------------------------------------------------------------- spawning the engine
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def pdeathsig_hook(platform: str | None = None) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send the engine SIGTERM when the thread that forked it dies
    (Linux; None elsewhere, and when libc's prctl cannot be had: the engine then still exits at EOF on its
    stdin, after its running call). If this process died between fork and prctl (the child's parent is no
    longer us), the child exits at once instead of running as an orphan. The broker's own is
    broker/enginerecord.py `pdeathsig_hook`; the client never imports the broker."""
    if not (platform or sys.platform).startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the running program's libc: no `ldconfig -p`
        args = (ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGTERM)), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))  # made before the fork: the child only calls
    except (OSError, AttributeError, ImportError) as exc:
        log(30, f"cannot load libc's prctl ({exc}): a killed session's engine finishes its running call first")
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(*args)
        if os.getppid() != parent:  # this session died before prctl took effect
            os._exit(1)

    return hook


class _Spawner:
    """Forks every engine from ONE daemon thread that lives as long as this process.

    Why a thread of its own: PR_SET_PDEATHSIG fires when the forking THREAD exits, not the process. The
    session runs discovery in a short-lived `connect` thread; an engine forked there with a death signal
    would be killed the moment that thread returned the link. This thread never returns, so the signal
    comes only when the whole process is gone (kill -9 included), or when it exits without stopping its
    engine first."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen], dict[str, Any], threading.Event]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, make: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="engine-spawner", daemon=True)
                self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((make, box, done))
        done.wait()  # a fork and an exec: bounded
        if "error" in box:
            raise box["error"]
        proc: subprocess.Popen = box["proc"]
        return proc

    def _serve(self) -> None:
        while True:
            make, box, done = self._jobs.get()
            try:
                box["proc"] = make()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
                box["error"] = exc
            finally:
                done.set()


_SPAWNER = _Spawner()


def spawn(argv: list[str], **popen: Any) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen), with a parent-death signal where there is one (see `_Spawner`).
    :raises OSError: as Popen."""
    hook = pdeathsig_hook()
    if hook is None:
        return subprocess.Popen(argv, **popen)
    return _SPAWNER.run(lambda: subprocess.Popen(argv, preexec_fn=hook, **popen))


class LocalOwner:
    """This session's hold on the palace while its engine runs: owner.json (kind local) and degraded.json,
    beaten every heartbeat_interval; requests that outrank it make its link hand the palace over."""

    def __init__(self, paths: state.StatePaths, claim: owner.Claim, stale_after: float, heartbeat_interval: float,
                 palace: str) -> None:
        self.paths = paths
        self.claim = claim
        self.stale_after = stale_after
        self.schedule = liveness.BeatSchedule(heartbeat_interval)  # a wake from sleep beats within 1 s
        self.degraded = {
            "pid": os.getpid(), "engine_pid": None, **liveness.writer_identity(), "palace": palace,
            "heartbeat": time.time(),
        }
        self._stop = threading.Event()  # released: no more beats (set only by `release`)
        self._lock = threading.Lock()  # a beat never lands after the release (it would re-create owner.json)
        self._link: ProcessLink | None = None
        self._yielding = False
        self._lost = False  # owner.json names another holder: never written again
        self._orphan: subprocess.Popen | None = None  # an engine not reaped after SIGKILL (`abandon`)
        self._then: Callable[[], None] | None = None  # run once that engine is reaped, before the release

    def start(self, link: ProcessLink, engine_pid: int) -> None:
        self._link = link
        self.degraded["engine_pid"] = engine_pid
        self._beat_degraded()
        try:
            # Its start time too: owner.holder keeps a record of this machine alive while that engine runs.
            kept = self.claim.beat(engine_pid=engine_pid, engine_proc_start=hostinfo.proc_start(engine_pid))
        except OSError as exc:  # owner.BeatSkipped included: unwritable is not lost
            log(30, f"cannot refresh {self.paths.owner} ({exc})")
            kept = True
        threading.Thread(target=self._run, name="local-owner", daemon=True).start()
        if not kept:
            self._lost = True
            link.lose(self._lost_why())

    def _lost_why(self) -> str:
        now = owner.live_holder(self.paths, self.stale_after)
        taker = who(now) if now is not None else "another process"
        return (f"this session's claim on the palace was taken by {taker} (it judged this session gone), "
                "so its memory engine was stopped at once")

    def _beat_degraded(self) -> None:
        self.degraded["heartbeat"] = time.time()
        try:
            state.write_json_atomic(self.paths.degraded, self.degraded)
        except OSError as exc:
            log(30, f"cannot write {self.paths.degraded} ({exc}): a bridge from before owner.json on the other side "
                    "of a VM boundary would not know this session writes the palace")

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - one bad look (a half-written file) costs one tick
                log(30, f"ownership check failed: {type(exc).__name__}: {exc}")

    def _tick(self) -> None:
        link = self._link
        if link is None:
            return
        orphan = self._orphan
        if orphan is not None and orphan.poll() is not None:
            log(30, f"the memory engine (pid {orphan.pid}) has finally exited: releasing the palace")
            then, self._then = self._then, None
            if then is not None:
                then()
            self.release()
            return
        if self.schedule.due():
            self.schedule.beaten()
            lost_now = False
            with self._lock:
                if self._stop.is_set():
                    return
                if not self._lost:
                    try:
                        kept = self.claim.beat()
                    except OSError as exc:  # owner.BeatSkipped included
                        log(30, f"cannot refresh {self.paths.owner} ({exc})")
                        kept = True  # unwritable is not lost: the next beat tries again
                    if not kept:
                        self._lost = lost_now = True
                self._beat_degraded()  # as long as the engine may write: until the release
            if lost_now:
                if orphan is not None:
                    log(50, f"{self._lost_why()}; but that engine (pid {orphan.pid}) could not be reaped and may "
                            "still write")
                else:
                    link.lose(self._lost_why())
                return
        if not self._yielding and not self._lost and orphan is None:
            wanted = owner.wanted_by(self.paths, "local", self.stale_after)
            if wanted is not None:
                self._yielding = True
                link.hand_over(wanted)

    def abandon(self, proc: subprocess.Popen, then: Callable[[], None] | None = None) -> None:
        """The engine could not be reaped even after SIGKILL (uninterruptible sleep): it may still write, so both
        records are kept and beaten until it has exited; then `then()` and the release, in the usual order."""
        with self._lock:
            self._then = then
            self._orphan = proc

    def release(self) -> None:
        """After the engine has exited: degraded.json removed, then owner.json released (if still ours)."""
        with self._lock:
            self._stop.set()
        current = state.read_broker_json(self.paths.degraded)
        if current is not None and current.get("pid") == self.degraded["pid"]:
            try:
                self.paths.degraded.unlink()
            except OSError:
                pass
        try:
            self.claim.release()
        except OSError as exc:
            log(40, f"cannot release {self.paths.owner} ({exc}); it is reclaimed once this process is gone")


class ProcessLink(Link):
    """Degraded mode: the engine as our own child, over its stdio; holds broker.lock and the claim while it runs."""

    transport = "engine"
    degraded = True

    def __init__(
        self, proc: subprocess.Popen, reason: str, lock_fd: int | None, max_line_bytes: int,
        holder: LocalOwner | None = None, call_bound: float | None = None, waited: tuple[float, str] | None = None,
    ) -> None:
        self.proc = proc
        self.reason = reason
        self.lock_fd = lock_fd
        self.holder = holder
        # Longest a running call may take to finish before a hand-over stops the engine anyway (its outcome then
        # unknown). Discovery always gives one: the session's timeout + grace, or with none set (timeout 0) the
        # broker's stall bound, capped by owner_wait. None (tests only): no bound.
        self.call_bound = call_bound
        self.waited = waited  # (seconds, for whom) when discovery waited for the palace before this engine
        self.endpoint = f"engine pid {proc.pid}"
        self.handover: str | None = None  # how this link gave the palace up, in words (the session's notice)
        self._frames = FrameBuffer(max_line_bytes)
        self._out: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()
        self._state = threading.Condition()  # guards everything below; never held while writing to the engine
        self._inflight: set[tuple[str, object]] = set()  # requests written to the engine, not answered yet
        self._draining = False  # a request outranks us: new requests are answered "not executed"
        self._stopping = False  # the engine is being stopped: nothing more reaches it
        self._eof = False
        self._sealed = False  # the session has counted what never ran: nothing more is written
        self._send_lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self._finished = False
        threading.Thread(target=self._read, name="engine-out", daemon=True).start()
        if holder is not None:
            holder.start(self, proc.pid)

    # ---- the engine's output ------------------------------------------------------------------
    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while True:
                frame = self._frames.next_frame()
                if frame is not None:
                    self._out.put(frame)
                    continue
                chunk = os.read(fd, 262144)
                if not chunk:
                    rest = self._frames.rest()
                    if rest:
                        self._out.put(rest)
                    break
                self._frames.feed(chunk)
        except LineTooLong as exc:
            self._out.put(ShimError(LINE_TOO_LONG, f"the engine sent a line above {exc.limit} bytes"))
        except OSError as exc:
            self._out.put(exc)
        with self._state:
            self._eof = True
            self._state.notify_all()
            stopping = self._stopping
        if not stopping:
            self._out.put(None)  # the engine ended by itself; when we stop it, _finish ends the link after the release

    def recv(self, timeout: float | None = None) -> bytes | None:
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame from the engine within {timeout:g}s") from None
        if item is None:
            self._out.put(None)  # every later recv sees the end too
            return None
        if isinstance(item, BaseException):
            raise item
        msg = _parse(item)
        if msg is not None and "method" not in msg and valid_id(msg.get("id")):
            with self._state:  # answered only once the session has it (`unsent` must never count it as unsent)
                self._inflight.discard(_key(msg["id"]))
                self._state.notify_all()
        return item

    # ---- to the engine ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        msg = _parse(data)
        request = msg is not None and isinstance(msg.get("method"), str) and valid_id(msg.get("id"))
        with self._send_lock:
            with self._state:
                if self._draining or self._stopping or self._sealed:
                    if request:
                        assert msg is not None
                        self._out.put(self._not_executed(msg["id"]))
                        return
                    if self._stopping or self._sealed or msg is None or msg.get("method") != "notifications/cancelled":
                        return  # nothing for an engine about to stop (a cancel still reaches its running call)
                if request:
                    assert msg is not None
                    self._inflight.add(_key(msg["id"]))
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except ValueError as exc:  # closed under us (the engine stopped): as a broken pipe
                raise BrokenPipeError(f"the memory engine's stdin is closed ({exc})") from None

    def _not_executed(self, msg_id: object) -> bytes:
        """The answer a stopping broker gives: the session puts the request back in its backlog for the next link."""
        why = self.handover or "this session's memory engine is stopping"
        return encode(error(msg_id, SHUTTING_DOWN, f"not executed: {why}", {"outcome": "not_executed"})).rstrip(b"\n")

    def unsent(self, msg_id: object) -> bool:
        """At the end (the session's link_lost): was this request never written to the engine? Seals the link
        first, so that a send racing the end cannot write it after this answer."""
        if not valid_id(msg_id):
            return False
        with self._state:
            self._sealed = True
            return _key(msg_id) not in self._inflight

    # ---- giving the palace up -----------------------------------------------------------------
    def hand_over(self, request: dict[str, Any]) -> None:
        """A request outranks us: finish the running call, then stop the engine and release (in a thread of its
        own, so that the owner's heartbeat goes on meanwhile)."""
        self.handover = f"memory was handed over to {who(request)}"
        with self._state:
            self._draining = True
            busy = len(self._inflight)
        log(30, f"{who(request)} wants the palace: " + (f"finishing {busy} running call(s), then " if busy else "")
            + f"stopping this session's memory engine (pid {self.proc.pid})")
        threading.Thread(target=self._drain_and_finish, name="hand-over", daemon=True).start()

    def _drain_and_finish(self) -> None:
        end = None if self.call_bound is None else time.monotonic() + self.call_bound
        hung = False
        with self._state:
            while self._inflight and not self._eof and not self._finished:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    log(30, f"the running call did not finish within {self.call_bound:g} s: stopping the engine anyway "
                            "(its outcome is unknown: it may have run; it is not sent again)")
                    hung = True
                    break
                self._state.wait(left)
        self._finish(kill=False, hung=hung)

    def lose(self, why: str) -> None:
        """The claim is no longer ours: stop the engine at once (another writer may already have started)."""
        self.handover = why
        log(40, why)
        threading.Thread(target=self._finish, kwargs={"kill": True}, name="claim-lost", daemon=True).start()

    def _finish(self, kill: bool, hung: bool = False) -> None:
        """Stop the engine, then release (broker.lock, degraded.json, owner.json), then end the link. Once.

        `kill` signals the engine before waiting for `_finish_lock`: a drain that holds it may spend seconds
        on EOF and SIGTERM, and a lost claim must not wait behind that."""
        if kill:
            with self._state:
                self._stopping = True
            self._kill()
        with self._finish_lock:
            if self._finished:
                return
            with self._state:
                self._stopping = True
            exited = self._stop_engine(kill, hung)
            if exited or self.holder is None:
                self._close_lock()
            if self.holder is not None:
                if exited:
                    self.holder.release()
                else:
                    self.holder.abandon(self.proc, then=self._close_lock)
                    log(50, f"the memory engine (pid {self.proc.pid}) did not exit even after SIGKILL: this session "
                            f"keeps its claim on the palace ({self.holder.paths.owner}), beaten, until it does")
            self._finished = True
            with self._state:
                self._state.notify_all()
        self._out.put(None)

    def _close_lock(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)

    def _kill(self) -> None:
        try:
            self.proc.kill()  # a no-op once it has been reaped
        except OSError:
            pass

    def _stop_engine(self, kill: bool, hung: bool = False) -> bool:
        """EOF on its stdin, then SIGTERM, then SIGKILL (at once with `kill`; SIGTERM at once when `hung`: a call
        that outlived its bound keeps the engine from reading its stdin); True once it has exited."""
        if kill:
            self._kill()
        self._close_stdin()  # the engine exits at EOF
        if not kill:
            if hung:
                self.proc.terminate()
            else:
                try:
                    self.proc.wait(STOP_WAIT_S)
                    return True
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
            try:
                self.proc.wait(STOP_WAIT_S)
                return True
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            self.proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _close_stdin(self) -> None:
        got = self._send_lock.acquire(timeout=STOP_WAIT_S)  # not in the middle of a frame
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        finally:
            if got:
                self._send_lock.release()

    def close(self) -> None:
        self._finish(kill=False)
