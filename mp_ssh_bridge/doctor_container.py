"""`mp-bridge doctor` in a container: every check goes the way the container's sessions go: its daemon, then SSH.

A container's sessions go through its daemon (mp_ssh_bridge/daemon.py), which reaches the host's broker with
asyncssh per the user's OpenSSH config (or, with no way to the host, owns the palace itself);
probing the host's UNIX path through the bind mount would report a healthy broker as dead, and
the palace's sqlite files must be checked on the host (WAL shared memory does not cross the VM
boundary). So: the SSH config and its keys, the connection (host key, login), the host's broker
command and its version, the broker over SSH (stream-local or the stdio fallback) with a real
MCP round trip, `palace.id` on both sides, then `mempalace-broker --check` run on the host.
"""

from __future__ import annotations

import time
from typing import Any

from mp_ssh_bridge import state
from mp_ssh_bridge.doctorkit import (
    Check,
    admit_owner_writers,
    host_json,
    hub_check,
    lock_check,
    palace_health_checks,
    probe_checks,
)
from mp_ssh_bridge.settings import Settings

HOST_CHECK_SECONDS = 60.0


def _ssh_failure(settings: Settings, message: str) -> Check:
    """One failed connection, named by its cause (the message already says what to fix)."""
    lowered = message.lower()
    if "host key" in lowered:
        return Check("fail", "ssh host key", message, "verify the host's key and record it in known_hosts "
                     "(the message says how); the bridge never runs without verifying it")
    if "login" in lowered:
        return Check("fail", "ssh login", message, "add the key to the host's ~/.ssh/authorized_keys, or fix "
                     f"User/IdentityFile for Host {settings.ssh_host}")
    return Check("fail", "ssh connect", message, f"check HostName/Port for Host {settings.ssh_host}, that sshd "
                 "runs on the host, and that the host is reachable from this container")


def _config_checks(settings: Settings, checks: list[Check]) -> bool:
    from mp_ssh_bridge import ssh

    try:
        facts = ssh.target_facts(settings)
    except ssh.SSHBridgeError as exc:
        checks.append(Check("fail", "ssh config", str(exc), "see configs/ssh_config for a working `Host` entry"))
        return False
    checks.append(Check("ok", "ssh config", f"{facts['config']}: Host {settings.ssh_host} is "
                                            f"{facts['user']}@{facts['where']}"))
    if facts["keys"] or facts["agent"]:
        keys = ", ".join(facts["keys"]) + (" and ssh-agent" if facts["agent"] else "")
        checks.append(Check("ok", "ssh key", keys.lstrip(", ")))
    else:
        checks.append(Check("fail", "ssh key", f"none of {', '.join(facts['keys_looked_for'])} exists and no "
                            "ssh-agent (SSH_AUTH_SOCK)", f"mount or create a key and name it with IdentityFile "
                            f"under Host {settings.ssh_host}"))
    if facts["known_hosts"]:
        checks.append(Check("ok", "known_hosts", ", ".join(facts["known_hosts"])))
    else:
        checks.append(Check("fail", "known_hosts", f"none of {', '.join(facts['known_hosts_looked_for'])} exists: the "
                            "host key cannot be verified", "record the host's key (UserKnownHostsFile in the SSH "
                            "config; see configs/ssh_config)"))
    return True


def daemon_check(settings: Settings, checks: list[Check]) -> dict[str, Any]:
    """This container's daemon (mp_ssh_bridge.daemon): running, its mode, its SSH connection, its sessions. Returns
    what status.daemon_view saw."""
    from mp_ssh_bridge.status import daemon_view, describe_daemon

    view = daemon_view(settings)
    text = describe_daemon(view)[0].removeprefix("container daemon: ")
    if not view.get("running"):
        checks.append(Check("warn", "container daemon", text, "the next mp-shim in this container starts it"))
        return view
    ssh_state = (view.get("ssh") or {}).get("state") if isinstance(view.get("ssh"), dict) else None
    if view.get("mode") == "relay" and ssh_state not in (None, "connected"):
        checks.append(Check("warn", "container daemon", text, f"its log: {view.get('log')}; the checks below say "
                            "what stands in the SSH path's way"))
    elif view.get("mode") not in (None, "relay") and not view.get("status"):
        checks.append(Check("fail", "container daemon", text + "; it does not answer on its socket",
                            f"its log: {view.get('log')}"))
    else:
        checks.append(Check("ok", "container daemon", text))
    return view


def container_checks(settings: Settings, checks: list[Check]) -> None:
    """The way a container session goes: its daemon, SSH config, connect (host key, login), the host's broker
    over SSH."""
    from mp_ssh_bridge import ssh
    from mp_ssh_bridge.errors import ShimError
    from mp_ssh_bridge.links import run_async

    view = daemon_check(settings, checks)
    if view.get("running") and view.get("mode") == "local-owner":
        from mp_ssh_bridge.containerd import ssh_path

        if ssh_path(settings) is None:  # no bridge on purpose: nothing of SSH to check
            checks.append(Check("warn", "ssh", "no SSH path to the host is configured: this container's sessions share "
                                "its daemon's engine, and cannot reach the host's broker when it takes the palace",
                                "to share the host's broker, set MP_BRIDGE_SSH_HOST and a `Host` entry (configs/ssh_config)"))
            return
    if not _config_checks(settings, checks):
        return
    bound = settings.connect_timeout + 10
    try:
        status, out, err = run_async(ssh.run_on_host(settings, "--version", bound=bound), bound + 5)
    except ssh.SSHBridgeError as exc:
        checks.append(_ssh_failure(settings, str(exc)) if "was not found on the SSH host" not in str(exc) else
                      Check("fail", "remote broker command", str(exc), "set MP_BRIDGE_REMOTE_BROKER"))
        return
    except (ShimError, TimeoutError) as exc:
        checks.append(_ssh_failure(settings, str(exc) or "no answer"))
        return
    if status != 0:
        checks.append(Check("fail", "remote broker command", f"`{settings.remote_broker} --version` on the host "
                            f"exited {status}: {err.strip()[-200:]}", "set MP_BRIDGE_REMOTE_BROKER"))
        return
    remote_version = out.strip().splitlines()[-1] if out.strip() else "?"
    checks.append(Check("ok", "ssh", f"connected to {settings.ssh_host} (host key verified); the host's "
                                     f"{settings.remote_broker} is version {remote_version}"))
    broker_pid = _broker_over_ssh(settings, checks, remote_version)
    _host_side_checks(settings, checks, broker_pid)


def _broker_over_ssh(settings: Settings, checks: list[Check], remote_version: str) -> int | None:
    """The broker the way a session reaches it: its socket over SSH, named by the host's own broker.json
    (asked over SSH: the mount may be missing or stale), with an MCP round trip."""
    from mp_ssh_bridge import ssh
    from mp_ssh_bridge.errors import ShimError
    from mp_ssh_bridge.links import AsyncLink, run_async

    snap, why = host_json(settings, "--status", bound=settings.connect_timeout + 15)
    record = (snap or {}).get("record")
    endpoint = record.get("endpoint") if isinstance(record, dict) else None
    if snap is None:
        checks.append(Check("fail", "broker", f"the host did not say which broker runs: {why}",
                            f"on the host: mp-bridge doctor (or {settings.remote_broker} --status)"))
        return None
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        checks.append(Check("warn", "broker", f"no broker runs on the host for this memory ({snap.get('state_dir')})",
                            "the next mp-shim starts one over SSH (or: mp-bridge doctor --fix)"))
        return None
    url = f"ssh://{settings.ssh_host}{endpoint[len('unix://'):]}"
    bound = settings.connect_timeout + 15
    started = time.perf_counter()
    try:
        link = AsyncLink(run_async(ssh.open_ssh_url(settings, url), bound))
    except (ShimError, TimeoutError) as exc:
        checks.append(Check("fail", "broker over SSH", f"{url}: {exc}", "on the host: mp-bridge doctor"))
        return None
    detail = link.conn.info.get("transport_detail")
    how = ("direct-streamlocal" if detail == "ssh-streamlocal" else
           "the stdio fallback (the host's sshd refuses stream-local forwarding)" if detail == "ssh-stdio" else str(detail))
    try:
        return probe_checks(settings, link, started, f"reached over SSH by {how}", checks, url, remote_version)
    finally:
        link.close()


def _host_side_checks(settings: Settings, checks: list[Check], broker_pid: int | None) -> None:
    """`mempalace-broker --check` on the host, where the files live: writers, lock, scars, quick_check."""
    report, why = host_json(settings, "--check", bound=HOST_CHECK_SECONDS)
    if report is None:
        checks.append(Check("warn", "palace files", f"the host did not report on its palace files: {why}",
                            f"on the host: mp-bridge doctor (or {settings.remote_broker} --check)"))
        return
    admit_owner_writers(report, settings, here=False)  # a grant run on the host is no stray writer
    lock_check(report, broker_pid, checks)
    hub_check(report, state.read_json_object(settings.paths.owner), " on the host", checks)
    palace_health_checks(report, " (checked on the host)", checks)
