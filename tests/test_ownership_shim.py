"""The shim as the palace's `local` owner (docs/PROTOCOL.md "Ownership"): degraded mode claims owner.json,
hands the palace over when a broker asks (finishing its running call, losing none sent meanwhile), waits for
a grant instead of refusing, and says each fact of a refusal once.

The session is a host-role shim for which no broker can start (its state directory is writable by its group),
and no SSH path: it runs the SCRIPTED FAKE ENGINE (tests/fake_engine.py) itself. (A container session never
runs an engine of its own: its container's daemon does, tests/test_daemon_local.py.) The test process plays
the other owners with mp_ssh_bridge.owner directly (its own pid: alive, on this machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import discovery, liveness, localowner, owner, protocol, state
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.settings import load
from tests.helpers import children_of, pid_alive, wait_for
from tests.test_shim_support import INIT_PARAMS, ShimProc

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
STALE = 30.0
HANDED = "handed over"
# The broker these tests play runs on the other side of a VM boundary: from there a host-role session cannot reach
# it either, so it waits for it (a broker on its own machine that does not answer is refused at once instead).
OTHER_MACHINE = {"host": "the-other-machine", "boot_id": "b" * 32, "pid_ns": None}


@pytest.fixture
def ctr(home: Path, tmp_path: Path) -> dict[str, Any]:
    """A host-role shim's environment in which no broker can start (a state directory writable by its group:
    the election refuses it), so the session runs its engine itself as the `local` owner, and that directory."""
    sd = home / ".mempalace"
    state.ensure_private_dir(sd)
    os.chmod(sd, 0o770)
    env = {"MP_BRIDGE_ROLE": "host", "MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_CONNECT_TIMEOUT": "2"}
    return {"env": env, "paths": state.StatePaths(sd), "err": tmp_path / "shim.err"}


def _record(path: Path) -> dict[str, Any] | None:
    return state.read_json_object(path)


def _texts(reply: dict[str, Any]) -> list[str]:
    assert "result" in reply, reply
    return [c.get("text", "") for c in reply["result"]["content"]]


def _start(ctr: dict[str, Any], **env: str) -> ShimProc:
    return ShimProc(env={**ctr["env"], **env}, stderr_path=ctr["err"])


def test_degraded_session_owns_the_palace_and_releases_it(ctr: dict[str, Any]) -> None:
    paths: state.StatePaths = ctr["paths"]
    shim = _start(ctr)
    try:
        assert "result" in shim.initialize(timeout=30)
        texts = _texts(shim.tool("fake_sleep", {"seconds": 0}, timeout=30))
        assert any("WITHOUT its broker" in t for t in texts), texts
        rec = _record(paths.owner)
        assert rec is not None and rec["kind"] == "local" and rec["pid"] == shim.proc.pid, rec
        engines = children_of(shim.proc.pid)
        assert len(engines) == 1 and rec["engine_pid"] == engines[0], (rec, engines)
        assert "degraded" in rec["what"]
        beacon = _record(paths.degraded)  # still written: bridges from before owner.json read only that one
        assert beacon is not None and beacon["pid"] == shim.proc.pid and beacon["engine_pid"] == engines[0]
        assert owner.live_holder(paths, STALE) is not None
    finally:
        assert shim.close() == 0
    assert not paths.owner.exists() and not paths.degraded.exists()
    wait_for(lambda: not pid_alive(engines[0]), 10, what="the engine's exit")


def test_hand_over_to_a_broker_request_loses_no_call(ctr: dict[str, Any]) -> None:
    """A broker asks while a slow call runs: that call is answered by the engine, one sent meanwhile waits
    (not executed, not lost) until the session owns the palace again, on a new engine; one notice."""
    paths: state.StatePaths = ctr["paths"]
    shim = _start(ctr)
    request = None
    try:
        shim.initialize(timeout=30)
        shim.tool("fake_sleep", {"seconds": 0}, timeout=30)  # the degraded-mode notice, out of the way
        first_engine = _record(paths.owner)["engine_pid"]  # type: ignore[index]
        slow = shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 1.5}})
        time.sleep(0.3)  # the engine is running it
        request = owner.Request(paths, "broker", **OTHER_MACHINE)
        wait_for(lambda: "wants the palace" in shim.stderr(), 5, what="the session to see the request")
        during = shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}})
        answered = shim.wait_reply(slow, 10)
        assert _texts(answered)[0] == '{"slept": true}', answered  # finished by the engine it started on
        wait_for(lambda: not paths.owner.exists(), 10, what="the release")
        assert not paths.degraded.exists()
        assert not pid_alive(first_engine)
        # The requester takes the palace (its request no longer counts against it) and holds it a moment.
        held = owner.claim(paths, "broker", STALE, request_token=request.token, fields=OTHER_MACHINE)
        request.withdraw()
        request = None
        time.sleep(0.6)
        assert all(m.get("id") != during for m in shim.inbox), shim.inbox  # it waits: never beside the holder
        assert owner.live_holder(paths, STALE)["token"] == held.token  # type: ignore[index]
        held.release()
        reply = shim.wait_reply(during, 20)
        texts = _texts(reply)
        assert texts[0] == '{"slept": true}', reply
        notes = [t for t in texts if HANDED in t]
        assert len(notes) == 1 and "the broker (pid" in notes[0] and "runs its own memory engine again" in notes[0]
        assert "waited" in notes[0] and notes[0].count("pid") == 1 and "\n" not in notes[0], notes  # once, one line
        rec = _record(paths.owner)
        assert rec is not None and rec["kind"] == "local" and rec["engine_pid"] != first_engine
        again = _texts(shim.tool("fake_sleep", {"seconds": 0}, timeout=10))
        assert not any(HANDED in t or "WITHOUT its broker" in t for t in again), again
    finally:
        if request is not None:
            request.withdraw()
        shim.close()
    assert not paths.owner.exists()


def test_waits_for_a_grant_then_gets_memory(ctr: dict[str, Any]) -> None:
    paths: state.StatePaths = ctr["paths"]
    grant = owner.claim(paths, "grant", STALE, fields={"what": "mempalace mine"})  # CMD = this test process
    shim = _start(ctr)
    try:
        init = shim.request("initialize", INIT_PARAMS)
        wait_for(lambda: "waiting for it to release the palace" in shim.stderr(), 10, what="the wait")
        assert children_of(shim.proc.pid) == [] and all(m.get("id") != init for m in shim.inbox)
        assert owner.live_holder(paths, STALE)["token"] == grant.token  # type: ignore[index]
        grant.release()
        assert "result" in shim.wait_reply(init, 15)
        assert _texts(shim.tool("fake_sleep", {"seconds": 0}, timeout=10))[0] == '{"slept": true}'
        assert _record(paths.owner)["kind"] == "local"  # type: ignore[index]
        assert not any(p.name.startswith("local-") for p in paths.owner_requests.glob("*.json"))  # withdrawn
    finally:
        grant.release()
        shim.close()


def test_a_grant_that_outlasts_owner_wait_is_named(ctr: dict[str, Any]) -> None:
    paths: state.StatePaths = ctr["paths"]
    grant = owner.claim(paths, "grant", STALE, fields={"what": "mempalace mine"})
    shim = _start(ctr, MP_BRIDGE_OWNER_WAIT="1")
    try:
        reply = shim.call("initialize", INIT_PARAMS, timeout=15)
        err = reply["error"]
        assert err["code"] == protocol.BROKER_UNREACHABLE, reply
        msg = err["message"]
        assert f"`mempalace mine` under `mp-bridge run` (pid {os.getpid()}" in msg, msg
        assert "holds the palace" in msg and "waited 1 s" in msg and "MP_BRIDGE_OWNER_WAIT=1" in msg, msg
        assert "its command exits" in msg, msg
        assert children_of(shim.proc.pid) == []
        assert owner.live_holder(paths, STALE)["token"] == grant.token  # type: ignore[index]
    finally:
        grant.release()
        shim.close()


def test_a_request_deadline_during_the_wait_names_the_holder(ctr: dict[str, Any]) -> None:
    """The session's own backstop (timeout + 2 s) fires while discovery still waits: it says for whom."""
    paths: state.StatePaths = ctr["paths"]
    grant = owner.claim(paths, "grant", STALE, fields={"what": "mempalace mine"})
    shim = _start(ctr, MP_BRIDGE_OWNER_WAIT="8", MEMPALACE_MCP_TIMEOUT_MS="500")
    try:
        reply = shim.call("initialize", INIT_PARAMS, timeout=10)
        msg = reply["error"]["message"]
        assert reply["error"]["code"] == protocol.DEADLINE_EXCEEDED and "NOT sent" in msg, reply
        assert "`mempalace mine` under `mp-bridge run`" in msg and "holds the palace" in msg, msg
        grant.release()
        assert "result" in shim.call("initialize", INIT_PARAMS, timeout=15)  # then it gets memory
    finally:
        grant.release()
        shim.close()


def test_another_sessions_engine_is_refused_at_once(ctr: dict[str, Any]) -> None:
    """A `local` owner never yields to another local one: no waiting, a refusal naming it."""
    paths: state.StatePaths = ctr["paths"]
    other = owner.claim(paths, "local", STALE, fields={"what": "mp-shim (degraded mode)"})
    shim = _start(ctr)
    try:
        start = time.monotonic()
        reply = shim.call("initialize", INIT_PARAMS, timeout=15)
        assert time.monotonic() - start < 8
        msg = reply["error"]["message"]
        assert f"a session running its own engine (pid {os.getpid()}" in msg and "will NOT" in msg, msg
        assert children_of(shim.proc.pid) == []
    finally:
        other.release()
        shim.close()


# --------------------------------------------------------------------------- each fact once
def _sentences(text: str) -> list[str]:
    parts = [text]
    for sep in ("; ", ". ", ", so "):
        parts = [p.strip() for part in parts for p in part.split(sep) if p.strip()]
    return parts


def _refusal(settings: Any, reason: str, role: str) -> str:
    with pytest.raises(ShimError) as info:
        discovery.degraded_or_refuse(settings.session_config(), settings, reason, role)
    assert info.value.code == protocol.BROKER_UNREACHABLE
    msg = str(info.value)
    parts = _sentences(msg)
    assert len(parts) == len(set(parts)), msg
    assert msg.count("second writer") == 1 and msg.count("will NOT") == 1, msg
    return msg


def test_refusals_say_each_fact_once(home: Path) -> None:
    sd = home / ".mempalace"
    state.ensure_private_dir(sd)
    settings = load(heartbeat_stale_after=STALE)
    paths = settings.paths
    # A broker that does not answer, on this machine; the election already said so.
    record = {"pid": os.getpid(), **liveness.writer_identity(), "heartbeat": time.time(), "endpoint": "unix:///nowhere"}
    state.write_json_atomic(paths.json, record)
    try:
        ensure = (f"no broker could be started: no healthy broker for {sd} after 3s (broker.json names pid "
                  f"{os.getpid()} at unix:///nowhere, which does not answer)")
        msg = _refusal(settings, ensure, "host")
        assert msg.count(f"pid {os.getpid()}") == 1, msg
        msg = _refusal(settings, "cannot reach the host broker over SSH: refused", "container")
        assert f"broker.json names broker pid {os.getpid()}" in msg and "mp-bridge status" in msg, msg
    finally:
        paths.json.unlink()
    # Another session runs its own engine (degraded.json); the election named it first.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        other = {"pid": sleeper.pid, **liveness.writer_identity(), "heartbeat": time.time(), "engine_pid": 1}
        state.write_json_atomic(paths.degraded, other)
        said = liveness.describe_degraded(other, paths)
        msg = _refusal(settings, f"no broker could be started: {said}", "host")
        assert msg.count(f"pid {sleeper.pid}") == 1, msg
        paths.degraded.unlink()
    finally:
        sleeper.kill()
        sleeper.wait()
    # broker.lock held by someone else: said once, with one "so".
    fd, held = discovery.hold_lock(paths)
    assert fd is not None and held is None
    try:
        msg = _refusal(settings, "cannot reach the host broker over SSH: refused", "container")
        assert msg.count(str(paths.lock)) == 1 and msg.count(" so ") <= 1, msg
    finally:
        os.close(fd)
    assert not paths.owner.exists()  # no refusal leaves a claim behind


def test_a_lost_claim_stops_the_engine_at_once(ctr: dict[str, Any]) -> None:
    """owner.json is no longer ours (another side judged this session gone and claimed): the engine is killed at
    the next heartbeat, never beside the new owner; memory comes back once that owner has released."""
    paths: state.StatePaths = ctr["paths"]
    shim = _start(ctr, MP_BRIDGE_HEARTBEAT_INTERVAL="0.3")
    taker = None
    try:
        shim.initialize(timeout=30)
        shim.tool("fake_sleep", {"seconds": 0}, timeout=30)
        engine = _record(paths.owner)["engine_pid"]  # type: ignore[index]
        # Another side judged this session gone, moved its record aside and claimed (written directly: a claim
        # from this machine would see the session's live degraded.json and refuse).
        taker = owner.Claim(paths, owner.new_record("broker", **OTHER_MACHINE))
        state.write_json_atomic(paths.owner, taker.record)
        wait_for(lambda: not pid_alive(engine), 5, what="the engine to be stopped")
        wait_for(lambda: not paths.degraded.exists(), 5, what="degraded.json to go")
        assert owner.live_holder(paths, STALE)["token"] == taker.token  # type: ignore[index]  # never released by us
        call = shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}})
        time.sleep(0.6)
        assert all(m.get("id") != call for m in shim.inbox) and children_of(shim.proc.pid) == []
        taker.release()
        texts = _texts(shim.wait_reply(call, 20))
        notes = [t for t in texts if "taken by" in t]
        assert len(notes) == 1 and "the broker (pid" in notes[0], texts
        assert _record(paths.owner)["engine_pid"] != engine  # type: ignore[index]
    finally:
        if taker is not None:
            taker.release()
        shim.close()


# --------------------------------------------------------------------------- a killed session, a hung call
def test_kill_9_of_a_degraded_session_stops_its_engine(ctr: dict[str, Any]) -> None:
    """The engine dies with its session even in the middle of a call (parent-death signal), and owner.json
    names it with its start time: the palace is claimable as soon as it is gone, never beside it."""
    paths: state.StatePaths = ctr["paths"]
    shim = _start(ctr)
    try:
        shim.initialize(timeout=30)
        shim.tool("fake_sleep", {"seconds": 0}, timeout=30)
        rec = _record(paths.owner)
        assert rec is not None and rec["engine_pid"] == children_of(shim.proc.pid)[0], rec
        engine = rec["engine_pid"]
        assert rec.get("engine_proc_start"), rec
        shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 60}})
        time.sleep(0.5)  # the engine is in that call
        assert pid_alive(engine)
        os.kill(shim.proc.pid, signal.SIGKILL)
        shim.proc.wait(10)
        wait_for(lambda: not pid_alive(engine), 5, what="the orphaned engine to be stopped")
        # The dead session's records no longer hold the palace once its engine is reaped (by init: an orphan's
        # zombie still counts as running for owner.holder, and init may take a moment).
        wait_for(lambda: owner.live_holder(paths, STALE) is None, 10, what="owner.json to be claimable")
        owner.claim(paths, "broker", STALE).release()
    finally:
        shim.close()


def test_the_engine_outlives_the_thread_that_spawned_it() -> None:
    """The death signal follows the forking THREAD: an engine spawned from a short-lived thread (the session's
    `connect` thread) must not be killed when that thread ends."""
    got: list[subprocess.Popen] = []
    t = threading.Thread(target=lambda: got.append(localowner.spawn(["sleep", "30"])))
    t.start()
    t.join()
    proc = got[0]
    try:
        time.sleep(0.5)
        assert proc.poll() is None, f"the engine died with its spawning thread (exit {proc.returncode})"
    finally:
        proc.kill()
        proc.wait()
    assert localowner.pdeathsig_hook("darwin") is None


def test_a_hung_call_without_a_session_deadline_is_bounded_in_a_hand_over(ctr: dict[str, Any]) -> None:
    """MEMPALACE_MCP_TIMEOUT_MS=0 and a call that never ends: a broker's request still gets the palace within the
    bound (stall_timeout, capped by owner_wait); the call is answered outcome unknown, never sent again."""
    paths: state.StatePaths = ctr["paths"]
    shim = _start(ctr, MEMPALACE_MCP_TIMEOUT_MS="0", MP_BRIDGE_STALL_TIMEOUT="2")
    request = None
    try:
        shim.initialize(timeout=30)
        shim.tool("fake_sleep", {"seconds": 0}, timeout=30)
        engine = _record(paths.owner)["engine_pid"]  # type: ignore[index]
        hung = shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 120}})
        time.sleep(0.3)
        request = owner.Request(paths, "broker", **OTHER_MACHINE)
        start = time.monotonic()
        wait_for(lambda: not paths.owner.exists(), 12, what="the hand-over")
        assert time.monotonic() - start < 10
        assert not pid_alive(engine) and not paths.degraded.exists()
        reply = shim.wait_reply(hung, 10)
        err = reply["error"]
        assert err["code"] == protocol.OUTCOME_UNKNOWN and err["data"]["outcome"] == "unknown", reply
        assert "did not finish within 2 s" in shim.stderr()
        held = owner.claim(paths, "broker", STALE, request_token=request.token, fields=OTHER_MACHINE)
        held.release()
    finally:
        if request is not None:
            request.withdraw()
        shim.close()


# --------------------------------------------------------------------------- LocalOwner alone
class _FakeLink:
    def __init__(self) -> None:
        self.lost: list[str] = []
        self.handed: list[dict[str, Any]] = []

    def lose(self, why: str) -> None:
        self.lost.append(why)

    def hand_over(self, request: dict[str, Any]) -> None:
        self.handed.append(request)


class _FakeProc:
    def __init__(self) -> None:
        self.pid = 4242
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def _local(paths: state.StatePaths, interval: float = 5.0) -> localowner.LocalOwner:
    claim = owner.claim(paths, "local", STALE, fields={"what": localowner.WHAT})
    return localowner.LocalOwner(paths, claim, STALE, interval, "/palace")


def test_a_claim_lost_before_the_first_beat_ends_the_link(home: Path) -> None:
    paths = state.StatePaths(home / ".mempalace")
    state.ensure_private_dir(paths.root)
    holder = _local(paths)
    taker = owner.new_record("broker")
    state.write_json_atomic(paths.owner, taker)  # another side took it between the claim and the engine's start
    link = _FakeLink()
    try:
        holder.start(link, os.getpid())  # type: ignore[arg-type]
        assert len(link.lost) == 1 and "taken by the broker" in link.lost[0], link.lost
    finally:
        holder.release()
    assert _record(paths.owner)["token"] == taker["token"]  # type: ignore[index]  # never overwritten


def test_a_busy_owner_lock_is_not_a_lost_claim(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = state.StatePaths(home / ".mempalace")
    state.ensure_private_dir(paths.root)
    holder = _local(paths)

    def skipped(**fields: Any) -> bool:
        raise owner.BeatSkipped("owner.lock busy")

    monkeypatch.setattr(holder.claim, "beat", skipped)
    link = _FakeLink()
    try:
        holder.start(link, os.getpid())  # type: ignore[arg-type]
        assert link.lost == []
    finally:
        holder.release()


def test_an_engine_not_reaped_keeps_both_records_beaten(home: Path) -> None:
    """abandon(): an engine stuck after SIGKILL may still write: owner.json and degraded.json go on beating until
    it is reaped, then the lock callback runs and both are released (degraded.json first)."""
    paths = state.StatePaths(home / ".mempalace")
    state.ensure_private_dir(paths.root)
    holder = _local(paths, interval=0.2)
    link = _FakeLink()
    proc = _FakeProc()
    closed: list[bool] = []
    holder.start(link, os.getpid())  # type: ignore[arg-type]
    try:
        holder.abandon(proc, then=lambda: closed.append(paths.owner.exists()))  # type: ignore[arg-type]
        first = (_record(paths.owner)["heartbeat"], _record(paths.degraded)["heartbeat"])  # type: ignore[index]
        time.sleep(1.0)
        later = (_record(paths.owner)["heartbeat"], _record(paths.degraded)["heartbeat"])  # type: ignore[index]
        assert later[0] > first[0] and later[1] > first[1], (first, later)
        owner.Request(paths, "broker")  # outranks it: no hand-over while the old engine may still write
        time.sleep(0.5)
        assert link.handed == [] and link.lost == [] and closed == []
        proc.code = -9
        wait_for(lambda: not paths.owner.exists(), 5, what="the release once reaped")
        assert closed == [True] and not paths.degraded.exists()
    finally:
        holder.release()
