"""Broker behaviour that needs a SCRIPTED FAKE ENGINE (tests/fake_engine.py).

The real mempalace 3.11 never sends progress and has no root-level anyOf, so
progress-token routing, the tools/list clean-up and a request the engine drops (a
hint on stderr that turns out false, too) are shown against the
fake, which replays mempalace 3.4.0's real tool list.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from mp_ssh_bridge import protocol
from tests.helpers import RawClient

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"


def run(coro):
    return asyncio.run(coro)


def test_tools_list_root_anyof_removed_and_switchable(broker_factory):
    on = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def tools(endpoint):
        c = await RawClient.connect(endpoint)
        r = await c.call("tools/list")
        await c.close()
        return {t["name"]: t for t in r["result"]["tools"]}

    stripped = run(tools(on.endpoint))
    assert len(stripped) == 30
    diary = stripped["mempalace_diary_write"]["inputSchema"]
    assert not any(k in diary for k in ("anyOf", "oneOf", "allOf"))
    # The same arguments stay valid: properties and required are untouched.
    assert diary["required"] == ["agent_name"] and {"entry", "content"} <= set(diary["properties"])
    on.stop()
    off = broker_factory("--no-strip-root-combinators", env={"MP_BRIDGE_ENGINE": FAKE})
    kept = run(tools(off.endpoint))
    assert kept["mempalace_diary_write"]["inputSchema"]["anyOf"] == [{"required": ["entry"]}, {"required": ["content"]}]


def test_progress_tokens_are_rewritten_per_client(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        a = await RawClient.connect(broker.endpoint)
        b = await RawClient.connect(broker.endpoint)
        params = {"name": "fake_progress", "arguments": {}, "_meta": {"progressToken": "tok"}}
        await a.send(protocol.request(1, "tools/call", params))
        await b.send(protocol.request(1, "tools/call", params))
        for c in (a, b):
            reply = await c.recv_id(1, 20)
            seen = json.loads(reply["result"]["content"][0]["text"])["token"]
            assert seen != "tok" and seen.startswith("mpb-")  # the engine saw the broker's token
            progress = [m for m in c.inbox if m.get("method") == "notifications/progress"]
            assert [p["params"]["progressToken"] for p in progress] == ["tok", "tok"]
            assert [p["params"]["progress"] for p in progress] == [1, 2]
        await a.close()
        await b.close()

    run(main())


def test_cancel_of_a_running_request_drops_its_late_reply(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        await c.send(protocol.request(1, "tools/call", {"name": "fake_sleep", "arguments": {"seconds": 1}}))
        await asyncio.sleep(0.3)
        await c.send(protocol.notification("notifications/cancelled", {"requestId": 1}))
        # The same id may be reused at once, and only the new request is answered.
        r = await c.call("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}}, msg_id=1, timeout=20)
        assert r["result"]["content"][0]["text"] == '{"slept": true}'
        assert (await c.call("ping"))["result"] == {}
        assert [m for m in c.inbox if m.get("id") == 1] == []
        st = (await c.call("broker/status"))["result"]
        assert st["totals"]["cancelled"] == 1 and st["totals"]["engine_requests"] == 2
        await c.close()

    run(main())


def test_engine_that_cannot_start_gives_a_clear_error(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": "/nonexistent/mempalace-mcp"}, wait_engine=False)

    async def main():
        c = await RawClient.connect(broker.endpoint)
        r = await c.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=30)
        assert r["error"]["code"] == protocol.ENGINE_UNAVAILABLE
        assert "/nonexistent/mempalace-mcp" in r["error"]["message"] and "NOT executed" in r["error"]["message"]
        assert (await c.call("ping"))["result"] == {}  # the broker itself stays up
        await c.close()

    run(main())


def test_large_messages_pass_both_ways_under_the_cap(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        big = "x" * (3 * 1024 * 1024)  # 3 MiB: far above asyncio's 64 KiB default line limit
        r = await c.call("tools/call", {"name": "no_such_tool", "arguments": {"blob": big}}, timeout=30)
        assert r["error"]["code"] == protocol.METHOD_NOT_FOUND  # the engine got it whole and answered
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(main())


def test_an_engine_that_keeps_crashing_is_not_respawned_in_a_loop(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": "/bin/false"}, wait_engine=False)

    async def main():
        c = await RawClient.connect(broker.endpoint)
        errors = []
        for _ in range(3):
            r = await c.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=60)
            errors.append(r["error"])
        assert all(e["code"] == protocol.ENGINE_UNAVAILABLE for e in errors), errors
        assert "exited during start-up" in errors[0]["message"] or "failed to start" in errors[0]["message"]
        await asyncio.sleep(2)
        st = (await c.call("broker/status"))["result"]
        assert st["engine"]["starts"] <= 6, st["engine"]  # backoff and a cool-down, not a spin
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(main())


def test_a_dropped_request_is_answered_at_once_and_a_false_hint_fails_nothing(broker_factory):
    """The proof that the engine dropped a request is its answer to a LATER one (it answers in order); an
    error-looking stderr line is only the hint that makes the broker ask (a ping). A hint while a request
    runs fails nothing: the ping is answered after it."""
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        r = await c.call("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 1, "log": "ERROR unrelated"}},
                         timeout=20)
        assert r["result"]["content"][0]["text"] == '{"slept": true}'
        started = time.monotonic()
        r = await c.call("tools/call", {"name": "fake_drop", "arguments": {"log": "Server error: boom"}}, timeout=20)
        assert time.monotonic() - started < 2
        assert r["error"]["code"] == protocol.OUTCOME_UNKNOWN and r["error"]["data"]["outcome"] == "unknown"
        assert "Server error: boom" in r["error"]["message"] and "NOT retried" in r["error"]["message"]
        r = await c.call("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}}, timeout=20)
        assert "result" in r  # the same engine serves on
        st = (await c.call("broker/status"))["result"]
        assert st["engine"]["restarts"] == 0 and st["totals"]["outcome_unknown"] == 1
        await c.close()

    run(main())
