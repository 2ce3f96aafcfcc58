"""Container sessions find, elect and share their container's daemon (mp_ssh_bridge/daemon.py), the way an agent
starts them: `mp-shim` in the container role with no MEMPALACE_BROKER. Real parts: the real sshd, the real host
broker over the pinned engine, real `mp-shim` processes. (The relay's own behaviour — an SSH drop, a host key
that does not match, fallbacks — is tests/test_relay.py; local-owner mode and its hand-over are
tests/test_daemon_local.py and tests/test_ownership_e2e.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import psutil

from mp_ssh_bridge import daemon, state
from tests.conftest import BIN, BrokerHandle
from tests.helpers import pid_alive, wait_for
from tests.sshd import SSHServer, two_sides
from tests.test_relay import accepted_logins, host_clients, text_of
from tests.test_shim_support import ShimProc

SESSIONS = 8


def daemons_of(ctr_state: Path) -> list[int]:
    """Processes that are a container daemon of this memory (its command line names the state directory)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if ("mp_ssh_bridge.containerd" in cmd or "--container-daemon" in cmd) and str(ctr_state) in cmd:
            found.append(p.pid)
    return found


def test_eight_container_sessions_elect_one_daemon_and_share_one_ssh_connection(
    home: Path, sshd: SSHServer, broker: BrokerHandle, tmp_path: Path
) -> None:
    """8 container sessions started at once: one daemon is elected (the others wait for its socket), sshd
    authenticates ONE connection, the host broker lists 8 clients, each session writes and finds its drawer, and
    `mp-bridge status` in the container names the daemon, its mode and its 8 sessions."""
    _host_state, ctr_state, wrapper = two_sides(home)
    env = sshd.container_env(ctr_state, wrapper, MEMPALACE_MCP_TIMEOUT_MS="60000", MP_BRIDGE_LOG_LEVEL="INFO")
    shims = [ShimProc(env=env, stderr_path=tmp_path / f"shim-{i}.err") for i in range(SESSIONS)]
    errors: list[str] = []
    done: list[int] = []

    def work(i: int, s: ShimProc) -> None:
        try:
            assert "result" in s.initialize(timeout=90), s.stderr()
            content = f"container session {i} wrote this {uuid.uuid4().hex}"
            added = s.tool("mempalace_add_drawer", {"wing": "ctr", "room": f"r{i}", "content": content}, timeout=90)
            assert '"success": true' in text_of(added), added
            found = s.tool("mempalace_search", {"query": content, "limit": 3}, timeout=90)
            assert content in text_of(found), found
            done.append(i)
        except BaseException as exc:  # reported below with the session's stderr
            errors.append(f"session {i}: {exc!r}; stderr: {s.stderr()}")

    try:
        threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(shims)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert errors == [], errors
        assert sorted(done) == list(range(SESSIONS))
        record: dict[str, Any] = daemon.read_record(str(ctr_state)) or {}
        assert record.get("mode") == "relay" and record.get("ssh", {}).get("state") == "connected", record
        assert record.get("loop") == "uvloop", record  # a dependency on Linux (pyproject): the relay runs on it
        assert daemons_of(ctr_state) == [record["pid"]]  # one daemon, elected once
        wait_for(lambda: len((daemon.read_record(str(ctr_state)) or {}).get("sessions", [])) == SESSIONS, 5,
                 what=f"{SESSIONS} sessions in the daemon's record")
        clients = host_clients(broker)
        assert len(clients) == SESSIONS and len({c["id"] for c in clients}) == SESSIONS, clients
        assert accepted_logins(sshd) == 1, sshd.log_tail()  # ONE SSH connection for all of them
        started = [s for s in shims if "starting this container's daemon" in s.stderr()]
        assert len(started) == 1, [s.stderr() for s in shims]
        out = subprocess.run([str(BIN / "mp-bridge"), "status"], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=60)
        assert f"container daemon: pid {record['pid']}, relay mode" in out.stdout, (out.stdout, out.stderr)
        assert f"{SESSIONS} sessions" in out.stdout and "connected" in out.stdout, out.stdout
        doc = subprocess.run([str(BIN / "mp-bridge"), "doctor", "--json"], env=dict(os.environ, **env),
                             capture_output=True, text=True, timeout=120)
        checks = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}
        mine = checks["container daemon"]
        assert mine["status"] == "ok" and f"pid {record['pid']}, relay mode" in mine["detail"], mine
        assert f"{SESSIONS} sessions" in mine["detail"], mine
        logs = subprocess.run([str(BIN / "mp-bridge"), "logs", "--daemon", "-n", "200"], env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=60)
        assert f"container daemon pid {record['pid']}: relay mode: connected to the host over SSH" in logs.stdout, logs
    finally:
        for s in shims:
            s.close()
    pid = record.get("pid")
    if isinstance(pid, int) and pid_alive(pid):
        os.kill(pid, 15)
        wait_for(lambda: not pid_alive(pid), 20, what="the daemon to exit")
    assert not state.StatePaths(ctr_state).daemon_paths().json.exists()
