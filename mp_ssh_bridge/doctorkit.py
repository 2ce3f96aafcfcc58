"""What `mp-bridge doctor` checks on either side: the Check record and the checks that read a broker's answers.

Shared by the host's checks (doctor.py) and the container's (doctor_container.py), so a broker's status,
versions, lock and palace files are judged by one rule wherever they were read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mp_ssh_bridge import owner, palace, state
from mp_ssh_bridge.palacecheck import NOT_CHECKED
from mp_ssh_bridge.settings import Settings

MCP_PROBE_SECONDS = 10.0


@dataclass
class Check:
    level: str  # "ok" | "warn" | "fail"
    title: str
    detail: str = ""
    fix: str = ""


def mcp_round_trip(link: Any, timeout: float) -> str:
    """initialize + notifications/initialized + tools/list, as an agent does; "N tools". Raises OSError."""
    from mp_ssh_bridge import __version__, handshake
    from mp_ssh_bridge.protocol import JSONRPC, encode

    init = {"jsonrpc": JSONRPC, "id": "doctor/initialize", "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "mp-bridge doctor", "version": __version__}}}
    reply = handshake.round_trip(link, init, timeout, "initialize")
    if "result" not in reply:
        raise ConnectionError(f"initialize failed: {reply.get('error')}")
    link.send(encode({"jsonrpc": JSONRPC, "method": "notifications/initialized"}))
    reply = handshake.round_trip(link, {"jsonrpc": JSONRPC, "id": "doctor/tools", "method": "tools/list"}, timeout,
                                  "tools/list")
    tools = (reply.get("result") or {}).get("tools")
    if not isinstance(tools, list):
        raise ConnectionError(f"tools/list failed: {reply.get('error')}")
    return f"{len(tools)} tools"



def probe_checks(settings: Settings, link: Any, started: float, how: str, checks: list[Check], what: str,
                 remote_version: str | None = None) -> int | None:
    """A broker reached on `link` (host socket or SSH): `broker/status`, then a real MCP round trip, then the
    status again (fresh after the round trip). A broker that answers its status but not the round trip (an
    engine still loading or stuck) is told apart from one that does not answer at all. The broker's pid, or None."""
    import time

    from mp_ssh_bridge import handshake
    from mp_ssh_bridge.errors import ShimError

    try:
        status = handshake.broker_status(link, settings.connect_timeout, {"probe": True})
    except (OSError, ShimError, ValueError) as exc:  # TimeoutError and ConnectionError are OSErrors
        checks.append(Check("fail", "broker", f"{what} does not answer: {exc or type(exc).__name__}",
                            "see `mp-bridge logs`; if it stays: mp-bridge stop --force"))
        return None
    try:
        tools = mcp_round_trip(link, MCP_PROBE_SECONDS)
        trip = f"MCP round trip (initialize + tools/list, {tools}) {(time.perf_counter() - started) * 1000:.0f} ms"
        status = handshake.broker_status(link, settings.connect_timeout, {"probe": True})
        failed = ""
    except (OSError, ShimError, ValueError) as exc:
        trip, failed = "MCP round trip failed", str(exc) or type(exc).__name__
    broker_status_checks(settings, status, f"{how}; {trip}", checks, remote_version)
    if failed:
        checks.append(Check("warn", "MCP round trip", f"the broker answers, but initialize + tools/list did not "
                            f"complete within {MCP_PROBE_SECONDS:g} s: {failed}", "the engine may still be loading: "
                            "run doctor again; if it stays, see `mp-bridge logs`"))
    b = status.get("broker") or {}
    return b.get("pid") if isinstance(b.get("pid"), int) else None


def broker_status_checks(settings: Settings, st: dict[str, Any], how: str, checks: list[Check],
                         remote_version: str | None = None) -> None:
    """What a live broker says of itself: version, engine, memory, palace id."""

    b, e = st.get("broker") or {}, st.get("engine") or {}
    clients = [c for c in st.get("clients") or [] if not c.get("probe")]
    checks.append(Check("ok", "broker", f"pid {b.get('pid')} on {b.get('host')}, mp-ssh-bridge {b.get('version')}, "
                                        f"{len(clients)} clients; {how}"))
    checks.append(versions_check(b.get("version"), remote_version))
    if e.get("state") == "failed" or e.get("cooldown_s") or (e.get("last_error") and e.get("state") != "ready"):
        last = "; ".join(f"{k.replace('_', ' ')}: {e[k]}" for k in ("last_error", "last_exit") if e.get(k)) or "no detail"
        pause = f"; restarts paused for {e['cooldown_s']:.0f} s" if e.get("cooldown_s") else ""
        checks.append(Check("fail", "engine", f"the memory engine failed (state {e.get('state')}{pause}): {last}",
                            "see `mp-bridge logs`; check MP_BRIDGE_ENGINE, then `mp-bridge restart`"))
    elif isinstance(e.get("hub"), dict):
        via = e["hub"]
        checks.append(Check("ok", "engine", f"via hub (pid {via.get('pid')}, {via.get('url')}): upstream's "
                            f"`mempalace serve` owns the palace (mempalace {e.get('version')}); the broker routes "
                            "every session's calls to it and runs no engine beside it"))
    else:
        level = "ok" if e.get("state") == "ready" else "warn"
        checks.append(Check(level, "engine", f"pid {e.get('pid')}, mempalace {e.get('version')}, state "
                                             f"{e.get('state')}, restarts {e.get('restarts')}",
                            "" if level == "ok" else "wait for it to be ready; see `mp-bridge logs`"))
    lease_check(e, checks)
    if settings.resolved_role() == "host":
        why = palace.mismatch(settings.memory, b)
        if why:
            checks.append(Check("fail", "palace", f"the broker does not serve this memory: {why}",
                                "leave MEMPALACE_PATH unset (one state directory per palace) or fix --palace"))
    local_id = state.read_palace_id(settings.paths)
    theirs = b.get("palace_id")
    if local_id and theirs not in (None, local_id):
        checks.append(Check("fail", "palace id", f"this side's palace.id {local_id} differs from the broker's "
                            f"{theirs}: another palace", "point MEMPALACE_PATH at the mount of the host's state "
                            "directory, or MP_BRIDGE_REMOTE_PALACE at the right palace"))
    elif local_id:
        side = "both sides of the mount" if settings.resolved_role() == "container" else "broker and state directory"
        checks.append(Check("ok", "palace id", f"{local_id}, the same for {side}"))



SWITCH_TO_HUB = ("to make upstream's hub the palace's writer instead: `mp-bridge stop`, then start `mempalace serve` "
                 "before any session starts a broker again; the next session's broker finds the hub and routes "
                 "every session to it")


def lease_check(e: dict[str, Any], checks: list[Check]) -> None:
    """mempalace's own writer lease (its per-palace flock), as the broker holds it (broker/lease.py)."""
    held = e.get("lease")
    if not isinstance(held, dict):
        return
    where, holder, state_ = held.get("path"), held.get("holder") or "another process", held.get("state")
    if isinstance(e.get("hub"), dict):
        checks.append(Check("ok", "writer lease", f"held by upstream's hub; the broker takes it ({where}) the moment "
                            "the hub exits, before a plain mempalace-mcp could"))
    elif state_ == "other":
        checks.append(Check("warn", "writer lease", f"mempalace's writer lease ({where}) is held by {holder}, not by "
                            "the broker or its engine: writes through the bridge are refused (\"Peer MCP writer "
                            "active\") while it holds it. A plain mempalace-mcp that took it (say, after a hub died) "
                            "writes the palace beside the bridge", "end that process (its agent session, or kill "
                            "the pid named); the broker's engine takes the lease at its next write"))
    elif state_ in ("engine", "broker", "lent"):
        how = {"engine": "held by the broker's engine", "broker": "held by the broker (no engine of its runs now)",
               "lent": "held by the broker between writes and lent to its engine for each (mempalace 3.4.0 has no "
                       "lease of its own)"}[str(state_)]
        checks.append(Check("ok", "writer lease", f"{how} ({where}): another writer, `mempalace serve` included, "
                            f"cannot become a writer of this palace (it waits for the lease, then exits 2), nor can a direct "
                            f"`mempalace mine` (run it as `mp-bridge run -- mempalace mine …`); {SWITCH_TO_HUB}"))


def versions_check(broker_version: Any, remote_command_version: str | None = None) -> Check:
    """This side's version against the broker's (and the host's broker command's, in a container)."""
    from mp_ssh_bridge import __version__

    seen = {f"broker {broker_version}"} | ({f"host command {remote_command_version}"} if remote_command_version else set())
    if broker_version != __version__ or (remote_command_version and remote_command_version != __version__):
        return Check("warn", "versions", f"this side is mp-ssh-bridge {__version__}; {', '.join(sorted(seen))}: "
                     "they work together, but upgrade to one version", "upgrade mp-ssh-bridge on both sides, then "
                     "`mp-bridge restart` (a queued call is not lost)")
    return Check("ok", "versions", f"mp-ssh-bridge {__version__} on both sides")



def lock_check(report: dict[str, Any], broker_pid: int | None, checks: list[Check]) -> None:
    lock = report.get("lock")
    if not isinstance(lock, dict):
        return
    by = ", ".join(f"pid {h['pid']} ({h['command'][:60]})" for h in lock.get("by") or [])
    held = lock.get("held")
    if held is None:
        checks.append(Check("ok", "lock", "this host cannot tell who holds broker.lock" + (f"; open in {by}" if by else "")))
    elif not held:
        checks.append(Check("ok", "lock", "broker.lock is free: no broker, and no election under way"))
    elif broker_pid is not None and any(h["pid"] == broker_pid for h in lock.get("by") or []):
        checks.append(Check("ok", "lock", f"held by the broker (pid {broker_pid})"))
    else:
        checks.append(Check("warn", "lock", "broker.lock is held, but not by a broker that answers"
                            + (f"; open in {by}" if by else ""),
                            "an election may be under way (try again in a few seconds); if it stays, stop that "
                            "process"))



def hub_check(report: dict[str, Any], owner_record: dict[str, Any] | None, where: str, checks: list[Check]) -> None:
    """Upstream's hub (`mempalace serve`) on this palace, as the host's --check found it, against the owner record."""
    found = report.get("hub")
    if not isinstance(found, dict):
        return
    named = f"upstream's hub (pid {found.get('pid')}, {found.get('url')}){where}"
    if found.get("read_only"):
        checks.append(Check("ok", "hub", f"{named} is read-only: no writer; the broker serves the palace itself"))
        return
    record = owner_record or {}
    via = owner.hub_of(record)
    if via is not None and via.get("pid") == found.get("pid"):
        checks.append(Check("ok", "hub", f"{named} owns the palace; the broker routes every session to it"))
    elif record.get("kind") in owner.BROKER_KINDS:
        checks.append(Check("warn", "hub", f"{named} serves the palace, and the broker does not route to it yet: its "
                            "next engine start will (owner.json names the hub within a heartbeat once it does). If "
                            "the broker's own engine runs now, only mempalace's writer lease (broker/lease.py) "
                            "keeps the two apart", "to make the hub the palace's writer now: mp-bridge restart; to "
                            "keep the broker's engine: stop the hub"))
    else:
        checks.append(Check("warn", "hub", f"{named} serves the palace and no broker routes to it: a container "
                            "cannot see it across the VM boundary (its registry and pid are the host's), so a "
                            "container-side owner could write beside it", "start an agent session on the host first "
                            "(its broker routes to the hub and records it where the container sees it), or stop the "
                            "hub"))


def palace_health_checks(report: dict[str, Any], where: str, checks: list[Check]) -> None:
    """Stray writers, scar files and sqlite quick_check results (palacecheck.report), from this host or the broker's."""
    writers = report.get("writers", [])
    note = f" ({report['writers_note']})" if report.get("writers_note") else ""
    if writers is None:
        checks.append(Check("ok", "stray writers", f"this host cannot tell{note}{where}"))
    elif writers:
        shown = "; ".join(f"pid {w['pid']} (`{w['command'][:120]}`) has {w['path']} open for writing"
                          for w in writers[:5])
        checks.append(Check("fail", "stray writers", f"{len(writers)} process(es) write the palace past its owner "
                            f"(neither the owner's engine nor a command run by `mp-bridge run`){where}: {shown}",
                            "end them; run such a writer through `mp-bridge run -- <its command>` (see "
                            "docs/WRITERS.md: the `mempalace` CLI shim does it for mine and hooks), and point every "
                            "agent at mp-shim instead of mempalace-mcp (two writers lose vectors)"))
    elif "writers" in report:
        granted = report.get("granted_writers") or []
        besides = ("; besides the grant's " + ", ".join(f"pid {w['pid']} (`{w['command'][:80]}`)" for w in granted[:3])
                   if granted else "")
        checks.append(Check("ok", "stray writers", f"none{besides}{note}{where}"))
    scars = report.get("scars") or []
    if scars:
        shown = ", ".join(str(s) for s in scars[:5]) + (f" and {len(scars) - 5} more" if len(scars) > 5 else "")
        checks.append(Check("warn", "scar files", f"{len(scars)} left by mempalace's repair machinery{where}: {shown}",
                            "they mark past damage (often two writers at once); keep them until the memory is "
                            "checked, then move them away"))
    else:
        checks.append(Check("ok", "scar files", f"none{where}"))
    for name in ("chroma.sqlite3", "knowledge_graph.sqlite3"):
        result = str(report.get(name))
        if result in ("ok", "absent"):
            checks.append(Check("ok", f"{name} quick_check", f"{result}{where}"))
        elif result.startswith(NOT_CHECKED):
            checks.append(Check("warn", f"{name} quick_check", f"{result[:300]}{where}",
                                "run `mp-bridge doctor` again; if it stays, see `mp-bridge logs`"))
        else:
            checks.append(Check("fail", f"{name} quick_check", f"{result[:300]}{where}",
                                "stop the broker (mp-bridge stop), back the file up, then repair it with mempalace"))


def host_json(settings: Settings, *args: str, bound: float) -> tuple[dict[str, Any] | None, str]:
    """Container role: `<remote_broker> ARGS` on the host over SSH, its last stdout line as a JSON object; or
    (None, why not) — one rule for `--status`, `--check` and `--ensure` read from here."""
    import json

    from mp_ssh_bridge import ssh
    from mp_ssh_bridge.errors import ShimError
    from mp_ssh_bridge.links import run_async

    try:
        status, out, err = run_async(ssh.run_on_host(settings, *args, bound=bound),
                                     bound + settings.connect_timeout + 5)
    except (ShimError, TimeoutError) as exc:
        return None, str(exc) or type(exc).__name__
    if status != 0:
        return None, f"`{settings.remote_broker} {' '.join(args)}` on the host exited {status}: {err.strip()[-300:]}"
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, f"`{settings.remote_broker} {' '.join(args)}` on the host printed no JSON: {out.strip()[-200:]!r}"
    return (data, "") if isinstance(data, dict) else (None, "the host's answer is not a JSON object")


def admit_owner_writers(report: dict[str, Any], settings: Settings, here: bool = True) -> None:
    """Move the writers owner.json admits (a grant's CMD and its children, the owner's engine) out of
    `report["writers"]` into `report["granted_writers"]`: they write through the door, not past it."""
    from mp_ssh_bridge import holders

    writers = report.get("writers")
    if not writers:
        return
    pids = holders.owner_writers(str(settings.paths.root), settings.heartbeat_stale_after, here=here)
    report["granted_writers"], report["writers"] = holders.admitted(writers, pids, descendants=here)


def owner_check(settings: Settings) -> Check:
    """Who owns the palace now (owner.json), and who waits for it (owner.requests/)."""
    import time

    from mp_ssh_bridge import owner

    paths, stale = settings.paths, settings.heartbeat_stale_after
    found = owner.holder(paths, stale)
    waiting = owner.live_requests(paths, stale)
    queue = ("; waiting: " + ", ".join(owner.describe(r) for r in waiting)) if waiting else ""
    if found is None:
        return Check("ok", "owner", f"none: the palace is free, the next writer claims it{queue}")
    record, verdict = found
    if record.get("unreadable"):
        return Check("warn" if not verdict.alive else "ok", "owner", verdict.why + queue,
                     "" if verdict.alive else "the next claim moves it aside; nothing to do")
    who = owner.describe(record)
    if not verdict.alive:
        return Check("warn", "owner", f"stale owner.json: {who} is gone ({verdict.why}){queue}",
                     f"the next claim replaces it; if no writer runs, it is safe to rm {paths.owner}")
    engine = f", engine pid {record['engine_pid']}" if record.get("engine_pid") else ""
    until = record.get("expires")
    if record.get("kind") == "grant" and isinstance(until, (int, float)) and time.time() > until + 60:
        return Check("warn", "owner", f"{who} has outlived its grant_max_duration by {time.time() - until:.0f} s "
                     f"({verdict.why}){queue}", f"its `mp-bridge run` should have stopped it: look at pid "
                     f"{record.get('pid')} on {record.get('host')}")
    return Check("ok", "owner", f"{record.get('kind')}: {who}{engine} ({verdict.why}){queue}")
