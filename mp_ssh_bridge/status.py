"""Gather what `mp-bridge status` and `doctor` show: broker.json plus a live round trip.

Pure data (no rendering), so the CLI and tests share it.
"""

from __future__ import annotations

import time
from typing import Any

from mp_ssh_bridge import liveness, state
from mp_ssh_bridge.settings import Settings

SECRETS = ("tcp_token",)


def public(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """broker.json without its secrets (what `status` may print, --json included)."""
    if record is None:
        return None
    return {k: ("<hidden>" if k in SECRETS else v) for k, v in record.items()}


def snapshot(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """broker.json (secrets hidden), its liveness and the broker's own `broker/status`, whichever exist."""
    return snapshot_of(settings.paths, settings.heartbeat_stale_after, timeout)


def snapshot_of(paths: state.StatePaths, stale_after: float, timeout: float = 2.0) -> dict[str, Any]:
    from mp_ssh_bridge.election import probe

    record = state.read_broker_json(paths.json)
    out: dict[str, Any] = {"state_dir": str(paths.root), "record": public(record), "status": None}
    if record is None:
        return out
    age = state.heartbeat_age(record)
    out["heartbeat_age_s"] = None if age is None else round(age, 1)
    _, verdict = liveness.record_alive(paths, stale_after)  # heartbeat age is for people; this is the rule
    out["may_be_alive"] = verdict is None or verdict.alive
    endpoint = record.get("endpoint")
    if isinstance(endpoint, str):
        started = time.perf_counter()
        out["status"] = probe(endpoint, timeout)
        out["round_trip_ms"] = round((time.perf_counter() - started) * 1000, 2) if out["status"] else None
    return out


def state_dirs(settings: Settings) -> list[state.StatePaths]:
    """Every state directory of this user that may hold a broker: this settings' own, ~/.mempalace,
    and each memory's under ~/.mempalace/brokers/ (`mp-bridge status --all`)."""
    import os
    from pathlib import Path

    root = Path(os.path.expanduser("~")) / ".mempalace"
    found = [settings.paths.root, root, *sorted(p.parent for p in root.glob("brokers/*/broker.json"))]
    out: list[state.StatePaths] = []
    for d in found:
        if state.StatePaths(d) not in out and (d / "broker.json").exists():
            out.append(state.StatePaths(d))
    return out
