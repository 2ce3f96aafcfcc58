"""Never two writers across a VM boundary or a sleep (issue 15): the liveness rule, the writers' beat,
pid namespaces, and a durable palace.id.

The rule (docs/PROTOCOL.md, "Who owns the palace"): a record from another machine whose heartbeat
moves is a live owner; it is dead only when its heartbeat has stood still between two readings taken
on the reader's own monotonic clock more than the stale limit apart (and a confirming reading).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import hostinfo, liveness, state
from tests import platforms
from tests.sshd import SSHServer, write_broker_wrapper

FOREIGN = liveness.Machine("the-mac", "mac-boot", None)
HERE = liveness.Machine("linux-vm", "vm-boot", "4026531836")
BIN = Path(sys.executable).parent
GONE_PID = 4194000  # above any pid this test machine hands out (pid_max is 4194304 at most)


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Beating:
    """Keep rewriting a record with a moving heartbeat (another machine's writer), until stopped."""

    def __init__(self, path: Path, record: dict[str, Any], every: float = 0.1, offset: float = 0.0) -> None:
        self.path, self.record, self.every, self.offset = path, dict(record), every, offset
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.record["heartbeat"] = time.time() + self.offset
        state.write_json_atomic(self.path, self.record)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._beat()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        return dict(self.record)


def _seen(tmp_path: Path, me: liveness.Machine = HERE) -> liveness.Seen:
    return liveness.Seen(tmp_path / "state", directory=tmp_path / "seen", me=me)


def _record(**extra: Any) -> dict[str, Any]:
    return {"pid": GONE_PID, "host": FOREIGN.host, "boot_id": FOREIGN.boot_id, "heartbeat": 1000.0,
            "endpoint": "unix:///nowhere.sock", **extra}


# --- the rule, by its inputs ------------------------------------------------------------------
def test_pid_namespace_parsed_from_proc_link() -> None:
    assert hostinfo.parse_linux_pid_namespace("pid:[4026531836]") == "4026531836"
    assert hostinfo.parse_linux_pid_namespace("pid:[4026531836]\n") == "4026531836"
    for bad in (None, "", "net:[4026531840]", "pid:[]", "pid:[abc]", "4026531836"):
        assert hostinfo.parse_linux_pid_namespace(bad) is None, bad
    assert hostinfo.pid_namespace("darwin") is None, "macOS has no pid namespaces"
    assert hostinfo.pid_namespace("linux") == hostinfo.parse_linux_pid_namespace(platforms.pid_namespace_link())


def test_same_machine_needs_host_boot_and_pid_namespace() -> None:
    rec = {"host": HERE.host, "boot_id": HERE.boot_id, "pid_ns": HERE.pid_ns}
    assert liveness.same_machine(rec, HERE)
    # A container on a native Linux host: same boot id, maybe the same host name, another pid namespace.
    assert not liveness.same_machine(dict(rec, pid_ns="4026532999"), HERE)
    assert not liveness.same_machine(dict(rec, host="elsewhere"), HERE)
    assert not liveness.same_machine(dict(rec, boot_id="another-boot"), HERE)
    assert liveness.same_machine({"host": HERE.host, "boot_id": HERE.boot_id}, HERE), "an older record: host + boot"
    mac = liveness.Machine("the-mac", "mac-boot", None)  # macOS: no pid namespace on either side
    assert liveness.same_machine({"host": "the-mac", "boot_id": "mac-boot", "pid_ns": None}, mac)
    assert not liveness.same_machine(rec, liveness.Machine(HERE.host, None, HERE.pid_ns)), "unknown boot: never"


def test_a_foreign_heartbeat_is_judged_by_whether_it_moves_never_by_its_value(tmp_path: Path) -> None:
    clock, seen = FakeClock(), _seen(tmp_path)
    judge = lambda rec: liveness.judge(rec, 30, seen=seen, kind="broker", clock=clock)  # noqa: E731
    ancient = _record(heartbeat=time.time() - 86400)  # a day behind our clock: the old rule said "dead" at once
    v = judge(ancient)
    assert v.alive and v.foreign and "first reading" in v.why
    clock.now += 29.9
    assert judge(ancient).alive, "standing still, but not yet for the stale limit by OUR clock"
    moved = dict(ancient, heartbeat=ancient["heartbeat"] + 5)
    clock.now += 100
    v = judge(moved)
    assert v.alive and "moved" in v.why, "a new value restarts the count"
    clock.now += 29
    assert judge(moved).alive
    clock.now += 1.5
    v = judge(moved)
    assert not v.alive and v.foreign and "stood still for 30 s" in v.why
    future = _record(heartbeat=time.time() + 86400)  # a clock far ahead: alive only while it moves, like any other
    clock.now += 1
    assert judge(future).alive


def test_same_machine_records_are_judged_by_their_pid(tmp_path: Path) -> None:
    seen = _seen(tmp_path)
    mine = {"pid": 42, "host": HERE.host, "boot_id": HERE.boot_id, "pid_ns": HERE.pid_ns, "heartbeat": 1.0}
    assert liveness.judge(mine, 30, seen=seen, kind="broker", pid_alive=lambda p: True).alive
    v = liveness.judge(mine, 30, seen=seen, kind="broker", pid_alive=lambda p: False)
    assert not v.alive and not v.foreign
    # The same pid in another pid namespace means nothing here: heartbeat rule, and one reading says alive.
    other_ns = dict(mine, pid_ns="4026532999")
    v = liveness.judge(other_ns, 30, seen=seen, kind="broker", pid_alive=lambda p: False)
    assert v.alive and v.foreign
    # A record that names no host at all (every bridge writes one): this machine's, by its pid, as always.
    assert not liveness.judge({"pid": 42, "heartbeat": 0}, 30, seen=seen, kind="broker", pid_alive=lambda p: False).alive


def test_readings_outlive_the_reader_but_not_its_boot(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = _record()
    assert liveness.judge(rec, 30, seen=_seen(tmp_path), kind="broker", clock=clock).alive
    clock.now += 31
    later = _seen(tmp_path)  # another process of this machine: it finds the first reading
    assert not liveness.judge(rec, 30, seen=later, kind="broker", clock=clock).alive
    rebooted = _seen(tmp_path, HERE._replace(boot_id="next-boot"))  # its monotonic clock restarted
    assert liveness.judge(rec, 30, seen=rebooted, kind="broker", clock=clock).alive
    assert oct((tmp_path / "seen").stat().st_mode & 0o777) == "0o700"
    planted = tmp_path / "planted"  # a directory others can write to: a reading planted there never counts
    planted.mkdir()
    planted.chmod(0o777)
    spoof = liveness.Seen(tmp_path / "other-state", directory=planted, me=HERE)
    (planted / f"seen-{spoof.key}-broker.json").write_text(
        json.dumps({"sig": liveness.signature(rec), "first": 0.0, "dead": True, "reader": list(HERE)}))
    assert liveness.judge(rec, 30, seen=spoof, kind="broker", clock=clock).alive


def test_a_dead_verdict_is_confirmed_by_one_more_reading(tmp_path: Path) -> None:
    paths = state.StatePaths(tmp_path / "state")
    state.ensure_private_dir(paths.root)
    rec = _record()
    state.write_json_atomic(paths.json, rec)
    clock, seen = FakeClock(), _seen(tmp_path)
    rules: dict[str, Any] = {"seen": seen, "clock": clock}
    assert liveness.live_foreign_owner(paths, 30, **rules) is not None
    clock.now += 3600  # a reader whose clock ran while the writer's machine slept: the writer beats on waking

    def wake(seconds: float) -> None:
        assert seconds == 2.0  # CONFIRM_S: above a writer's one-second tick
        state.write_json_atomic(paths.json, dict(rec, heartbeat=rec["heartbeat"] + 3600))

    owner = liveness.live_foreign_owner(paths, 30, sleep=wake, **rules)
    assert owner is not None and "moved" in owner[1].why
    clock.now += 31
    naps: list[float] = []
    assert liveness.live_foreign_owner(paths, 30, sleep=naps.append, **rules) is None  # really gone
    assert liveness.live_foreign_owner(paths, 30, sleep=naps.append, **rules) is None
    assert naps == [2.0], "confirmed once; every later reader of this machine agrees at once"


# --- the writers' beat ------------------------------------------------------------------------
def test_beat_schedule_follows_the_wall_clock_through_a_sleep() -> None:
    wall, mono = FakeClock(1_000_000.0), FakeClock(50.0)
    beats = liveness.BeatSchedule(5.0, wall=wall, mono=mono)
    assert beats.tick == 1.0 and not beats.due()
    mono.now += 5
    wall.now += 5
    assert beats.due()
    beats.beaten()
    wall.now += 3600  # macOS slept an hour: the wall clock moved on, time.monotonic() did not
    assert beats.due()
    beats.beaten()
    assert not beats.due()
    wall.now -= 120  # the clock was stepped back (NTP after a wake)
    assert beats.due()


def test_broker_heartbeat_after_a_sleep_is_written_at_once_and_never_read_as_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mp_ssh_bridge.settings import load_broker
    from mp_ssh_bridge_broker.lifecycle import BrokerProcess

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MP_BRIDGE_CONFIG", str(tmp_path / "none.toml"))
    sd = tmp_path / "state"
    settings = load_broker(mempalace_path=str(sd), heartbeat_interval=5, idle_exit_minutes=0)
    proc = BrokerProcess(settings)
    state.ensure_private_dir(sd)
    wall, mono = FakeClock(1_000_000.0), FakeClock(50.0)
    proc.beats = liveness.BeatSchedule(5.0, tick=0.01, wall=wall, mono=mono)
    beats: list[float] = []

    def write_record() -> None:  # what _write_record does, on the fake wall clock
        beats.append(wall())
        state.write_json_atomic(settings.paths.json, {"pid": GONE_PID, "host": FOREIGN.host, "boot_id": FOREIGN.boot_id,
                                                      "heartbeat": wall()})

    monkeypatch.setattr(proc, "_write_record", write_record)
    write_record()
    reader_clock = FakeClock(7.0)
    reader: dict[str, Any] = {"seen": _seen(tmp_path), "clock": reader_clock}
    assert liveness.live_foreign_owner(settings.paths, 30, **reader) is not None

    async def main() -> None:
        loop_task = asyncio.create_task(proc._heartbeat_loop())
        await asyncio.sleep(0.1)
        assert beats == [1_000_000.0], "neither clock moved: no beat"
        wall.now += 3600  # the Mac slept for an hour; its monotonic clock stood still
        reader_clock.now += 3600  # worst case: the reader's clock counted the whole sleep
        # A reader that looks right after the wake: at worst its confirming reading sees the new beat.
        owner = await asyncio.to_thread(liveness.live_foreign_owner, settings.paths, 30, confirm=1.0, **reader)
        assert owner is not None, "the owner was declared dead across a sleep"
        assert beats[1:] == [1_003_600.0], "exactly one beat, written within a tick of waking"
        loop_task.cancel()

    asyncio.run(main())


# --- small things ---------------------------------------------------------------------------------
def test_boot_id_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(hostinfo, "_BOOT_IDS", {})
    monkeypatch.setattr(hostinfo, "_read_boot_id", lambda plat: calls.append(plat) or "B-1")
    assert [hostinfo.boot_id("darwin") for _ in range(5)] == ["B-1"] * 5
    assert calls == ["darwin"], "macOS pays one sysctl per process, not one per liveness check"


def test_durable_sync_uses_full_fsync_on_macos(tmp_path: Path) -> None:
    class FakeFcntl:
        F_FULLFSYNC = 51

        def __init__(self, fails: bool = False) -> None:
            self.calls: list[tuple[int, int]] = []
            self.fails = fails

        def fcntl(self, fd: int, op: int) -> int:
            self.calls.append((fd, op))
            if self.fails:
                raise OSError(errno.ENOTSUP, "not supported")
            return 0

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        full = FakeFcntl()
        assert hostinfo.sync_fd(fd, "darwin", full) == "F_FULLFSYNC" and full.calls == [(fd, 51)]
        refusing = FakeFcntl(fails=True)
        assert hostinfo.sync_fd(fd, "darwin", refusing) == "fsync" and refusing.calls, "a mount without it: fsync"
        assert hostinfo.sync_fd(fd, "darwin", object()) == "fsync", "a Python without F_FULLFSYNC"
        linux = FakeFcntl()
        assert hostinfo.sync_fd(fd, "linux", linux) == "fsync" and linux.calls == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["", "\n", "\x00" * 37, "3f2a9c"])
def test_damaged_palace_id_is_repaired_only_under_the_lock(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths = state.StatePaths(tmp_path)
    paths.palace_id_file.write_text(damage)
    assert state.read_palace_id(paths) is None
    with pytest.raises(state.PalaceIdDamaged, match="holds no palace id"):
        state.palace_id(paths)  # not holding broker.lock: never replaced
    assert paths.palace_id_file.read_text() == damage
    with caplog.at_level(logging.WARNING, logger="mp_ssh_bridge.state"):
        new = state.palace_id(paths, repair=True)
    assert state.parse_palace_id(new) == new == state.read_palace_id(paths) == state.palace_id(paths)
    assert any("held no palace id" in r.getMessage() and new in r.getMessage() for r in caplog.records)
    assert oct(paths.palace_id_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["palace.id"], "no temporary file left behind"


def test_palace_id_appears_complete_or_not_at_all(tmp_path: Path) -> None:
    paths = state.StatePaths(tmp_path)
    ids = set()
    threads = [threading.Thread(target=lambda: ids.add(state.palace_id(paths))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 1 and ids == {state.read_palace_id(paths)}, "one id, whoever raced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["palace.id"]


# --- the reproduction (Linux), end to end -------------------------------------------------------------
def _dead_socket(path: Path) -> int:
    """A socket file nobody serves (what a broker on the other side of a VM boundary looks like from here)."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path.stat().st_ino


def _ensure(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mempalace-broker"), "--ensure", *args], capture_output=True, text=True,
                          timeout=120)


def _foreign_broker_json(sd: Path, **extra: Any) -> dict[str, Any]:
    sd.mkdir(mode=0o700, exist_ok=True)
    sock = sd / "broker.sock"
    return {"version": 1, "pid": GONE_PID, "host": "the-mac", "boot_id": "mac-boot", "pid_ns": None,
            "endpoint": f"unix://{sock}", "endpoints": {"unix": f"unix://{sock}"}, "palace_id": "x",
            "state_dir": str(sd), "started_at": 1.0, **extra}


def test_ensure_refuses_beside_a_live_broker_on_another_machine(home: Path) -> None:
    sd = home / ".mempalace"
    record = _foreign_broker_json(sd)
    ino = _dead_socket(sd / "broker.sock")
    # Its heartbeat runs two hours behind our clock (a VM after a sleep), but it moves.
    writer = Beating(sd / "broker.json", record, offset=-7200)
    try:
        t0 = time.monotonic()
        out = _ensure()
        took = time.monotonic() - t0
        assert out.returncode == 1, out
        assert "live broker on another machine" in out.stderr and "host the-mac" in out.stderr, out.stderr
        assert f"pid {GONE_PID}" in out.stderr and str(sd / "broker.sock") in out.stderr
        fg = subprocess.run([str(BIN / "mempalace-broker")], capture_output=True, text=True, timeout=120)
        assert fg.returncode == 3 and "second writer" in fg.stderr, fg.stderr
        last = writer.stop()
        assert state.read_broker_json(sd / "broker.json") == last, "the record is untouched"
        assert (sd / "broker.sock").stat().st_ino == ino, "its socket was not removed"
        assert took < 10, f"refused at once, not after a wait ({took:.1f} s)"
    finally:
        writer.stop()
        (sd / "broker.json").unlink(missing_ok=True)


def test_a_foreign_broker_whose_heartbeat_stops_is_reclaimed_after_the_stale_limit(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MP_BRIDGE_HEARTBEAT_STALE_AFTER", "1.5")
    sd = home / ".mempalace"
    record = _foreign_broker_json(sd)
    _dead_socket(sd / "broker.sock")
    writer = Beating(sd / "broker.json", record)
    try:
        assert _ensure().returncode == 1  # moving: a live owner
        writer.stop()  # that machine is gone: its heartbeat stands still from now on
        first = _ensure()
        assert first.returncode == 1 and ("stood still" in first.stderr or "moved" in first.stderr), first.stderr
        time.sleep(1.6)  # the stale limit, on this machine's clock
        out = _ensure()
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["started"] is True and info["pid"] != GONE_PID
        mine = state.read_broker_json(sd / "broker.json")
        assert mine is not None and mine["pid"] == info["pid"] and liveness.same_machine(mine)
        assert mine["pid_ns"] == hostinfo.pid_namespace()
    finally:
        writer.stop()


# --- a host-role session facing a live broker on another machine -------------------------------------
def _session_side(home: Path) -> Path:
    """The session's state directory (what the mount shows): the host's palace.id and a foreign live broker.json."""
    host_state = home / ".mempalace"
    state.ensure_private_dir(host_state)
    pid = state.palace_id(state.StatePaths(host_state))
    mine = home.parent / "vm" / ".mempalace"
    mine.mkdir(parents=True, mode=0o700)
    (mine / "palace.id").write_text(pid + "\n")
    _dead_socket(mine / "broker.sock")
    return mine


def test_host_session_takes_the_ssh_path_to_a_live_foreign_broker(
    home: Path, sshd: SSHServer, broker_factory: Any, tmp_path: Path
) -> None:
    from tests.test_shim_support import ShimProc

    broker = broker_factory(wait_engine=False)  # the broker on the other side (here: reached only over SSH)
    mine = _session_side(home)
    wrapper = write_broker_wrapper(home.parent / "remote-broker.sh", home, home / ".mempalace")
    record = dict(_foreign_broker_json(mine), palace_id=broker.record["palace_id"])
    writer = Beating(mine / "broker.json", record)
    env = sshd.container_env(mine, wrapper, MP_BRIDGE_ROLE="host")  # a host-role process with an SSH path set up
    s = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    try:
        assert s.call("ping", timeout=60)["result"] == {}, s.stderr()
        assert "taking the SSH path" in s.stderr()
        clients = [c for c in s.call("broker/status", timeout=60)["result"]["clients"] if c["transport"] == "ssh"]
        assert clients, "the session reached the other side's broker over SSH"
        assert (mine / "broker.sock").exists() and not (mine / "degraded.json").exists()
    finally:
        s.close()
        writer.stop()
    assert state.read_broker_json(mine / "broker.json")["pid"] == GONE_PID, "its record was left alone"


def test_host_session_without_ssh_waits_then_names_the_live_foreign_broker(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.test_shim_support import ShimProc

    mine = _session_side(home)
    writer = Beating(mine / "broker.json", _foreign_broker_json(mine))
    s = ShimProc(env={"MEMPALACE_PATH": str(mine), "MP_BRIDGE_ENSURE_TIMEOUT": "2"}, stderr_path=tmp_path / "shim.err")
    try:
        t0 = time.monotonic()
        r = s.call("ping", timeout=60)
        took = time.monotonic() - t0
        assert r["error"]["code"] == -32066, r
        msg = r["error"]["message"]
        assert "live broker on another machine" in msg and "host the-mac" in msg and "watched for 2 s" in msg, msg
        assert "will NOT start its own memory engine" in msg
        assert 2 <= took < 20, took
        assert not (mine / "degraded.json").exists() and (mine / "broker.sock").exists()
    finally:
        s.close()
        writer.stop()
    assert state.read_broker_json(mine / "broker.json")["pid"] == GONE_PID


@pytest.mark.parametrize("pid", ["123", 0, -5, True, 1.5, None, [1], {"n": 1}])
def test_a_record_without_a_usable_pid_is_no_record(tmp_path: Path, pid: object) -> None:
    """A broker.json whose pid is not a positive integer proves nothing: not a live broker anywhere."""
    path = tmp_path / "broker.json"
    path.write_text(json.dumps({"pid": pid, "host": "elsewhere", "boot_id": "b", "heartbeat": 9e9}))
    assert state.read_broker_json(path) is None
    path.write_text(json.dumps({"pid": 123, "host": "elsewhere"}))
    assert state.read_broker_json(path) == {"pid": 123, "host": "elsewhere"}
