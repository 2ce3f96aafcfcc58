"""A memory's state directory (`$MEMPALACE_PATH`, else one per palace: `palace.state_dir_for`).

It holds `broker.lock` (flock'ed by the one broker for its whole life),
`broker.sock`, `broker.json` (written atomically, owner-only, with a
heartbeat) and `palace.id` (an identity that survives a bind mount, so a
shim in a container can tell the host broker serves *its* palace even
though the paths differ; written so that it is complete or absent even
after a power loss, see `palace_id`). Whether the writer a record names is
alive is `mp_ssh_bridge.liveness`'s question. Stdlib only. The shim's fast
path does not import it (it reads broker.json itself, in `session.fast_connect`).
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

    __slots__ = ("root", "lock_dir", "private")

    def __init__(self, root: Path, lock_dir: Path | None = None, private: Path | None = None) -> None:
        self.root = Path(root)
        # A container daemon's paths (`daemon_paths`): its own records — broker.json, broker.sock, broker.lock,
        # engine.json, broker.log — live in `private`, a directory of the container's own; what both sides of the
        # bind mount must see (owner.json, owner.requests/, palace.id) stays in `root`.
        self.private = Path(private) if private is not None else None
        # Where the flocks live: the state directory itself, except in tests that play two sides of a VM
        # boundary on one kernel (setting `lock_dir`): there each side's locks must not see the other's.
        # A daemon's broker.lock is its own (private); owner.lock stays where the other claimers on this kernel look.
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatePaths) and other.root == self.root and other.private == self.private

    def __hash__(self) -> int:
        return hash((self.root, self.private))

    def __repr__(self) -> str:
        return f"StatePaths({str(self.root)!r}" + (f", private={str(self.private)!r})" if self.private else ")")

    @property
    def own(self) -> Path:
        """Where this process's own records live: `private` for a container daemon, else the state directory."""
        return self.private or self.root

    @property
    def daemon_dir(self) -> Path:
        """The container daemon's directory for this memory (config.daemon_dir_for), whoever asks."""
        from mp_ssh_bridge.config import daemon_dir_for

        return Path(daemon_dir_for(str(self.root)))

    def daemon_paths(self) -> StatePaths:
        """The paths a container daemon of this memory uses (its records in `daemon_dir`, see `private`)."""
        return StatePaths(self.root, self.lock_dir, private=self.daemon_dir)

    @property
    def lock(self) -> Path:
        return (self.private or self.lock_dir) / "broker.lock"

    @property
    def owner(self) -> Path:
        """Who may write the palace now (mp_ssh_bridge.owner): seen by both sides of a bind mount."""
        return self.root / "owner.json"

    @property
    def owner_requests(self) -> Path:
        """One file per process waiting to own the palace (mp_ssh_bridge.owner.Request)."""
        return self.root / "owner.requests"

    @property
    def owner_lock(self) -> Path:
        """Serializes claims of owner.json on one kernel (across the boundary O_EXCL does)."""
        return self.lock_dir / "owner.lock"

    @property
    def json(self) -> Path:
        return self.own / "broker.json"

    @property
    def degraded(self) -> Path:
        """Written by a session that runs the engine itself (degraded mode), heartbeat kept fresh."""
        return self.root / "degraded.json"

    @property
    def engine(self) -> Path:
        """The broker's engine (pid, start time, boot): a broker killed with -9 leaves it, so the next one
        can wait for that engine or stop it before starting its own (broker/enginerecord.py)."""
        return self.own / "engine.json"

    @property
    def log(self) -> Path:
        return self.own / "broker.log"

    @property
    def palace_id_file(self) -> Path:
        return self.root / "palace.id"

    @property
    def preferred_socket(self) -> Path:
        return self.own / "broker.sock"

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

        digest = hashlib.sha256(os.fsencode(self.own)).hexdigest()[:20]
        return runtime_dir(uid) / f"{digest}.sock"


def runtime_dir(uid: int | None = None) -> Path:
    """`/tmp/mp-bridge-<uid>`: this machine's own per-user directory (0700 once `ensure_private_dir` made it).

    Not shared through a bind mount, and emptied by a reboot: socket stand-ins and the liveness
    readings (mp_ssh_bridge.liveness) live here.
    """
    return Path("/tmp") / f"mp-bridge-{os.getuid() if uid is None else uid}"


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
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode)


def write_text_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """`text` to `path` through a temp file in the same directory (created exclusively), fsync, chmod, rename:
    readers see the old file or the new one, never half of it."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
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
    """The record, or None when absent, unreadable, not a JSON object, or without a usable `pid`.

    Every record (broker.json, degraded.json, engine.json) names its writer by a positive integer pid; one
    that does not (`"pid": "123"`, damage, a foreign file) proves nothing about any process, so it is no
    record at all: taking it for a live writer somewhere would refuse every session until it went stale.
    """
    data = read_json_object(path)
    pid = data.get("pid") if data is not None else None
    return data if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when absent, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class PalaceIdDamaged(OSError):
    """palace.id exists but holds no palace id (empty or garbage: a power loss while it was written)."""


def parse_palace_id(text: str | None) -> str | None:
    """The palace id in palace.id's text: a UUID, as `palace_id` writes it; None for empty or garbage."""
    import uuid

    value = (text or "").strip()
    if len(value) != 36:
        return None
    try:
        uuid.UUID(value)
    except ValueError:
        return None
    return value


def _read_text(path: Path) -> str | None:
    """The file's text (undecodable bytes replaced), or None when it cannot be read."""
    try:
        return path.read_bytes().decode("ascii", errors="replace")
    except OSError:
        return None


def palace_id(paths: StatePaths, *, repair: bool = False) -> str:
    """The palace's identity: a UUID kept in `palace.id`, created once, durably and race-free.

    The file appears complete or not at all (written to a temporary file, flushed to the disk
    — F_FULLFSYNC on macOS — then hard-linked into place), so no reader ever sees it empty. One
    left empty or garbled by an older writer and a power loss is replaced, with a warning in
    the log, only when `repair` says the caller holds broker.lock (the broker): otherwise
    PalaceIdDamaged, which names the file.
    """
    path = paths.palace_id_file
    for _ in range(50):  # an older bridge creates it empty, then writes: give such a writer a moment
        raw = _read_text(path)
        current = parse_palace_id(raw)
        if current is not None:
            return current
        if raw is None:
            new = _create_palace_id(path)
            if new is not None:
                return new
            continue  # someone else created it first: read theirs
        if repair:
            return _repair_palace_id(path, raw)
        if raw.strip():
            break  # garbage, not a write in progress
        time.sleep(0.01)
    raise PalaceIdDamaged(
        f"{path} holds no palace id ({_describe_damage(raw)}); the next broker start replaces it "
        "(or delete the file while no broker runs)"
    )


def _describe_damage(raw: str | None) -> str:
    if raw is None:
        return "it cannot be read"
    return "it is empty" if not raw.strip("\x00 \t\r\n") else f"{len(raw)} bytes that are not a UUID"


def _write_temp(path: Path, text: str) -> str:
    """`text` in a new owner-only file beside `path`, flushed to stable storage; its name."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("ascii"))
        hostinfo.sync_fd(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _create_palace_id(path: Path) -> str | None:
    """A new id in `path` if it does not exist yet; None when someone else created it first."""
    import uuid

    new = str(uuid.uuid4())
    return new if create_new(path, new + "\n") else None


def create_new(path: Path, text: str) -> bool:
    """Create `path` holding `text` (ASCII), never replacing it; False when it already exists.

    Complete or not at all: a temporary file flushed to the disk, then hard-linked into place (atomic,
    also through a bind mount, where flock is not). On a file system without hard links (some FUSE
    mounts) an exclusive create and write, which a reader may see empty for a moment. The directory is
    synced after. palace.id and owner.json (mp_ssh_bridge/owner.py) are created this way.
    """
    import errno

    tmp = _write_temp(path, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if not _create_exclusive(path, text):
            return False
    finally:
        os.unlink(tmp)
    hostinfo.sync_dir(path.parent)
    return True


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode("ascii"))
        hostinfo.sync_fd(fd)
    finally:
        os.close(fd)
    return True


def _repair_palace_id(path: Path, raw: str) -> str:
    """Replace a damaged palace.id (the caller holds broker.lock), and say so in the log."""
    import logging
    import uuid

    new = str(uuid.uuid4())
    tmp = _write_temp(path, new + "\n")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    hostinfo.sync_dir(path.parent)
    logging.getLogger("mp_ssh_bridge.state").warning(
        "%s held no palace id (%s; a power loss while it was written?): replaced it with a new id %s. Sessions "
        "that compare palace.id read the new one; nothing in the palace changed", path, _describe_damage(raw), new,
    )
    return new


def read_palace_id(paths: StatePaths) -> str | None:
    """The palace id, or None when palace.id is missing, empty or garbage."""
    return parse_palace_id(_read_text(paths.palace_id_file))


def heartbeat_age(record: dict[str, Any], now: float | None = None) -> float | None:
    beat = record.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return None
    return (time.time() if now is None else now) - float(beat)
