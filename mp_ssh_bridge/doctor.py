"""`mp-bridge doctor`: check each thing the shim depends on and say plainly what is wrong.

Each check is a `Check` (level ok / warn / fail, title, detail, fix). The order follows the shim's own
path — settings, state directory, broker, engine, SSH — so the first failure
is usually the cause of the rest.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

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
    checks: list[Check] = []
    paths = settings.paths
    role = settings.resolved_role()
    checks.append(Check("ok", "role", f"{role} (MP_BRIDGE_ROLE={settings.role})"))

    # State directory.
    root = paths.root
    if not root.exists():
        checks.append(Check("warn", "state directory", f"{root} does not exist yet", "it is created on first use"))
    else:
        st = root.stat()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            checks.append(Check("fail", "state directory", f"{root} is writable by group/others", f"chmod go-w {root}"))
        elif st.st_uid != os.getuid():
            checks.append(Check("fail", "state directory", f"{root} belongs to uid {st.st_uid}", "use your own MEMPALACE_PATH"))
        else:
            checks.append(Check("ok", "state directory", str(root)))
    sock = paths.socket()
    note = "" if sock == paths.preferred_socket else f" (stand-in: {paths.preferred_socket} is too long for this OS)"
    checks.append(Check("ok", "socket path", f"{sock}{note}"))

    # Broker.
    snap = snapshot(settings)
    record = snap["record"]
    if record is None:
        checks.append(Check("warn", "broker", "no broker.json: no broker is running", "the next mp-shim starts one (or: mempalace-broker --ensure)"))
    elif snap["status"] is None:
        if snap.get("may_be_alive"):
            checks.append(Check(
                "fail", "broker",
                f"broker.json names pid {record.get('pid')} at {record.get('endpoint')}, which is alive but does not answer",
                f"inspect {paths.log}; stop it with: kill {record.get('pid')}",
            ))
        else:
            checks.append(Check("warn", "broker", f"stale broker.json (pid {record.get('pid')} is gone)", "the next mp-shim reclaims it"))
    else:
        b, e = snap["status"]["broker"], snap["status"]["engine"]
        checks.append(Check("ok", "broker", f"pid {b.get('pid')}, {len(snap['status']['clients'])} clients, round trip {snap['round_trip_ms']} ms"))
        level = "ok" if e.get("state") == "ready" else "warn"
        checks.append(Check(level, "engine", f"pid {e.get('pid')}, mempalace {e.get('version')}, state {e.get('state')}, restarts {e.get('restarts')}"))
        why = palace.mismatch(settings.memory, record)
        if why:
            checks.append(Check("fail", "palace", f"the broker does not serve this memory: {why}",
                                "leave MEMPALACE_PATH unset (one state directory per set of files) or fix --palace"))
        local_id = state.read_palace_id(paths)
        if local_id and record.get("palace_id") not in (None, local_id):
            checks.append(Check("fail", "palace id", f"palace.id {local_id} != broker's {record.get('palace_id')}"))

    other = state.live_degraded_writer(paths, settings.heartbeat_stale_after)
    if other is not None:
        checks.append(Check("warn", "degraded mode", state.describe_degraded(other, paths)))

    # Engine command (the broker resolves it the same way).
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    try:
        checks.append(Check("ok", "engine command", " ".join(resolve(settings.engine_argv))))
    except EngineNotFound as exc:
        checks.append(Check("fail", "engine command", str(exc), "pip install mempalace, or set MP_BRIDGE_ENGINE"))

    # Container role: SSH.
    if role == "container":
        cfg = settings.ssh_config_path
        if not Path(cfg).exists():
            checks.append(Check("fail", "ssh config", f"{cfg} does not exist", "create it with a `Host host` entry (see configs/ssh_config)"))
        else:
            checks.append(Check("ok", "ssh config", f"{cfg}, host alias {settings.ssh_host!r}"))
    if hostinfo.in_container() and role == "host":
        checks.append(Check("warn", "role", "running in a container but MP_BRIDGE_ROLE=host", "unset MP_BRIDGE_ROLE unless the socket is reachable"))
    return checks
