"""mempalace's writer lease held by the broker (broker/lease.py): the same file as mempalace's own lock, and no gap.

- The lease file is the one mempalace's `mine_palace_lock` uses (3.11 in this venv, 3.4.0 in its own) for every
  spelling of a palace, and a lease the broker holds refuses mempalace's own lock, naming the broker.
- With the real engine, the real hub and mp-shim: the broker's 3.11 engine holds the lease from its start, so
  `mempalace serve` refuses to start on the palace, and still refuses while that engine is killed and restarted;
  a 3.4.0 engine (no lease of its own) gets it lent for each write, and a hub is refused between writes; a plain
  `mempalace-mcp` that took the lease first is named by status and doctor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge_broker import lease
from tests.conftest import BIN, ENGINES
from tests.helpers import wait_for
from tests.sshd import free_port
from tests.test_hub import Shim, add, broker_status, doctor_json, found, named, old_engine

palace_lock = pytest.importorskip("mempalace.palace")  # mine_palace_lock, MineAlreadyRunning


def upstream_lock_file(home: Path, palace_path: str, python: str = sys.executable) -> Path:
    """The file mempalace's own `mine_palace_lock` creates for `palace_path` under `home` (3.11 or 3.4.0)."""
    code = (
        "import os, sys\n"
        "from mempalace.palace import mine_palace_lock\n"
        "with mine_palace_lock(sys.argv[1]):\n"
        "    d = os.path.join(os.path.expanduser('~'), '.mempalace', 'locks')\n"
        "    print(os.path.join(d, os.listdir(d)[0]))\n"
    )
    out = subprocess.run([python, "-c", code, palace_path], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=str(home)), check=True)
    return Path(out.stdout.strip())


@pytest.mark.parametrize("engine", ["pinned", "3.4.0"])
def test_the_lease_file_is_mempalaces_own_for_every_spelling(engine: str, tmp_path: Path) -> None:
    python = str(ENGINES[engine].parent / "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"mempalace {engine} is not installed: run scripts/setup-engine.sh {engine}")
    real = tmp_path / "palaces" / "p"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "palaces")
    spellings = [str(real), str(real) + "/", str(tmp_path / "link" / "p"), str(real / ".." / "p")]
    for i, spelling in enumerate(spellings):
        home = tmp_path / f"h{engine}{i}"
        home.mkdir()
        assert upstream_lock_file(home, spelling, python) == lease.lock_path(spelling, str(home)), spelling
        assert lease.lock_path(spelling, str(home)) == lease.lock_path(str(real), str(home))


def hold_elsewhere(home: Path) -> subprocess.Popen[str]:
    """Another process holding the palace's lease through mempalace's own `mine_palace_lock` (returns once held)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mempalace.palace import mine_palace_lock\n"
         "with mine_palace_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(home / "palace")], stdout=subprocess.PIPE, text=True, env=dict(os.environ, HOME=str(home)))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lease_refuses_mempalaces_lock_and_names_the_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    held = lease.Lease(str(tmp_path / "palace"))
    assert held.take() and held.take() and held.held
    with pytest.raises(palace_lock.MineAlreadyRunning, match=f"PID {os.getpid()} \\(mempalace-broker"):
        with palace_lock.mine_palace_lock(str(tmp_path / "palace")):
            pass
    held.release()
    with palace_lock.mine_palace_lock(str(tmp_path / "palace")):  # let go: mempalace takes it
        other = lease.Lease(str(tmp_path / "palace"))
        assert not other.take()
    held.release()  # idempotent


def test_lent_for_each_write_and_taken_back_after_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    held = lease.Lease(str(tmp_path / "palace"))
    assert held.take()
    held.lend()
    held.lend()
    with palace_lock.mine_palace_lock(str(tmp_path / "palace")):  # what 3.4.0 does around each write
        pass
    assert held.give_back() and not held.held  # one write still in flight: still lent
    assert held.give_back() and held.held
    held.lend()
    holder = hold_elsewhere(tmp_path)  # another process takes it while lent: giving back fails and names it
    try:
        assert not held.give_back() and not held.held
        assert held.holder().startswith(f"PID {holder.pid} (")
    finally:
        holder.kill()
        holder.wait()
    assert held.holder() == ""  # its holder is gone


def test_waiting_holds_the_lease_the_moment_its_holder_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    holder = hold_elsewhere(tmp_path)
    held = lease.Lease(str(tmp_path / "palace"))
    taken: list[float] = []
    try:
        held.wait(lambda: taken.append(time.monotonic()))
        time.sleep(0.2)
        assert not taken and not held.held
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        holder.wait()
        wait_for(lambda: bool(taken), 5, what="the waiting thread to take the lease")
        assert held.held and taken[0] - killed < 1.0
        with pytest.raises(palace_lock.MineAlreadyRunning):
            with palace_lock.mine_palace_lock(str(tmp_path / "palace")):
                pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        held.release()


@pytest.mark.parametrize(
    ("engine", "level", "says"),
    [
        ({"lease": {"state": "engine", "path": "/l"}}, "ok", "held by the broker's engine"),
        ({"lease": {"state": "broker", "path": "/l"}}, "ok", "no engine of its runs now"),
        ({"lease": {"state": "lent", "path": "/l"}}, "ok", "lent to its engine for each"),
        ({"lease": {"state": "other", "path": "/l", "holder": "PID 5 (mempalace-mcp)"}}, "warn", "PID 5"),
        ({"lease": {"state": "other", "path": "/l"}, "hub": {"pid": 3}}, "ok", "held by upstream's hub"),
    ],
)
def test_doctor_says_who_holds_the_lease(engine: dict[str, Any], level: str, says: str) -> None:
    from mp_ssh_bridge.doctorkit import Check, lease_check

    checks: list[Check] = []
    lease_check(engine, checks)
    assert [c.level for c in checks] == [level] and says in checks[0].detail, checks
    if level == "ok" and "hub" not in engine:
        assert "mp-bridge stop" in checks[0].detail  # how to switch the palace to hub mode
    checks.clear()
    lease_check({}, checks)  # a broker without a lease (the container daemon, an older bridge): nothing said
    assert checks == []


def test_a_released_lease_is_not_kept_by_a_waiting_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread still waiting when the broker lets the lease go (a hand-over) lets go of what it gets, and `settle`
    waits for that: the next owner's own non-blocking lock (a grant's `mempalace mine`) then finds it free."""
    monkeypatch.setenv("HOME", str(tmp_path))
    holder = hold_elsewhere(tmp_path)
    held = lease.Lease(str(tmp_path / "palace"))
    taken: list[bool] = []
    try:
        held.wait(lambda: taken.append(True))
        held.release()  # the hand-over: no longer wanted
        holder.kill()
        holder.wait()
        held.settle(5)
        with palace_lock.mine_palace_lock(str(tmp_path / "palace")):
            assert not held.held and not taken
        assert held.take()  # and the broker can take it again afterwards
        held.wait(lambda: taken.append(True))  # already held: no thread, nothing to tell
        assert not taken
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        held.release()


# --------------------------------------------------------------------------- with the real engine and hub
@pytest.fixture
def palace(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = home / "palace"
    monkeypatch.setenv("MEMPALACE_PALACE_PATH", str(p))  # broker, hub and plain engine: one palace
    return p


WAIT_ENV = "MEMPALACE_MCP_WRITER_WAIT_SECONDS"  # how long `mempalace serve` waits for the lease (3.11: 120 s)


def serve(palace_path: Path, home: Path, wait_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "mempalace"), "serve", "--palace", str(palace_path), "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=dict(os.environ, HOME=str(home), **{WAIT_ENV: str(wait_s)}),
    )


def refused(hub_proc: subprocess.Popen[str], bound: float) -> str:
    """Assert that this `mempalace serve` refused to start (it exits 2 once its wait for the lease runs out)."""
    try:
        said, _ = hub_proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        hub_proc.kill()
        said, _ = hub_proc.communicate()
        raise AssertionError(f"the hub started beside the broker: {said[-800:]}") from None
    assert hub_proc.returncode == 2 and "startup refused" in said, said[-800:]
    return said


def serve_refused(palace_path: Path, home: Path) -> str:
    """`mempalace serve` on the palace, told not to wait for the lease: it refuses at once, naming the holder."""
    return refused(serve(palace_path, home, 0), 90)


def lease_of(home: Path) -> dict[str, Any]:
    return dict(broker_status(home)["engine"].get("lease") or {})


def test_no_hub_starts_while_the_broker_owns_the_palace_even_during_a_restart(home: Path, palace: Path) -> None:
    shim = Shim()
    try:
        assert "result" in shim.start()
        status = broker_status(home)
        engine_pid = status["engine"]["pid"]
        held = lease_of(home)
        assert held["state"] == "engine" and held["holder"].startswith(f"PID {engine_pid} ("), held
        assert f"held by PID {engine_pid}" in serve_refused(palace, home)
        add(shim, "written by the broker's engine, which holds the lease")
        # A hub that waits for the lease (retrying 0.5, 1, 2, 4, 5 ... s after it starts), then kill -9 of the
        # engine: the broker holds the lease from the engine's death until its next engine has it.
        waiting = serve(palace, home, 12)
        time.sleep(3)
        os.kill(engine_pid, signal.SIGKILL)
        wait_for(lambda: broker_status(home)["engine"].get("pid") not in (None, engine_pid)
                 and lease_of(home).get("state") == "engine", 60, what="the restarted engine to hold the lease")
        refused(waiting, 60)
        assert broker_status(home)["engine"]["restarts"] == 1
        add(shim, "written by the restarted engine")
        assert found(shim, "written by the restarted engine")
    finally:
        shim.close()


def test_a_3_4_0_engine_gets_the_lease_lent_for_each_write(home: Path, palace: Path) -> None:
    shim = Shim(env={"MP_BRIDGE_ENGINE": str(old_engine())})
    try:
        assert "result" in shim.start()
        assert lease_of(home)["state"] == "lent"
        for i in range(5):  # each write takes mempalace's lock itself: lent, then taken back
            add(shim, f"a 3.4.0 drawer number {i}")
        held = lease_of(home)
        assert held["state"] == "lent" and held["holder"] == "", held  # the broker holds it between writes
        assert "mempalace-broker" in serve_refused(palace, home)
        assert found(shim, "a 3.4.0 drawer number 4")
    finally:
        shim.close()


def test_a_plain_engine_that_took_the_lease_is_named_by_status_and_doctor(home: Path, palace: Path) -> None:
    # a plain mempalace-mcp (not through the bridge) on the same palace, run as an agent would
    plain = Shim(command=ENGINES["pinned"], env={"MEMPALACE_HUB_FORWARD": "0"})
    try:
        assert "result" in plain.start()
        add(plain, "written by a plain engine")  # it writes first: it holds mempalace's lease for its life
        shim = Shim()
        try:
            assert "result" in shim.start()
            held = lease_of(home)
            assert held["state"] == "other" and held["holder"].startswith(f"PID {plain.proc.pid} ("), held
            reply = shim.tool("mempalace_add_drawer", wing="w", room="r", content="refused while it holds the lease")
            assert "Peer MCP writer active" in json.dumps(reply), reply
            check = named(doctor_json(), "writer lease")
            assert check["status"] == "warn" and f"PID {plain.proc.pid}" in json.dumps(check), check
        finally:
            shim.close()
        plain.close()  # it lets go: the broker's engine takes the lease at its next write
        shim = Shim()
        try:
            assert "result" in shim.start()
            add(shim, "written once the plain engine had gone")
        finally:
            shim.close()
    finally:
        plain.close()
