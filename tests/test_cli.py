"""`mp-bridge status` and `doctor` against a real broker and against none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import engine_facts

BIN = Path(sys.executable).parent


def bridge(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "mp-bridge"), *args], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, COLUMNS="2000"))  # rich wraps table cells at the terminal width
    out.stdout = " ".join(out.stdout.split(" ")) if args[-1] == "--json" else " ".join(out.stdout.split())
    return out


def test_status_and_doctor_without_a_broker(home):
    out = bridge("status")
    assert out.returncode == 1 and "No broker answers" in out.stdout
    doc = bridge("doctor")
    assert doc.returncode == 0, doc.stdout  # nothing is wrong: a broker starts on demand
    assert "no broker is running" in doc.stdout and "engine command" in doc.stdout


def test_status_and_doctor_with_a_broker(broker):
    out = bridge("status", "--json")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["status"]["broker"]["pid"] == broker.proc.pid
    assert snap["status"]["engine"]["state"] == "ready"
    text = bridge("status")
    assert text.returncode == 0 and f"pid {broker.proc.pid}" in text.stdout
    doc = bridge("doctor")
    assert doc.returncode == 0 and "FAIL" not in doc.stdout and f"mempalace {engine_facts()['version']}" in doc.stdout


def test_doctor_names_the_fix_for_a_shared_state_dir(home):
    (home / ".mempalace").mkdir(mode=0o777)
    (home / ".mempalace").chmod(0o777)
    doc = bridge("doctor")
    assert doc.returncode == 1
    assert "FAIL" in doc.stdout and "chmod 700" in doc.stdout


def test_doctor_flags_a_broker_that_does_not_answer(broker):
    import signal

    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        doc = bridge("doctor")
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert doc.returncode == 1 and "does not answer" in doc.stdout


# --- doctor --json: each failing check provoked for real --------------------------------------
def doctor_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:

    out = subprocess.run([str(BIN / "mp-bridge"), "doctor", "--json", *args], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, **(env or {})))
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def _check(report: dict, name: str) -> dict:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, (name, report)
    return found[-1]


def test_doctor_json_healthy_host(broker):
    code, report = doctor_json()
    assert code == 0 and report["ok"] is True, report
    assert _check(report, "broker")["status"] == "ok" and _check(report, "engine")["status"] == "ok"
    assert {"name", "status", "detail", "fix"} <= set(report["checks"][0])


def test_doctor_json_names_each_failure(home):
    code, report = doctor_json(env={"MP_BRIDGE_ENGINE": "/nonexistent/mempalace-mcp"})
    assert code == 1 and report["ok"] is False
    assert _check(report, "engine command")["status"] == "fail" and _check(report, "engine command")["fix"]
    (home / ".mempalace").mkdir(mode=0o755)
    (home / ".mempalace").chmod(0o755)
    code, report = doctor_json()
    state_dir = _check(report, "state directory")
    assert code == 1 and state_dir["status"] == "fail" and "chmod 700" in state_dir["fix"]
    code, report = doctor_json(env={"MP_BRIDGE_CONNECT_TIMEOUT": "-1"})
    assert code == 1 and _check(report, "settings")["status"] == "fail"


def test_doctor_in_the_container_goes_over_ssh(sshd, broker, home, tmp_path):
    """Before: it probed the host's UNIX path from broker.json and said FAIL 'alive but does not answer'."""
    import shutil

    from tests.sshd import write_broker_wrapper

    ctr = home.parent / "ctr-doctor" / ".mempalace"
    ctr.mkdir(parents=True, mode=0o700)
    shutil.copyfile(broker.state_dir / "palace.id", ctr / "palace.id")
    (ctr / "broker.json").symlink_to(broker.state_dir / "broker.json")  # the shared mount
    wrapper = write_broker_wrapper(home.parent / "remote-broker-doctor.sh", home, broker.state_dir)
    env = sshd.container_env(ctr, wrapper)
    code, report = doctor_json(env=env)
    assert code == 0 and report["ok"], report
    assert "over SSH" in _check(report, "broker")["detail"] and _check(report, "ssh")["status"] == "ok"
    assert "checked on the host" in _check(report, "scar files")["detail"]
    logs = subprocess.run([str(BIN / "mp-bridge"), "logs", "-n", "5"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))
    assert logs.returncode == 0 and str(broker.state_dir / "broker.log") in logs.stdout, logs  # the host's, over SSH
    sshd.kill()  # the host's sshd is down: a plain failure that says so
    code, report = doctor_json(env=dict(env, MP_BRIDGE_CONNECT_TIMEOUT="3"))
    assert code == 1 and _check(report, "ssh connect")["status"] == "fail", report
    assert "refused" in _check(report, "ssh connect")["detail"]


def test_status_names_agents_and_does_not_count_itself(broker, tmp_path):
    from tests.test_shim_support import ShimProc

    s = ShimProc(stderr_path=tmp_path / "shim.err")
    try:
        assert "result" in s.initialize()
        for _ in range(2):  # looking twice changes nothing: the probe is no client and no request
            out = subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True, timeout=60)
            snap = json.loads(out.stdout)
            clients = snap["status"]["clients"]
            assert [(c["client"], c["transport"], c["role"]) for c in clients] == [("test 1", "unix", "host")], clients
            assert snap["status"]["totals"]["requests"] == 1  # the agent's initialize only
    finally:
        s.close()


def test_logs_version_and_rotation(home, tmp_path):

    out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    logs = subprocess.run([str(BIN / "mp-bridge"), "logs", "-n", "20"], capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0 and "serving" in logs.stdout, logs.stdout
    version = subprocess.run([str(BIN / "mp-bridge"), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and f"mempalace {engine_facts()['version']}" in version.stdout
    # a log over its bound is rotated under a process that writes it as its stderr, and nothing is lost
    log = tmp_path / "broker.log"
    code = ("import sys; from pathlib import Path; from mp_ssh_bridge import brokerlog\n"
            "sys.stderr.write('x' * 200 + '\\n'); sys.stderr.flush()\n"
            "assert brokerlog.rotate_if_big(Path(sys.argv[1]), max_bytes=100)\n"
            "sys.stderr.write('after\\n'); sys.stderr.flush()\n")
    with open(log, "ab") as fh:
        subprocess.run([sys.executable, "-c", code, str(log)], stderr=fh, check=True, timeout=60, env=dict(os.environ))
    assert log.read_text() == "after\n" and (tmp_path / "broker.log.1").read_text() == "x" * 200 + "\n"
    from mp_ssh_bridge import brokerlog

    assert brokerlog.tail(log, 2) == "x" * 200 + "\nafter"


def test_status_watch_refreshes_until_interrupted(broker):
    import signal
    import time

    proc = subprocess.Popen([str(BIN / "mp-bridge"), "status", "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert f"pid {broker.proc.pid}" in " ".join(out.split())


def test_doctor_names_scar_files_and_a_corrupt_database(broker, tmp_path):
    from pathlib import Path

    palace_dir = Path(broker.record["palace"])
    palace_dir.mkdir(parents=True, exist_ok=True)
    (palace_dir / "chroma.sqlite3.corrupt-20260528").write_bytes(b"scar")
    code, report = doctor_json()
    assert _check(report, "scar files")["status"] == "warn" and "corrupt-20260528" in _check(report, "scar files")["detail"]
    kg = Path(broker.record["kg"])
    kg.parent.mkdir(parents=True, exist_ok=True)
    kg.write_bytes(b"SQLite format 3\x00" + b"\x07" * 4096)  # a damaged database file
    code, report = doctor_json()
    assert code == 1 and _check(report, "knowledge_graph.sqlite3 quick_check")["status"] == "fail", report
