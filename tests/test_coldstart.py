"""A cold broker answers `initialize` and `tools/list` at once, from the last run's engine (broker/coldstart.py).

Uses the SCRIPTED FAKE ENGINE (tests/fake_engine.py) with FAKE_START_DELAY: the real engine
cannot be made to start slowly on demand, and opencode drops a server that takes over 5 s to
list its tools.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from tests.helpers import RawClient

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cold", "version": "1"}}


def test_cold_broker_answers_from_the_last_runs_engine_and_says_when_it_changed(broker_factory, home: Path,
                                                                                 tmp_path: Path) -> None:
    first = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})
    cache = first.state_dir / "engine-cache.json"
    deadline = time.monotonic() + 30
    while not cache.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.exists(), "the warm engine's answers were not kept"
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    first.stop()

    fewer = json.loads((Path(__file__).parent / "data" / "mempalace-3.4.0-tools.json").read_text())
    fewer["tools"] = fewer["tools"][:-1]  # the engine that comes up lists one tool less than last time
    (tmp_path / "tools.json").write_text(json.dumps(fewer))
    second = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "FAKE_START_DELAY": "4",
                                 "FAKE_TOOLS": str(tmp_path / "tools.json")}, wait_engine=False)

    async def main() -> None:
        c = await RawClient.connect(second.endpoint)
        sent = time.monotonic()
        init = await c.call("initialize", INIT, timeout=10)
        listed = await c.call("tools/list", timeout=10)
        early = time.monotonic() - sent
        status = (await c.call("broker/status"))["result"]
        assert status["engine"]["state"] != "ready", status["engine"]  # answered while the engine loads
        assert early < 2.0, early
        assert init["result"]["protocolVersion"] == "2025-06-18"
        assert init["result"]["capabilities"]["tools"]["listChanged"] is True
        assert len(listed["result"]["tools"]) == 30  # last run's list
        older = await RawClient.connect(second.endpoint)  # any protocol version the engine knows is echoed
        old_init = await older.call("initialize", dict(INIT, protocolVersion="2024-11-05"), timeout=10)
        assert old_init["result"]["protocolVersion"] == "2024-11-05"
        await older.close()
        changed = None
        end = time.monotonic() + 30
        while changed is None and time.monotonic() < end:
            msg = await c.recv(timeout=end - time.monotonic())
            if msg and msg.get("method") == "notifications/tools/list_changed":
                changed = msg
        assert changed is not None, "no tools/list_changed after the engine came up with another list"
        again = await c.call("tools/list", timeout=30)
        assert len(again["result"]["tools"]) == 29
        await c.close()

    asyncio.run(main())
