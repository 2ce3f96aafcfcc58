"""`mp-bridge run -- CMD` (mp_ssh_bridge/grant.py, guardian.py): CMD runs as the palace's one owner, and never
writes before its grant nor after it; the `mempalace` CLI shim (configs/mempalace-cli-shim) routes writes
through it. docs/PROTOCOL.md "Ownership", docs/WRITERS.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import owner, state
from tests.helpers import pid_alive, wait_for

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
SHIM = REPO / "configs" / "mempalace-cli-shim"
STALE = 30.0


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mp-bridge"), "run", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), **kw)


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "mp-bridge"), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **(env or {})))


def paths_of(home: Path) -> state.StatePaths:
    return state.StatePaths(home / ".mempalace")


def record(home: Path) -> dict[str, Any] | None:
    return state.read_json_object(paths_of(home).owner)


def cmd_record(home: Path, run_pid: int) -> dict[str, Any]:
    """The grant's record once it names CMD (it names `run` itself between the claim and CMD's start)."""
    def named() -> dict[str, Any] | None:
        rec = record(home)
        return rec if rec and rec.get("kind") == "grant" and rec.get("pid") != run_pid else None

    return wait_for(named, 15, what="the grant's record naming CMD")


def test_the_grant_names_cmd_while_it_runs_and_ends_with_it(home: Path) -> None:
    out = run("--", "sh", "-c", 'cat "$MEMPALACE_PATH/owner.json"; echo "cmd $$"')
    assert out.returncode == 0, out.stderr
    text, _, last = out.stdout.rstrip("\n").rpartition("\n")
    seen = json.loads(text)
    assert seen["kind"] == "grant" and last == f"cmd {seen['pid']}", out.stdout  # pid = CMD's own
    assert seen["what"].startswith("sh -c ") and seen["expires"] > seen["since"] + 7000  # grant_max_duration
    assert seen["proc_start"] and "token" in seen
    assert not paths_of(home).owner.exists(), "released after CMD"
    assert out.stderr == ""  # nothing to say when nobody held the palace
    assert run("--", "sh", "-c", "exit 3").returncode == 3
    assert run("--", "sh", "-c", "kill -9 $$").returncode == 128 + 9
    assert not paths_of(home).owner.exists()


def test_stdout_passes_through_untouched(home: Path) -> None:
    data = bytes(range(256)) * 64
    out = subprocess.run([str(BIN / "mp-bridge"), "run", "--", sys.executable, "-c",
                          "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                         input=data, capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == data, out.stderr


def test_a_missing_command_is_127_and_claims_nothing(home: Path) -> None:
    out = run("--", "no-such-command-here")
    assert out.returncode == 127 and "no-such-command-here" in out.stderr and "not found" in out.stderr
    assert not paths_of(home).owner.exists()


def test_a_second_run_waits_its_turn(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    first = start("--", "sh", "-c", f'echo start1 >> {log}; sleep 1.5; echo end1 >> {log}')
    try:
        cmd_record(home, first.pid)
        second = run("--", "sh", "-c", f"echo start2 >> {log}")
        assert second.returncode == 0, second.stderr
        assert first.wait(10) == 0
    finally:
        first.kill()
        first.wait()
    assert log.read_text().split() == ["start1", "end1", "start2"]
    assert "waiting for the palace" in second.stderr and "runs until its command ends" in second.stderr, second.stderr
    assert "sleep 1.5" in second.stderr  # names the grant it waited for
    assert not paths_of(home).owner.exists()


def test_cmd_dies_with_a_killed_run_and_the_palace_is_free_again(home: Path) -> None:
    proc = start("--", sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)")
    try:
        cmd = cmd_record(home, proc.pid)["pid"]
        assert pid_alive(cmd)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        killed = time.monotonic()
        wait_for(lambda: not pid_alive(cmd), 5, what="CMD gone after run was killed")
        assert time.monotonic() - killed < 3.0
        claim = wait_for(lambda: _try_claim(paths_of(home)), 5, what="the palace claimable")
        assert claim.ours()
        claim.release()
    finally:
        proc.kill()
        proc.wait()


def _try_claim(paths: state.StatePaths) -> owner.Claim | None:
    try:
        return owner.claim(paths, "broker", STALE)
    except owner.Busy:
        return None


def test_a_holder_that_does_not_hand_over_means_exit_75_naming_it(home: Path, tmp_path: Path) -> None:
    paths = paths_of(home)
    state.ensure_private_dir(paths.root)
    held = owner.claim(paths, "broker", STALE)  # the test holds the palace and never yields
    marker = tmp_path / "ran"
    try:
        began = time.monotonic()
        out = run("--timeout", "1", "--", "touch", str(marker))
        took = time.monotonic() - began
    finally:
        held.release()
    assert out.returncode == 75, out.stderr
    assert f"the broker (pid {os.getpid()}" in out.stderr and "not handed over within 1 s" in out.stderr
    assert "waiting for the palace" in out.stderr and "finishing its running call" in out.stderr
    assert not marker.exists(), "CMD must not run without the grant"
    assert took < 10
    assert list(paths.owner_requests.glob("*.json")) == [], "the request is withdrawn"


def test_grant_max_duration_stops_cmd_and_says_so(home: Path) -> None:
    began = time.monotonic()
    out = run("--", "sleep", "30", env={"MP_BRIDGE_GRANT_MAX_DURATION": "1"})
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert "grant_max_duration (1 s)" in out.stderr and "stopping it" in out.stderr
    assert time.monotonic() - began < 8
    assert not paths_of(home).owner.exists()


def test_status_shows_the_grant_and_signals_reach_cmd(home: Path) -> None:
    proc = start("--", "sleep", "30")
    try:
        rec = cmd_record(home, proc.pid)
        out = subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True, timeout=30)
        snap = json.loads(out.stdout)
        held = snap["owner"]
        assert held["kind"] == "grant" and held["pid"] == rec["pid"] and held["what"] == "sleep 30", snap
        assert held["alive"] is True and held["expires_in_s"] > 7000 and "token" not in held
        assert snap["requests"] == []
        text = subprocess.run([str(BIN / "mp-bridge"), "status"], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, COLUMNS="400"))
        assert "owner: grant" in text.stdout and "`sleep 30` under `mp-bridge run`" in text.stdout, text.stdout
        proc.send_signal(signal.SIGTERM)  # forwarded to CMD; run exits with CMD's status once it is gone
        assert proc.wait(10) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(rec["pid"]) and not paths_of(home).owner.exists()
    snap = json.loads(subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True,
                                     timeout=30).stdout)
    assert snap["owner"] is None


def _watch_release(home: Path, proc: subprocess.Popen[str], still_running: Any, timeout: float = 20) -> float:
    """Poll until `run` exits: owner.json must never be gone while `still_running()` (a member of CMD's group
    that could write). When owner.json went, monotonic."""
    released = None
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if released is None and not paths_of(home).owner.exists():
            assert not still_running(), "the grant was released while a member of CMD's group remained"
            released = time.monotonic()
        time.sleep(0.01)
    assert proc.poll() is not None, "run did not exit"
    return released if released is not None else time.monotonic()


def test_the_grant_outlives_every_member_of_cmds_group(home: Path, tmp_path: Path) -> None:
    # A member the guardian's SIGKILL cannot end at once (standing in for one in uninterruptible I/O): X stays in
    # CMD's group while its parent P leaves it and does not reap X's zombie, until P exits 1.5 s in.
    marker = tmp_path / "parent-left"
    script = ("import os, sys, time\n"
              "if os.fork() == 0:\n"
              "    if os.fork() == 0:\n"
              "        time.sleep(60); os._exit(0)\n"
              "    os.setpgid(0, 0)\n"
              "    time.sleep(1.5)\n"
              f"    open({str(marker)!r}, 'w').close(); os._exit(0)\n"
              "time.sleep(0.3)\n")
    began = time.monotonic()
    proc = start("--", sys.executable, "-c", script)
    try:
        cmd_record(home, proc.pid)
        released = _watch_release(home, proc, lambda: not marker.exists())
        assert proc.wait(5) == 0, proc.communicate()
    finally:
        proc.kill()
        proc.wait()
    assert released - began >= 1.3
    assert not paths_of(home).owner.exists()


def test_a_killed_guardian_means_run_ends_cmds_group_before_releasing(home: Path) -> None:
    # The background member ignores SIGTERM: run must SIGKILL it, and release only once it is gone.
    proc = start("--", "sh", "-c", "trap '' TERM; sleep 30 & echo $!; wait")
    try:
        rec = cmd_record(home, proc.pid)
        assert proc.stdout is not None
        member = int(proc.stdout.readline())
        assert rec["engine_pid"] == rec["guardian_pid"] and rec["engine_proc_start"]
        os.kill(rec["guardian_pid"], signal.SIGKILL)
        _watch_release(home, proc, lambda: pid_alive(member))
        assert proc.wait(5) == 70  # CMD's status died with its guardian
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(member) and not paths_of(home).owner.exists()


def test_ctrl_z_does_not_suspend_a_grant(home: Path) -> None:
    proc = start("--", "sleep", "2.5", env={"MP_BRIDGE_HEARTBEAT_INTERVAL": "0.2"})
    try:
        first = cmd_record(home, proc.pid)["heartbeat"]
        proc.send_signal(signal.SIGTSTP)
        time.sleep(0.8)
        now = record(home)
        assert now is not None and now["heartbeat"] > first, "run stopped beating"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not paths_of(home).owner.exists()


def test_an_ignored_sigchld_does_not_turn_a_failure_into_success(home: Path) -> None:
    out = run("--", "sh", "-c", "exit 3", preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert out.returncode == 3, out.stderr
    assert not paths_of(home).owner.exists()


def test_cmd_never_runs_when_the_beat_naming_it_cannot_be_written(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = ("import sys\nfrom mp_ssh_bridge import grant, owner\nfrom mp_ssh_bridge.settings import load\n"
              "def skipped(self, **fields):\n    raise owner.BeatSkipped('owner.lock busy (test)')\n"
              "owner.Claim.beat = skipped\ngrant.GO_BEAT_TRIES = 2\n"
              "sys.exit(grant.run(load(), ['touch', sys.argv[1]]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert out.returncode == 75, out.stderr
    assert "could not write the owner record naming CMD" in out.stderr and "nothing was run" in out.stderr
    assert not marker.exists() and not paths_of(home).owner.exists()


class _FakeReader:
    def __init__(self, lines: int) -> None:
        self.left, self.status, self.eof = lines, None, False

    @property
    def done(self) -> bool:
        return self.status is not None

    def line(self, timeout: float) -> None:
        time.sleep(0.01)
        self.left -= 1
        if self.left <= 0:
            self.status = 0


class _FlakyClaim:
    def __init__(self, failures: int) -> None:
        self.failures, self.beats = failures, 0

    def beat(self, **fields: Any) -> bool:
        self.beats += 1
        if self.beats <= self.failures:
            raise owner.BeatSkipped("owner.lock busy (test)")
        return True


def test_a_beat_that_cannot_be_written_is_said_once_and_cmd_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from mp_ssh_bridge import grant

    cmd = subprocess.Popen(["sleep", "10"], start_new_session=True)
    try:
        claim = _FlakyClaim(failures=3)
        settings = SimpleNamespace(heartbeat_interval=0.02, grant_max_duration=3600.0)
        signals = SimpleNamespace(take=list)
        status = grant._supervise(settings, claim, "sleep", cmd.pid, time.time() + 3600,  # type: ignore[arg-type]
                                  _FakeReader(40), signals)
        assert status == 0 and claim.beats > 4  # beat on after the failures
        assert cmd.poll() is None, "CMD must not be stopped for a beat that could not be written"
        err = capsys.readouterr().err
        assert err.count("could not write the heartbeat") == 1, err
    finally:
        cmd.kill()
        cmd.wait()


# --------------------------------------------------------------------------- the mempalace CLI shim
@pytest.fixture
def shim_path(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH: the shim as `mempalace`, then a fake real `mempalace` that says whether a grant was held."""
    shim_dir, real_dir = tmp_path / "shim", tmp_path / "real"
    shim_dir.mkdir()
    real_dir.mkdir()
    shutil.copy(SHIM, shim_dir / "mempalace")
    fake = real_dir / "mempalace"
    fake.write_text('#!/bin/sh\nif [ -e "$MEMPALACE_PATH/owner.json" ]; then w=granted; else w=direct; fi\n'
                    'echo "$w: $*"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{real_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MP_BRIDGE_OWNER_WAIT", "5")  # a deadlock would fail fast
    return fake


def mempalace(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mempalace", *args], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **(env or {})))


def test_the_cli_shim_routes_writes_through_run_and_reads_straight(shim_path: Path, home: Path) -> None:
    assert mempalace("mine", "/some/dir", "--mode", "convos").stdout == "granted: mine /some/dir --mode convos\n"
    assert mempalace("--palace", "/p", "mine", "x").stdout == "granted: --palace /p mine x\n"
    assert mempalace("hook", "run", "--hook", "stop", "--harness", "claude-code").stdout.startswith("granted:")
    assert mempalace("search", "why graphql").stdout == "direct: search why graphql\n"
    assert mempalace("status").stdout == "direct: status\n"
    assert mempalace("hook", "run", "--hook", "session-start", "--harness", "claude-code").stdout.startswith("direct:")
    assert mempalace("logstream", "list").stdout.startswith("direct:")
    refused = mempalace("mine", "x", "--daemon")
    assert refused.returncode == 2 and refused.stdout == "" and "long-lived writer" in refused.stderr
    assert mempalace("daemon", "start").returncode == 2
    # `$MEMPALACE_PYTHON -m mempalace mine …`, as mempalace's hooks start their background mines
    py = mempalace("-m", "mempalace", "mine", "t", env={"MEMPALACE_SHIM_PYTHON": str(shim_path)})
    assert py.stdout == "granted: -m mempalace mine t\n", py.stderr
    assert not paths_of(home).owner.exists()


def test_the_cli_shim_inside_a_run_uses_that_grant(shim_path: Path, home: Path) -> None:
    out = run("--", "sh", "-c", "mempalace mine a && mempalace mine b")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "granted: mine a\ngranted: mine b\n" and "waiting" not in out.stderr


def test_doctor_names_a_writer_past_the_owner_and_admits_the_grants(home: Path) -> None:
    from mp_ssh_bridge.settings import load

    palace = Path(load().memory.palace)
    palace.mkdir(parents=True, exist_ok=True)
    db = palace / "chroma.sqlite3"
    db.touch()
    hold = ("import os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nprint('open', flush=True)\n"
            "time.sleep(60)\n")

    def doctor() -> dict[str, dict[str, Any]]:
        out = subprocess.run([str(BIN / "mp-bridge"), "doctor", "--json"], capture_output=True, text=True, timeout=120)
        return {c["name"]: c for c in json.loads(out.stdout)["checks"]}

    bypass = subprocess.Popen([sys.executable, "-c", hold, str(db)], stdout=subprocess.PIPE, text=True)
    granted = start("--", sys.executable, "-c", hold, str(db))
    try:
        assert bypass.stdout is not None and bypass.stdout.readline() == "open\n"
        assert granted.stdout is not None and granted.stdout.readline() == "open\n"
        cmd = cmd_record(home, granted.pid)["pid"]
        checks = doctor()
        check = checks["stray writers"]
        assert check["status"] == "fail", check
        assert f"pid {bypass.pid}" in check["detail"] and f"pid {cmd} " not in check["detail"], check
        assert "mp-bridge run --" in check["fix"]
        found = checks["owner"]
        assert found["status"] == "ok" and f"pid {cmd}" in found["detail"] and "grant" in found["detail"], found
    finally:
        bypass.kill()
        bypass.wait()
        granted.send_signal(signal.SIGTERM)
        granted.wait(10)
    stale = owner.new_record("broker", pid=bypass.pid)  # a gone writer's record
    state.write_json_atomic(paths_of(home).owner, stale)
    found = doctor()["owner"]
    assert found["status"] == "warn" and "stale owner.json" in found["detail"], found
