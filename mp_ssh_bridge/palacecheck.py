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
from typing import Any

SCAR_MARKERS = (".corrupt-", ".drift-", ".broken-")
QUICK_CHECK_SECONDS = 10.0
NOT_CHECKED = "not checked: "  # could not look (busy, too slow, unreadable): no verdict on the file


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
    from urllib.parse import quote

    try:  # quoted: a path with ?, # or % is still this file
        conn = sqlite3.connect(f"file:{quote(db)}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        return f"{NOT_CHECKED}cannot open it ({exc})"
    try:
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        if time.monotonic() > deadline:
            return f"{NOT_CHECKED}it did not finish within {seconds:g}s"
        if any(word in str(exc).lower() for word in ("locked", "busy")):
            return f"{NOT_CHECKED}{exc} (a writer holds it; try again)"
        return f"error: {exc}"  # "file is not a database", "malformed": damage
    finally:
        conn.close()
    result = "; ".join(str(r[0]) for r in rows)
    return result or "no answer"


def report(palace: str, kg: str, state_dir: str | None = None) -> dict[str, object]:
    """Everything above for one memory, as JSON-ready data; with `state_dir`, also who else holds the
    palace's files (stray writers: not the broker named by broker.json, not its engine) and broker.lock."""
    out: dict[str, object] = {
        "scars": scars(palace),
        "chroma.sqlite3": quick_check(os.path.join(palace, "chroma.sqlite3")),
        "knowledge_graph.sqlite3": quick_check(kg),
    }
    if state_dir is not None:
        out.update(_holders(palace, kg, state_dir))
    return out


def _live_hub(palace: str) -> dict[str, object] | None:
    """Upstream's hub serving `palace` on this machine (mp_ssh_bridge/hub.py), as JSON-ready data."""
    from mp_ssh_bridge import hub

    found = hub.live(palace)
    return None if found is None else found.as_dict()


def _holders(palace: str, kg: str, state_dir: str) -> dict[str, object]:
    from mp_ssh_bridge import holders, state

    paths = state.StatePaths(Path(state_dir))
    ours = {os.getpid()}
    for record in (state.read_broker_json(paths.json), state.read_broker_json(paths.degraded)):
        pid = _recorded_pid(record)
        if pid is not None:
            ours.add(pid)  # the broker (or a degraded session): it and its descendants (the engine) are no strays
    # the owner's engine, a grant's command (mp-bridge run); records of this machine, judged by pid
    ours |= holders.owner_writers(state_dir, stale_after=30.0)
    live_hub = _live_hub(palace)
    if live_hub is not None:  # a writer, but no stray: doctor's hub check says how it stands to the broker
        ours.add(int(str(live_hub["pid"])))
    found, note = holders.holders(palace, kg)
    held, lockers = holders.lock_holders(str(paths.lock))
    return {
        "writers": None if found is None else [vars(h) for h in holders.strays(found, ours)],
        "writers_note": note,
        "lock": {"held": held, "by": [{"pid": h.pid, "command": h.command} for h in lockers]},
        "hub": live_hub,
    }


def _recorded_pid(record: dict[str, Any] | None) -> int | None:
    """The pid a broker.json / degraded.json record names, when it names a process here: the record was
    written on this machine (a pid from another machine or boot names some unrelated process here) and,
    when it records `proc_start`, the process with that pid started then (not a reused pid)."""
    from mp_ssh_bridge import liveness

    if record is None or not liveness.same_machine(record) or liveness.pid_gone(record) is not None:
        return None
    return int(record["pid"])
