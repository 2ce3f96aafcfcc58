"""The broker's log file: bounded, and read the same way on the host and over SSH.

A detached broker's stdout and stderr are `broker.log` in its state directory (the
election opens it). Left alone it grows with every connection and engine restart for
as long as the broker lives, so the broker rotates it by size (one `broker.log.1` kept)
and `mp-bridge logs` (or `mempalace-broker --logs`, which a container runs on the host
over SSH) shows its end. Stdlib only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_BYTES = 5 * 1024 * 1024  # then broker.log becomes broker.log.1 (the previous .1 is dropped)


def rotate_if_big(log: Path, max_bytes: int = MAX_BYTES) -> bool:
    """Rotate `log` when this process writes it (stdout/stderr are it) and it is over `max_bytes`.

    Renames it to `<log>.1` and points fds 1 and 2 at a fresh file, so nothing is lost and
    nothing else needs to know. Returns True when it rotated.
    """
    try:
        st = os.stat(log)
        ours = os.fstat(2)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) != (ours.st_dev, ours.st_ino) or st.st_size <= max_bytes:
        return False
    os.replace(log, log.with_name(log.name + ".1"))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return True


def tail(log: Path, lines: int = 50) -> str:
    """The last `lines` lines of the log (and of `<log>.1` when the current file is shorter)."""
    return tail_and_position(log, lines)[0]


def tail_and_position(log: Path, lines: int = 50) -> tuple[str, tuple[int | None, int]]:
    """`tail`, and where in the current log it stopped reading ((inode, offset)): `follow(since=...)` goes on
    from there, so a line written between the two is printed once, never lost."""
    text = ""
    where: tuple[int | None, int] = (None, 0)
    for path in (log.with_name(log.name + ".1"), log):
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * 1024))
                text += fh.read().decode("utf-8", "replace")
                if path == log:
                    where = (os.fstat(fh.fileno()).st_ino, fh.tell())
        except OSError:
            continue
    return "\n".join(text.splitlines()[-lines:]), where


def follow(log: Path, poll: float = 0.5, stop: Callable[[], bool] | None = None,
           since: tuple[int | None, int] | None = None) -> Iterator[str]:
    """New lines as they are written (across a rotation), until the caller stops iterating or `stop()` is true
    (checked at every poll: `mempalace-broker --logs --follow` over SSH ends when its session is gone).
    `since`: where a `tail_and_position` stopped (else: the end of the log now)."""
    if since is not None:
        ino, pos = since
    else:
        ino, pos = (log.stat().st_ino, log.stat().st_size) if log.exists() else (None, 0)
    while not (stop is not None and stop()):
        try:
            st = log.stat()
        except OSError:
            time.sleep(poll)
            continue
        if st.st_ino != ino or st.st_size < pos:  # rotated or truncated: start the new file
            ino, pos = st.st_ino, 0
        if st.st_size > pos:
            with open(log, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            pos += len(chunk)
            yield from chunk.decode("utf-8", "replace").splitlines()
        else:
            time.sleep(poll)
