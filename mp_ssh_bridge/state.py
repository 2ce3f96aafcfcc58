"""A memory's state directory (`$MEMPALACE_PATH`, else one per palace: `palace.state_dir_for`).

It holds `broker.lock` (flock'ed by the one broker for its whole life),
`broker.sock`, `broker.json` (written atomically, owner-only, with a
heartbeat) and `palace.id` (an identity that survives a bind mount, so a
shim in a container can tell the host broker serves *its* palace even
though the paths differ). Stdlib only. The shim's fast path does not
import it (it reads broker.json itself, in `session.fast_connect`).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from mp_ssh_bridge import hostinfo

BROKER_JSON_VERSION = 1


def expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


class StatePaths:
    """Every file the broker keeps in one state directory."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatePaths) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"StatePaths({str(self.root)!r})"

    @property
    def lock(self) -> Path:
        return self.root / "broker.lock"

    @property
    def json(self) -> Path:
        return self.root / "broker.json"

    @property
    def degraded(self) -> Path:
        """Written by a session that runs the engine itself (degraded mode), heartbeat kept fresh."""
        return self.root / "degraded.json"

    @property
    def log(self) -> Path:
        return self.root / "broker.log"

    @property
    def palace_id_file(self) -> Path:
        return self.root / "palace.id"

    @property
    def preferred_socket(self) -> Path:
        return self.root / "broker.sock"

    def socket(self, platform: str | None = None, uid: int | None = None) -> Path:
        """`broker.sock` in the state dir, or a short stand-in when that path is too long.

        macOS allows 103 usable bytes; a deep `$MEMPALACE_PATH` would not bind.
        The stand-in lives in a per-user 0700 directory under /tmp and is named
        by a hash of the state dir, so it is stable and never shared.
        """
        preferred = self.preferred_socket
        if len(os.fsencode(preferred)) <= hostinfo.max_socket_path_bytes(platform):
            return preferred
        import hashlib

        digest = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:20]
        user = os.getuid() if uid is None else uid
        return Path("/tmp") / f"mp-bridge-{user}" / f"{digest}.sock"


class UnsafeDirectory(Exception):
    """A directory that someone other than its owner can write to."""


def ensure_private_dir(path: Path) -> None:
    """Create `path` (0700) if needed; refuse one that others can write to."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise UnsafeDirectory(f"{path} exists and is not a directory") from exc
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"fix it with: chmod go-w {path}"
        )


def write_json_atomic(path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
    """temp file in the same directory, fsync, chmod, rename: readers see old or new, never half."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_broker_json(path: Path) -> dict[str, Any] | None:
    """The record, or None when absent, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def palace_id(paths: StatePaths) -> str:
    """The palace's identity: a UUID kept in `palace.id`, created once (race-safe)."""
    import errno
    import uuid

    try:
        existing = paths.palace_id_file.read_text(encoding="ascii").strip()
        if existing:
            return existing
    except OSError:
        pass
    new = str(uuid.uuid4())
    try:
        fd = os.open(paths.palace_id_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        for _ in range(50):  # another process is writing it right now
            existing = paths.palace_id_file.read_text(encoding="ascii").strip()
            if existing:
                return existing
            time.sleep(0.01)
        raise
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(new + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return new


def read_palace_id(paths: StatePaths) -> str | None:
    try:
        return paths.palace_id_file.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def heartbeat_age(record: dict[str, Any], now: float | None = None) -> float | None:
    beat = record.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return None
    return (time.time() if now is None else now) - float(beat)


def broker_may_be_alive(
    record: dict[str, Any] | None,
    stale_after: float,
    *,
    now: float | None = None,
    this_host: str | None = None,
    this_boot: str | None = None,
    pid_alive=hostinfo.pid_alive,
) -> bool:
    """Could the broker described by `record` still be running?

    On the broker's own host and boot the pid decides. Across a VM boundary
    pids mean nothing, so a heartbeat younger than `stale_after` means alive.
    Used before degraded mode: when in doubt, say alive (never two writers).
    """
    if record is None:
        return False
    host = hostinfo.host_name() if this_host is None else this_host
    boot = hostinfo.boot_id() if this_boot is None else this_boot
    pid = record.get("pid")
    same_machine = record.get("host") == host and record.get("boot_id") == boot and boot is not None
    if same_machine and isinstance(pid, int):
        return pid_alive(pid)
    age = heartbeat_age(record, now)
    if age is None:
        return True
    return age < stale_after


def live_degraded_writer(paths: StatePaths, stale_after: float, **liveness: Any) -> dict[str, Any] | None:
    """The record of a degraded-mode session that may still be writing the palace, or None.

    Across a VM boundary flock does not hold, so this file (and its heartbeat)
    is how a container session running its own engine keeps a host broker
    from becoming a second writer, and the other way round.
    """
    record = read_broker_json(paths.degraded)
    if record is None or not broker_may_be_alive(record, stale_after, **liveness):
        return None
    return record


def describe_degraded(record: dict[str, Any], paths: StatePaths) -> str:
    age = heartbeat_age(record)
    beat = f", heartbeat {age:.0f}s ago" if age is not None else ""
    return (
        f"a session on {record.get('host')} (pid {record.get('pid')}{beat}) runs its own memory engine on this "
        f"palace (degraded mode, recorded in {paths.degraded}); starting a broker now would make a second writer. "
        "End that session (or let its heartbeat go stale) and try again"
    )
