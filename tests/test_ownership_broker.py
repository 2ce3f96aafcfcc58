"""The broker's part in the ownership protocol (broker/ownership.py, docs/PROTOCOL.md "Ownership").

A real broker over the SCRIPTED FAKE ENGINE (tests/fake_engine.py); the other owners are played by
this test process through mp_ssh_bridge.owner: a `local` owner that hands the palace over when the
broker asks, a `grant` (what `mp-bridge run` does), and a side that takes owner.json away.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import owner, protocol, state
from mp_ssh_bridge.settings import load
from mp_ssh_bridge_broker.engine import Engine
from mp_ssh_bridge_broker.ownership import Ownership
from tests.helpers import RawClient, pid_alive, wait_for

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
ENV = {"MP_BRIDGE_ENGINE": FAKE}
STALE = 30.0  # every owner here is on this machine: its pid decides, never this limit
WHAT = "mempalace mine ~/x"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _paths(home: Path) -> state.StatePaths:
    paths = state.StatePaths(home / ".mempalace")
    state.ensure_private_dir(paths.root)
    return paths


async def _status(endpoint: str) -> dict[str, Any]:
    c = await RawClient.connect(endpoint)
    try:
        return (await c.call("broker/status", {"probe": True}))["result"]
    finally:
        await c.close()


def status(endpoint: str) -> dict[str, Any]:
    return run(_status(endpoint))


class LocalOwner:
    """A `local` owner (a container session running its own engine): holds the palace, and hands it over once
    a request that outranks it shows up and the test lets it go."""

    def __init__(self, paths: state.StatePaths) -> None:
        self.paths = paths
        self.claim = owner.claim(paths, "local", STALE)
        self.asked: dict[str, Any] | None = None
        self.seen = threading.Event()
        self.let_go = threading.Event()
        self.released_at: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self.seen.is_set():
            wanted = owner.wanted_by(self.paths, "local", STALE)
            if wanted is not None:
                self.asked = wanted
                self.seen.set()
            time.sleep(0.05)
        self.let_go.wait(20)
        self.released_at = time.monotonic()
        self.claim.release()

    def join(self) -> None:
        self.let_go.set()
        self._thread.join(10)


class Grant:
    """`mp-bridge run`'s part: request a grant, claim it once the broker has released, hold it until told."""

    def __init__(self, paths: state.StatePaths, engine_pid: int) -> None:
        self.paths = paths
        self.engine_pid = engine_pid
        self.claimed = threading.Event()
        self.done = threading.Event()
        self.facts: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            claim = owner.acquire(self.paths, "grant", STALE, 15, fields={"what": WHAT})
        except owner.Busy as exc:
            self.facts["error"] = str(exc)
            self.claimed.set()
            return
        # What the grant finds the moment it holds the palace: the broker's engine gone, its record too.
        self.facts.update(at=time.monotonic(), engine_alive=pid_alive(self.engine_pid),
                          engine_json=self.paths.engine.exists())
        self.claimed.set()
        self.done.wait(20)
        claim.release()

    def join(self) -> None:
        self.done.set()
        self._thread.join(10)


def test_the_broker_waits_for_a_local_owner_which_hands_the_palace_over(home, broker_factory):
    paths = _paths(home)
    local = LocalOwner(paths)
    try:
        broker = broker_factory(env=ENV, wait_engine=False)
        assert local.seen.wait(10), "the broker never asked for the palace"
        assert local.asked is not None and local.asked["kind"] == "broker" and local.asked["pid"] == broker.proc.pid

        async def main() -> None:
            c = await RawClient.connect(broker.endpoint)
            for _ in range(100):  # its request is written before its first claim is refused (which names the holder)
                st = (await c.call("broker/status"))["result"]
                own = st["ownership"]
                if own["waiting_for"] is not None:
                    break
                await asyncio.sleep(0.05)
            assert own["state"] == "waiting" and st["engine"]["pid"] is None, st
            assert f"a session running its own engine (pid {os.getpid()}" in own["waiting_for"], own
            assert own["owner"]["kind"] == "local" and own["owner"]["pid"] == os.getpid(), own
            assert [r["kind"] for r in own["requests"]] == ["broker"], own
            assert not paths.engine.exists()  # no engine was started beside the local owner
            await c.send(protocol.request(7, "tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}}))
            notice = await c.recv(5)  # the waiting request hears why it waits
            assert notice is not None and notice.get("method") == "notifications/message", notice
            assert "waiting for the palace's owner" in notice["params"]["data"], notice
            assert "the palace is held by a session running its own engine" in notice["params"]["data"], notice
            local.let_go.set()  # it finishes, stops its engine, releases
            reply = await c.recv_id(7, 15)
            assert reply["result"]["content"][0]["text"] == '{"slept": true}', reply
            st = (await c.call("broker/status"))["result"]
            own = st["ownership"]
            assert own["state"] == "holding" and own["waiting_for"] is None and own["requests"] == [], own
            assert own["owner"]["kind"] == "broker" and own["owner"]["pid"] == broker.proc.pid, own
            assert st["engine"]["pid"] is not None and st["engine"]["state"] == "ready", st
            await c.close()

        run(main())
        record = state.read_json_object(paths.owner)
        assert record is not None and record["kind"] == "broker" and record["pid"] == broker.proc.pid
    finally:
        local.join()


def test_a_grant_gets_the_palace_between_calls_and_the_broker_takes_it_back(home, broker_factory):
    paths = _paths(home)
    broker = broker_factory(env=ENV)
    first = status(broker.endpoint)
    engine0 = first["engine"]["pid"]
    assert engine0 and first["ownership"]["state"] == "holding" and first["ownership"]["handovers"] == 0, first

    async def main() -> None:
        long = await RawClient.connect(broker.endpoint)
        await long.send(protocol.request(1, "tools/call", {"name": "fake_sleep", "arguments": {"seconds": 2}}))
        await asyncio.sleep(0.3)  # it runs; now the grant asks
        grant = Grant(paths, engine0)
        try:
            # The yield is decided at once, but the running call finishes first; a call queued behind it that meets
            # its deadline meanwhile is not executed, and says where the palace goes.
            for _ in range(50):
                own = (await _status(broker.endpoint))["ownership"]
                if own["state"] == "yielded":
                    break
                await asyncio.sleep(0.05)
            assert own["state"] == "yielded" and WHAT in own["waiting_for"], own
            drain = await RawClient.connect(broker.endpoint)
            await drain.call("broker/status", {"timeoutMs": 600})
            queued = await drain.tool("fake_sleep", {"seconds": 0}, msg_id=3, timeout=5)
            assert queued["error"]["code"] == protocol.DEADLINE_EXCEEDED, queued
            said = queued["error"]["message"]
            assert f"the palace is being handed over to `{WHAT}` under `mp-bridge run`" in said, queued
            assert queued["error"]["data"]["outcome"] == "not_executed", queued
            assert not grant.claimed.is_set()  # the engine still runs the first call: the palace is still ours
            await drain.close()
            reply = await long.recv_id(1, 10)
            answered_at = time.monotonic()
            assert reply["result"]["content"][0]["text"] == '{"slept": true}', reply  # finished, not cut short
            assert await asyncio.to_thread(grant.claimed.wait, 10), "the grant never got the palace"
            facts = grant.facts
            assert "error" not in facts, facts
            assert facts["at"] >= answered_at - 0.05, facts  # the running call's answer came first
            assert facts["engine_alive"] is False and facts["engine_json"] is False, facts

            # During the grant: a request with a short deadline is answered naming it; another one waits.
            short = await RawClient.connect(broker.endpoint)
            await short.call("broker/status", {"timeoutMs": 1500})
            waiter = await RawClient.connect(broker.endpoint)
            await waiter.send(protocol.request(5, "tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}}))
            expired = await short.tool("fake_sleep", {"seconds": 0}, msg_id=9, timeout=10)
            err = expired["error"]
            assert err["code"] == protocol.DEADLINE_EXCEEDED, expired
            assert f"the palace is held by `{WHAT}` under `mp-bridge run` (pid {os.getpid()} on " in err["message"], err
            assert ", for " in err["message"] and "NOT executed (safe to retry)" in err["message"], err
            assert err["data"]["outcome"] == "not_executed", err
            st = (await short.call("broker/status"))["result"]
            own = st["ownership"]
            assert own["state"] == "yielded" and own["handovers"] == 1, own
            assert own["owner"]["kind"] == "grant" and own["owner"]["what"] == WHAT, own
            assert WHAT in own["waiting_for"] and st["engine"]["pid"] is None, st
            assert [m for m in waiter.inbox if m.get("id") == 5] == []  # still waiting
        finally:
            await asyncio.to_thread(grant.join)  # CMD exited: the grant is released
        reply = await waiter.recv_id(5, 15)
        assert reply["result"]["content"][0]["text"] == '{"slept": true}', reply
        st = (await waiter.call("broker/status"))["result"]
        assert st["ownership"]["state"] == "holding" and st["ownership"]["handovers"] == 1, st
        assert st["engine"]["pid"] not in (None, engine0), st  # a fresh engine: the old one's index may be stale
        assert st["engine"]["restarts"] == 1 and "cooldown_s" not in st["engine"], st
        for c in (long, short, waiter):
            await c.close()

    run(main())


def test_broker_exit_releases_the_palace(home, broker_factory):
    paths = _paths(home)
    broker = broker_factory(env=ENV)
    st = status(broker.endpoint)
    own = st["ownership"]
    assert own["state"] == "holding" and own["waiting_for"] is None and own["requests"] == [], own
    assert own["owner"]["kind"] == "broker" and own["owner"]["pid"] == broker.proc.pid, own
    assert set(own["owner"]) == {"kind", "pid", "host", "since", "what", "expires"}, own
    engine_pid = st["engine"]["pid"]
    record = state.read_json_object(paths.owner)
    assert record is not None and record["token"] and record["kind"] == "broker"
    assert broker.stop() == 0
    assert not pid_alive(engine_pid)
    assert not paths.owner.exists()  # released, after the engine had exited
    assert not list(paths.owner_requests.glob("*.json")) if paths.owner_requests.exists() else True
    claim = owner.claim(paths, "local", STALE)  # the palace is free at once
    assert claim.release()


def test_a_broker_that_loses_owner_json_stops_its_engine(home, broker_factory):
    paths = _paths(home)
    broker = broker_factory(env=ENV)
    engine0 = status(broker.endpoint)["engine"]["pid"]
    assert engine0 and pid_alive(engine0)
    # Another side judged the broker gone and claimed: owner.json names it now.
    taker = owner.new_record("local")
    state.write_json_atomic(paths.owner, taker)
    wait_for(lambda: not pid_alive(engine0), 5, what="the engine killed at once")
    # reaped by the broker a moment after its death (a loaded machine: tens of ms): then status no longer names it
    st = wait_for(lambda: (s := status(broker.endpoint))["engine"]["pid"] is None and s, 5, what="the engine reaped")
    own = st["ownership"]
    assert own["state"] == "waiting" and st["engine"]["pid"] is None, st
    assert f"a session running its own engine (pid {os.getpid()}" in own["waiting_for"], own
    assert state.read_json_object(paths.owner)["token"] == taker["token"]  # never overwritten or removed
    paths.owner.unlink()  # that owner releases: the broker takes the palace back with a fresh engine
    st = wait_for(lambda: (s := status(broker.endpoint))["engine"]["state"] == "ready" and s, 10, what="engine back")
    assert st["engine"]["pid"] != engine0 and st["ownership"]["state"] == "holding", st
    record = state.read_json_object(paths.owner)
    assert record is not None and record["pid"] == broker.proc.pid and record["kind"] == "broker"
    assert "lost the palace" in (home / "broker-0.log").read_text()


def test_a_palace_lost_while_the_engine_starts_up_leaves_no_engine_beside_the_new_owner(home, broker_factory):
    """Lost after the spawn, before initialize was answered: the starting engine is killed, and that is no failed
    start; a fresh engine comes once the other owner has released."""
    paths = _paths(home)
    broker = broker_factory(env=dict(ENV, FAKE_START_DELAY="1.5"), wait_engine=False)
    st = wait_for(lambda: (s := status(broker.endpoint))["engine"]["state"] == "starting" and s["engine"]["pid"] and s,
                  10, what="the engine spawned")
    starting = st["engine"]["pid"]
    assert st["ownership"]["state"] == "holding", st
    taker = owner.new_record("local")
    state.write_json_atomic(paths.owner, taker)  # another side judged the broker gone and claimed
    wait_for(lambda: not pid_alive(starting), 5, what="the starting engine killed")
    time.sleep(1.0)  # long enough for a start that went on regardless to have spawned again
    st = status(broker.endpoint)
    assert st["engine"]["pid"] is None and st["ownership"]["state"] == "waiting", st
    assert not paths.engine.exists()
    assert state.read_json_object(paths.owner)["token"] == taker["token"]  # never overwritten or removed
    paths.owner.unlink()  # that owner releases
    st = wait_for(lambda: (s := status(broker.endpoint))["engine"]["state"] == "ready" and s, 15, what="engine back")
    assert st["engine"]["pid"] not in (None, starting) and st["ownership"]["state"] == "holding", st
    assert "last_error" not in st["engine"] and "cooldown_s" not in st["engine"], st
    log = (home / "broker-0.log").read_text()
    assert "lost the palace" in log and "engine start given up" in log, log[-3000:]
    assert "engine start failed" not in log and "warm-up failed" not in log, log[-3000:]


# --- in-process: an Ownership and an Engine on this test's own loop, to stop a start at a chosen point --------
class InProcess:
    def __init__(self, home: Path) -> None:
        self.settings = load(engine=FAKE, mempalace_path=home / ".mempalace")
        self.paths = self.settings.paths
        state.ensure_private_dir(self.paths.root)
        self.gate = asyncio.Lock()
        self.engine = Engine(self.settings, lambda msg: None)
        self.own = Ownership(self.settings, self.engine, self.gate)

    async def close(self) -> None:
        await self.engine.stop()
        await self.own.close()


async def until(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_start_that_passed_before_start_gives_up_when_the_palace_is_lost(home, monkeypatch: pytest.MonkeyPatch):
    """F1: a start under way (past before_start, before the spawn) when owner.json is taken away spawns nothing
    while the other owner holds the palace; it starts a fresh engine once the palace is the broker's again."""
    box = InProcess(home)
    engine, own, paths = box.engine, box.own, box.paths

    async def main() -> None:
        clearing, go_on = asyncio.Event(), asyncio.Event()
        real_clear = engine._clear_old_engine

        async def slow_clear() -> None:  # the start has passed before_start: the palace was the broker's
            clearing.set()
            await go_on.wait()
            await real_clear()

        monkeypatch.setattr(engine, "_clear_old_engine", slow_clear)
        own.start()
        try:
            starting = asyncio.create_task(engine.ensure_ready())
            await asyncio.wait_for(clearing.wait(), 10)
            assert own.holding() and state.read_json_object(paths.owner)["kind"] == "broker"
            taker = owner.new_record("local")
            state.write_json_atomic(paths.owner, taker)  # another side took the palace
            await until(lambda: not own.holding(), 5, "the loss noticed")
            go_on.set()  # the start goes on: it must give up, not spawn
            await asyncio.sleep(1.5)
            assert not starting.done() and engine.pid is None and engine.state != "ready", engine.state
            assert not paths.engine.exists()
            assert state.read_json_object(paths.owner)["token"] == taker["token"]
            assert engine._failures == 0 and "last_error" not in engine.health(), engine.health()
            paths.owner.unlink()  # the other owner releases
            await asyncio.wait_for(starting, 15)
            assert engine.running() and own.holding() and engine.pid is not None
            record = state.read_json_object(paths.owner)
            assert record is not None and record["kind"] == "broker" and record["pid"] == os.getpid(), record
            await until(lambda: own._losing is None and not box.gate.locked(), 10, "the take-back done")
            assert engine.running() and own.holding(), own.status()
        finally:
            go_on.set()
            await box.close()
        assert not paths.owner.exists()

    run(main())


def test_a_lost_claim_that_was_ours_after_all_is_released_and_claimed_again(home, monkeypatch: pytest.MonkeyPatch):
    """F2: a false "lost" (owner.json judged not ours, yet it names the broker) must not leave the broker's own
    record behind: with the broker's live pid it would refuse the broker's own claim forever."""
    box = InProcess(home)
    engine, own, paths = box.engine, box.own, box.paths

    async def main() -> None:
        own.start()
        try:
            await engine.ensure_ready()
            pid0 = engine.pid
            first = state.read_json_object(paths.owner)
            claim = own._claim
            assert first is not None and own.holding() and claim is not None
            real_ours, looks = claim.ours, []

            def wrong_once() -> bool:  # one look that wrongly finds owner.json not ours
                looks.append(1)
                return False if len(looks) == 1 else real_ours()

            monkeypatch.setattr(claim, "ours", wrong_once)
            await until(lambda: engine.running() and own.holding() and engine.pid != pid0, 15, "a fresh engine")
            record = state.read_json_object(paths.owner)
            assert record is not None and record["token"] != first["token"] and record["pid"] == os.getpid(), record
        finally:
            await box.close()

    run(main())


def test_a_yield_is_called_off_when_the_request_gave_up_before_the_running_call_ended(home):
    box = InProcess(home)
    engine, own, paths = box.engine, box.own, box.paths

    async def main() -> None:
        own.start()
        try:
            await engine.ensure_ready()
            pid0 = engine.pid
            await box.gate.acquire()  # a call runs
            request = await asyncio.to_thread(owner.Request, paths, "grant", what=WHAT)
            await until(lambda: own.state == "yielded", 5, "the yield decided")
            request.withdraw()  # the grant gave up (its bound ran out) while the call still ran
            box.gate.release()
            await asyncio.sleep(1.0)
            st = own.status()
            assert st["state"] == "holding" and st["handovers"] == 0 and st["waiting_for"] is None, st
            assert engine.running() and engine.pid == pid0
        finally:
            await box.close()

    run(main())
