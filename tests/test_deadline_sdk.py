"""The broker owns a request's deadline: what the agent's MCP client sees, end to end.

Two official `mcp` SDK clients, each through its own `mp-shim`, one broker over the
SCRIPTED FAKE ENGINE (tests/fake_engine.py: `fake_sleep` holds the engine as long
as asked, which the real engine cannot be made to do on demand). Before, with the
shim and the broker at the same timeout, the shim's timer won and a request that
never left the broker's queue reached the agent as "outcome unknown".
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from mp_ssh_bridge import protocol
from tests.conftest import BIN

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"


def test_a_request_queued_behind_a_slow_one_reaches_the_sdk_client_as_not_executed(broker_factory, home: Path) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    try:
        from mcp.shared.exceptions import MCPError as McpError  # mcp >= 2
    except ImportError:
        from mcp.shared.exceptions import McpError  # type: ignore[no-redef]  # mcp 1.x

    broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})
    env = dict(os.environ, MEMPALACE_MCP_TIMEOUT_MS="1500")
    params = StdioServerParameters(command=str(BIN / "mp-shim"), args=[], env=env, cwd=str(home))
    outcome: dict[str, Any] = {}

    async def client(name: str, seconds: float, start_after: float) -> None:
        await asyncio.sleep(start_after)
        with open(home / f"{name}.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    sent = time.monotonic()
                    try:
                        await s.call_tool("fake_sleep", {"seconds": seconds})
                        outcome[name] = ("ok", None, time.monotonic() - sent)
                    except McpError as exc:
                        outcome[name] = (exc.error.code, exc.error.data, time.monotonic() - sent)

    async def both() -> None:
        await asyncio.gather(client("slow", 4.0, 0.0), client("queued", 0.0, 1.0))

    asyncio.run(asyncio.wait_for(both(), 60))
    code, data, waited = outcome["queued"]
    assert code == protocol.DEADLINE_EXCEEDED, outcome
    assert data["outcome"] == "not_executed", outcome  # the broker's precise answer, not the shim's guess
    assert waited < 1.5, outcome  # it arrived before the session's own 1500 ms timer would have fired
    code, data, _ = outcome["slow"]
    assert code == protocol.DEADLINE_EXCEEDED and data["outcome"] == "unknown", outcome  # it was running
