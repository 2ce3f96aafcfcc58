"""The broker over the REAL mempalace-mcp engine: routing, fairness, faults, lifecycle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mp_ssh_bridge import palace, protocol, state
from tests.helpers import RawClient, broker_pids, engine_facts, pid_alive, tool_json, wait_for

BIN = Path(sys.executable).parent


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add(wing: str, content: str) -> dict[str, Any]:
    return {"name": "mempalace_add_drawer", "arguments": {"wing": wing, "room": "r", "content": content}}


async def status(endpoint: str) -> dict[str, Any]:
    c = await RawClient.connect(endpoint)
    try:
        return (await c.call("broker/status"))["result"]
    finally:
        await c.close()


async def drawer_count(c: RawClient) -> int:
    data = tool_json(await c.tool("mempalace_status"))
    if "total_drawers" not in data and "missing" in str(data.get("error", "")).lower():
        return 0  # a palace nobody has written to yet has no database
    return int(data["total_drawers"])


def test_concurrent_clients_with_colliding_ids(broker):
    async def main():
        clients = [await RawClient.connect(broker.endpoint) for _ in range(4)]
        # Every client uses id 1 for a different write, at the same time.
        await asyncio.gather(*(c.send(protocol.request(1, "tools/call", add(f"wing{i}", f"collide {i} apricot"))) for i, c in enumerate(clients)))
        replies = await asyncio.gather(*(c.recv_id(1, 60) for c in clients))
        for i, reply in enumerate(replies):
            data = tool_json(reply)
            assert data["success"] is True and data["wing"] == f"wing{i}", (i, data)
        # String ids and the same id reused after completion work too.
        r = await clients[0].call("tools/call", {"name": "mempalace_search", "arguments": {"query": "apricot collide"}}, msg_id="1")
        assert r["id"] == "1"
        assert len(tool_json(r)["results"]) >= 4
        assert await drawer_count(clients[1]) == 4
        st = (await clients[2].call("broker/status"))["result"]
        assert len(st["clients"]) == 4
        assert st["engine"]["version"] == engine_facts()["version"]
        for c in clients:
            await c.close()

    run(main())


def test_initialize_cached_per_protocol_version(broker):
    async def main():
        c = await RawClient.connect(broker.endpoint)
        before = (await c.call("broker/status"))["result"]["totals"]["engine_requests"]
        versions = []
        for v in ("2025-11-25", "2024-11-05", "2024-11-05", "2025-06-18", "2025-06-18"):
            r = await c.call("initialize", {"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})
            versions.append(r["result"]["protocolVersion"])
            assert r["result"]["serverInfo"]["name"] == "mempalace"
        await c.send(protocol.notification("notifications/initialized"))
        assert versions == ["2025-11-25", "2024-11-05", "2024-11-05", "2025-06-18", "2025-06-18"]
        after = (await c.call("broker/status"))["result"]["totals"]["engine_requests"]
        # latest came from the start-up initialize; each other version reached the engine once
        assert after - before == 2
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(main())


def test_cancel_of_a_queued_request(broker):
    async def main():
        a = await RawClient.connect(broker.endpoint)
        b = await RawClient.connect(broker.endpoint)
        base = await drawer_count(b)
        for i in range(6):  # keep the engine busy with A's writes
            await a.send(protocol.request(100 + i, "tools/call", add("busy", f"busy write {i}")))
        # B queues two writes and cancels the second in the same breath.
        await b.send_raw(
            protocol.encode(protocol.request(1, "tools/call", add("b", "kept write")))
            + protocol.encode(protocol.request(2, "tools/call", add("b", "cancelled write")))
            + protocol.encode(protocol.notification("notifications/cancelled", {"requestId": 2, "reason": "test"}))
        )
        assert tool_json(await b.recv_id(1, 60))["success"] is True
        for i in range(6):
            await a.recv_id(100 + i, 60)
        assert (await b.call("ping"))["result"] == {}
        assert not [m for m in b.inbox if m.get("id") == 2], "a cancelled request must get no reply"
        assert await drawer_count(b) == base + 7  # 6 busy + 1 kept; the cancelled one never ran
        st = (await b.call("broker/status"))["result"]
        assert st["totals"]["cancelled"] == 1
        await a.close()
        await b.close()

    run(main())


def test_fairness_read_is_not_starved_by_a_burst_of_writes(broker):
    async def main():
        a = await RawClient.connect(broker.endpoint)
        b = await RawClient.connect(broker.endpoint)
        await a.send_raw(b"".join(protocol.encode(protocol.request(i, "tools/call", add("burst", f"burst write {i}"))) for i in range(20)))
        # Wait until the burst is really queued behind a running write.
        st = None
        for _ in range(200):
            st = (await b.call("broker/status"))["result"]
            if st["in_flight"] and st["queue_depth"] >= 15:
                break
            await asyncio.sleep(0.01)
        assert st and st["queue_depth"] >= 15, st
        await b.send(protocol.request("s", "tools/call", {"name": "mempalace_status", "arguments": {}}))
        # Count A's writes that complete before B's read does.
        order: list[str] = []

        async def collect_a():
            for _ in range(20):
                msg = await a.recv(60)
                assert msg is not None and "result" in msg
                order.append(f"a{msg['id']}")

        async def collect_b():
            msg = await b.recv_id("s", 60)
            assert tool_json(msg)["total_drawers"] >= 1
            order.append("b")

        await asyncio.gather(collect_a(), collect_b())
        writes_before_read = order.index("b")
        print(f"fairness: {writes_before_read} of A's 20 queued writes completed before B's status")
        assert writes_before_read <= 2, order
        await a.close()
        await b.close()

    run(main())


def test_event_wait_does_not_block_other_clients(broker):
    async def main():
        a = await RawClient.connect(broker.endpoint)
        b = await RawClient.connect(broker.endpoint)
        assert tool_json(await b.tool("mempalace_add_drawer", add("seed", "seed drawer")["arguments"], timeout=60))["success"]
        await a.send(protocol.request(1, "tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 4000}}))
        await asyncio.sleep(0.3)
        await b.send(protocol.request(1, "tools/call", {"name": "mempalace_status", "arguments": {}}))
        first = await asyncio.wait_for(
            asyncio.wait(
                [asyncio.create_task(a.recv_id(1, 30)), asyncio.create_task(b.recv_id(1, 30))],
                return_when=asyncio.FIRST_COMPLETED,
            ),
            30,
        )
        done, pending = first
        winner = done.pop().result()
        assert "total_drawers" in json.loads(winner["result"]["content"][0]["text"]), "B's status must not wait behind A's long poll"
        rest = await pending.pop()
        data = tool_json(rest)
        assert data["timed_out"] is True and data["events"] == []  # the documented result, once
        await a.close()
        await b.close()

    run(main())


async def until_parked(endpoint: str, n: int, bound: float = 4.0) -> dict[str, Any]:
    """broker/status once it holds `n` long polls (or at the bound: the caller asserts)."""
    deadline = time.monotonic() + bound
    st = await status(endpoint)
    while st["long_polls_parked"] != n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        st = await status(endpoint)
    return st


def test_a_long_poll_is_held_by_the_broker_and_woken_by_a_write_through_it(broker_factory):
    """#14: a pending mempalace_event_wait does not occupy the engine — between its looks (one engine call each,
    no wait there) the broker holds it — and an event appended through the broker wakes it at once. The periodic
    look is set to 60 s here, so only the write can have woken it."""
    broker = broker_factory(env={"MP_BRIDGE_EVENT_WAIT_POLL": "60"})

    async def main():
        a = await RawClient.connect(broker.endpoint)
        b = await RawClient.connect(broker.endpoint)
        wait = {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 45000, "room": "r14", "stream": "s14"}}
        await a.send(protocol.request(1, "tools/call", wait))
        st = await until_parked(broker.endpoint, 1)
        assert st["long_polls_parked"] == 1 and st["in_flight"] is None, st
        before = st["totals"]["engine_requests"]
        for _ in range(10):  # the others' calls run on a free engine
            assert "result" in await b.tool("mempalace_status", {}, timeout=30)
        st = await status(broker.endpoint)
        assert st["totals"]["engine_requests"] - before == 10, st["totals"]  # statuses only: the wait took no look
        appended = tool_json(await b.tool("mempalace_event_append", {
            "type": "note", "stream": "s14", "room": "r14", "from_agent": "b", "body": "wake up"}, timeout=30))
        assert appended.get("event"), appended
        woken = time.monotonic()
        got = tool_json(await a.recv_id(1, 30))
        assert time.monotonic() - woken < 20, "not woken by the write (the periodic look is 60 s away)"
        assert got["timed_out"] is False and [e["body"] for e in got["events"]] == ["wake up"], got
        st = await status(broker.endpoint)
        assert st["long_polls_parked"] == 0
        # a cancelled wait (on a room with no event yet): no reply (per spec), and the broker holds it no longer
        quiet = {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 45000, "room": "quiet", "stream": "s14"}}
        await a.send(protocol.request(2, "tools/call", quiet))
        assert (await until_parked(broker.endpoint, 1))["long_polls_parked"] == 1
        await a.send(protocol.notification("notifications/cancelled", {"requestId": 2}))
        assert (await until_parked(broker.endpoint, 0))["long_polls_parked"] == 0
        assert "result" in await a.call("ping")  # and its connection goes on
        await a.close()
        await b.close()

    run(main())


def test_a_parked_long_poll_finds_an_event_that_did_not_come_through_the_broker(broker):
    """An event appended to the palace's coordination log by another process (mempalace's own CLI does so): the
    periodic look (`event_wait_poll`, 0.5 s) finds it."""
    from mempalace.logstream import LOGSTREAM_DB_FILENAME, Logstream

    async def main():
        a = await RawClient.connect(broker.endpoint)
        wait = {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 45000, "room": "oob", "stream": "s"}}
        await a.send(protocol.request(1, "tools/call", wait))
        st = await until_parked(broker.endpoint, 1)
        assert st["long_polls_parked"] == 1, st
        log = Logstream(db_path=str(Path(st["broker"]["palace"]) / LOGSTREAM_DB_FILENAME))
        log.append_event(type="note", stream="s", room="oob", from_agent="cli", body="from outside")
        got = tool_json(await a.recv_id(1, 30))
        assert got["timed_out"] is False and [e["body"] for e in got["events"]] == ["from outside"], got
        await a.close()

    run(main())


def test_engine_killed_mid_call_gives_outcome_unknown_and_restarts(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_EVENT_WAIT_SLICE": "20"})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        st = (await c.call("broker/status"))["result"]
        old_pid = st["engine"]["pid"]
        await c.send(protocol.request(7, "tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 30000}}))
        for _ in range(100):
            st = (await c.call("broker/status"))["result"]
            if st["in_flight"]:
                break
            await asyncio.sleep(0.02)
        os.kill(old_pid, signal.SIGKILL)
        reply = await c.recv_id(7, 30)
        assert reply["error"]["code"] == protocol.OUTCOME_UNKNOWN, reply
        assert "outcome is unknown" in reply["error"]["message"] and "NOT retried" in reply["error"]["message"]
        # The next call works on a new engine.
        r = await c.tool("mempalace_add_drawer", add("after", "written after the crash")["arguments"], timeout=60)
        assert tool_json(r)["success"] is True
        st = (await c.call("broker/status"))["result"]
        assert st["engine"]["pid"] != old_pid and st["engine"]["restarts"] == 1
        assert st["totals"]["outcome_unknown"] == 1
        await c.close()

    run(main())


def test_stopped_engine_hits_deadline_then_is_killed_and_restarted(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_REQUEST_TIMEOUT": "3", "MP_BRIDGE_STALL_TIMEOUT": "4"})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        old_pid = (await c.call("broker/status"))["result"]["engine"]["pid"]
        os.kill(old_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            reply = await c.tool("mempalace_status", timeout=30)
            waited = time.monotonic() - started
            assert reply["error"]["code"] == protocol.DEADLINE_EXCEEDED, reply
            assert reply["error"]["data"]["outcome"] == "unknown"
            assert waited < 15, "the deadline must turn a frozen engine into an error in seconds"
            # The stall limit kills the stopped engine and a new one serves the next call.
            for _ in range(600):
                st = (await c.call("broker/status"))["result"]
                if st["engine"]["state"] == "ready" and st["engine"]["pid"] not in (None, old_pid):
                    break
                await asyncio.sleep(0.05)
            r = await c.tool("mempalace_add_drawer", add("s", "after the stall")["arguments"], timeout=60)
            assert tool_json(r)["success"] is True
            st = (await c.call("broker/status"))["result"]
            assert st["engine"]["pid"] != old_pid and st["engine"]["restarts"] == 1
            assert not pid_alive(old_pid)
        finally:
            try:
                os.kill(old_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        await c.close()

    run(main())


def test_ten_concurrent_ensure_leave_exactly_one_broker(home):
    state_dir = home / ".mempalace"
    procs = [
        subprocess.Popen([str(BIN / "mempalace-broker"), "--ensure"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(10)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outs]
    infos = [json.loads(o[0].decode().strip().splitlines()[-1]) for o in outs]
    assert len({i["pid"] for i in infos}) == 1
    assert sum(1 for i in infos if i["started"]) >= 1
    assert infos[0]["endpoint"].startswith("unix://") and infos[0]["palace"] == palace.resolve(None).palace
    assert all(len(o[0].decode().strip().splitlines()) == 1 for o in outs), "stdout is ONE JSON line"
    time.sleep(1.0)  # let any losing broker finish exiting
    assert broker_pids(state_dir) == [infos[0]["pid"]]
    record = state.read_broker_json(state_dir / "broker.json")
    assert record and record["pid"] == infos[0]["pid"]
    assert (state_dir / "broker.json").stat().st_mode & 0o777 == 0o600
    assert Path(infos[0]["endpoint"][7:]).stat().st_mode & 0o777 == 0o600
    # idempotent: once more, same broker, not started
    again = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], capture_output=True, timeout=60)
    assert json.loads(again.stdout)["pid"] == infos[0]["pid"] and json.loads(again.stdout)["started"] is False


def test_idle_exit_removes_socket_and_broker_json(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_IDLE_EXIT_MINUTES": "0.03"}, wait_engine=False)
    sock = Path(broker.socket_path)

    async def touch():
        c = await RawClient.connect(broker.endpoint)
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(touch())
    assert broker.proc.wait(timeout=60) == 0
    assert not sock.exists() and not (broker.state_dir / "broker.json").exists()


def test_stale_state_is_reclaimed(home):
    state_dir = home / ".mempalace"
    state_dir.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    sock_path = state_dir / "broker.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()  # a socket file nobody listens on
    state.write_json_atomic(
        state_dir / "broker.json",
        {"pid": dead.pid, "endpoint": f"unix://{sock_path}", "palace": str(state_dir / "palace"), "heartbeat": 0},
    )
    out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    info = json.loads(out.stdout)
    assert info["pid"] != dead.pid and info["started"] is True

    async def use():
        c = await RawClient.connect(info["endpoint"])
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(use())


def test_malformed_and_oversized_lines_hurt_only_their_sender(broker_factory):
    broker = broker_factory(env={"MP_BRIDGE_MAX_LINE_BYTES": "65536"})

    async def main():
        good = await RawClient.connect(broker.endpoint)
        bad = await RawClient.connect(broker.endpoint)
        huge = await RawClient.connect(broker.endpoint)
        await bad.send_raw(b"{this is not json\n")
        r = await bad.recv(10)
        assert r["error"]["code"] == protocol.PARSE_ERROR and r["id"] is None
        await bad.send_raw(b'{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}\n')
        assert (await bad.recv(10))["error"]["code"] == protocol.INVALID_REQUEST
        await bad.send_raw(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]\n')
        assert (await bad.recv(10))["error"]["code"] == protocol.INVALID_REQUEST
        r = await bad.call("no/such/method")
        assert r["error"]["code"] == protocol.METHOD_NOT_FOUND
        assert (await bad.call("ping"))["result"] == {}  # still usable
        # A duplicate pending id is refused for that request alone.
        await bad.send_raw(
            protocol.encode(protocol.request(9, "tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 1500}}))
            + protocol.encode(protocol.request(9, "tools/call", {"name": "mempalace_status", "arguments": {}}))
        )
        dup = await bad.recv(10)
        assert dup["id"] == 9 and dup["error"]["code"] == protocol.INVALID_REQUEST
        assert tool_json(await bad.recv_id(9, 30))["timed_out"] is True
        # Over the cap: a clear error, then that connection (only) is closed.
        await huge.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":"' + b"a" * 200_000 + b'"}}\n')
        r = await huge.recv(10)
        assert r["error"]["code"] == protocol.LINE_TOO_LONG
        assert await huge.recv(10) is None
        r = await good.tool("mempalace_add_drawer", add("good", "the good client still writes")["arguments"])
        assert tool_json(r)["success"] is True
        await good.close()
        await bad.close()

    run(main())


def test_sigterm_stops_cleanly(broker):
    sock = Path(broker.socket_path)

    async def main():
        c = await RawClient.connect(broker.endpoint)
        engine_pid = (await c.call("broker/status"))["result"]["engine"]["pid"]
        await c.send(protocol.request(1, "tools/call", add("t", "written just before shutdown")))
        await asyncio.sleep(0.02)
        broker.proc.send_signal(signal.SIGTERM)
        reply = await c.recv_id(1, 30)
        # Either it finished in the grace period or it says plainly what happened.
        assert "result" in reply or reply["error"]["code"] in (protocol.SHUTTING_DOWN, protocol.OUTCOME_UNKNOWN)
        assert await c.recv(30) is None
        return engine_pid

    engine_pid = run(main())
    assert broker.proc.wait(timeout=30) == 0
    assert not sock.exists()
    assert not (broker.state_dir / "broker.json").exists()
    wait_for(lambda: not pid_alive(engine_pid), 10, what="engine gone")


def test_refuses_a_state_dir_others_can_write(home):
    state_dir = home / ".mempalace"
    state_dir.mkdir()
    os.chmod(state_dir, 0o777)
    out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure", "--timeout", "5"], capture_output=True, timeout=60)
    assert out.returncode == 1
    assert b"writable by group or others" in out.stderr and b"chmod go-w" in out.stderr


def test_tcp_listener_requires_the_token(broker_factory):
    broker = broker_factory("--tcp", "127.0.0.1:0", wait_engine=False)
    rec = broker.record
    host, port = rec["endpoints"]["tcp"][len("tcp://") :].rsplit(":", 1)
    token = rec["tcp_token"]

    async def client(tok: str | None, first: dict[str, Any]) -> list[dict[str, Any] | None]:
        reader, writer = await asyncio.open_connection(host, int(port))
        if tok is not None:
            first = protocol.request(1, "broker/auth", {"token": tok})
        writer.write(protocol.encode(first))
        await writer.drain()
        out = [json.loads(await asyncio.wait_for(reader.readline(), 10) or b"null")]
        try:
            writer.write(protocol.encode(protocol.request(2, "ping")))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
        except ConnectionError:
            line = b""  # the broker closed on us: what a refused client should see
        out.append(json.loads(line) if line else None)
        writer.close()
        return out

    async def main():
        ok = await client(token, {})
        assert ok[0]["result"] == {"ok": True} and ok[1]["result"] == {}
        wrong = await client(token[:-1] + ("A" if token[-1] != "A" else "B"), {})
        assert wrong[0]["error"]["code"] == protocol.UNAUTHORIZED and wrong[1] is None
        missing = await client(None, protocol.request(1, "ping"))
        assert missing[0]["error"]["code"] == protocol.UNAUTHORIZED and missing[1] is None
        # the unix socket is unaffected
        c = await RawClient.connect(broker.endpoint)
        assert (await c.call("ping"))["result"] == {}
        await c.close()

    run(main())


def test_broker_skips_a_shim_installed_as_mempalace_mcp(broker_factory, tmp_path):
    impostor_dir = tmp_path / "shim-as-engine"
    impostor_dir.mkdir()
    impostor = impostor_dir / "mempalace-mcp"
    impostor.write_bytes((BIN / "mp-shim").read_bytes())
    impostor.chmod(0o755)
    broker = broker_factory(env={"PATH": f"{impostor_dir}{os.pathsep}{os.environ['PATH']}"})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        st = (await c.call("broker/status"))["result"]
        assert st["engine"]["version"] == engine_facts()["version"]  # the real engine, not the shim talking to itself
        await c.close()

    run(main())


def test_bare_environment_still_finds_the_engine(home, tmp_path):
    """MCP clients spawn servers with little more than HOME and PATH=/usr/bin:/bin."""
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "MP_BRIDGE_CONFIG": str(home / "none.toml")}
    out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    info = json.loads(out.stdout)
    memory = palace.resolve(None, env, str(home))  # a fresh HOME: the XDG palace, as a plain engine would open
    assert info["state_dir"] == palace.state_dir_for(memory, None, str(home)) and info["palace"] == memory.palace

    async def main():
        c = await RawClient.connect(info["endpoint"])
        r = await c.tool("mempalace_add_drawer", add("bare", "from a bare environment")["arguments"], timeout=60)
        assert tool_json(r)["success"] is True
        await c.close()

    run(main())


def test_no_engine_while_a_degraded_session_writes_across_the_boundary(home, monkeypatch):
    """A container session running its own engine (degraded mode, a bridge from before owner.json) keeps
    degraded.json's heartbeat moving; pids from its side mean nothing here, so that heartbeat alone keeps the
    broker's engine off the palace. The broker itself is started and serves (docs/PROTOCOL.md "Ownership"): its
    status names whom it waits for, and its engine starts once that heartbeat has stood still for the limit."""
    from mp_ssh_bridge import election
    from tests.test_liveness import Beating

    monkeypatch.setenv("MP_BRIDGE_HEARTBEAT_STALE_AFTER", "1.5")
    monkeypatch.setenv("MP_BRIDGE_ENGINE", f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}")
    state_dir = home / ".mempalace"
    state_dir.mkdir(mode=0o700)
    record = {"pid": 4242, "engine_pid": 4243, "host": "some-container", "boot_id": "their-boot"}
    writer = Beating(state_dir / "degraded.json", record, offset=-3600)  # its clock an hour behind ours: no matter
    try:
        out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure", "--timeout", "10"], capture_output=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["started"] is True
        status = election.probe(info["endpoint"], 2.0)
        assert status is not None and status["engine"]["pid"] is None, status
        ownership = status["ownership"]
        assert ownership["state"] == "waiting" and "some-container" in ownership["waiting_for"], ownership
        assert not (state_dir / "owner.json").exists() and not (state_dir / "engine.json").exists()
    finally:
        writer.stop()
    # Once its heartbeat has stood still for the stale limit (by this machine's clock), the palace is free again.
    ready = wait_for(lambda: (st := election.probe(info["endpoint"], 2.0)) and st["engine"]["state"] == "ready" and st,
                     20, what="the engine once the degraded session's heartbeat stood still")
    assert ready["ownership"]["state"] == "holding" and ready["ownership"]["owner"]["pid"] == info["pid"], ready


def test_read_only_session_gets_the_engines_read_only_surface(broker):
    async def main():
        ro = await RawClient.connect(broker.endpoint)
        rw = await RawClient.connect(broker.endpoint)
        st = (await ro.call("broker/status", {"readOnly": True}))["result"]
        assert any(c["read_only"] for c in st["clients"])
        ro_tools = {t["name"] for t in (await ro.call("tools/list", timeout=90))["result"]["tools"]}
        rw_tools = {t["name"] for t in (await rw.call("tools/list"))["result"]["tools"]}
        assert (len(rw_tools), len(ro_tools)) == (engine_facts()["tools"], engine_facts()["read_only_tools"])
        assert "mempalace_search" in ro_tools and "mempalace_add_drawer" not in ro_tools
        refused = await ro.tool("mempalace_add_drawer", add("ro", "must not be stored")["arguments"])
        assert refused["error"]["code"] == -32003 and "read-only" in refused["error"]["message"]
        assert "results" in tool_json(await ro.tool("mempalace_search", {"query": "anything"}))
        # The other client is untouched, and the refused write never reached the palace.
        assert tool_json(await rw.tool("mempalace_add_drawer", add("rw", "stored by the writer")["arguments"]))["success"]
        assert await drawer_count(rw) == 1
        await ro.close()
        await rw.close()

    run(main())


def test_a_read_only_environment_does_not_make_the_shared_engine_read_only(broker_factory):
    """A read-only shim may be the one that starts the broker: its MEMPALACE_MCP_READ_ONLY is per session."""
    broker = broker_factory(env={"MEMPALACE_MCP_READ_ONLY": "1"})

    async def main():
        c = await RawClient.connect(broker.endpoint)
        assert len((await c.call("tools/list"))["result"]["tools"]) == engine_facts()["tools"]
        assert tool_json(await c.tool("mempalace_add_drawer", add("w", "the writer still writes")["arguments"]))["success"]
        await c.close()

    run(main())
