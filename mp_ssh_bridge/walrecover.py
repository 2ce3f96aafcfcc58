"""Recover a dead engine's SQLite write-ahead logs before the next engine opens the palace.

An engine killed mid-write (kill -9, an OOM kill, a stall kill) leaves `chroma.sqlite3-wal` (and the
knowledge graph's) unrecovered. mempalace 3.11's start-up health check opens the palace read-only
(`PRAGMA quick_check` on a `mode=ro` connection), and a read-only connection cannot rebuild the WAL
index: it fails with "attempt to write a readonly database", the engine reports "Palace SQLite
integrity check failed" and refuses every tool call with -32002 until it is restarted — measured in
2 of 16 `kill -9`s mid-write (tests/test_reliability_faults.py). The files are fine (`PRAGMA
integrity_check` says ok); only the recovery is missing.

So before each engine start, with the old engine proven gone (broker/enginerecord.py), the broker
opens each database that has a non-empty `-wal` read-write once: SQLite recovers the log on open and
checkpoints it when the last connection closes. A few milliseconds, and only when a log is there. A
session that runs the engine itself (degraded mode, mp_ssh_bridge/discovery.py) does the same. Stdlib
only (sqlite3 is imported only when a log is pending).
"""

from __future__ import annotations

import os

BUSY_TIMEOUT_S = 2.0  # another writer (a `mempalace mine`) holding the database: wait this long, then leave it


def pending_logs(palace: str, kg: str) -> list[str]:
    """The databases of this palace whose write-ahead log is not empty."""
    found = []
    for db in (os.path.join(palace, "chroma.sqlite3"), kg):
        try:
            if os.path.getsize(db + "-wal") > 0 and os.path.isfile(db):
                found.append(db)
        except OSError:
            continue
    return found


def recover(db: str) -> str | None:
    """Open `db` read-write once so SQLite recovers and checkpoints its log; None, or what went wrong."""
    import sqlite3

    try:
        conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def recover_all(palace: str, kg: str) -> list[str]:
    """Recover every pending log of the palace; one line per database touched, for the broker's log."""
    said = []
    for db in pending_logs(palace, kg):
        problem = recover(db)
        said.append(f"{db}: {'recovered its write-ahead log' if problem is None else 'could not recover: ' + problem}")
    return said
