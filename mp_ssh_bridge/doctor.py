"""`mp-bridge doctor`: check each thing the shim depends on and say plainly what is wrong.

Each check is a `Check` (level ok / warn / fail, title, detail, fix). The order follows the shim's own
path — settings, state directory, broker, engine, SSH — so the first failure
is usually the cause of the rest.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_ssh_bridge import hostinfo, palace, state
from mp_ssh_bridge.settings import Settings
from mp_ssh_bridge.status import snapshot


@dataclass
class Check:
    level: str  # "ok" | "warn" | "fail"
    title: str
    detail: str = ""
    fix: str = ""


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order the shim itself goes: the container role goes over SSH, as its sessions do."""
    checks: list[Check] = []
    role = settings.resolved_role()
    why_role = "MP_BRIDGE_ROLE" if settings.role != "auto" else (
        "/.dockerenv or /run/.containerenv exists" if hostinfo.in_container() else "no container marker")
    checks.append(Check("ok", "role", f"{role} ({why_role})"))
    memory = settings.memory
    checks.append(Check("ok", "memory", f"palace {memory.palace}, knowledge graph {memory.kg}, config {memory.config_dir} "
                                         "(as a plain mempalace-mcp with these arguments and environment)"))
    _state_dir_checks(settings, checks)
    if role == "container":
        _container_checks(settings, checks)
    else:
        _host_checks(settings, checks)
        if hostinfo.in_container():
            checks.append(Check("warn", "role", "running in a container but MP_BRIDGE_ROLE=host",
                                "unset MP_BRIDGE_ROLE unless the host's socket is reachable from here"))
    return checks


def _state_dir_checks(settings: Settings, checks: list[Check]) -> None:
    paths = settings.paths
    root = paths.root
    if not root.exists():
        checks.append(Check("warn", "state directory", f"{root} does not exist yet", "it is created on first use"))
        return
    st = root.stat()
    if st.st_uid != os.getuid():
        checks.append(Check("fail", "state directory", f"{root} belongs to uid {st.st_uid}, not to you",
                            "use a state directory of your own (MEMPALACE_PATH)"))
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        checks.append(Check("fail", "state directory", f"{root} is writable by group/others (mode "
                            f"{stat.S_IMODE(st.st_mode):o})", f"chmod 700 {root}"))
    elif st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        checks.append(Check("fail", "state directory", f"{root} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                            "broker.json holds the TCP token", f"chmod 700 {root}"))
    else:
        checks.append(Check("ok", "state directory", f"{root} (mode {stat.S_IMODE(st.st_mode):o})"))
    sock = paths.socket()
    note = "" if sock == paths.preferred_socket else f" (stand-in: {paths.preferred_socket} is too long for this OS)"
    checks.append(Check("ok", "socket path", f"{sock}{note}"))


def _host_checks(settings: Settings, checks: list[Check]) -> None:
    paths = settings.paths
    snap = snapshot(settings)
    record = snap["record"]
    if record is None:
        checks.append(Check("warn", "broker", "no broker.json: no broker is running",
                            "the next mp-shim starts one (or: mempalace-broker --ensure)"))
    elif snap["status"] is None:
        if snap.get("may_be_alive"):
            checks.append(Check(
                "fail", "broker",
                f"broker.json names pid {record.get('pid')} at {record.get('endpoint')}, which is alive but does not answer",
                f"inspect {paths.log}; stop it with: mp-bridge stop --force",
            ))
        else:
            checks.append(Check("warn", "broker", f"stale broker.json (pid {record.get('pid')} is gone)",
                                "the next mp-shim reclaims it"))
    else:
        _broker_status_checks(settings, snap["status"], record, f"round trip {snap['round_trip_ms']} ms", checks)
    other = state.live_degraded_writer(paths, settings.heartbeat_stale_after)
    if other is not None:
        checks.append(Check("warn", "degraded mode", state.describe_degraded(other, paths)))
    from mp_ssh_bridge import palacecheck

    _palace_health_checks(palacecheck.report(settings.memory.palace, settings.memory.kg), "", checks)
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    try:
        checks.append(Check("ok", "engine command", " ".join(resolve(settings.engine_argv))))
    except (EngineNotFound, ValueError) as exc:  # ValueError: an empty MP_BRIDGE_ENGINE
        checks.append(Check("fail", "engine command", str(exc), "pip install mempalace, or set MP_BRIDGE_ENGINE"))


def _palace_health_checks(report: dict[str, Any], where: str, checks: list[Check]) -> None:
    """Scar files and sqlite quick_check results (palacecheck.report), from this host or the broker's."""
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
        else:
            checks.append(Check("fail", f"{name} quick_check", f"{result[:300]}{where}",
                                "stop the broker (mp-bridge stop), back the file up, then repair it with mempalace"))


def _broker_status_checks(settings: Settings, st: dict[str, Any], record: dict[str, Any] | None, how: str,
                          checks: list[Check]) -> None:
    """What a live broker says of itself: version, engine, memory, palace id."""
    from mp_ssh_bridge import __version__

    b, e = st.get("broker") or {}, st.get("engine") or {}
    checks.append(Check("ok", "broker", f"pid {b.get('pid')} on {b.get('host')}, {len(st.get('clients') or [])} "
                                        f"clients, {how}"))
    if b.get("version") != __version__:
        checks.append(Check("warn", "versions", f"the broker is mp-ssh-bridge {b.get('version')}, this side "
                            f"{__version__}", "upgrade both sides to one version, then `mp-bridge stop` the broker"))
    if e.get("state") == "failed":
        last = e.get("last_exit") or "no detail"
        checks.append(Check("fail", "engine", f"the memory engine failed: {last}",
                            f"see {settings.paths.log}; check MP_BRIDGE_ENGINE"))
    else:
        level = "ok" if e.get("state") == "ready" else "warn"
        checks.append(Check(level, "engine", f"pid {e.get('pid')}, mempalace {e.get('version')}, state "
                                             f"{e.get('state')}, restarts {e.get('restarts')}"))
    if settings.resolved_role() == "host":
        why = palace.mismatch(settings.memory, b)
        if why:
            checks.append(Check("fail", "palace", f"the broker does not serve this memory: {why}",
                                "leave MEMPALACE_PATH unset (one state directory per set of files) or fix --palace"))
    local_id = state.read_palace_id(settings.paths)
    if local_id and b.get("palace_id") not in (None, local_id):
        checks.append(Check("fail", "palace id", f"this side's palace.id {local_id} differs from the broker's "
                            f"{b.get('palace_id')}: another palace", "point MEMPALACE_PATH at the mount of the "
                            "host's state directory, or MP_BRIDGE_REMOTE_PALACE at the right palace"))


def _container_checks(settings: Settings, checks: list[Check]) -> None:
    """The way a container session goes: SSH config, connect (host key, login), the host's broker over SSH."""
    import time

    from mp_ssh_bridge import handshake, ssh
    from mp_ssh_bridge.errors import ShimError
    from mp_ssh_bridge.links import AsyncLink, run_async

    cfg = settings.ssh_config_path
    if not Path(cfg).exists():
        checks.append(Check("fail", "ssh config", f"{cfg} does not exist",
                            "create it with a `Host host` entry (see configs/ssh_config) or set MP_BRIDGE_SSH_CONFIG"))
        return
    checks.append(Check("ok", "ssh config", f"{cfg}, host alias {settings.ssh_host!r}"))
    bound = settings.connect_timeout + settings.ensure_timeout + 30
    try:
        status, out, err = run_async(ssh.run_on_host(settings, "--version", bound=settings.connect_timeout + 10), bound)
    except (ShimError, TimeoutError) as exc:
        checks.append(Check("fail", "ssh", str(exc), "see the message: host key, login, reachability"))
        return
    if status != 0:
        checks.append(Check("fail", "remote broker command", f"`{settings.remote_broker} --version` on the host "
                            f"exited {status}: {err.strip()[-200:]}", "set MP_BRIDGE_REMOTE_BROKER"))
        return
    checks.append(Check("ok", "ssh", f"connected to {settings.ssh_host}; remote {settings.remote_broker} is "
                                     f"version {out.strip()}"))
    record = state.read_broker_json(settings.paths.json)
    endpoint = record.get("endpoint") if record else None
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        checks.append(Check("warn", "broker", f"no broker.json visible in {settings.paths.root}: no broker is "
                            "running on the host, or this is not a mount of the host's state directory",
                            "the next mp-shim starts one over SSH (mempalace-broker --ensure on the host)"))
        return
    url = f"ssh://{settings.ssh_host}{endpoint[len('unix://'):]}"
    started = time.perf_counter()
    try:
        link = AsyncLink(run_async(ssh.open_ssh_url(settings, url), bound))
    except (ShimError, TimeoutError) as exc:
        checks.append(Check("fail", "broker over SSH", f"{url}: {exc}", "see the message"))
        return
    try:
        st = handshake.broker_status(link, settings.connect_timeout, {"probe": True})
    except (OSError, ShimError) as exc:
        checks.append(Check("fail", "broker over SSH", f"{url} does not answer: {exc}", "on the host: mp-bridge doctor"))
        return
    finally:
        link.close()
    rt = round((time.perf_counter() - started) * 1000, 1)
    _broker_status_checks(settings, st, record, f"reached over SSH ({link.conn.info.get('transport_detail')}) "
                          f"in {rt} ms", checks)
    try:  # on the host, where the files live: SQLite's WAL shared memory does not cross the VM boundary
        status, out, err = run_async(ssh.run_on_host(settings, "--check", bound=settings.connect_timeout + 60), bound)
        report = json.loads(out.strip().splitlines()[-1]) if status == 0 else None
    except (ShimError, TimeoutError, ValueError, IndexError):
        report = None
    if isinstance(report, dict):
        _palace_health_checks(report, " (checked on the host)", checks)
    else:
        checks.append(Check("warn", "palace files", "the host did not report on its palace files",
                            f"on the host: mp-bridge doctor (or {settings.remote_broker} --check)"))
