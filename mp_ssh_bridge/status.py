"""Gather what `mp-bridge status` and `doctor` show: broker.json plus a live round trip, and who owns the
palace now (owner.json and the waiting requests, mp_ssh_bridge/owner.py).

Pure data (no rendering), so the CLI and tests share it.
"""

from __future__ import annotations

import time
from typing import Any

from mp_ssh_bridge import liveness, owner, state
from mp_ssh_bridge.settings import Settings

SECRETS = ("tcp_token",)
OWNER_FIELDS = ("kind", "pid", "host", "since", "heartbeat", "what", "expires", "engine_pid", "guardian_pid")


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
    out: dict[str, Any] = {"state_dir": str(paths.root), "record": public(record), "status": None,
                           **ownership(paths, stale_after)}
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


def _owner_view(record: dict[str, Any], now: float) -> dict[str, Any]:
    """An owner record (or request) for people and scripts: its fields without the token, with ages."""
    out = {k: record[k] for k in OWNER_FIELDS if k in record}
    since, beat, until = record.get("since"), record.get("heartbeat"), record.get("expires")
    if isinstance(since, (int, float)):
        out["held_s"] = round(max(0.0, now - since), 1)
    if isinstance(beat, (int, float)):
        out["heartbeat_age_s"] = round(now - beat, 1)
    if isinstance(until, (int, float)):
        out["expires_in_s"] = round(until - now, 1)
    out["same_machine"] = liveness.same_machine(record)
    out["description"] = owner.describe(record)
    return out


def ownership(paths: state.StatePaths, stale_after: float) -> dict[str, Any]:
    """{"owner": who holds the palace now (owner.json, judged by liveness' rule) or None, "requests": the live
    requests, oldest first}. Read from the state directory: both sides of a bind mount see the same files."""
    now = time.time()
    found = owner.holder(paths, stale_after)
    view: dict[str, Any] | None = None
    if found is not None:
        record, verdict = found
        view = {"kind": "unknown", "unreadable": True} if record.get("unreadable") else _owner_view(record, now)
        view.update(alive=verdict.alive, why=verdict.why)
    requests = [_owner_view(r, now) for r in owner.live_requests(paths, stale_after)]
    return {"owner": view, "requests": requests}


def describe_ownership(snap: dict[str, Any]) -> list[str]:
    """`status`'s lines on ownership: the owner (or none) and each request."""
    held = snap.get("owner")
    lines = []
    if held is None:
        lines.append("owner: none (the palace is free: the next writer claims it)")
    elif held.get("unreadable"):
        lines.append(f"owner: owner.json holds no complete record ({held.get('why')})")
    else:
        state_word = "" if held.get("alive") else f" — gone ({held.get('why')}): the next claim replaces it"
        extra = f"; engine pid {held['engine_pid']}" if held.get("engine_pid") else ""
        lines.append(f"owner: {held['kind']}, {held.get('description')}{extra}{state_word}")
    for r in snap.get("requests") or []:
        waited = f" for {r['held_s']:.0f} s" if isinstance(r.get("held_s"), (int, float)) else ""
        what = f" `{r['what']}`" if r.get("what") else ""
        lines.append(f"waiting: {r['kind']}{what} (pid {r.get('pid')} on {r.get('host')}){waited}")
    return lines


def daemon_view(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """This container's daemon (mp_ssh_bridge.daemon), from its own record in the container's daemon directory:
    whether it runs, its mode (relay over SSH, or the palace's local owner), its SSH connection and its sessions;
    in local-owner mode also its `broker/status` (it is the container's broker)."""
    from mp_ssh_bridge.election import probe

    paths = settings.paths.daemon_paths()
    record = state.read_broker_json(paths.json)
    view: dict[str, Any] = {"dir": str(paths.own), "log": str(paths.log), "running": False, "record": public(record)}
    if record is None:
        view["why"] = "no daemon record (the first container session starts the daemon)"
        return view
    gone = liveness.pid_gone(record) if liveness.same_machine(record) else "it was recorded on another machine"
    view.update(running=gone is None, why=gone, pid=record.get("pid"), mode=record.get("mode"),
                ssh=record.get("ssh"), sessions=record.get("sessions"), endpoint=record.get("endpoint"))
    age = state.heartbeat_age(record)
    view["heartbeat_age_s"] = None if age is None else round(age, 1)
    endpoint = record.get("endpoint")
    if gone is None and record.get("mode") != "relay" and isinstance(endpoint, str):
        started = time.perf_counter()
        view["status"] = probe(endpoint, timeout)
        view["round_trip_ms"] = round((time.perf_counter() - started) * 1000, 2) if view["status"] else None
    return view


def describe_daemon(view: dict[str, Any] | None) -> list[str]:
    """`status`'s lines on the container daemon."""
    if not view:
        return []
    if not view.get("running"):
        return [f"container daemon: not running ({view.get('why')}); its log {view.get('log')}"]
    mode = view.get("mode") or "?"
    line = f"container daemon: pid {view.get('pid')}, {mode} mode"
    ssh = view.get("ssh") if isinstance(view.get("ssh"), dict) else None
    if mode == "relay" and ssh:
        line += f"; SSH {ssh.get('host')!r}: {ssh.get('state')}"
        if ssh.get("transport_detail"):
            line += f" ({ssh['transport_detail']})"
        if ssh.get("reconnects"):
            line += f", {ssh['reconnects']} reconnects"
        if ssh.get("last_error"):
            line += f"; last error: {ssh['last_error']}"
    sessions = view.get("sessions")
    if isinstance(sessions, list):
        line += f"; {len(sessions)} session" + ("" if len(sessions) == 1 else "s")
    elif isinstance(view.get("status"), dict):
        line += f"; {len(view['status'].get('clients') or [])} sessions"
    return [line]


def describe_engine(e: dict[str, Any]) -> str:
    """The engine line of `mp-bridge status` (rich markup): its pid, or "via hub (pid, url)" in hub mode."""
    via = e.get("hub")
    if isinstance(via, dict):
        return (f"[bold]engine[/] via hub (pid {via.get('pid')}, {via.get('url')}) mempalace {e.get('version')}  "
                f"{e.get('state')}  {via.get('calls', 0)} calls, {via.get('failures', 0)} failed; the broker runs no "
                "engine of its own")
    return (f"[bold]engine[/] pid {e.get('pid')} mempalace {e.get('version')}  {e.get('state')}  "
            f"up {e.get('uptime_s')} s  restarts {e.get('restarts')}")
