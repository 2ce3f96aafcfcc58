"""`mp-bridge status` and `doctor` against a real broker and against none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import engine_facts

BIN = Path(sys.executable).parent


def bridge(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "mp-bridge"), *args], capture_output=True, text=True, timeout=60)
    out.stdout = " ".join(out.stdout.split(" ")) if args[-1] == "--json" else " ".join(out.stdout.split())
    return out  # rich wraps at the terminal width: compare with whitespace folded


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
    assert "FAIL" in doc.stdout and "chmod go-w" in doc.stdout


def test_doctor_flags_a_broker_that_does_not_answer(broker):
    import os
    import signal

    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        doc = bridge("doctor")
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert doc.returncode == 1 and "alive but does not answer" in doc.stdout
