"""The broker over EVERY supported engine version (the `engine` fixture: pinned and mempalace 3.4.0).

What differs between versions and must not reach a client: root-level `anyOf` in tools/list
(3.4.0's diary_write), requests an older engine never answers (3.4.0 logs `Server error` and
sends nothing when handling one raises), and a read-only mode that an older engine does not
have (3.4.0 ignores `--read-only`). Each test states the same outcome for every engine; the
figures (time to an answer, engine restarts) are asserted, not just printed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mp_ssh_bridge import protocol
from mp_ssh_bridge_broker import readonly
from tests.conftest import EngineUnderTest
from tests.helpers import RawClient, tool_json

pytestmark = pytest.mark.engines

PROMPT_S = 5.0  # "within seconds": an answer that took the stall path would take stall_timeout (60 s)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _engine_state(c: RawClient) -> tuple[int | None, int]:
    st = (await c.call("broker/status"))["result"]
    return st["engine"]["pid"], st["engine"]["restarts"]


async def _drawers(c: RawClient) -> int:
    data = tool_json(await c.tool("mempalace_status"))
    return int(data.get("total_drawers") or 0)


def test_tools_list_has_no_root_combinators(engine: EngineUnderTest, broker_factory) -> None:
    broker = broker_factory()

    async def main() -> None:
        c = await RawClient.connect(broker.endpoint)
        listed = (await c.call("tools/list"))["result"]["tools"]
        assert listed and all(not {"anyOf", "oneOf", "allOf"} & set(t["inputSchema"]) for t in listed)
        diary = next(t for t in listed if t["name"] == "mempalace_diary_write")["inputSchema"]
        assert "agent_name" in diary["required"]  # everything but the root combinator is kept
        await c.close()

    run(main())


def test_requests_an_engine_cannot_survive_are_answered_by_the_broker(engine: EngineUnderTest, broker_factory) -> None:
    """A malformed tools/call never reaches the engine: -32602 (mempalace 3.11's own words) at once, for that
    client only, and the engine keeps running (no stall, no restart)."""
    broker = broker_factory()

    async def main() -> None:
        bad = await RawClient.connect(broker.endpoint)
        other = await RawClient.connect(broker.endpoint)
        before = await _engine_state(other)
        cases = [
            {"name": {"object": "as name"}, "arguments": {}},
            {"name": ["mempalace_status"]},
            {"name": "mempalace_status", "arguments": ["not", "an", "object"]},
            {"name": "mempalace_status", "arguments": 5},
        ]
        worst = 0.0
        for params in cases:
            started = time.monotonic()
            reply = await bad.call("tools/call", params, timeout=PROMPT_S)
            worst = max(worst, time.monotonic() - started)
            assert worst < PROMPT_S
            assert reply["error"]["code"] == protocol.INVALID_PARAMS, reply
            assert "'name' must be a string and 'arguments' an object" in reply["error"]["message"]
        # Array params count as {} (as mempalace 3.11 does): the engine itself names what is missing.
        reply = await bad.call("tools/call", ["mempalace_status"], timeout=PROMPT_S)
        assert reply["error"]["code"] == protocol.INVALID_PARAMS and "'name' is required" in reply["error"]["message"]
        assert "result" in await bad.call("initialize", ["2025-06-18"], timeout=PROMPT_S)
        assert "result" in await other.tool("mempalace_kg_stats", timeout=PROMPT_S)
        assert await _engine_state(other) == before and before[1] == 0  # same engine process, no restart
        print(f"\n{engine.name}: malformed tools/call answered in {worst * 1000:.1f} ms at most, engine restarts 0")
        await bad.close()
        await other.close()

    run(main())


def test_a_request_whose_handling_raises_is_answered_within_seconds(engine: EngineUnderTest, broker_factory) -> None:
    """`"limit": 1e400` is well-formed JSON-RPC; coercing it raises inside every engine version. 3.11 answers
    -32603; 3.4.0 answers nothing and logs `Server error` on stderr, which the broker reads: the client gets a
    clear outcome-unknown error at once, a request queued behind it runs, and the engine is not restarted."""
    broker = broker_factory()

    async def main() -> None:
        raising = await RawClient.connect(broker.endpoint)
        queued = await RawClient.connect(broker.endpoint)
        pid, restarts = await _engine_state(queued)
        started = time.monotonic()
        await raising.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"mempalace_search",'
                               b'"arguments":{"query":"anything","limit":1e400}}}\n')
        behind = asyncio.ensure_future(queued.tool("mempalace_kg_stats", timeout=PROMPT_S * 2))
        reply = await raising.recv_id(1, PROMPT_S)
        answered_s = time.monotonic() - started
        assert "error" in reply, reply
        if engine.pinned:
            assert reply["error"]["code"] == protocol.INTERNAL_ERROR  # the engine's own answer
        else:
            assert reply["error"]["code"] == protocol.OUTCOME_UNKNOWN, reply
            assert reply["error"]["data"]["outcome"] == "unknown"
            assert "NOT retried" in reply["error"]["message"] and "Server error" in reply["error"]["message"]
        assert "result" in await behind
        assert time.monotonic() - started < PROMPT_S
        assert await _engine_state(queued) == (pid, restarts) and restarts == 0
        print(f"\n{engine.name}: raising handler answered in {answered_s * 1000:.0f} ms, engine restarts 0")
        await raising.close()
        await queued.close()

    run(main())


def test_read_only_session_is_read_only_on_every_engine(engine: EngineUnderTest, broker_factory) -> None:
    """With 3.11 the engine's own --read-only surface; with 3.4.0, which has none, the known read tools."""
    broker = broker_factory()

    async def main() -> None:
        ro = await RawClient.connect(broker.endpoint)
        rw = await RawClient.connect(broker.endpoint)
        assert "result" in await ro.call("broker/status", {"readOnly": True})
        ro_tools = {t["name"] for t in (await ro.call("tools/list", timeout=90))["result"]["tools"]}
        rw_tools = {t["name"] for t in (await rw.call("tools/list"))["result"]["tools"]}
        assert ro_tools and not ro_tools & readonly.WRITE_TOOLS and ro_tools <= readonly.READ_TOOLS
        assert {"mempalace_search", "mempalace_status", "mempalace_kg_query"} <= ro_tools
        assert rw_tools & readonly.WRITE_TOOLS  # the writer's surface is whole
        for name, args in (("mempalace_add_drawer", {"wing": "ro", "room": "r", "content": "must not be stored"}),
                           ("mempalace_kg_add", {"subject": "s", "predicate": "p", "object": "o"}),
                           ("mempalace_diary_write", {"agent_name": "ro", "entry": "must not be written"})):
            refused = await ro.tool(name, args)
            assert refused["error"]["code"] == readonly.READ_ONLY_REFUSED and "read-only" in refused["error"]["message"]
        added = tool_json(await rw.tool("mempalace_add_drawer", {"wing": "rw", "room": "r", "content": "the writer"}))
        assert added["success"] is True
        found = tool_json(await ro.tool("mempalace_search", {"query": "the writer"}))  # reading is allowed
        assert any("the writer" in str(hit) for hit in found["results"])
        assert await _drawers(rw) == 1  # the refused write never reached the palace
        await ro.close()
        await rw.close()

    run(main())


def test_engine_rules_are_learned_once_and_again_when_the_engine_changes(home, monkeypatch, tmp_path) -> None:
    """The shim's fast path knows an engine's rules from a cache keyed by its files: a hit asks no one (its
    cost is printed: well under 1 ms on an idle machine); reinstalling the engine (a new script) makes it ask again."""
    from mp_ssh_bridge import enginerules, palace
    from tests.conftest import engine_under_test

    old, pinned = engine_under_test("3.4.0"), engine_under_test("pinned")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    script = tmp_path / "bin" / "mempalace-mcp"
    script.parent.mkdir()
    script.write_bytes(old.path.read_bytes())  # the 3.4.0 console script (its #! names 3.4.0's python)
    script.chmod(0o755)
    assert enginerules.for_argv([str(script)]) == palace.RULES_3_4
    assert (tmp_path / "cache/mp-ssh-bridge/engine-rules.json").is_file()

    def no_asking(*_: Any) -> Any:
        raise AssertionError("a cache hit must not ask the engine")

    real_ask = enginerules.ask
    monkeypatch.setattr(enginerules, "ask", no_asking)
    started = time.perf_counter()
    for _ in range(50):
        assert enginerules.for_argv([str(script)]) == palace.RULES_3_4
    per_call_ms = (time.perf_counter() - started) * 1000 / 50  # printed, not asserted: a loaded machine is slow
    monkeypatch.setattr(enginerules, "ask", real_ask)
    script.write_bytes(pinned.path.read_bytes())  # "upgraded": the same path now runs the pinned mempalace
    assert enginerules.for_argv([str(script)]) == palace.RULES_3_11
    assert enginerules.for_argv([str(tmp_path / "nowhere" / "mempalace-mcp")]) == palace.RULES_3_11
    print(f"\nengine rules cache hit: {per_call_ms * 1000:.0f} µs")
