"""Which processes write a palace's files, and whether broker.lock is held (and who has it open).

A second writer (a plain `mempalace-mcp`, `mempalace mine`) on the palace the broker
owns is exactly how vectors get lost, and the broker cannot see it: its own writes are
merely refused ("Peer MCP writer active"). `mp-bridge doctor` names such processes.

Whether broker.lock is held is asked of the kernel itself: a non-blocking shared flock on a
fresh read-only descriptor, given back at once. That is right on every file system and through
any symlink, where comparing device and inode numbers with /proc/locks is not (btrfs, overlayfs).
Who has a file open is only for naming: Linux reads `/proc/<pid>/fd` and `/proc/<pid>/fdinfo`
(own processes; root sees all); macOS has no `/proc`, so it asks `lsof` (bounded in time).
Paths are compared after `os.path.realpath`, as the kernel names them. Only descriptors opened
for writing count as writers: a reader (a read-only sqlite connection, `mempalace status`) loses
no vectors. The parsers are pure functions, tested by their inputs on either platform. Processes
in another VM (a container's, through a bind mount) are invisible from here: the host can only see
its own. Stdlib only.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import dataclass

LSOF_SECONDS = 5.0
LSOF_MAX_FILES = 2000  # files handed to lsof: the palace's top level and one level down (HNSW segment folders)
ANCESTOR_DEPTH = 6  # how far up `strays` looks for one of ours (a shell wrapper, `uvx`, a venv launcher ...)
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)
# SQLite opens these read-write even for a read-only connection (WAL mode); a writer has the database itself
# open read-write, so only that counts
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    path: str


# --------------------------------------------------------------------------- open files
def palace_files(palace: str, kg: str) -> list[str]:
    """The files whose holders matter: every file in the palace (chroma.sqlite3, its -wal/-shm,
    the HNSW segments) and the knowledge graph with its -wal/-shm."""
    return [palace, kg, kg + "-wal", kg + "-shm"]


def _resolved(targets: list[str]) -> list[str]:
    """`targets` and their real paths (what /proc and lsof report), each once."""
    out = list(targets)
    out += [r for r in map(os.path.realpath, targets) if r not in out]
    return out


def _matches(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read(4096).split(b"\0")
    except OSError:
        return "?"
    return " ".join(w.decode("utf-8", "replace") for w in words if w)[:200] or "?"


def parse_fdinfo_writable(text: str | None) -> bool | None:
    """Was the descriptor opened for writing? From `/proc/<pid>/fdinfo/<fd>` text (`flags:` is octal)."""
    for line in (text or "").splitlines():
        if line.startswith("flags:"):
            try:
                return (int(line.split(":", 1)[1].strip(), 8) & os.O_ACCMODE) in _WRITE_MODES
            except ValueError:
                return None
    return None


def _fd_writable(proc: str, pid: int, fd: str) -> bool:
    try:
        with open(f"{proc}/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
            text = fh.read(4096)
    except OSError:  # closed meanwhile, or not ours to read
        return False
    return bool(parse_fdinfo_writable(text))


def holders_linux(targets: list[str], proc: str = "/proc", writers: bool = True) -> tuple[list[Holder], int]:
    """(processes with an fd on one of `targets` — with `writers`, only fds opened for writing, SQLite's side
    files aside —,
    how many processes could not be inspected). `targets` must be real paths: /proc names those."""
    found: list[Holder] = []
    unreadable = 0
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return [], 0
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                path = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if _matches(path, targets) and (not writers or (not path.endswith(_SQLITE_SIDE_FILES)
                                                            and _fd_writable(proc, pid, fd))):
                found.append(Holder(pid, _command(pid), path))
                break
    return found, unreadable


def parse_lsof(output: str, writers: bool = True) -> list[Holder]:
    """`lsof -F pcfan` output: one Holder per (pid, first file that counts).

    Lines: p<pid>, c<command>, then per file f<fd>, a<access>, n<name>. With `writers`, a file counts
    only when lsof did not say otherwise: `f` a number (not cwd, txt, mem ...) and `a` `w` or `u`
    (read-write); never a SQLite -wal/-shm/-journal file (a read-only connection opens those read-write).
    Output without f and a fields (`-F pcn`) cannot tell, so every other named file counts.
    """
    found: list[Holder] = []
    pid, command, seen = 0, "?", set()
    fd: str | None = None
    access: str | None = None
    for line in output.splitlines():
        tag, value = line[:1], line[1:]
        if tag == "p":
            pid, command, fd, access = (int(value) if value.isdigit() else 0), "?", None, None
        elif tag == "c":
            command = value
        elif tag == "f":
            fd, access = value, None
        elif tag == "a":
            access = value.strip()
        elif tag == "n" and pid and pid not in seen:
            if writers and ((fd is not None and not fd.isdigit()) or (access is not None and access not in ("w", "u"))
                            or (fd is not None and access is None) or value.endswith(_SQLITE_SIDE_FILES)):
                continue
            seen.add(pid)
            found.append(Holder(pid, command, value))
    return found


def _lsof_files(targets: list[str]) -> list[str]:
    """The files to hand lsof: each target file, and a target folder's files one level down (at most
    LSOF_MAX_FILES): lsof looks at exactly the files it is given."""
    files: list[str] = []
    for t in targets:
        if os.path.isdir(t):
            try:
                names = sorted(os.listdir(t))
            except OSError:
                continue
            for name in names:
                sub = os.path.join(t, name)
                if not os.path.isdir(sub):
                    files.append(sub)
                    continue
                try:
                    files += [os.path.join(sub, n) for n in sorted(os.listdir(sub))
                              if not os.path.isdir(os.path.join(sub, n))]
                except OSError:
                    continue
                if len(files) >= LSOF_MAX_FILES:
                    break
        elif os.path.exists(t):
            files.append(t)
        if len(files) >= LSOF_MAX_FILES:
            break
    return files[:LSOF_MAX_FILES]


def holders_lsof(targets: list[str], writers: bool = True) -> list[Holder] | None:
    """macOS (or any host with lsof): None when lsof is missing or too slow."""
    files = _lsof_files(targets)
    if not files:
        return []
    try:
        out = subprocess.run(["lsof", "-n", "-P", "-F", "pcfan", "--", *files], capture_output=True, text=True,
                             timeout=LSOF_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_lsof(out.stdout, writers=writers)


def holders(palace: str, kg: str, platform: str | None = None) -> tuple[list[Holder] | None, str]:
    """(who has the palace's files open for writing — None when this host cannot tell, a note on what was
    not seen). A palace spelled through a symlink is matched by its real path, which is what /proc names."""
    targets = _resolved(palace_files(palace, kg))
    if (platform or sys.platform).startswith("linux"):
        found, unreadable = holders_linux(targets)
        note = f"{unreadable} processes of other users not inspected" if unreadable and os.getuid() != 0 else ""
        return found, note
    found_lsof = holders_lsof([os.path.realpath(t) for t in palace_files(palace, kg)])
    return found_lsof, "" if found_lsof is not None else "lsof is missing or did not answer"


def _ours_or_below(pid: int, ours: set[int]) -> bool:
    """Is `pid` in `ours`, or a descendant within ANCESTOR_DEPTH generations (an engine behind `uvx`
    or a shell wrapper is the broker's grandchild)?"""
    from mp_ssh_bridge import hostinfo

    seen = set()
    current: int | None = pid
    for _ in range(ANCESTOR_DEPTH + 1):
        if current is None or current <= 0 or current in seen:
            return False
        if current in ours:
            return True
        seen.add(current)
        current = hostinfo.parent_pid(current)
    return False


def strays(found: list[Holder], ours: set[int]) -> list[Holder]:
    """Holders that are neither in `ours` (the broker, its engine, this process) nor descended from them."""
    return [h for h in found if not _ours_or_below(h.pid, ours)]


# --------------------------------------------------------------------------- broker.lock
def parse_proc_locks(text: str, dev_inode: tuple[int, int, int]) -> bool:
    """Whether /proc/locks text shows a lock held on (major, minor, inode).

    No longer used to decide "held" (`lock_is_held` asks the kernel; device numbers in /proc/locks do
    not match `stat` on btrfs or overlayfs); kept as a pure parser for diagnostics.

    Lines look like `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF` (major:minor in hex); a
    blocked waiter's line has `->` after the number.
    """
    major, minor, inode = dev_inode
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or words[1] == "->":
            continue
        try:
            dev = words[5].split(":")
            if (int(dev[0], 16), int(dev[1], 16), int(dev[2])) == (major, minor, inode):
                return True
        except (ValueError, IndexError):
            continue
    return False


def lock_is_held(lock_path: str) -> bool | None:
    """Is `lock_path` flock'ed by anyone? A non-blocking shared flock on a fresh read-only descriptor,
    released and closed at once. Never creates the file: absent means free. None when it cannot tell.

    flock locks belong to an open file description, so this asks the same question the election asks,
    wherever the file lives and however its path is spelled; a descriptor handed on by the process
    that took the lock (the shim that elects the broker does that) still holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return True if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_holders(lock_path: str, platform: str | None = None) -> tuple[bool | None, list[Holder]]:
    """(is broker.lock held — None when this host cannot tell, the processes that have it open)."""
    held = lock_is_held(lock_path)
    if not os.path.exists(lock_path):
        return held, []
    real = os.path.realpath(lock_path)
    if (platform or sys.platform).startswith("linux"):
        return held, holders_linux([real], writers=False)[0]
    return held, holders_lsof([real], writers=False) or []


# --------------------------------------------------------------------------- writers the owner record admits
def owner_writers(state_dir: str, stale_after: float, here: bool = True) -> set[int]:
    """The pids owner.json (mp_ssh_bridge/owner.py) names as the palace's writer: a grant's CMD (`pid` of a
    `grant`) and the owner's engine (`engine_pid`) — only while that owner lives. `here`: records written on
    this machine (their descendants count too, see `strays`); else records of another machine (a container
    asks about the host's processes, which the host reported: exact pids only)."""
    from pathlib import Path

    from mp_ssh_bridge import liveness, owner, state

    found = owner.holder(state.StatePaths(Path(state_dir)), stale_after)
    if found is None or not found[1].alive:
        return set()
    record = found[0]
    if liveness.same_machine(record) != here:
        return set()
    pids = {record.get("engine_pid")}
    if record.get("kind") == "grant":
        pids.add(record.get("pid"))
    return {p for p in pids if isinstance(p, int) and not isinstance(p, bool) and p > 0}


def admitted(writers: list[dict[str, object]], pids: set[int], descendants: bool = True) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(the writers `pids` admit — those pids, and with `descendants` their children —, the others).
    `writers` as palacecheck reports them: {"pid", "command", "path"}."""
    if not pids:
        return [], list(writers)
    ok: list[dict[str, object]] = []
    other: list[dict[str, object]] = []
    for w in writers:
        pid = w.get("pid")
        inside = isinstance(pid, int) and (pid in pids or (descendants and _ours_or_below(pid, pids)))
        (ok if inside else other).append(w)
    return ok, other
