"""`mp-bridge doctor` (and `restart`): each failing check provoked for real, asserted through `--json`.

Real brokers over the real engine; the scripted fake engine (tests/fake_engine.py) only where a call must
take a known time (restart with a call in flight and one queued). The container role over the real sshd.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import holders
from mp_ssh_bridge.doctorkit import versions_check
from tests.conftest import BIN
from tests.helpers import wait_for
from tests.test_stop import write_record

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([str(BIN / "mp-bridge"), "doctor", "--json", *args], capture_output=True, text=True,
                         timeout=180, env=dict(os.environ, **(env or {})))
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, (name, [c["name"] for c in report["checks"]])
    return found[-1]


def test_dead_pid_is_stale_and_fix_reclaims_it_and_starts_a_broker(home: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_record(home / ".mempalace", dead.pid)
    code, report = doctor()
    assert check(report, "broker")["status"] == "warn" and "is gone" in check(report, "broker")["detail"], report
    code, report = doctor("--fix")
    assert any("stale broker.json" in line and "removed" in line for line in report["fixed"]), report["fixed"]
    assert any("started a broker" in line for line in report["fixed"]), report["fixed"]
    assert code == 0 and check(report, "broker")["status"] == "ok", report
    assert "MCP round trip" in check(report, "broker")["detail"] and "tools" in check(report, "broker")["detail"]


def test_unrelated_live_pid_fails_and_stop_leaves_it_alone(home: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_record(home / ".mempalace", sleeper.pid, proc_start="1")
        code, report = doctor()  # its start time is not the broker's: a reused pid, so a stale record
        assert check(report, "broker")["status"] == "warn", report
        assert "belongs to another process" in check(report, "broker")["detail"]
        stop = subprocess.run([str(BIN / "mp-bridge"), "stop"], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 1 and "not proven" in stop.stderr, stop
        assert sleeper.poll() is None  # never signalled
    finally:
        sleeper.kill()
        sleeper.wait()


def test_group_writable_state_dir_and_fix_tightens_it(home: Path) -> None:
    sd = home / ".mempalace"
    sd.mkdir(mode=0o700)
    sd.chmod(0o775)
    (sd / "palace.id").write_text("x")
    (sd / "palace.id").chmod(0o644)
    code, report = doctor()
    assert code == 1 and check(report, "state directory")["status"] == "fail"
    assert "writable by group" in check(report, "state directory")["detail"]
    code, report = doctor("--fix")
    assert any(f"chmod 700 {sd}" in line for line in report["fixed"]) and any("palace.id" in x for x in report["fixed"])
    assert check(report, "state directory")["status"] == "ok", report
    assert (sd.stat().st_mode & 0o777) == 0o700 and ((sd / "palace.id").stat().st_mode & 0o777) == 0o600


def test_a_socket_that_refuses(broker: Any) -> None:
    path = broker.socket_path
    os.unlink(path)  # the broker keeps running, but its socket now leads nowhere
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: connect() is refused
    try:
        code, report = doctor()
        assert code == 1 and check(report, "broker")["status"] == "fail", report
        assert "refused" in check(report, "broker")["detail"].lower()
    finally:
        s.close()


def test_a_stray_writer_is_named(broker: Any, tmp_path: Path) -> None:
    """A plain mempalace-mcp on the broker's palace: the second writer that loses vectors."""
    from tests.test_shim_support import ShimProc

    palace = broker.record["palace"]
    stray = ShimProc("--palace", palace, command=str(BIN / "mempalace-mcp"), stderr_path=tmp_path / "stray.err")
    try:
        assert "result" in stray.initialize()
        assert "result" in stray.tool("mempalace_kg_add", {"subject": "s", "predicate": "p", "object": "o"},
                                      timeout=120)  # now it holds the palace's files
        code, report = doctor()
        writers = check(report, "stray writers")
        assert code == 1 and writers["status"] == "fail", report
        assert f"pid {stray.proc.pid}" in writers["detail"] and "mempalace-mcp" in writers["detail"]
    finally:
        stray.close()
    code, report = doctor()
    assert check(report, "stray writers")["status"] == "ok", report  # the broker's own engine is no stray


def test_lock_and_holders_parsers() -> None:
    text = ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146985 0 EOF\n"
            "1: -> FLOCK  ADVISORY  WRITE 4343 fe:00:2146985 0 EOF\n"
            "2: POSIX  ADVISORY  WRITE 99 08:01:77 0 EOF\n")
    assert holders.parse_proc_locks(text, (0xFE, 0, 2146985)) is True
    assert holders.parse_proc_locks(text, (8, 1, 78)) is False
    found = holders.parse_lsof("p12\ncpython3\nn/p/chroma.sqlite3\nn/p/x\np13\ncmempalace\nn/p/kg\n")
    assert [(h.pid, h.command, h.path) for h in found] == [(12, "python3", "/p/chroma.sqlite3"), (13, "mempalace", "/p/kg")]


def test_versions_check_by_input() -> None:
    from mp_ssh_bridge import __version__

    assert versions_check(__version__).level == "ok"
    other = versions_check("0.0.1")
    assert other.level == "warn" and "0.0.1" in other.detail and "restart" in other.fix
    assert versions_check(__version__, "0.0.2").level == "warn"


# --- the container role over the real sshd --------------------------------------------------------
def _container(sshd: Any, broker: Any, home: Path, name: str, **extra: str) -> dict[str, str]:
    import shutil

    from tests.sshd import write_broker_wrapper

    ctr = home.parent / name / ".mempalace"
    ctr.mkdir(parents=True, mode=0o700)
    shutil.copyfile(broker.state_dir / "palace.id", ctr / "palace.id")
    (ctr / "broker.json").symlink_to(broker.state_dir / "broker.json")  # the shared mount
    wrapper = write_broker_wrapper(home.parent / f"remote-broker-{name}.sh", home, broker.state_dir)
    return sshd.container_env(ctr, wrapper, **extra)


def test_container_healthy_then_unknown_host_key_then_unreachable(sshd: Any, broker: Any, home: Path) -> None:
    env = _container(sshd, broker, home, "ctr-a")
    code, report = doctor(env=env)
    assert code == 0, [c for c in report["checks"] if c["status"] != "ok"]
    for name in ("ssh config", "ssh key", "known_hosts", "ssh", "versions", "palace id", "lock", "stray writers"):
        assert check(report, name)["status"] == "ok", (name, report)
    assert "direct-streamlocal" in check(report, "broker")["detail"]
    status = subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, **env))
    snap = json.loads(status.stdout)  # the host's own view, over SSH (the mount's UNIX path means nothing here)
    assert status.returncode == 0 and snap["status"]["broker"]["pid"] == broker.proc.pid and snap["via"] == "ssh host"
    assert "checked on the host" in check(report, "stray writers")["detail"]
    empty = home.parent / "known_hosts.empty"
    empty.write_text("")
    cfg = sshd.write_client_config(home.parent / "ssh_config.unknown", known_hosts=empty)
    code, report = doctor(env=dict(env, MP_BRIDGE_SSH_CONFIG=str(cfg)))
    assert code == 1 and check(report, "ssh host key")["status"] == "fail", report
    assert "could not be verified" in check(report, "ssh host key")["detail"]
    cfg = sshd.write_client_config(home.parent / "ssh_config.unreachable", port=1)  # nothing listens on port 1
    code, report = doctor(env=dict(env, MP_BRIDGE_SSH_CONFIG=str(cfg), MP_BRIDGE_CONNECT_TIMEOUT="3"))
    assert code == 1 and check(report, "ssh connect")["status"] == "fail", report


# --- restart ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_restart_loses_no_queued_call(home: Path, tmp_path: Path) -> None:
    """A call in flight finishes on the old broker; a queued one runs on the new broker; nobody sees an error."""
    from mp_ssh_bridge import state
    from tests.test_shim_support import ShimProc

    env = {"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_SHUTDOWN_GRACE": "10"}
    a = ShimProc(env=env, stderr_path=tmp_path / "a.err")
    b = ShimProc(env=env, stderr_path=tmp_path / "b.err")
    try:
        assert "result" in a.initialize() and "result" in b.initialize()
        old = state.read_broker_json(home / ".mempalace" / "broker.json")
        assert old is not None
        slow = a.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 2}})
        wait_for(lambda: _in_flight(), 10, what="the slow call in flight")
        queued = b.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0.1}})
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=subprocess.run(
            [str(BIN / "mp-bridge"), "restart"], capture_output=True, text=True, timeout=120,
            env=dict(os.environ, **env))))
        t.start()
        assert "result" in a.wait_reply(slow, 30), a.stderr()
        assert "result" in b.wait_reply(queued, 30), b.stderr()
        t.join(60)
        assert result["r"].returncode == 0, result["r"]
        new = state.read_broker_json(home / ".mempalace" / "broker.json")
        assert new is not None and new["pid"] != old["pid"]
    finally:
        a.close()
        b.close()


def _in_flight() -> bool:
    out = subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True, timeout=30)
    snap = json.loads(out.stdout)
    return bool((snap.get("status") or {}).get("in_flight"))


@pytest.mark.parametrize("wrapper_execs", [True, False], ids=["exec-wrapper", "plain-wrapper"])
def test_logs_follow_in_the_container_goes_over_ssh(sshd: Any, broker: Any, home: Path, wrapper_execs: bool) -> None:
    """`mp-bridge logs -f` in a container follows the HOST's log over SSH; Ctrl-C ends it on both sides, also
    behind a MP_BRIDGE_REMOTE_BROKER wrapper that does not `exec` (the remote follower sees its stdin close)."""
    import signal

    env = _container(sshd, broker, home, "ctr-f")
    if not wrapper_execs:
        wrapper = Path(env["MP_BRIDGE_REMOTE_BROKER"])
        wrapper.write_text(wrapper.read_text().replace("exec '", "'"))
    log = broker.state_dir / "broker.log"  # the foreground test broker logs elsewhere: write the file ourselves
    log.write_text("first line\n")
    proc = subprocess.Popen([str(BIN / "mp-bridge"), "logs", "-f", "-n", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "first line"
        with open(log, "a") as fh:
            fh.write("written after the follow began\n")
        assert proc.stdout.readline().strip() == "written after the follow began"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()

    def remote_gone() -> bool:  # this test's follower only: its wrapper set HOME to this test's home
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            try:
                if "--follow" in (proc.info["cmdline"] or []) and proc.environ().get("HOME") == str(home):
                    return False
            except (psutil.Error, OSError):
                continue
        return True

    wait_for(remote_gone, 10, what="the host's --follow to end with its SSH session")


def test_service_manager_by_input() -> None:
    from mp_ssh_bridge.hostinfo import parse_service_manager

    assert parse_service_manager({"XPC_SERVICE_NAME": "0"}, None, True) is None  # a Terminal shell on macOS
    mac = parse_service_manager({"XPC_SERVICE_NAME": "dev.mp-ssh-bridge.broker"}, None, True)
    assert mac is not None and mac["kind"] == "launchd" and "launchctl bootout gui/" in mac["stop"]
    cg = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/mp-bridge-broker.service\n"
    unit = parse_service_manager({"INVOCATION_ID": "abc"}, cg, True)
    assert unit == {"kind": "systemd", "unit": "mp-bridge-broker.service",
                    "stop": "systemctl --user stop mp-bridge-broker.service",
                    "restart": "systemctl --user restart mp-bridge-broker.service"}
    assert parse_service_manager({}, cg, True) is None  # no INVOCATION_ID: not started by systemd
    assert parse_service_manager({"INVOCATION_ID": "x"}, "0::/user.slice/session-2.scope\n", True) is None
    # inherited from an editor or a service that started the agent: an on-demand broker never leads its session
    assert parse_service_manager({"INVOCATION_ID": "abc"}, cg, False) is None
    assert parse_service_manager({"XPC_SERVICE_NAME": "application.com.microsoft.VSCode.1.2"}, None, False) is None


def test_stop_names_the_service_manager_and_leaves_the_broker_running(broker_factory: Any) -> None:
    from mp_ssh_bridge import state

    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_HEARTBEAT_INTERVAL": "600"})  # no rewrite
    record = broker.record
    record["manager"] = {"kind": "systemd", "unit": "mp-bridge-broker.service",
                         "stop": "systemctl --user stop mp-bridge-broker.service"}
    state.write_json_atomic(broker.state_dir / "broker.json", record)  # as a broker under systemd writes it
    out = subprocess.run([str(BIN / "mp-bridge"), "stop"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "systemctl --user stop mp-bridge-broker.service" in out.stderr, out
    assert broker.proc.poll() is None


def test_a_session_of_another_version_is_told_once_what_to_do() -> None:
    from mp_ssh_bridge import __version__
    from mp_ssh_bridge.handshake import version_note

    assert version_note({"broker": {"version": __version__}}) is None
    note = version_note({"broker": {"version": "0.0.9"}})
    assert note is not None and "0.0.9" in note and __version__ in note and "mp-bridge restart" in note
    assert version_note({}) is None


def test_a_world_readable_state_dir_fails(home: Path) -> None:
    sd = home / ".mempalace"
    sd.mkdir(mode=0o700)
    sd.chmod(0o755)
    code, report = doctor()
    found = check(report, "state directory")
    assert code == 1 and found["status"] == "fail" and "readable by others" in found["detail"]
    assert f"chmod 700 {sd}" in found["fix"]


def test_a_failed_engine_is_a_failure_with_its_last_error(broker_factory: Any) -> None:
    broker_factory(env={"MP_BRIDGE_ENGINE": f"{sys.executable} -c 'import sys; sys.exit(3)'"}, wait_engine=False)
    report: dict[str, Any] = {}

    def failed() -> bool:
        nonlocal report
        _, report = doctor()
        return any(c["name"] == "engine" and c["status"] == "fail" for c in report["checks"])

    wait_for(failed, 60, what="doctor to report the engine failed")
    engine = check(report, "engine")
    assert "exit" in engine["detail"] and "MP_BRIDGE_ENGINE" in engine["fix"], engine


def test_quick_check_of_a_busy_database_is_no_verdict(tmp_path: Path) -> None:
    import sqlite3

    from mp_ssh_bridge import palacecheck

    db = tmp_path / "odd ?#% name.sqlite3"  # the file: URI must quote it
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    assert palacecheck.quick_check(str(db)) == "ok"
    conn.execute("BEGIN EXCLUSIVE")  # a writer holds it
    try:
        busy = palacecheck.quick_check(str(db), seconds=3)
    finally:
        conn.rollback()
        conn.close()
    assert busy.startswith(palacecheck.NOT_CHECKED), busy
