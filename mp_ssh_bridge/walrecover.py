"""Recover a dead engine's SQLite logs (a hot rollback journal or an unrecovered WAL) before the next
engine opens the palace.

An engine killed mid-write (kill -9, an OOM kill, a stall kill) leaves its transaction's log behind:
a hot `chroma.sqlite3-journal` (chromadb keeps the palace in rollback-journal mode: `journal_mode`
reads `delete` on a mempalace 3.11 palace), or an unrecovered `-wal` for a database in WAL mode. mempalace 3.11's start-up
health check opens the palace read-only (`PRAGMA quick_check` on a `mode=ro` connection), and a
read-only connection can neither roll back a hot journal nor rebuild a WAL index: it fails with
"attempt to write a readonly database", the engine reports "Palace SQLite integrity check failed" and
refuses every tool call with -32002 until it is restarted (tests/test_reliability_faults.py: a third
of the runs failed while only the WAL was recovered). The files are fine (`PRAGMA integrity_check` says ok); only the recovery is missing.

So before each engine start, with the old engine proven gone (broker/enginerecord.py), the broker
opens each database that has a non-empty `-journal` or `-wal` read-write once: SQLite rolls back a hot
journal, or recovers the WAL, on the first read, and checkpoints the WAL when the last connection
closes. A few milliseconds, and only when a log is there. Stdlib only (sqlite3 is imported only when
a log is pending).
"""

from __future__ import annotations

import os

BUSY_TIMEOUT_S = 2.0  # another writer (a `mempalace mine`) holding the database: wait this long, then leave it
LOG_SUFFIXES = ("-journal", "-wal")  # rollback journal (delete/truncate/persist modes), write-ahead log


def pending_logs(palace: str, kg: str) -> list[str]:
    """The databases of this palace with a non-empty rollback journal or write-ahead log."""
    found = []
    for db in (os.path.join(palace, "chroma.sqlite3"), kg):
        for suffix in LOG_SUFFIXES:
            try:
                if os.path.getsize(db + suffix) > 0 and os.path.isfile(db):
                    found.append(db)
                    break
            except OSError:
                continue
    return found


def recover(db: str) -> str | None:
    """Open `db` read-write once so SQLite rolls back a hot journal, or recovers and checkpoints its WAL
    (a no-op for a database not in WAL mode); None, or what went wrong."""
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
        said.append(f"{db}: {'recovered its log' if problem is None else 'could not recover: ' + problem}")
    return said
