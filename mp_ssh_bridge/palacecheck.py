"""Health of a palace's files, checked where the files live (the host), never through a bind mount.

Two things a person wants to know when memory "doesn't work": whether mempalace's own
defences fired (scar files it leaves beside damaged databases: `*.corrupt-*`, `*.drift-*`,
`*.broken-*`), and whether the sqlite files are sound (`PRAGMA quick_check`, read-only,
bounded in time). SQLite's WAL shared memory does not cross a VM boundary, so a container
asks the host to run this (`mempalace-broker --check`) instead of opening the files itself.
Stdlib only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

SCAR_MARKERS = (".corrupt-", ".drift-", ".broken-")
QUICK_CHECK_SECONDS = 10.0


def scars(palace: str) -> list[str]:
    """Scar files mempalace left in the palace and its parent (where the KG and backups live)."""
    found: list[str] = []
    for folder in {Path(palace), Path(palace).parent}:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [str(folder / n) for n in names if any(m in n for m in SCAR_MARKERS)]
    return sorted(found)


def quick_check(db: str, seconds: float = QUICK_CHECK_SECONDS) -> str:
    """`ok`, or what `PRAGMA quick_check` found, or why it could not run (missing, locked, too slow)."""
    if not os.path.exists(db):
        return "absent"
    deadline = time.monotonic() + seconds
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        return f"cannot open: {exc}"
    try:
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return f"did not finish within {seconds:g}s" if time.monotonic() > deadline else f"error: {exc}"
    finally:
        conn.close()
    result = "; ".join(str(r[0]) for r in rows)
    return result or "no answer"


def report(palace: str, kg: str) -> dict[str, object]:
    """Everything above for one memory, as JSON-ready data."""
    return {
        "scars": scars(palace),
        "chroma.sqlite3": quick_check(os.path.join(palace, "chroma.sqlite3")),
        "knowledge_graph.sqlite3": quick_check(kg),
    }
