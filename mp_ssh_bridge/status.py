"""Gather what `mp-bridge status` and `doctor` show: broker.json plus a live round trip.

Pure data (no rendering), so the CLI and tests share it.
"""

from __future__ import annotations

import time
from typing import Any

from mp_ssh_bridge import state
from mp_ssh_bridge.settings import Settings


def snapshot(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """broker.json, its liveness and the broker's own `broker/status`, whichever exist."""
    from mp_ssh_bridge.election import probe

    record = state.read_broker_json(settings.paths.json)
    out: dict[str, Any] = {"state_dir": str(settings.paths.root), "record": record, "status": None}
    if record is None:
        return out
    age = state.heartbeat_age(record)
    out["heartbeat_age_s"] = None if age is None else round(age, 1)
    out["may_be_alive"] = state.broker_may_be_alive(record, settings.heartbeat_stale_after)
    endpoint = record.get("endpoint")
    if isinstance(endpoint, str):
        started = time.perf_counter()
        out["status"] = probe(endpoint, timeout)
        out["round_trip_ms"] = round((time.perf_counter() - started) * 1000, 2) if out["status"] else None
    return out
