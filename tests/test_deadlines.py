"""The broker owns a request's deadline, and leaves no task behind when it stops.

A session declares its own timer with broker/status `timeoutMs`; the broker
answers just before it, so a request that never left the queue reaches the
agent as "not executed" (safe to retry) instead of the session's blind
"outcome unknown". Shown against the SCRIPTED FAKE ENGINE (tests/fake_engine.py),
whose `fake_sleep` holds the sequential engine for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol
from mp_ssh_bridge.settings import load
from mp_ssh_bridge_broker.engine import Engine
from mp_ssh_bridge_broker.mux import TIMEOUT_MS_MAX, Mux, job_deadline_s, valid_timeout_ms
from mp_ssh_bridge_broker.server import Server
from tests.helpers import RawClient

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
SLACK_S = 0.5  # scheduling slack on a loaded CI machine; the assertions are about order, not speed


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sleep_call(seconds: float) -> dict[str, Any]:
    return {"name": "fake_sleep", "arguments": {"seconds": seconds}}


async def until_in_flight(c: RawClient, tool: str, timeout: float = 20) -> None:
    """Wait until the engine is running `tool` (so a next request must queue behind it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flight = (await c.call("broker/status"))["result"]["in_flight"]
        if flight and flight["tool"] == tool:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tool} never ran")


# --- the rule ------------------------------------------------------------------------------------
def test_job_deadline_rule():
    # No session timer: the broker's request_timeout.
    assert job_deadline_s(0, 60.0, None) == 60.0
    # The session's timer wins, answered a margin early: 10 %, at most 1 s, never under 0.2 s in all.
    assert job_deadline_s(1000, 60.0, None) == pytest.approx(0.9)
    assert job_deadline_s(5000, 60.0, None) == pytest.approx(4.5)
    assert job_deadline_s(30_000, 60.0, None) == pytest.approx(29.0)
    assert job_deadline_s(120_000, 60.0, None) == pytest.approx(119.0)  # longer than request_timeout: still wins
    assert job_deadline_s(100, 60.0, None) == pytest.approx(0.2)
    # mempalace_event_wait: its own wait on top, either way.
    assert job_deadline_s(0, 60.0, 5000) == pytest.approx(65.0)
    assert job_deadline_s(1000, 60.0, 5000) == pytest.approx(5.9)
    # The shim's backstop is computed from the same function, a fixed grace later.
    assert protocol.broker_deadline_s(1000, 60.0) + protocol.SHIM_BACKSTOP_GRACE_S == pytest.approx(2.9)
    assert protocol.SHIM_BACKSTOP_GRACE_S == 2.0
    for session_ms in (300, 1000, 60_000, 600_000):  # always before the session's own timer
        assert job_deadline_s(session_ms, 60.0, None) < session_ms / 1000


def test_timeout_ms_validation_rule():
    assert all(valid_timeout_ms(v) for v in (0, 1, 1000, TIMEOUT_MS_MAX))
    assert not any(valid_timeout_ms(v) for v in (-1, True, False, 1.5, 1000.0, "1000", None, [], TIMEOUT_MS_MAX + 1))


# --- the protocol ---------------------------------------------------------------------------------
def test_timeout_ms_is_validated_and_kept_per_session(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        other = await RawClient.connect(broker.endpoint)

        async def mine() -> int:
            st = (await c.call("broker/status"))["result"]
            return min(st["clients"], key=lambda s: s["id"])["timeout_ms"]  # c connected before `other`

        assert "result" in await c.call("broker/status", {"timeoutMs": 5000})
        assert await mine() == 5000  # absent keeps it
        for bad in (-1, True, 1.5, "1000", None, TIMEOUT_MS_MAX + 1):
            r = await c.call("broker/status", {"timeoutMs": bad})
            assert r["error"]["code"] == protocol.INVALID_PARAMS, (bad, r)
            assert "timeoutMs" in r["error"]["message"]
        assert await mine() == 5000  # a refused value changes nothing
        assert "result" in await c.call("broker/status", {"timeoutMs": 0, "readOnly": False})
        assert await mine() == 0
        st = (await other.call("broker/status"))["result"]
        assert [s["timeout_ms"] for s in st["clients"]] == [0, 0]  # the default, and per session
        await c.close()
        await other.close()

    run(main())


def test_queued_request_is_not_executed_before_the_sessions_own_timer(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})  # request_timeout: the default 60 s

    async def main():
        busy = await RawClient.connect(broker.endpoint)
        c = await RawClient.connect(broker.endpoint)
        assert "result" in await c.call("broker/status", {"timeoutMs": 1000})
        await busy.send(protocol.request(1, "tools/call", sleep_call(3)))
        await until_in_flight(c, "fake_sleep")
        sent = time.monotonic()
        r = await c.call("tools/call", sleep_call(0), msg_id=7, timeout=10)
        elapsed = time.monotonic() - sent
        err = r["error"]
        assert err["code"] == protocol.DEADLINE_EXCEEDED, r
        assert err["data"]["outcome"] == "not_executed"
        assert err["data"]["busy_with"] == "tool fake_sleep"
        assert "NOT executed" in err["message"] and "fake_sleep" in err["message"], err["message"]
        # Ordering: the broker's verdict comes before the session's own 1000 ms timer would have fired.
        assert 0.85 <= elapsed < 1.0 + SLACK_S, elapsed
        # The other session's long call is untouched, and ours never reached the engine.
        done = await busy.recv_id(1, 20)
        assert done["result"]["content"][0]["text"] == '{"slept": true}'
        st = (await c.call("broker/status"))["result"]
        assert st["totals"]["engine_requests"] == 1 and st["totals"]["timeouts"] == 1
        await busy.close()
        await c.close()

    run(main())


def test_running_request_past_its_deadline_is_outcome_unknown(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        assert "result" in await c.call("broker/status", {"timeoutMs": 1000})
        sent = time.monotonic()
        r = await c.call("tools/call", sleep_call(2), msg_id=1, timeout=10)
        elapsed = time.monotonic() - sent
        assert r["error"]["code"] == protocol.DEADLINE_EXCEEDED, r
        assert r["error"]["data"]["outcome"] == "unknown"
        assert "still running" in r["error"]["message"]
        assert elapsed < 1.0 + SLACK_S, elapsed
        await asyncio.sleep(1.5)  # the engine's late reply arrives and is dropped
        assert (await c.call("ping"))["result"] == {}
        assert [m for m in c.inbox if m.get("id") == 1] == []
        st = (await c.call("broker/status"))["result"]
        assert st["totals"]["engine_requests"] == 1 and st["totals"]["timeouts"] == 1
        await c.close()

    run(main())


def test_session_timer_wins_over_request_timeout_and_its_absence_falls_back(broker_factory):
    broker = broker_factory("--request-timeout", "1", env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        long = await RawClient.connect(broker.endpoint)  # declares 10 s: longer than the broker's 1 s
        plain = await RawClient.connect(broker.endpoint)  # declares nothing: the broker's 1 s
        assert "result" in await long.call("broker/status", {"timeoutMs": 10_000})
        await long.send(protocol.request(1, "tools/call", sleep_call(2)))
        await until_in_flight(plain, "fake_sleep")
        r = await plain.call("tools/call", sleep_call(0), timeout=10)
        assert r["error"]["code"] == protocol.DEADLINE_EXCEEDED and r["error"]["data"]["outcome"] == "not_executed"
        assert "request_timeout" in r["error"]["message"]
        done = await long.recv_id(1, 20)
        assert "result" in done, done  # ran its 2 s past the broker's 1 s default
        await long.close()
        await plain.close()

    run(main())


# --- task hygiene ----------------------------------------------------------------------------------
def _leftovers(before: set[asyncio.Task[Any]]) -> list[str]:
    current = asyncio.current_task()
    return sorted(t.get_name() for t in asyncio.all_tasks() - before if t is not current and not t.done())


def test_engine_stop_cancels_a_pending_crash_restart(home: Path):
    settings = load(engine=FAKE, mempalace_path=home / ".mempalace")

    async def main():
        before = asyncio.all_tasks()
        engine = Engine(settings, lambda msg: None)
        await engine.ensure_ready()
        pid = engine.pid
        assert pid is not None
        # Two more recent starts on record make the restart's backoff 1 s: a window wide enough to stop in.
        engine._restart_times.extend([time.monotonic()] * 2)
        os.kill(pid, signal.SIGKILL)  # a crash: the engine schedules a warm restart (after a backoff)
        for _ in range(500):
            if engine._restart_task is not None:
                break
            await asyncio.sleep(0.01)
        restart = engine._restart_task
        assert restart is not None and not restart.done()
        await engine.stop()
        assert restart.cancelled()
        assert engine.pid is None
        assert _leftovers(before) == []
        assert len(engine._tasks) == 0

    run(main())


def test_shutdown_leaves_no_task_of_the_broker_pending(home: Path):
    settings = load(engine=FAKE, mempalace_path=home / ".mempalace", shutdown_grace=0.2)

    async def main():
        before = asyncio.all_tasks()
        mux = Mux(settings)
        server = Server(mux, settings.max_line_bytes, auth_timeout=30)
        sock = home / "t.sock"
        await server.start_unix(sock)
        _, port = await server.start_tcp("127.0.0.1", 0, "token")
        mux.start()
        c = await RawClient.connect(sock)
        assert "result" in await c.call("broker/status", {"timeoutMs": 20_000})
        ro = await RawClient.connect(sock)
        assert "result" in await ro.call("broker/status", {"readOnly": True})  # starts the read-only probe
        # A running call, cancelled: its cancel is forwarded to the engine by a task of the Mux.
        await c.send(protocol.request(1, "tools/call", sleep_call(1)))
        await until_in_flight(c, "fake_sleep")
        await c.send(protocol.notification("notifications/cancelled", {"requestId": 1}))
        await c.send(protocol.request(2, "tools/call", sleep_call(0)))  # queued at shutdown
        # A TCP client that never authenticates: nothing but Server.close() would end it before auth_timeout.
        tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert _leftovers(before) != []

        await server.close()
        assert await asyncio.wait_for(tcp_reader.read(), 2) == b""
        await mux.shutdown(settings.shutdown_grace)
        queued = await c.recv_id(2, 5)
        assert queued["error"]["code"] == protocol.SHUTTING_DOWN  # still answered: close() left it attached
        await server.close_connections()
        assert _leftovers(before) == []
        assert len(mux._tasks) == 0 and len(mux.engine._tasks) == 0
        tcp_writer.close()
        await c.close()
        await ro.close()

    run(main())


def test_the_call_still_running_when_the_shutdown_grace_ends_is_answered(home: Path):
    """Scripted fake engine: a 3 s call, a 0.3 s grace. Its client is told the outcome is unknown (the dispatcher's
    cancellation used to clear `in_flight` first, and that call got no answer at all)."""
    settings = load(engine=FAKE, mempalace_path=home / ".mempalace", shutdown_grace=0.3)

    async def main():
        mux = Mux(settings)
        server = Server(mux, settings.max_line_bytes, auth_timeout=30)
        sock = home / "t.sock"
        await server.start_unix(sock)
        mux.start()
        c = await RawClient.connect(sock)
        await c.send(protocol.request(1, "tools/call", sleep_call(3)))
        await until_in_flight(c, "fake_sleep")
        await server.close()
        await mux.shutdown(settings.shutdown_grace)
        running = await c.recv_id(1, 5)
        assert running["error"]["code"] == protocol.OUTCOME_UNKNOWN, running
        assert running["error"]["data"]["outcome"] == "unknown"
        await server.close_connections()
        await c.close()

    run(main())
