"""mempalace's writer lease, held by the broker whenever no engine of its own holds it.

Why: mempalace arbitrates its writers with one flock per palace, `~/.mempalace/locks/mine_palace_<key>.lock`
(`mine_palace_lock` in mempalace/palace/palace_lock.py, 3.4.0's palace.py: same file, same key). `mempalace serve`
does not start while another process holds it (it waits, 120 s by default, then exits 2), and a plain
`mempalace-mcp` 3.11 refuses mutating calls. But
mempalace-mcp 3.11 takes it only at its first mutating call and lets it go when it exits. So a hub started before
the broker's engine had written anything, or between two of its engines (a crash restart, an idle exit, the
0.6-1 s of a spawn), became the palace's writer, and every write through the bridge then failed with "Peer MCP
writer active". The broker closes those gaps (broker/engine.py drives this):

- before it spawns an engine it takes the lease itself, and takes it again the moment an engine of its exits
  (a restart keeps it; only a hand-over of the palace, or the broker's stop, lets it go);
- once the engine answered initialize, the lease passes to it: the broker lets go and at once sends `PROBE`, a
  call that takes the lease and changes nothing (the lease check runs before the tool, and the tool refuses an
  empty id list before it opens the palace: 9 ms on an empty palace, plus mempalace's sqlite check before a first
  write, which it would otherwise pay at the first write); who holds it afterwards is judged from the lease;
- mempalace 3.4.0 has no lease of its own: it takes the same flock around each Chroma write and fails the write
  when it is held. With such an engine the broker holds the lease between calls and lends it for each call that
  may write (`lend` / `give_back`);
- while upstream's hub owns the palace a thread waits on the flock (`wait`), so the broker holds the lease the
  moment the hub dies, ahead of a plain `mempalace-mcp` that would fall back to writing the palace itself.

flock is per kernel: this keeps writers on the broker's machine out. Across a VM boundary the ownership record
(mp_ssh_bridge/owner.py) does that job.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mp_ssh_bridge import hostinfo

log = logging.getLogger("broker.lease")

# A mutating call with no effect: 3.11 takes its lease for it, then refuses the empty list untouched.
PROBE = {"name": "mempalace_delete_drawers", "arguments": {"drawer_ids": []}}
PEER_WRITER = -32001  # mempalace 3.11: "Peer MCP writer active; this server is read-only for mutating tools"
UNKNOWN_TOOL = -32601  # mempalace 3.4.0 has no such tool, and no lease: it locks around each write
WAITER_JOIN_S = 0.05  # `take` while a waiting thread is blocked: its wake-up after the holder exited
IDENTITY = "mempalace-broker (mp-ssh-bridge: mempalace's writer lease, held between its engines)"
_SENTINEL = 1  # byte 0 is mempalace's lock byte; the holder's identity follows it


def lock_path(palace: str, home: str | None = None) -> Path:
    """The lease file mempalace uses for `palace`, under `home` (the engine's HOME: `~` as it expands it)."""
    base = home if home is not None else os.path.expanduser("~")
    resolved = os.path.realpath(os.path.expanduser(palace))
    key = hashlib.sha256(os.path.normcase(resolved).encode()).hexdigest()[:16]
    return Path(base) / ".mempalace" / "locks" / f"mine_palace_{key}.lock"


def recorded_holder(path: Path) -> tuple[int | None, str]:
    """The last holder's identity as mempalace records it: (pid, "PID n (command)"); (None, "") when unrecorded."""
    try:
        text = path.read_bytes()[_SENTINEL:].decode("utf-8", "replace").strip()
    except OSError:
        return None, ""
    parts = text.split(maxsplit=1)
    if not parts or not parts[0].isdigit():
        return None, ""
    pid = int(parts[0])
    return pid, f"PID {pid} ({parts[1].strip()})" if len(parts) > 1 else f"PID {pid}"


def _open(path: Path) -> IO[bytes]:
    for folder in (path.parent.parent, path.parent):  # ~/.mempalace/locks: owner-only when the broker makes them
        if not folder.is_dir():  # (mempalace's own makedirs leaves them 0755)
            folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return os.fdopen(fd, "r+b")


def _unlock(handle: IO[bytes] | None) -> None:
    if handle is None:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        handle.close()


def _write_identity(handle: IO[bytes]) -> None:
    data = f"{os.getpid()} {IDENTITY}".encode()
    handle.seek(_SENTINEL)
    handle.truncate(_SENTINEL + len(data))
    handle.write(data)
    handle.flush()


class Lease:
    """The broker's hold on one palace's lease file. Every method is quick (one non-blocking flock) except
    `wait`, which blocks in a thread of its own. Not thread-safe beyond that: call it from the event loop."""

    def __init__(self, palace: str, home: str | None = None) -> None:
        self.path = lock_path(palace, home)
        self._handle: IO[bytes] | None = None
        self._lent = 0  # calls in flight that may write, with an engine that locks around each write
        self._waiter: threading.Thread | None = None
        self._wanted = threading.Event()  # the waiting thread keeps what it gets only while this is set
        self._guard = threading.Lock()  # the waiting thread and the loop both hand `_handle` over
        self._on_taken: Callable[[], Any] = lambda: None

    @property
    def held(self) -> bool:
        return self._handle is not None

    @property
    def lent(self) -> bool:
        """Calls that may write are in flight with an engine that locks around each write: not ours to take."""
        return self._lent > 0

    def take(self) -> bool:
        """Hold the lease now if nobody does (non-blocking); True when the broker holds it after the call.

        While a thread of `wait` is blocked on the flock for us, that thread is the one to get it (a second
        descriptor would stay blocked behind its own): it is given WAITER_JOIN_S, as its holder has just exited."""
        with self._guard:
            waiter = self._waiter if self._wanted.is_set() else None
        if waiter is not None:
            waiter.join(WAITER_JOIN_S)
            with self._guard:
                if self._handle is not None or self._waiter is waiter:  # got it, or still blocked: held elsewhere
                    return self._handle is not None
        with self._guard:
            if self._handle is not None:
                return True
            try:
                handle = _open(self.path)
            except OSError as exc:
                log.warning("cannot open mempalace's lease file %s: %s", self.path, exc)
                return False
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                return False
            self._keep(handle)
            return True

    def release(self) -> None:
        """Let the lease go (idempotent); a thread still waiting for it lets go of what it gets."""
        with self._guard:
            self._wanted.clear()
            handle, self._handle = self._handle, None
            self._lent = 0
        _unlock(handle)

    def settle(self, bound: float) -> None:
        """After `release`: give a waiting thread that its holder's exit has just woken up to `bound` seconds to
        let go of what it got, so the next owner's own non-blocking lock (a grant's `mempalace mine`) finds the
        lease free. Blocking: call it in a thread."""
        waiter = self._waiter
        if waiter is not None:
            waiter.join(bound)

    def wait(self, on_taken: Callable[[], Any]) -> None:
        """Hold the lease as soon as its holder lets go (a thread blocks on the flock; one at a time): the kernel
        wakes it as that holder exits (the engine, the hub), ahead of anyone who tries again later. `on_taken`
        is called in that thread once the broker holds it: hand it to the loop with `call_soon_threadsafe`."""
        with self._guard:
            self._on_taken = on_taken
            self._wanted.set()
            if self._handle is not None or self._waiter is not None:  # held, or a thread waits already
                return
            self._waiter = threading.Thread(target=self._wait, name="lease-wait", daemon=True)
            self._waiter.start()

    def _wait(self) -> None:
        handle: IO[bytes] | None = None
        try:
            handle = _open(self.path)
            fcntl.flock(handle, fcntl.LOCK_EX)  # a daemon thread: a broker that exits meanwhile does not wait
        except OSError as exc:
            log.warning("cannot wait for mempalace's lease %s: %s", self.path, exc)
            with self._guard:
                self._waiter = None
            if handle is not None:
                handle.close()
            return
        with self._guard:  # `wait` and `take` decide under the same lock: a thread is either waiting or gone
            self._waiter = None
            kept = self._wanted.is_set() and self._handle is None
            if kept:
                self._keep(handle)
            on_taken = self._on_taken
        if not kept:  # no longer wanted (released meanwhile): give it back
            _unlock(handle)
            return
        try:
            on_taken()
        except RuntimeError:  # the broker's loop has closed (shutdown): nobody to tell
            pass

    def _keep(self, handle: IO[bytes]) -> None:
        try:
            _write_identity(handle)  # mempalace names the holder from this when it refuses
        except OSError:
            pass
        self._handle = handle

    # --- an engine that locks around each write (3.4.0) ----------------------------------------------------
    def lend(self) -> None:
        """A call that may write goes to such an engine: let the lease go while any is in flight."""
        self._lent += 1
        if self._lent == 1:
            with self._guard:
                handle, self._handle = self._handle, None
            _unlock(handle)

    def give_back(self) -> bool:
        """That call ended: once none is in flight, hold the lease again; False when another process took it."""
        if self._lent == 0:
            return self.held
        self._lent -= 1
        return self._lent > 0 or self.take()

    # --- for status and doctor -------------------------------------------------------------------------
    def holder(self) -> str:
        """Who holds the lease, when not the broker: mempalace's own record of its last holder, if that process
        lives (signal 0: cheap enough for every status; an exited holder not yet reaped still counts); "" when
        the broker holds it or the recorded holder is gone."""
        if self.held:
            return ""
        pid, named = recorded_holder(self.path)
        return named if pid is not None and pid != os.getpid() and hostinfo.pid_alive(pid) else ""
