"""`mp-bridge doctor`: check each thing the shim depends on and say plainly what is wrong.

Each check is a `Check` (level ok / warn / fail, title, detail, fix). The order follows the shim's own
path — settings, memory, state directory, engine, broker, palace files — so the first failure is
usually the cause of the rest. The container role goes the way its sessions go, over SSH
(doctor_container.py). Doctor only looks: it never starts a broker nor writes the palace
(`--fix`, in doctorfix.py, may).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

from mp_ssh_bridge import config, hostinfo, liveness, palace, state
from mp_ssh_bridge.doctorkit import (
    Check,
    admit_owner_writers,
    hub_check,
    lock_check,
    owner_check,
    palace_health_checks,
    probe_checks,
)
from mp_ssh_bridge.settings import Settings

ENGINE_RESOLVE_SECONDS = 30.0


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order the shim itself goes: the container role goes over SSH, as its sessions do.

    Never raises: a check that crashes (a file gone mid-look, a permission) is one failure that says so.
    """
    checks: list[Check] = []
    role = settings.resolved_role()
    why_role = "MP_BRIDGE_ROLE" if settings.role != "auto" else (
        "/.dockerenv or /run/.containerenv exists" if hostinfo.in_container() else "no container marker")

    def stranded(out: list[Check]) -> None:
        from mp_ssh_bridge.migrate import stranded_checks

        out += [Check(*found) for found in stranded_checks(settings)]  # what an older bridge wrote elsewhere

    def side(out: list[Check]) -> None:
        if role == "container":
            from mp_ssh_bridge.doctor_container import container_checks

            container_checks(settings, out)
        else:
            _host_checks(settings, out)

    steps = [("settings", lambda out: out.append(settings_check(settings))),
             ("role", lambda out: out.append(Check("ok", "role", f"{role} ({why_role})"))),
             ("memory", lambda out: out.append(memory_check(settings))),
             ("stranded data", stranded),
             ("state directory", lambda out: _state_dir_checks(settings, out)),
             ("owner", lambda out: out.append(owner_check(settings))),
             ("over SSH" if role == "container" else "broker", side)]
    for title, step in steps:
        try:
            step(checks)
        except Exception as exc:  # noqa: BLE001 - reported as one check, never a traceback
            checks.append(Check("fail", title, f"doctor could not check this: {type(exc).__name__}: {exc}",
                                "run it again; if it stays, please report it"))
    if role == "host" and hostinfo.in_container():
        checks.append(Check("warn", "role", "running in a container but MP_BRIDGE_ROLE=host",
                            "unset MP_BRIDGE_ROLE unless the host's socket is reachable from here"))
    return checks


# --------------------------------------------------------------------------- settings and memory
def settings_check(settings: Settings) -> Check:
    """Where each value that is not a default came from: the environment or the config file."""
    path = config.config_file_path()
    try:
        file_values = config.read_config_file(path)
    except (OSError, ValueError):
        file_values = {}  # the model loaded, so the file is readable; a race is not worth a failure
    origins = []
    for field in type(settings).model_fields:
        env = config.env_name(field)
        if os.environ.get(env):
            origins.append(f"{field}={getattr(settings, field)!s} (env {env})")
        elif field in file_values:
            origins.append(f"{field}={getattr(settings, field)!s} (config file)")
    where = f"config file {path}" + ("" if Path(path).exists() else " (absent)")
    shown = "; ".join(o for o in origins if "token" not in o) or "all defaults"
    return Check("ok", "settings", f"{where}; {shown}")


def _palace_origin(settings: Settings) -> str:
    if settings.palace:
        return "--palace / MP_BRIDGE_PALACE"
    for name in palace.PALACE_ENV:
        if os.environ.get(name):
            return f"env {name}"
    memory = settings.memory
    if memory.palace != os.path.join(memory.config_dir, "palace"):
        return f"palace_path in {memory.config_dir}/config.json"
    return f"the default under the config dir {memory.config_dir}"


def memory_check(settings: Settings) -> Check:
    memory = settings.memory
    return Check("ok", "memory", f"palace {memory.palace} (from {_palace_origin(settings)}), knowledge graph "
                                 f"{memory.kg}, config {memory.config_dir} — as a plain mempalace-mcp with these "
                                 "arguments and environment")


# --------------------------------------------------------------------------- state directory
def _mode_problem(path: Path, st: os.stat_result, is_dir: bool, secret: bool = True) -> Check | None:
    want = "700" if is_dir else "600"
    if st.st_uid != os.getuid():
        return Check("fail", "state directory", f"{path} belongs to uid {st.st_uid}, not to you",
                     "use a state directory of your own (MEMPALACE_PATH)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check("fail", "state directory", f"{path} is writable by group/others (mode {mode:o})",
                     f"chmod {want} {path} (or: mp-bridge doctor --fix)")
    if secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        return Check("fail", "state directory", f"{path} is readable by others (mode {mode:o}): broker.json holds "
                     "the TCP token", f"chmod {want} {path} (or: mp-bridge doctor --fix)")
    return None


def _state_dir_checks(settings: Settings, checks: list[Check]) -> None:
    paths = settings.paths
    root = paths.root
    if not root.exists():
        checks.append(Check("warn", "state directory", f"{root} does not exist yet", "it is created on first use"))
        return
    problem = _mode_problem(root, root.stat(), True)
    for f in (paths.json, paths.palace_id_file, paths.lock, paths.log, paths.degraded):
        if problem is None and f.exists() and not f.is_symlink():
            problem = _mode_problem(f, f.stat(), False, secret=f in (paths.json, paths.degraded))
    if problem is not None:
        checks.append(problem)
    else:
        checks.append(Check("ok", "state directory", f"{root} (mode {stat.S_IMODE(root.stat().st_mode):o}; its "
                                                      "files yours and owner-only)"))
    sock = paths.socket()
    note = "" if sock == paths.preferred_socket else f" (stand-in: {paths.preferred_socket} is too long for this OS)"
    checks.append(Check("ok", "socket path", f"{sock}{note}"))


# --------------------------------------------------------------------------- host role
def engine_check(settings: Settings) -> Check:
    """The engine command exists, runs, and opens the files this bridge resolved; its version."""
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    try:
        argv = resolve(settings.engine_argv)
    except (EngineNotFound, ValueError) as exc:  # ValueError: an empty MP_BRIDGE_ENGINE
        return Check("fail", "engine command", str(exc), "pip install mempalace, or set MP_BRIDGE_ENGINE")
    environ = dict(os.environ)
    started = time.perf_counter()
    try:
        theirs, version = palace.engine_resolve(argv, str(settings.palace) if settings.palace else None, environ,
                                                timeout=ENGINE_RESOLVE_SECONDS)
    except palace.EngineResolveError as exc:
        return Check("fail", "engine command", f"{' '.join(argv)} does not run: {exc}",
                     "reinstall mempalace in that environment, or point MP_BRIDGE_ENGINE at a working mempalace-mcp")
    took = (time.perf_counter() - started) * 1000
    why = palace.mismatch(settings.memory, theirs.as_dict())
    if why:
        return Check("fail", "engine command", f"mempalace {version} ({argv[0]}) would open other files than the "
                     f"bridge resolved: {why}", "set MEMPALACE_PALACE_PATH (or --palace) explicitly")
    return Check("ok", "engine command", f"{' '.join(argv)}: mempalace {version}, opens the same files "
                                         f"(asked in {took:.0f} ms)")


def _host_checks(settings: Settings, checks: list[Check]) -> None:
    from mp_ssh_bridge import palacecheck

    checks.append(engine_check(settings))
    ours = _broker_checks(settings, checks)
    tcp = tcp_check(state.read_broker_json(settings.paths.json))
    if tcp is not None:
        checks.append(tcp)
    report = palacecheck.report(settings.memory.palace, settings.memory.kg, str(settings.paths.root))
    admit_owner_writers(report, settings)  # a grant's CMD writes through the door, not past it
    lock_check(report, ours, checks)
    hub_check(report, state.read_json_object(settings.paths.owner), "", checks)
    other = liveness.live_degraded_writer(settings.paths, settings.heartbeat_stale_after)
    if other is not None:
        checks.append(Check("warn", "degraded mode", liveness.describe_degraded(other, settings.paths)))
    palace_health_checks(report, "", checks)


ADVERTISE_EXAMPLES = "host.docker.internal (Docker Desktop), host.orb.internal (OrbStack), host.lima.internal (Lima)"


def tcp_check(record: dict[str, Any] | None) -> Check | None:
    """The broker's TCP listener (only when it has one): what it is bound to and what broker.json tells the other
    side of a VM to dial. A wildcard bind without MP_BRIDGE_TCP_ADVERTISE advertises nothing, on purpose."""
    if not record or not record.get("tcp_token"):
        return None
    endpoints = record.get("endpoints")
    url = endpoints.get("tcp") if isinstance(endpoints, dict) else None
    listen = record.get("tcp_listen") or "?"
    if not isinstance(url, str):
        return Check("warn", "tcp", f"the broker listens on {listen} but broker.json advertises no TCP endpoint: a "
                     "wildcard address names no host another machine can dial (a container dialling 0.0.0.0 "
                     "reaches itself)", f"set MP_BRIDGE_TCP_ADVERTISE (or tcp_advertise in the config file) to the "
                     f"name the VM reaches this host by: {ADVERTISE_EXAMPLES}; then `mp-bridge restart`")
    from mp_ssh_bridge import urls
    from mp_ssh_bridge.errors import EndpointError

    try:
        host = urls.parse(url).host
    except EndpointError as exc:  # an older broker wrote an unbracketed IPv6 address
        return Check("warn", "tcp", f"broker.json advertises {url}, which does not parse: {exc}",
                     "upgrade the broker's mp-ssh-bridge and `mp-bridge restart`")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    note = ": only this machine can dial a loopback address" if loopback else ""
    return Check("ok", "tcp", f"listening on {listen}, advertised as {url} (token required){note}")


def _broker_checks(settings: Settings, checks: list[Check]) -> int | None:
    """broker.json, the pid it names (this host, this boot), its heartbeat, a real MCP round trip. The pid of a
    broker that answered, or None."""
    from mp_ssh_bridge.stopping import read_record

    paths = settings.paths
    record, bad = read_record(paths.json)
    if bad:
        checks.append(Check("fail", "broker.json", bad, f"if no broker runs: rm {paths.json} (or: mp-bridge doctor --fix)"))
        return None
    if record is None:
        checks.append(Check("warn", "broker", "no broker.json: no broker is running",
                            "the next mp-shim starts one (or: mp-bridge doctor --fix)"))
        return None
    pid, endpoint = record.get("pid"), record.get("endpoint")
    age = state.heartbeat_age(record)
    beat = "no heartbeat" if age is None else f"heartbeat {age:.0f}s ago"
    if liveness.from_another_machine(record):
        owner = liveness.live_foreign_owner(paths, settings.heartbeat_stale_after)
        where = f"broker.json names pid {pid} on another machine ({liveness.describe_machine(record)}), {beat}"
        if owner is not None:
            checks.append(Check("warn", "broker", f"{where}: a live owner, {owner[1].why}",
                                "sessions here reach it over SSH (set MP_BRIDGE_SSH_HOST); no broker starts beside it"))
        else:
            checks.append(Check("warn", "broker", f"{where}: gone, its heartbeat no longer moves",
                                "the next mp-shim reclaims it"))
        return None
    gone = liveness.pid_gone(record)
    if gone is not None:
        checks.append(Check("warn", "broker", f"stale broker.json: {gone} ({beat})",
                            "the next mp-shim reclaims it (or: mp-bridge doctor --fix)"))
        return None
    from mp_ssh_bridge.links import connect_unix

    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        checks.append(Check("fail", "broker.json", f"names no unix endpoint ({endpoint!r})", f"rm {paths.json}"))
        return None
    started = time.perf_counter()
    try:
        link = connect_unix(endpoint[len("unix://"):], settings.connect_timeout, config.DEFAULT_MAX_LINE_BYTES,
                            endpoint)
    except OSError as exc:
        checks.append(Check("fail", "broker", f"broker.json names pid {pid} (alive on this host, {beat}) at "
                            f"{endpoint}, which refuses connections: {exc.strerror or exc}",
                            "see `mp-bridge logs`; if it stays: mp-bridge stop --force"))
        return None
    try:
        return probe_checks(settings, link, started, beat, checks, f"pid {pid} (alive on this host) at {endpoint}")
    finally:
        link.close()
