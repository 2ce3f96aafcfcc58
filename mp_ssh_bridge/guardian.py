"""The guardian of `mp-bridge run -- CMD`: CMD never writes the palace once `run` is gone.

Why: `mp-bridge run` holds the palace for CMD (a `grant`, mp_ssh_bridge/grant.py) and releases it
after CMD has exited. If `run` itself dies (kill -9, a closed terminal, an OOM kill), nobody would
release nor stop CMD — and a CMD left running after its grant is gone is a second writer. So CMD
runs under this small process, started by `run` as `python -m mp_ssh_bridge.guardian`, which:

- forks CMD into its own session (its own process group, pgid = CMD's pid), and tells `run` the
  pid on the info pipe (`pid N`);
- lets CMD exec only when `run` says so (one byte `g` on the go pipe), i.e. after `run` has made
  the owner record name CMD's pid: CMD never writes before the claim is CMD's. EOF instead of
  `g` (run died, or lost the palace) ends the child without running CMD;
- watches `run`: Linux PR_SET_PDEATHSIG (the kernel signals the guardian the moment `run` dies),
  and everywhere a poll of getppid() every 0.1 s. Once `run` is gone it stops CMD's whole group:
  SIGTERM, 2 s, SIGKILL;
- when CMD has exited, kills (SIGKILL) what CMD left running in its group, reaps CMD, and waits
  until no member of the group remains: os.killpg(pgid, 0) fails with ESRCH. A member in
  uninterruptible sleep (D state) dies only when its I/O is done, and that I/O may be a write.
  Zombies of the group count as gone only once reaped: the guardian is a child subreaper on
  Linux (orphans of CMD become its children) and reaps them itself. The record names the
  guardian as `engine_pid` (grant.py), so on this machine the grant stays alive while the
  guardian waits, although CMD's own pid is gone;
- reports CMD's wait status on the info pipe (`status N`; `status ?` when it could not be had)
  and exits. If the group is not empty after DRAIN_S, it first says `stuck S`, and then keeps
  waiting (and killing) until it is: `run` keeps the grant, says so and exits; the grant ends
  when this process does.

CMD's stdin, stdout and stderr are the guardian's, which are `run`'s: untouched. On Linux CMD
also gets PR_SET_PDEATHSIG = SIGKILL for the guardian itself (a killed guardian takes CMD with it;
`run` then kills and waits for the rest of the group). SIGCHLD is set to SIG_DFL first: an
inherited SIG_IGN would have the kernel reap CMD behind our back and lose its status.
A CMD that leaves its group on purpose (setsid, a daemon) escapes this, as it escapes any
process-group kill. Stdlib only, and quick to start: nothing of the bridge is imported.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

POLL_S = 0.1
STOP_GRACE_S = 2.0  # SIGTERM to SIGKILL, when run is gone
DRAIN_S = 10.0  # after CMD's exit: how long to wait for its group to be empty before saying `stuck`
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
RESET_SIGNALS = ("SIGINT", "SIGQUIT", "SIGHUP", "SIGTERM", "SIGPIPE", "SIGXFSZ", "SIGTSTP", "SIGTTIN", "SIGTTOU")

_stop_requested = False


def _prctl(option: int, arg: int) -> bool:
    """Linux prctl(option, arg); False when not available (another OS, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _prctl_pdeathsig(sig: int) -> bool:
    """Linux: signal `sig` to this process when its parent dies. False when not available."""
    return _prctl(PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Linux: orphaned descendants become this process's children (so it can reap their zombies)."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _on_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def _killpg(pgid: int, sig: int) -> bool:
    """Signal CMD's group; False when it has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_group(pgid: int) -> None:
    """Reap whatever of our own children in group `pgid` has exited (their zombies would count as members)."""
    while True:
        try:
            done, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if done == 0:
            return


def drain(pgid: int, bound: float | None, tick: float = 0.02) -> bool:
    """SIGKILL group `pgid` until no member remains (True), at most `bound` seconds (None: no bound).

    A member is gone when os.killpg(pgid, 0) says ESRCH: zombies of our own children are reaped here,
    other zombies count until their parent reaps them. The group's id cannot be reused meanwhile: a
    pid is not handed out again while a process group of that id exists."""
    end = None if bound is None else time.monotonic() + bound
    while True:
        reap_group(pgid)
        if not _killpg(pgid, 0):
            return True
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(tick)
        _killpg(pgid, signal.SIGKILL)


class _Cmd:
    """CMD, the guardian's child: whether it has exited, without reaping it where the OS allows (waitid
    WNOWAIT: its zombie keeps the grant alive); elsewhere waitpid reaps it and the group is killed at once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None  # the wait status, once reaped
        self.lost = False  # reaped by someone else (ECHILD): its status is unknown
        self.peek = hasattr(os, "waitid")

    def exited(self) -> bool:
        if self.status is not None:
            return True
        if self.peek:
            try:
                return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.peek = False
        return self.reap(wait=False)

    def reap(self, wait: bool = True) -> bool:
        """Reap CMD; True once reaped (or found reaped by someone else: `lost`, status unknown)."""
        if self.status is not None or self.lost:
            return True
        try:
            done, raw = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:  # never 0: a status we did not see is no success
            self.lost = True
            return True
        if done != self.pid:
            return False
        self.status = raw
        return True


def _child(path: str, argv: list[str], go_fd: int, info_fd: int, guardian: int) -> None:
    """In the forked child: own session, die with the guardian, wait for `g`, exec CMD. Never returns."""
    try:
        os.close(info_fd)
        os.setsid()
        _prctl_pdeathsig(signal.SIGKILL)
        if os.getppid() != guardian:
            os._exit(125)
        for name in RESET_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, signal.SIG_DFL)
        word = b""
        while True:
            try:
                word = os.read(go_fd, 1)
                break
            except InterruptedError:
                continue
        if word != b"g":
            os._exit(125)  # run is gone or lost the palace: CMD never starts
        os.close(go_fd)
        os.execv(path, argv)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        try:
            os.write(2, f"mp-bridge run: cannot run {path}: {exc.strerror or exc}\n".encode())
        finally:
            os._exit(code)
    except BaseException:  # noqa: BLE001 - the child must never return into the guardian's code
        os._exit(125)
    os._exit(125)


def _stop_group(cmd: _Cmd, grace: float) -> None:
    """SIGTERM CMD's group; SIGKILL it once CMD has exited or `grace` ran out, so nothing of it runs on."""
    _killpg(cmd.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and not cmd.exited():
        time.sleep(0.02)
    _killpg(cmd.pid, signal.SIGKILL)


def guard(parent: int, info_fd: int, go_fd: int, path: str, argv: list[str]) -> int:
    """Run CMD as described above; the guardian's own exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN: the kernel would reap CMD itself
    for name in ("SIGINT", "SIGQUIT", "SIGHUP", "SIGTSTP"):  # run forwards what CMD should get
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_stop)
    _prctl_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # run died before the death signal was set
        return 1
    become_subreaper()  # what CMD leaves behind in its group is ours to reap
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(path, argv, go_fd, info_fd, me)
    os.close(go_fd)
    info = os.fdopen(info_fd, "w", buffering=1)
    try:
        info.write(f"pid {pid}\n")
    except OSError:
        pass  # run is gone: the loop below stops CMD (which never got its `g`)
    cmd = _Cmd(pid)
    stopped = False
    while not cmd.exited():
        if not stopped and (_stop_requested or os.getppid() != parent):
            stopped = True
            _stop_group(cmd, STOP_GRACE_S)
            continue
        time.sleep(POLL_S)
    _killpg(pid, signal.SIGKILL)  # CMD is done: what it left in its group would write after the grant
    cmd.reap()
    empty = drain(pid, DRAIN_S)
    try:
        if not empty:
            info.write(f"stuck {DRAIN_S:g}\n")
        info.write(f"status {'?' if cmd.status is None else cmd.status}\n")
        info.close()
    except OSError:
        pass  # run is gone: nobody to tell
    if not empty:
        drain(pid, None, tick=0.5)  # the grant lives as long as this process: until the group is empty
    return 0


def main(args: list[str] | None = None) -> int:
    """`python -m mp_ssh_bridge.guardian PARENT_PID INFO_FD GO_FD PATH ARGV0 [ARGS...]`."""
    words = sys.argv[1:] if args is None else args
    if len(words) < 5:
        print("usage: python -m mp_ssh_bridge.guardian PARENT_PID INFO_FD GO_FD PATH ARGV0 [ARGS...]", file=sys.stderr)
        return 2
    return guard(int(words[0]), int(words[1]), int(words[2]), words[3], words[4:])


if __name__ == "__main__":
    sys.exit(main())
