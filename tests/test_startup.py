"""While the engine loads, a waiting session is told so (MCP log notices), and a deadline says why.

The slow start is the SCRIPTED FAKE ENGINE's (tests/fake_engine.py, FAKE_START_DELAY): the
real engine cannot be made to start slowly on demand. A real-engine cold start is checked
too, as far as its speed allows (it may well be up before the first request arrives).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol
from mp_ssh_bridge_broker import startup
from mp_ssh_bridge_broker.mux import announce_list_changed
from tests.conftest import BIN
from tests.helpers import RawClient, wait_for

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
SLOW_S = 5.0  # the fake engine's start: long enough for a notice at once and another NOTICE_EVERY_S later
INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "startup", "version": "1"}}


def sleep_call(seconds: float) -> dict[str, Any]:
    return {"name": "fake_sleep", "arguments": {"seconds": seconds}}


def notices(frames: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, dict[str, Any]]]:
    return [(t, m["params"]) for t, m in frames if m.get("method") == "notifications/message"]


async def until_reply(c: RawClient, msg_id: Any, timeout: float = 30) -> tuple[dict[str, Any], list]:
    """The reply to `msg_id`, and every frame before it with its arrival time (monotonic)."""
    frames: list[tuple[float, dict[str, Any]]] = []
    end = time.monotonic() + timeout
    while True:
        msg = await c.recv(max(0.01, end - time.monotonic()))
        assert msg is not None, "connection closed"
        if msg.get("id") == msg_id and "method" not in msg:
            return msg, frames
        frames.append((time.monotonic(), msg))


def test_levels_and_capabilities() -> None:
    assert startup.level_allows(None, "debug") and startup.level_allows("info", "warning")
    assert not startup.level_allows("warning", "info") and startup.level_allows("warning", "warning")
    assert startup.valid_level("notice") and not startup.valid_level("verbose") and not startup.valid_level(3)
    caps = announce_list_changed({"capabilities": {"tools": {}}})["capabilities"]
    assert caps == {"tools": {"listChanged": True}, "logging": {}}


def test_a_call_during_a_slow_start_is_told_and_a_short_deadline_says_still_starting(broker_factory) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "FAKE_START_DELAY": str(SLOW_S)}, wait_engine=False)

    async def main() -> None:
        waiting, idle, quiet, short = [await RawClient.connect(broker.endpoint) for _ in range(4)]
        assert (await quiet.call("logging/setLevel", {"level": "warning"}))["result"] == {}
        bad = await quiet.call("logging/setLevel", {"level": "loud"})
        assert bad["error"]["code"] == protocol.INVALID_PARAMS, bad
        assert "result" in await short.call("broker/status", {"timeoutMs": 1000})
        st = (await idle.call("broker/status"))["result"]
        assert st["engine"]["state"] != "ready", st["engine"]  # the calls below wait for the engine

        sent = time.monotonic()
        await waiting.send(protocol.request(1, "tools/call", sleep_call(0)))
        await quiet.send(protocol.request(1, "tools/call", sleep_call(0)))
        replies = asyncio.gather(until_reply(waiting, 1), until_reply(quiet, 1))  # arrival times taken as they come
        expired = await short.call("tools/call", sleep_call(0), msg_id=9, timeout=10)
        (reply, frames), (quiet_reply, quiet_frames) = await replies
        assert reply["result"]["content"][0]["text"] == '{"slept": true}', reply

        said = notices(frames)
        texts = [p["data"] for _, p in said]
        assert len(said) >= 3, texts  # at once, at least once more while it loads, and when it is up
        assert all(p["level"] == "info" and p["logger"] == startup.LOGGER for _, p in said), said
        assert said[0][0] - sent < 0.5, texts  # the first one at once
        assert texts[0].startswith("memory engine starting (") and "your request waits for it up to" in texts[0]
        assert any(t.startswith("memory engine still starting (") for t in texts[1:-1]), texts
        assert texts[-1].startswith("memory engine ready after "), texts
        gaps = [b[0] - a[0] for a, b in zip(said[:-1], said[1:], strict=True)]
        assert all(g >= startup.NOTICE_EVERY_S - 0.1 for g in gaps[:-1]), gaps  # bounded: one per NOTICE_EVERY_S

        assert "result" in quiet_reply and notices(quiet_frames) == []  # it asked for warnings and up only

        err = expired["error"]
        assert err["code"] == protocol.DEADLINE_EXCEEDED, expired
        assert err["message"].startswith("memory engine still starting ("), err["message"]
        assert "NOT executed" in err["message"] and "mp-bridge logs" in err["message"], err["message"]
        assert "mp-bridge doctor" in err["message"] and "safe to retry" in err["message"], err["message"]
        assert err["data"]["outcome"] == "not_executed" and err["data"]["engine_starting_s"] > 0, err
        short_frames = [m for m in short.inbox if m.get("method") == "notifications/message"]
        assert short_frames and short_frames[0]["params"]["data"].startswith("memory engine starting"), short.inbox

        assert (await idle.call("ping"))["result"] == {}
        assert [m for m in idle.inbox if m.get("method") == "notifications/message"] == []  # nothing waited
        st = (await idle.call("broker/status"))["result"]
        assert st["totals"]["engine_requests"] == 2, st["totals"]  # the expired call never reached the engine
        for c in (waiting, idle, quiet, short):
            await c.close()

    asyncio.run(main())


def test_an_engine_that_cannot_start_is_named_with_its_last_error(broker_factory) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": "/nonexistent/mempalace-mcp"}, wait_engine=False)

    async def main() -> None:
        c = await RawClient.connect(broker.endpoint)
        r = await c.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=30)
        err = r["error"]
        assert err["code"] == protocol.ENGINE_UNAVAILABLE, r
        assert err["message"].startswith("memory engine failed to start: "), err["message"]
        assert "/nonexistent/mempalace-mcp" in err["message"] and "NOT executed" in err["message"], err["message"]
        assert "mp-bridge logs" in err["message"] and "mp-bridge doctor" in err["message"], err["message"]
        assert err["data"]["outcome"] == "not_executed" and "/nonexistent" in err["data"]["last_error"], err
        await c.close()

    asyncio.run(main())


# mcp >= 2 marks the client's set_logging_level deprecated (SEP-2577, spec 2026-07-28: advisory, no wire change).
@pytest.mark.filterwarnings("ignore:The logging capability is deprecated")
def test_an_sdk_client_sees_the_logging_capability_and_the_notices(broker_factory, home: Path) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    first = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})  # its warm engine's answers are kept for the next start
    wait_for(lambda: (first.state_dir / "engine-cache.json").exists(), 30, what="engine-cache.json")
    first.stop()
    broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "FAKE_START_DELAY": "4"}, wait_engine=False)
    params = StdioServerParameters(command=str(BIN / "mp-shim"), args=[], env=dict(os.environ), cwd=str(home))
    heard: list[tuple[str, Any]] = []

    async def on_log(p: Any) -> None:
        heard.append((p.level, p.data))

    async def main() -> None:
        with open(home / "shim.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write, logging_callback=on_log) as s:
                    init = await s.initialize()  # answered from the cache while the engine loads
                    assert init.capabilities.logging is not None, init.capabilities
                    assert init.capabilities.tools is not None, init.capabilities
                    await s.set_logging_level("info")  # answered by the broker (the engine has no logging)
                    result = await s.call_tool("fake_sleep", {"seconds": 0})
                    assert result.content[0].text == '{"slept": true}', result

    asyncio.run(asyncio.wait_for(main(), 60))
    texts = [str(d) for _, d in heard]
    assert texts and texts[0].startswith("memory engine starting ("), texts
    assert texts[-1].startswith("memory engine ready after "), texts


def test_a_real_engine_cold_start_tells_a_waiting_call_then_answers_it(broker_factory) -> None:
    broker = broker_factory(wait_engine=False)

    async def main() -> None:
        c = await RawClient.connect(broker.endpoint)
        await c.send(protocol.request(1, "tools/call", {"name": "mempalace_status", "arguments": {}}))
        reply, frames = await until_reply(c, 1, timeout=60)
        assert "result" in reply, reply
        texts = [p["data"] for _, p in notices(frames)]
        if texts:  # the engine was still loading when the call arrived (usual: it takes 1-2.5 s here)
            assert texts[0].startswith("memory engine starting ("), texts
            assert texts[-1].startswith("memory engine ready after "), texts
        await c.close()

    asyncio.run(main())


def test_the_shims_backstop_while_it_still_dials_a_broker_says_so_and_where_to_look() -> None:
    import json

    from mp_ssh_bridge.config import Config
    from mp_ssh_bridge.session import Pending, Shim

    cfg = Config()
    cfg.timeout_ms = 1000
    read_fd, write_fd = os.pipe()
    try:
        with open(os.devnull, "rb") as stdin:
            shim = Shim(cfg, write_fd, stdin)
            shim.connecting, shim.connect_started = True, time.monotonic() - 3.2  # an election still under way
            shim.expire(Pending(5, "tools/call", b"{}\n", time.monotonic(), "mempalace_status"))
        reply = json.loads(os.read(read_fd, 65536))
    finally:
        os.close(read_fd)
        os.close(write_fd)
    err = reply["error"]
    assert reply["id"] == 5 and err["code"] == protocol.DEADLINE_EXCEEDED and err["data"]["outcome"] == "not_executed"
    assert "NOT sent (safe to retry)" in err["message"] and "still connecting to the broker" in err["message"], err
    assert "(3.2 s so far)" in err["message"] and "mp-bridge logs" in err["message"], err
