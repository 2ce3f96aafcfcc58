"""mp-shim end to end: the MCP SDK client, election storm, broker kill -9, a stopped broker, palace mismatch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from mp_ssh_bridge import protocol, state
from tests.helpers import broker_pids, children_of, engine_facts, kill_pid, pid_alive, wait_for
from tests.test_shim_support import SHIM, ShimProc

pytestmark = pytest.mark.slow


@pytest.fixture
def host_role(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test machine is a container (/.dockerenv): force the host role the tests are about."""
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    return home


def _text(result) -> str:
    return "\n".join(getattr(item, "text", "") for item in result.content)


def test_mcp_sdk_client_through_shim(host_role: Path, broker, tmp_path: Path) -> None:
    """The official MCP client launches mp-shim: initialize, 47 tools, write, then find it by search."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    marker = f"quartz-otter-{uuid.uuid4().hex[:8]}"
    content = f"The {marker} lives under the third bridge and collects violet pebbles."

    async def session() -> tuple[int, str, str]:
        params = StdioServerParameters(command=SHIM, args=[], env=dict(os.environ), cwd=str(host_role))
        with open(tmp_path / "shim.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as s:
                    init = await s.initialize()
                    assert init.server_info.name == "mempalace"
                    tools = (await s.list_tools()).tools
                    added = await s.call_tool(
                        "mempalace_add_drawer", {"wing": "shimtest", "room": "bridges", "content": content}
                    )
                    assert not added.is_error, _text(added)
                    found = await s.call_tool("mempalace_search", {"query": f"{marker} violet pebbles"})
                    assert not found.is_error, _text(found)
                    return len(tools), _text(added), _text(found)

    n_tools, added, found = asyncio.run(asyncio.wait_for(session(), 180))
    assert n_tools == engine_facts()["tools"]
    assert "error" not in json.loads(added)
    assert marker in found
    # the shim went through the broker (one client session was served there)
    status = asyncio.run(_broker_status(broker.endpoint))
    assert status["totals"]["requests"] >= 3


async def _broker_status(endpoint: str) -> dict:
    from tests.helpers import RawClient

    client = await RawClient.connect(endpoint)
    try:
        return (await client.call("broker/status"))["result"]
    finally:
        await client.close()


def test_election_storm_twenty_shims_one_broker(host_role: Path, tmp_path: Path) -> None:
    """Twenty shims at once, no broker: exactly one broker is started and every session works."""
    state_dir = host_role / ".mempalace"
    assert not (state_dir / "broker.json").exists()
    shims = [ShimProc(stderr_path=tmp_path / f"shim-{i}.err") for i in range(20)]
    try:
        ids = [s.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": f"storm-{i}", "version": "1"}}) for i, s in enumerate(shims)]
        for s, i in zip(shims, ids, strict=True):
            reply = s.wait_reply(i, timeout=240)
            assert "result" in reply, reply
        answers = []
        for s in shims:
            reply = s.tool("mempalace_status", timeout=240)
            assert "result" in reply, reply
            answers.append(reply)
        assert len(answers) == 20
        record = state.read_broker_json(state_dir / "broker.json")
        assert record is not None
        pids = broker_pids(state_dir)
        assert pids == [record["pid"]], (pids, record["pid"])
    finally:
        for s in shims:
            s.close()


def test_kill_9_broker_mid_session_recovers(host_role: Path, tmp_path: Path) -> None:
    """kill -9 of the broker: the in-flight call gets OUTCOME_UNKNOWN, the next one works via a new broker."""
    state_dir = host_role / ".mempalace"
    shim = ShimProc(stderr_path=tmp_path / "shim.err")
    try:
        assert "result" in shim.initialize()
        assert "result" in shim.tool("mempalace_status", timeout=120)
        old = state.read_broker_json(state_dir / "broker.json")
        assert old is not None
        # a call that is certainly in flight when the broker dies: a long poll
        waiting = shim.request("tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 20000}})
        wait_for(lambda: (state.read_broker_json(state_dir / "broker.json") or {}).get("pid") == old["pid"], 10)
        time.sleep(1.0)  # let it reach the broker
        os.kill(old["pid"], signal.SIGKILL)
        lost = shim.wait_reply(waiting, timeout=60)
        assert lost["error"]["code"] == protocol.OUTCOME_UNKNOWN, lost
        assert "outcome unknown" in lost["error"]["message"]
        after = shim.tool("mempalace_status", timeout=180)
        assert "result" in after, after
        new = state.read_broker_json(state_dir / "broker.json")
        assert new is not None and new["pid"] != old["pid"] and pid_alive(new["pid"])
        # and the session is still a normal one: tools/list works without a new initialize
        assert len(shim.call("tools/list", timeout=60)["result"]["tools"]) == engine_facts()["tools"]
    finally:
        shim.close()


def test_a_stopped_broker_is_refused_never_a_second_engine(host_role: Path, broker, tmp_path: Path) -> None:
    """A broker that is alive but does not answer (SIGSTOP): errors, and never a second engine."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    shim = None
    try:
        shim = ShimProc(
            env={"MP_BRIDGE_CONNECT_TIMEOUT": "1", "MP_BRIDGE_ENSURE_TIMEOUT": "3"},
            stderr_path=tmp_path / "shim.err",
        )
        reply = shim.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                         "clientInfo": {"name": "t", "version": "1"}}, timeout=120)
        assert reply["error"]["code"] == protocol.BROKER_UNREACHABLE, reply
        msg = reply["error"]["message"]
        assert str(broker.proc.pid) in msg and "second writer" in msg
        again = shim.tool("mempalace_status", timeout=120)
        assert again["error"]["code"] == protocol.BROKER_UNREACHABLE, again
        assert children_of(shim.proc.pid) == []  # no engine of our own
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
        if shim is not None:
            shim.close()


def test_palace_mismatch_names_both_paths(host_role: Path, broker_factory, tmp_path: Path) -> None:
    served = host_role / "palace-served"
    wanted = host_role / "palace-wanted"
    broker_factory("--palace", str(served), wait_engine=False)
    shim = ShimProc("--palace", str(wanted), stderr_path=tmp_path / "shim.err")
    try:
        reply = shim.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                         "clientInfo": {"name": "t", "version": "1"}}, timeout=120)
        assert reply["error"]["code"] == protocol.PALACE_MISMATCH, reply
        assert str(served) in reply["error"]["message"] and str(wanted) in reply["error"]["message"]
    finally:
        shim.close()
    # the same palace, asked for explicitly, is fine
    same = ShimProc("--palace", str(served), stderr_path=tmp_path / "shim2.err")
    try:
        assert "result" in same.call("ping", timeout=60)
    finally:
        same.close()


def test_palace_id_mismatch_through_explicit_endpoint(host_role: Path, broker_factory, tmp_path: Path) -> None:
    """MEMPALACE_BROKER pointing at another state dir's broker: palace.id differs -> PALACE_MISMATCH."""
    other = host_role / "other-state"
    b = broker_factory(env={"MEMPALACE_PATH": str(other)}, wait_engine=False)
    mine = host_role / ".mempalace"
    mine.mkdir(mode=0o700, exist_ok=True)  # the broker's engine may have made it: mempalace's lock directory
    (mine / "palace.id").write_text(str(uuid.uuid4()) + "\n")
    shim = ShimProc(env={"MEMPALACE_BROKER": b.endpoint}, stderr_path=tmp_path / "shim.err")
    try:
        reply = shim.call("ping", timeout=60)
        assert reply["error"]["code"] == protocol.PALACE_MISMATCH, reply
        assert b.record["palace"] in reply["error"]["message"] and str(mine) in reply["error"]["message"]
    finally:
        shim.close()
    kill_pid(b.proc.pid)


def test_stdout_is_protocol_only_and_args_are_accepted(host_role: Path, broker, tmp_path: Path) -> None:
    """mempalace-mcp's arguments are accepted; a bad line earns -32700; nothing else appears on stdout."""
    # (no --palace: the broker fixture runs without one, and with it the engine's knowledge graph would differ)
    args = ["--backend", "chroma", "--transport", "stdio", "--host", "127.0.0.1", "--port", "8765", "--read-only"]
    env = dict(os.environ, MP_BRIDGE_LOG_LEVEL="DEBUG")
    lines = [
        b"this is not json\n",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
                    "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).encode() + b"\n",
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode() + b"\n",
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode() + b"\n",
    ]
    proc = subprocess.run([SHIM, *args], input=b"".join(lines), capture_output=True, env=env, timeout=120)
    replies = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    by_id = {r.get("id"): r for r in replies}
    assert by_id[None]["error"]["code"] == protocol.PARSE_ERROR
    assert by_id[1]["result"]["serverInfo"]["name"] == "mempalace"
    assert by_id[2]["result"] == {}
    assert b"connected to" in proc.stderr  # logs go to stderr
    assert proc.returncode == 0


def test_read_only_flag_keeps_its_meaning_through_the_shared_broker(host_role: Path, broker, tmp_path: Path) -> None:
    """`mempalace-mcp --read-only` refuses writes; so must `mp-shim --read-only`, although it shares the
    broker's one writable engine with other sessions."""
    ro = ShimProc("--read-only", stderr_path=tmp_path / "ro.err")
    env_ro = ShimProc(env={"MEMPALACE_MCP_READ_ONLY": "1"}, stderr_path=tmp_path / "env.err")
    rw = ShimProc(stderr_path=tmp_path / "rw.err")
    try:
        for s in (ro, env_ro, rw):
            assert "result" in s.initialize()
        names = {t["name"] for t in ro.call("tools/list", timeout=90)["result"]["tools"]}
        assert "mempalace_add_drawer" not in names and "mempalace_search" in names and len(names) == engine_facts()["read_only_tools"]
        for s in (ro, env_ro):
            refused = s.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": "read-only write"})
            assert refused["error"]["code"] == -32003, refused
        assert "result" in ro.tool("mempalace_search", {"query": "write"})
        wrote = rw.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": "the writer's write"})
        assert "success" in wrote["result"]["content"][0]["text"]
        assert len(rw.call("tools/list")["result"]["tools"]) == engine_facts()["tools"]
    finally:
        for s in (ro, env_ro, rw):
            s.close()


def test_same_palace_other_knowledge_graph_is_refused_not_given_a_second_writer(host_role: Path, broker,
                                                                                 tmp_path: Path) -> None:
    """`--palace P` keeps the KG inside P; without it the KG is ~/.mempalace's: one palace, one broker, so the
    second kind of session is told why instead of getting a second engine on the palace."""
    default = broker.record["palace"]
    s = ShimProc("--palace", default, stderr_path=tmp_path / "shim.err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.PALACE_MISMATCH, r
        assert "knowledge graph" in r["error"]["message"] and "--palace" in r["error"]["message"]
    finally:
        s.close()
    assert len(broker_pids(broker.state_dir)) == 1
