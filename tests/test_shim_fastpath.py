"""The shim's fast path: what it imports, that it agrees with the settings model, and the pump's rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mp_ssh_bridge import config, protocol, session, shim
from mp_ssh_bridge.settings import load
from tests.test_shim_support import FakeBroker, ShimProc

FORBIDDEN = ("pydantic", "pydantic_settings", "rich", "asyncssh", "broker", "asyncio", "platformdirs")
# protocol is allowed: it is json-only at import (asyncio is imported inside read_frame).
FORBIDDEN_OURS = ("mp_ssh_bridge.settings", "mp_ssh_bridge.ssh", "mp_ssh_bridge.discovery", "mp_ssh_bridge.state",
                  "mp_ssh_bridge.connection")


# The stdlib wrappers whose C halves the fast path uses directly (~3 ms of every agent start here, measured).
WRAPPERS = ("socket", "selectors", "signal", "heapq")


def _heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN_OURS)


def test_fast_path_imports_nothing_heavy(home: Path, monkeypatch: pytest.MonkeyPatch, broker) -> None:
    """Run the real fast path (config, broker.json, socket, broker/status) in a fresh interpreter."""
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    code = (
        "import json, sys\n"
        "from mp_ssh_bridge import config, protocol, session, shim\n"
        "cfg = config.fast_config(None)\n"
        "link = session.fast_connect(cfg)\n"
        "link.send(protocol.encode({'jsonrpc': '2.0', 'id': 7, 'method': 'ping'}))\n"
        "assert json.loads(link.recv(30))['id'] == 7\n"
        "link.close()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout)
    assert "mp_ssh_bridge.shim" in modules and "_socket" in modules
    assert _heavy(modules) == []
    assert [m for m in WRAPPERS if m in modules] == []


def test_shim_process_stays_light(home: Path, monkeypatch: pytest.MonkeyPatch, broker, tmp_path: Path) -> None:
    """The same, for the real mp-shim process after a call: no heavy module was loaded (checked via -X importtime)."""
    env = dict(os.environ, MP_BRIDGE_ROLE="host", PYTHONPROFILEIMPORTTIME="1")
    s = ShimProc(env=env, stderr_path=tmp_path / "err")
    try:
        assert "result" in s.call("ping", timeout=60)
    finally:
        s.close()
    imported = [line.rsplit("|", 1)[-1].strip() for line in (tmp_path / "err").read_text().splitlines()
                if line.startswith("import time:") and "|" in line]
    assert "mp_ssh_bridge.shim" in imported
    assert _heavy(imported) == []
    assert [m for m in WRAPPERS if m in imported] == []


def test_unsure_values_defer_to_the_model(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPALACE_MCP_TIMEOUT_MS", "soon")
    with pytest.raises(config.NeedSettings):
        config.fast_config(None)
    with pytest.raises(Exception):  # the model rejects it too: mp-shim reports it and exits 2
        load()
    out = subprocess.run([str(Path(sys.executable).parent / "mp-shim")], input=b"", capture_output=True, timeout=60)
    assert out.returncode == 2 and b"invalid settings" in out.stderr and out.stdout == b""


def test_backstop_rules() -> None:
    """The shim's timer is a backstop: it fires SHIM_BACKSTOP_GRACE_S after the session's own timeout."""
    from mp_ssh_bridge.protocol import SHIM_BACKSTOP_GRACE_S, broker_deadline_s

    grace = int(SHIM_BACKSTOP_GRACE_S * 1000)
    assert session.backstop_ms(60000, "tools/call", {"name": "mempalace_status"}) == 60000 + grace
    assert session.backstop_ms(0, "tools/call", {"name": "mempalace_status"}) is None
    wait = {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 5000}}
    assert session.backstop_ms(1000, "tools/call", wait) == 6000 + grace
    assert session.backstop_ms(1000, "tools/call", {"name": "mempalace_event_wait"}) == 61000 + grace
    assert session.backstop_ms(1000, "tools/call", {"name": "mempalace_event_wait",
                                                    "arguments": {"timeout_ms": 10**9}}) == 301000 + grace
    for timeout_ms in (1000, 5000, 60000, 600000):  # the broker answers before the session's own timer
        assert broker_deadline_s(timeout_ms, 60.0) * 1000 < timeout_ms < session.backstop_ms(timeout_ms, "ping", None)
    for timeout_ms in (1, 100, 250):  # and, for tiny timeouts too, before the backstop
        assert broker_deadline_s(timeout_ms, 60.0) * 1000 < session.backstop_ms(timeout_ms, "ping", None)


def test_parse_args_accepts_mempalace_mcp_arguments() -> None:
    a = shim.parse_args(["--palace", "/p", "--backend", "chroma", "--read-only", "--port=1", "--weird"])
    assert a["palace"] == "/p"
    assert a["read_only"] is True and "--read-only" not in a["ignored"]
    assert "--weird" in a["ignored"] and "--backend=chroma" in a["ignored"]
    assert shim.parse_args([])["read_only"] is False
    assert shim.parse_args(["--palace=/x"])["palace"] == "/x"


# --------------------------------------------------------------------------- the pump, against a fake broker
@pytest.fixture
def fake_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    return home / ".mempalace"


def test_deadline_error_and_late_reply_dropped(fake_home: Path, tmp_path: Path) -> None:
    held: list = []

    def handler(no, msg):
        if msg.get("method") == "tools/call" and msg["params"]["name"] == "slow":
            held.append((no, msg))  # answered late, below
            return None
        if "id" in msg:
            return {"jsonrpc": "2.0", "id": msg["id"], "result": {"echo": msg["method"]}}
        return None

    fake = FakeBroker(fake_home, handler)
    s = ShimProc(env={"MEMPALACE_MCP_TIMEOUT_MS": "400"}, stderr_path=tmp_path / "err")
    try:
        slow = s.request("tools/call", {"name": "slow", "arguments": {}})
        reply = s.wait_reply(slow, timeout=30)
        assert reply["error"]["code"] == protocol.DEADLINE_EXCEEDED
        # the shim told the broker to drop it
        deadline = time.monotonic() + 10
        while ("notifications/cancelled" not in [m for _, m in fake.methods()]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "notifications/cancelled" in [m for _, m in fake.methods()]
        # a late answer is dropped, and the session goes on
        conn = fake.connections[-1]
        FakeBroker.send(conn, {"jsonrpc": "2.0", "id": held[0][1]["id"], "result": {"late": True}})
        after = s.call("ping", timeout=30)
        assert after["result"] == {"echo": "ping"}
        assert all(m.get("id") != slow for m in s.inbox)
    finally:
        s.close()
        fake.close()


def test_event_wait_extends_the_deadline(fake_home: Path, tmp_path: Path) -> None:
    def handler(no, msg):
        if "id" in msg:
            if msg.get("method") == "tools/call":
                time.sleep(1.0)  # longer than MEMPALACE_MCP_TIMEOUT_MS, shorter than it plus timeout_ms
            return {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": []}}
        return None

    fake = FakeBroker(fake_home, handler)
    s = ShimProc(env={"MEMPALACE_MCP_TIMEOUT_MS": "300"}, stderr_path=tmp_path / "err")
    try:
        reply = s.tool("mempalace_event_wait", {"timeout_ms": 30000}, timeout=60)
        assert "result" in reply, reply
    finally:
        s.close()
        fake.close()


def test_lost_connection_outcome_unknown_then_replayed_initialize(fake_home: Path, tmp_path: Path) -> None:
    """The connection drops mid-call: that call gets OUTCOME_UNKNOWN; the next call reconnects and the
    client's initialize (and notifications/initialized) are replayed first, their reply swallowed."""

    def handler(no, msg):
        if msg.get("method") == "tools/call" and msg["params"]["name"] == "crash":
            return "close"
        if "id" in msg:
            return {"jsonrpc": "2.0", "id": msg["id"], "result": {"conn": no, "method": msg["method"]}}
        return None

    fake = FakeBroker(fake_home, handler)
    s = ShimProc(stderr_path=tmp_path / "err")
    try:
        init = s.initialize()
        assert init["result"]["method"] == "initialize"
        lost = s.tool("crash", timeout=30)
        assert lost["error"]["code"] == protocol.OUTCOME_UNKNOWN
        assert "connection to the broker was lost; outcome unknown; not retried" in lost["error"]["message"]
        nxt = s.tool("fine", timeout=60)
        assert nxt["result"]["method"] == "tools/call" and nxt["result"]["conn"] >= 2
        second = [m for no, m in fake.received if no == nxt["result"]["conn"]]
        methods = [m.get("method") for m in second]
        assert methods[:4] == ["broker/status", "initialize", "notifications/initialized", "tools/call"], methods
        assert second[1]["params"] == shim_init_params()
        assert not any(m.get("id", "").startswith("mp-shim/") for m in s.inbox if isinstance(m.get("id"), str))
    finally:
        s.close()
        fake.close()


def shim_init_params() -> dict:
    from tests.test_shim_support import INIT_PARAMS

    return INIT_PARAMS


def test_palace_mismatch_with_a_fake_broker_forwards_nothing(fake_home: Path, tmp_path: Path) -> None:
    def handler(no, msg):
        return {"jsonrpc": "2.0", "id": msg["id"], "result": {}} if "id" in msg else None

    fake = FakeBroker(fake_home, handler, palace="/somewhere/else")
    s = ShimProc("--palace", "/the/one/i/want", stderr_path=tmp_path / "err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.PALACE_MISMATCH, (r, s.stderr())
        assert "/somewhere/else" in r["error"]["message"] and "/the/one/i/want" in r["error"]["message"], (
            r["error"]["message"], s.stderr(), fake.received)
        assert fake.methods() and all(m == "broker/status" for _, m in fake.methods())  # nothing was forwarded
    finally:
        s.close()
        fake.close()
