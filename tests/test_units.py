"""Unit tests of the small pieces: queue order, tool helpers, platform branches, state, settings."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mp_ssh_bridge import hostinfo, protocol, state
from mp_ssh_bridge_broker import tools
from mp_ssh_bridge_broker.queue import FairQueue


@dataclass(eq=False)
class J:
    owner: str
    n: int


def test_fair_queue_round_robin_and_removal():
    async def main():
        q: FairQueue[J] = FairQueue()
        a = [J("a", i) for i in range(4)]
        for j in a:
            q.put(j)
        q.put(J("b", 0))
        q.put(J("c", 0))
        assert q.remove(a[2]) and not q.remove(a[2])
        order = [(j.owner, j.n) for j in [await q.get() for _ in range(5)]]
        assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("a", 3)]
        assert len(q) == 0 and q.get_nowait() is None
        q.put(J("x", 1))
        q.put(J("x", 2))
        assert [j.n for j in q.drop_owner("x")] == [1, 2] and len(q) == 0
        # A newcomer arriving while the busy owner's job runs goes next, before that owner's next job.
        for i in range(3):
            q.put(J("busy", i))
        assert (await q.get()).n == 0  # "running"
        q.put(J("new", 0))
        assert [(j.owner, j.n) for j in [await q.get() for _ in range(3)]] == [("new", 0), ("busy", 1), ("busy", 2)]
        # ... also when its next request arrives only after its job was taken (a pipelined burst that reaches the
        # broker in pieces, the first piece a single request), as long as that is before the next get.
        q.put(J("w", 0))
        assert (await q.get()).n == 0  # "running", nothing else queued
        q.put(J("w", 1))
        q.put(J("r", 0))
        q.put(J("w", 2))
        assert [(j.owner, j.n) for j in [await q.get() for _ in range(3)]] == [("r", 0), ("w", 1), ("w", 2)]
        # ... and when its only queued request was cancelled (removed) before it sent the next one.
        q.put(J("w", 3))
        q.put(J("w", 4))
        assert (await q.get()).n == 3  # "running"
        w4 = next(j for j in q.jobs() if j.n == 4)
        assert q.remove(w4)
        q.put(J("w", 5))
        q.put(J("r", 1))
        assert [(j.owner, j.n) for j in [await q.get() for _ in range(2)]] == [("r", 1), ("w", 5)]
        # The owner holding the last turn can still be cancelled out entirely.
        q.put(J("h", 0))
        q.put(J("h", 1))
        assert (await q.get()).n == 0
        assert [j.n for j in q.drop_owner("h")] == [1] and q.get_nowait() is None
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        q.put(J("y", 9))
        assert (await asyncio.wait_for(waiter, 1)).n == 9

    asyncio.run(main())


def test_strip_root_combinators_keeps_everything_else():
    listing = {"tools": [
        {"name": "a", "inputSchema": {"type": "object", "properties": {"x": {"anyOf": [{}]}}, "anyOf": [{}], "oneOf": [{}]}},
        {"name": "b", "inputSchema": {"type": "object"}},
    ], "nextCursor": "n"}
    out = tools.strip_root_combinators(listing)
    assert out["tools"][0]["inputSchema"] == {"type": "object", "properties": {"x": {"anyOf": [{}]}}}
    assert out["tools"][1] is listing["tools"][1] and out["nextCursor"] == "n"
    assert "anyOf" in listing["tools"][0]["inputSchema"], "the input is not modified"
    assert tools.strip_root_combinators({"oops": 1}) == {"oops": 1}


def test_event_wait_helpers():
    call = {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 999_999, "topic": "t"}}
    assert tools.event_wait_timeout_ms("tools/call", call) == 300_000
    assert tools.event_wait_timeout_ms("tools/call", {"name": "mempalace_event_wait"}) == 60_000
    assert tools.event_wait_timeout_ms("tools/call", {"name": "mempalace_status"}) is None
    assert tools.event_wait_timeout_ms("tools/list", call) is None
    sliced = tools.event_wait_slice(call, 500)
    assert sliced["arguments"] == {"timeout_ms": 500, "topic": "t"} and call["arguments"]["timeout_ms"] == 999_999
    assert tools.event_wait_slice(call, 0)["arguments"]["timeout_ms"] == 0  # a look: one read, no wait
    # which answered calls make the parked long polls look again: those that may append an event
    wakes = {name: tools.may_add_events("tools/call", {"name": name}) for name in (
        "mempalace_event_append", "mempalace_task_create", "mempalace_event_ack", "mempalace_some_new_tool",
        "mempalace_add_drawer", "mempalace_kg_add", "mempalace_status", "mempalace_event_wait")}
    assert [n for n, w in wakes.items() if w] == [
        "mempalace_event_append", "mempalace_task_create", "mempalace_event_ack", "mempalace_some_new_tool"]
    assert not tools.may_add_events("tools/list", None) and tools.may_write("tools/call", {"name": "mempalace_kg_add"})
    timed_out = {"content": [{"type": "text", "text": json.dumps({"timed_out": True, "events": [], "count": 0})}]}
    got = {"content": [{"type": "text", "text": json.dumps({"timed_out": False, "events": [{"id": 1}]})}]}
    assert tools.event_wait_timed_out(timed_out) and not tools.event_wait_timed_out(got)
    assert not tools.event_wait_timed_out({"isError": True, "content": timed_out["content"]})
    assert tools.event_wait_timed_out({"structuredContent": {"timed_out": True}})


def test_socket_path_limits_per_platform():
    assert hostinfo.max_socket_path_bytes("darwin") == 103
    assert hostinfo.max_socket_path_bytes("linux") == 107
    assert hostinfo.max_socket_path_bytes("freebsd14") == 103
    short = state.StatePaths(Path("/Users/jo/.mempalace"))
    assert short.socket("darwin") == Path("/Users/jo/.mempalace/broker.sock")
    deep = state.StatePaths(Path("/Users/jo/" + "d" * 90 + "/.mempalace"))
    stand_in = deep.socket("darwin", uid=501)
    assert stand_in.parent == Path("/tmp/mp-bridge-501") and len(os.fsencode(stand_in)) <= 103
    assert stand_in == deep.socket("darwin", uid=501), "stable across calls"
    assert deep.socket("linux", uid=501) == stand_in  # 108-byte limit is exceeded too
    mid = state.StatePaths(Path("/home/" + "m" * 88))  # 106 bytes with /broker.sock: fits Linux, not macOS
    assert mid.socket("linux") == mid.preferred_socket and mid.socket("darwin", uid=1) != mid.preferred_socket


def test_boot_id_parsers_for_both_platforms():
    assert hostinfo.parse_linux_boot_id("6999cce3-5591\n") == "6999cce3-5591"
    assert hostinfo.parse_linux_boot_id("") is None
    assert hostinfo.parse_macos_boot_id("A1B2-C3\n") == "A1B2-C3"
    assert hostinfo.parse_macos_boot_id(None) is None
    assert hostinfo.boot_id("sunos") is None
    assert hostinfo.boot_id("linux")  # this CI machine is Linux


def test_container_detection_by_marker_files():
    assert hostinfo.in_container(lambda p: p == "/.dockerenv")
    assert hostinfo.in_container(lambda p: p == "/run/.containerenv")
    assert not hostinfo.in_container(lambda p: False)


def test_broker_liveness_by_pid_or_moving_heartbeat(tmp_path):
    """Same machine: the pid. Across the boundary: a heartbeat that moves (tests/test_liveness.py in full)."""
    from mp_ssh_bridge import liveness

    rec = {"pid": 42, "host": "h", "boot_id": "b", "heartbeat": 1000.0}
    here = liveness.Machine("h", "b", None)
    seen = liveness.Seen(tmp_path / "sd", directory=tmp_path / "seen", me=here)
    judge = lambda r, **kw: liveness.judge(r, 30, seen=seen, kind="broker", **kw)  # noqa: E731
    assert judge(rec, pid_alive=lambda p: True).alive
    assert not judge(rec, pid_alive=lambda p: False).alive
    clock = [0.0]
    other = dict(rec, host="container", boot_id="x")
    assert judge(other, clock=lambda: clock[0]).alive, "one reading across the boundary: alive"
    clock[0] = 31.0
    assert not judge(other, clock=lambda: clock[0]).alive, "stood still for the stale limit on our clock"
    assert judge({"pid": 1, "host": "zz"}, clock=lambda: clock[0]).alive, "no heartbeat, first reading: alive"


def test_atomic_json_and_private_dirs(tmp_path):
    d = tmp_path / "state"
    state.ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    state.write_json_atomic(d / "broker.json", {"pid": 1})
    assert stat.S_IMODE((d / "broker.json").stat().st_mode) == 0o600
    assert state.read_broker_json(d / "broker.json") == {"pid": 1}
    assert [p.name for p in d.iterdir()] == ["broker.json"], "no temp file left behind"
    (d / "bad.json").write_text("[1,2]")
    assert state.read_broker_json(d / "bad.json") is None
    os.chmod(d, 0o770)
    with pytest.raises(state.UnsafeDirectory, match="chmod go-w"):
        state.ensure_private_dir(d)


def test_palace_id_is_created_once(tmp_path):
    paths = state.StatePaths(tmp_path)
    first = state.palace_id(paths)
    assert state.palace_id(paths) == first == state.read_palace_id(paths)
    assert stat.S_IMODE(paths.palace_id_file.stat().st_mode) == 0o600


def test_palace_resolution_follows_mempalace(tmp_path):
    """mempalace 3.11's own rules (mempalace/config.py, mcp_server/_guards.py); tests/test_dropin.py
    checks the same against the real engine's answer."""
    from mp_ssh_bridge.palace import resolve, state_dir_for

    home = str(tmp_path)
    fresh = resolve(None, {}, home)  # a fresh user: XDG config dir, KG in ~/.mempalace
    assert fresh.palace == f"{home}/.config/mempalace/palace" and fresh.config_dir == f"{home}/.config/mempalace"
    assert fresh.kg == f"{home}/.mempalace/knowledge_graph.sqlite3"
    assert resolve(None, {"XDG_CONFIG_HOME": f"{home}/x"}, home).palace == f"{home}/x/mempalace/palace"
    assert resolve(None, {"XDG_CONFIG_HOME": "relative"}, home).palace == fresh.palace  # invalid per XDG: ignored
    flagged = resolve(f"{home}/p", {}, home)  # --palace moves the KG into the palace
    assert flagged.palace == f"{home}/p" and flagged.kg == f"{home}/p/knowledge_graph.sqlite3"
    env = {"MEMPAL_PALACE_PATH": "/c", "MEMPALACE_PALACE": "/b"}
    assert resolve(None, env, home).palace == "/b"
    assert resolve(None, dict(env, MEMPALACE_PALACE_PATH="/a"), home).palace == "/a"
    assert resolve(None, dict(env, MEMPALACE_PALACE_PATH="/a"), home).kg == fresh.kg  # env is not --palace
    (tmp_path / ".config/mempalace").mkdir(parents=True)
    (tmp_path / ".config/mempalace/config.json").write_text(json.dumps({"palace_path": "/srv/palace"}))
    assert resolve(None, {}, home).palace == "/srv/palace"
    assert resolve(None, {"MEMPALACE_CONFIG_DIR": f"{home}/cfg"}, home).config_dir == f"{home}/cfg"
    (tmp_path / ".mempalace/palace").mkdir(parents=True)
    assert resolve(None, {}, home).config_dir == f"{home}/.config/mempalace"  # an empty ~/.mempalace is no install
    (tmp_path / ".mempalace/palace/chroma.sqlite3").write_bytes(b"")
    legacy = resolve(None, {}, home)
    assert legacy.config_dir == f"{home}/.mempalace" and legacy.palace == f"{home}/.mempalace/palace"
    # where each memory's broker lives: the legacy layout keeps ~/.mempalace; others get their own
    assert state_dir_for(legacy, None, home) == f"{home}/.mempalace"
    assert state_dir_for(fresh, None, home) == f"{home}/.mempalace/brokers/{fresh.key(home)}"
    assert state_dir_for(fresh, "/explicit", home) == "/explicit"
    assert fresh.key(home) != flagged.key(home)
    same_palace = resolve(fresh.palace, {}, home)  # --palace naming the same palace: another KG, same broker
    assert same_palace.kg != fresh.kg and state_dir_for(same_palace, None, home) == state_dir_for(fresh, None, home)
    assert resolve("~/x", {}, home).palace == os.path.abspath("~/x")  # as mempalace-mcp: no ~ expansion
    other_home = resolve(None, {}, "/home/developer")  # the same layout seen through a home-relative mount
    assert other_home.key("/home/developer") == fresh.key(home)


def test_palace_resolution_by_mempalace_3_4_rules(tmp_path):
    """3.4.0 keeps everything under ~/.mempalace and reads neither XDG, MEMPALACE_CONFIG_DIR nor MEMPALACE_PALACE
    (learned from the engine itself: mp_ssh_bridge/enginerules.py; checked against it in tests/test_dropin.py)."""
    from mp_ssh_bridge.palace import RULES_3_4, Rules, resolve

    home = str(tmp_path)
    fresh = resolve(None, {}, home, RULES_3_4)
    assert fresh.palace == f"{home}/.mempalace/palace" and fresh.config_dir == f"{home}/.mempalace"
    ignored = {"XDG_CONFIG_HOME": f"{home}/x", "MEMPALACE_CONFIG_DIR": f"{home}/c", "MEMPALACE_PALACE": "/b"}
    assert resolve(None, ignored, home, RULES_3_4) == fresh
    assert resolve(None, dict(ignored, MEMPAL_PALACE_PATH="/c"), home, RULES_3_4).palace == "/c"
    (tmp_path / ".mempalace").mkdir()
    (tmp_path / ".mempalace/config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"palace_path": "/p"}).encode())
    assert resolve(None, {}, home, RULES_3_4).palace == f"{home}/.mempalace/palace"  # 3.4.0 cannot read a BOM
    assert resolve(None, {}, home).palace == "/p"  # 3.11 can (and ~/.mempalace/config.json is a legacy install)
    assert Rules.from_dict(RULES_3_4.as_dict()) == RULES_3_4 and Rules.from_dict({"xdg": "yes"}) is None


def test_broker_guard_keeps_what_an_engine_cannot_survive_from_it():
    from mp_ssh_bridge_broker import guard

    assert guard.invalid_params("tools/call", {"name": {"a": 1}, "arguments": {}}) == guard.TOOL_CALL_MEMBERS
    assert guard.invalid_params("tools/call", {"name": "t", "arguments": [1]}) == guard.TOOL_CALL_MEMBERS
    assert guard.invalid_params("tools/call", {"name": "t", "arguments": None}) is None
    assert guard.invalid_params("tools/call", {"arguments": 5}) is None  # no name: the engine says it is required
    assert guard.invalid_params("tools/list", {"name": 5}) is None
    assert guard.envelope_params([1]) == {} and guard.envelope_params(None) is None
    assert guard.hints_no_reply("Server error: unhashable type: 'dict'") and not guard.hints_no_reply("Filed drawer")


def test_read_only_tools_where_the_engine_cannot_say():
    from mp_ssh_bridge_broker import readonly

    own = frozenset({"mempalace_search", "mempalace_status"})
    assert readonly.classify(own) == own  # a real read-only surface: the engine's own word
    ignored = frozenset({"mempalace_search", "mempalace_add_drawer", "mempalace_new_unknown_tool"})
    assert readonly.classify(ignored) == {"mempalace_search"}  # it ignored --read-only: known read tools only
    assert readonly.classify(None) == readonly.READ_TOOLS
    assert not readonly.READ_TOOLS & readonly.WRITE_TOOLS


def test_settings_sources_and_precedence(tmp_path, monkeypatch):
    from mp_ssh_bridge.settings import load

    for name in list(os.environ):
        if name.startswith(("MP_BRIDGE_", "MEMPALACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    toml = tmp_path / "c.toml"
    toml.write_text('request_timeout = 7\nidle_exit_minutes = 2\nengine = "/opt/mp/bin/mempalace-mcp --backend chroma"\n')
    monkeypatch.setenv("MP_BRIDGE_CONFIG", str(toml))
    s = load()
    assert s.mempalace_path is None and s.palace_path == tmp_path / ".config/mempalace/palace"
    assert s.state_dir == tmp_path / ".mempalace" / "brokers" / s.memory.key(str(tmp_path))
    assert s.request_timeout == 7 and s.idle_exit_minutes == 2
    assert s.engine_argv == ["/opt/mp/bin/mempalace-mcp", "--backend", "chroma"]
    monkeypatch.setenv("MP_BRIDGE_REQUEST_TIMEOUT", "9")
    monkeypatch.setenv("MEMPALACE_PATH", "~/elsewhere")
    monkeypatch.setenv("MEMPALACE_MCP_TIMEOUT_MS", "1234")
    s = load()
    assert s.request_timeout == 9 and s.mempalace_path == tmp_path / "elsewhere" and s.mcp_timeout_ms == 1234
    assert load(request_timeout=11).request_timeout == 11  # CLI flags win
    with pytest.raises(ValueError):
        load(tcp="no-port")


def test_protocol_shape_checks():
    assert protocol.check_request_shape([]) and protocol.check_request_shape(3)
    assert protocol.check_request_shape({"method": 1}) and protocol.check_request_shape({"method": "m", "id": 1.5})
    assert protocol.check_request_shape({"method": "m", "id": True}), "booleans are not ids"
    assert protocol.check_request_shape({"method": "m", "params": "x"})
    assert protocol.check_request_shape({"method": "m", "id": "a", "params": {}}) is None
    assert protocol.check_request_shape({"id": 1, "result": {}}) is None
    assert protocol.decode(protocol.encode({"k": "ü"})) == {"k": "ü"}
    assert protocol.encode({"a": 1}).count(b"\n") == 1


def test_the_engines_nan_is_passed_on_but_a_clients_is_refused() -> None:
    """mempalace-mcp is Python: json.dumps writes NaN (a NaN distance, say); dropping that reply would leave
    its request to the stall timer. A client's NaN is still a parse error (docs/PROTOCOL.md)."""
    from mp_ssh_bridge import protocol

    line = b'{"jsonrpc":"2.0","id":3,"result":{"distance":NaN,"far":Infinity}}'
    with pytest.raises(ValueError):
        protocol.decode(line)
    msg = protocol.decode(line, strict=False)
    assert msg["id"] == 3 and msg["result"]["distance"] != msg["result"]["distance"]  # NaN
    with pytest.raises(ValueError):  # the nesting bound holds either way
        protocol.decode(b"[" * 5000 + b"]" * 5000, strict=False)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_IDS = st.integers(min_value=-(10**20), max_value=10**20) | st.text(max_size=20)


@settings(max_examples=400, deadline=None)
@given(msg_id=_IDS, body=_JSON, failed=st.booleans(), compact=st.booleans(), new_id=_IDS)
def test_a_reply_read_by_its_head_is_the_reply_parsed(msg_id: object, body: object, failed: bool, compact: bool,
                                                      new_id: object) -> None:
    """`reply_head` (the broker passes a tool call's reply on unparsed, the shim reads only its id) agrees with
    `decode` on every reply json.dumps writes, or declines; `with_id` changes the id and nothing else."""
    reply = {"jsonrpc": "2.0", "id": msg_id, "error" if failed else "result": body}
    seps = (",", ":") if compact else (", ", ": ")
    frame = json.dumps(reply, ensure_ascii=False, separators=seps).encode("utf-8", "surrogatepass")
    head = protocol.reply_head(frame)
    if head is None:
        return
    parsed = protocol.decode(frame, strict=False)
    assert head.msg_id == parsed["id"] and type(head.msg_id) is type(parsed["id"]) and head.error == failed
    swapped = head.with_id(new_id)
    assert swapped.endswith(b"\n") and swapped.count(b"\n") == frame.count(b"\n") + 1
    again = protocol.decode(swapped[:-1], strict=False)
    assert again == dict(parsed, id=new_id) or body != body  # NaN != NaN
    assert swapped[: head.start] == frame[: head.start] and swapped.endswith(frame[head.end :] + b"\n")


def test_what_reply_head_declines() -> None:
    for frame in (
        b'{"id": 1, "jsonrpc": "2.0", "result": 1}',  # another key order
        b'{"jsonrpc": "2.0", "id": 1.5, "result": 1}',  # not an id
        b'{"jsonrpc": "2.0", "id": "a\\"b", "result": 1}',  # an escaped string: left to json
        b'{"jsonrpc": "2.0", "id": 01, "result": 1}',  # not JSON
        b'{"jsonrpc": "2.0", "id": 1, "result": {"cut off"',  # not a whole object
        b'{"jsonrpc": "2.0", "id": 1, "method": "x"}',  # a request
        b'{"jsonrpc": "2.0", "id": "\xff", "result": 1}',  # not UTF-8
        b'{"jsonrpc": "2.0", "id": 1, "result": "\xe9"}',  # not UTF-8 (a Latin-1 engine's output): refused by decode
    ):
        assert protocol.reply_head(frame) is None, frame
    head = protocol.reply_head(b'{"jsonrpc": "2.0", "id": 7, "result": {"x": NaN}}')
    assert head is not None and head.with_id("s\ud800") == b'{"jsonrpc": "2.0", "id": "s\\ud800", "result": {"x": NaN}}\n'


def test_within_waits_a_bounded_time_and_never_cancels_what_it_waits_for() -> None:
    from mp_ssh_bridge_broker.tasks import within

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        with pytest.raises(asyncio.TimeoutError):
            await within(fut, 0.05)
        assert not fut.done()
        loop.call_later(0.01, fut.set_result, 5)
        assert await within(fut, 5) == 5 and await within(fut, 0) == 5
        failing: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.01, failing.set_exception, KeyError("k"))
        with pytest.raises(KeyError):
            await within(failing, 5)
        held: asyncio.Future[int] = loop.create_future()
        waiting = asyncio.ensure_future(within(held, 5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not held.cancelled() and not held.done()

    asyncio.run(main())


def test_a_clients_frames_keep_their_order_and_their_cap_whether_written_at_once_or_queued() -> None:
    """ClientSession.send_frame writes a frame straight to the socket only when nothing waits before it; a client
    that does not read is still cut off at max_client_outbox_bytes (what the socket holds unsent counts too)."""
    import socket

    from mp_ssh_bridge_broker.mux import ClientSession

    async def main() -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        session = ClientSession("unix", writer, outbox_max=64 * 1024 * 1024)
        frames = [json.dumps({"n": i, "pad": "x" * (i * 997 % 50_000)}).encode() + b"\n" for i in range(400)]
        for frame in frames:  # the first go out at once, then the socket fills and the rest queue
            session.send_frame(frame)
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        got = b""
        while got.count(b"\n") < len(frames):
            got += await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 10)
        assert [json.loads(line)["n"] for line in got.splitlines()] == list(range(len(frames)))
        session.close()
        await session.wait_closed()

        ours, theirs = socket.socketpair()  # a client that never reads
        reader, writer = await asyncio.open_connection(sock=ours)
        session = ClientSession("unix", writer, outbox_max=2 * 1024 * 1024)
        sent = 0
        while not session.closed and sent < 64:
            session.send_frame(b"[" + b"0," * 100_000 + b"0]\n")
            sent += 1
            await asyncio.sleep(0)
        assert session.closed and sent < 64, sent  # 64 frames are 12.8 MB: cut off well before
        await session.wait_closed()
        theirs.close()

    asyncio.run(main())


def test_follow_goes_on_where_the_tail_stopped(tmp_path: Path) -> None:
    """`logs -f`: a line written between the tail and the start of the follow is printed once, never lost (under
    load the follower started after the test's second line had landed, and waited for it forever)."""
    from mp_ssh_bridge import brokerlog

    log = tmp_path / "broker.log"
    log.write_text("one\ntwo\n")
    text, where = brokerlog.tail_and_position(log, 5)
    assert text == "one\ntwo"
    with open(log, "a") as fh:
        fh.write("three\n")  # before the follow begins
    lines = brokerlog.follow(log, poll=0.01, since=where)
    assert next(lines) == "three"
    with open(log, "a") as fh:
        fh.write("four\n")
    assert next(lines) == "four"


def test_a_daemons_hand_over_becomes_a_notice() -> None:
    """A queued call the container daemon answered "shutting down (handed the palace over to …)" is resent, and
    the session's next result says what happened (session.handover_notice)."""
    from mp_ssh_bridge import protocol, session

    msg = protocol.error(3, protocol.SHUTTING_DOWN, "broker is shutting down (handed the palace over to the broker "
                         "(pid 5 on mac, waiting 1 s)); request NOT executed", {"outcome": "not_executed"})
    assert session._handed_over(msg) == ("this container's daemon handed the palace over to the broker "
                                         "(pid 5 on mac, waiting 1 s)")
    plain = protocol.error(3, protocol.SHUTTING_DOWN, "broker is shutting down (signal SIGTERM); request NOT executed",
                           {"outcome": "not_executed"})
    assert session._handed_over(plain) is None
