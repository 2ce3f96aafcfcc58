"""Bad input is answered, never dropped, and never kills anything: the broker's socket and the shim's stdin.

Hostile lines (random bytes, invalid UTF-8, lone surrogates, deep nesting, wrong types for every member,
huge numbers, odd cancels and progress tokens, batches) go one by one over ONE connection to a real broker
(real engine behind it), and one by one into a real `mp-shim`'s stdin. Each line is judged by an oracle
written from the JSON-RPC/MCP rules (not from protocol.py): what reply it is owed — none for a notification
or a blank line, -32700 with id null for what is not JSON, -32600 for JSON that is no valid message
(id null when the id itself is unusable), -32602 for a known method's bad params, and some answer carrying
its id for anything the engine gets. After each case a `ping` proves the connection still works; another
client is served throughout; the broker's log and the shim's stderr carry no traceback.

Counts follow tests/reliability.py: a few hundred cases in CI, >= 10,000 per target with RELIABILITY=full.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp_ssh_bridge import protocol
from tests.conftest import BrokerHandle
from tests.reliability import FULL, record, scale
from tests.test_shim_support import SHIM

pytestmark = [pytest.mark.reliability]

NO_REPLY = "none"  # a notification, a response, a blank line: nothing is owed
ANY = "any"  # the engine answers it: a result or an error, with its id

SURROGATES = ["\ud800", "\udfff", "a\udc80b", "\ud83d"]  # lone halves; a valid pair ("\ud83d\ude00") is fine


def _settings(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=None,
        derandomize=not FULL,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- the oracle: what one line is owed, by JSON-RPC 2.0 and MCP ---------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed value, iteratively (a test must not recurse either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def expected(line: bytes) -> tuple[str | int, Any]:
    """(what is owed, the id it must carry): a code, ANY (a reply of any kind) or NO_REPLY."""
    if not line.strip():
        return NO_REPLY, None
    try:
        msg = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return protocol.PARSE_ERROR, None
    if _depth(msg) > protocol.MAX_NESTING:
        return protocol.PARSE_ERROR, None
    if not isinstance(msg, dict):
        return protocol.INVALID_REQUEST, None
    raw_id = msg.get("id")
    usable = isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool))
    msg_id = raw_id if usable else None
    if "jsonrpc" in msg and msg["jsonrpc"] != "2.0":
        return protocol.INVALID_REQUEST, msg_id
    if "method" not in msg:
        return (NO_REPLY, None) if ("result" in msg or "error" in msg) else (protocol.INVALID_REQUEST, msg_id)
    method, params = msg["method"], msg.get("params")
    if not isinstance(method, str):
        return protocol.INVALID_REQUEST, msg_id
    if "id" in msg and not usable:
        return protocol.INVALID_REQUEST, None
    if "params" in msg and not isinstance(params, (dict, list)):
        return protocol.INVALID_REQUEST, msg_id
    if "id" not in msg:
        return NO_REPLY, None
    p = params if isinstance(params, dict) else {}
    if method == "ping" or method == "broker/auth":
        return "result", msg_id
    if method == "broker/status":
        if "timeoutMs" in p:
            t = p["timeoutMs"]
            if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 2**31 - 1):
                return protocol.INVALID_PARAMS, msg_id
        return "result", msg_id
    if method.startswith(("broker/", "notifications/")):  # a notification sent with an id: no such request
        return protocol.METHOD_NOT_FOUND, msg_id
    if method == "logging/setLevel":
        levels = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
        return ("result" if p.get("level") in levels else protocol.INVALID_PARAMS), msg_id
    if method == "tools/call" and "name" in p:
        if not isinstance(p["name"], str) or not isinstance(p.get("arguments"), (dict, type(None))):
            return protocol.INVALID_PARAMS, msg_id
    return ANY, msg_id


# --- hostile lines ---------------------------------------------------------------------------------------
def _dumps(value: Any, how: str) -> bytes:
    """JSON text of `value`, its lone surrogates as escapes ("ascii"), raw UTF-8 where possible ("utf8"),
    or as CESU bytes that are not UTF-8 at all ("surrogatepass")."""
    if how == "ascii":
        return json.dumps(value).encode()
    text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass" if how == "surrogatepass" else "backslashreplace")


texts = st.one_of(st.text(max_size=12), st.sampled_from(SURROGATES), st.text(alphabet="[]{}\"\\:,", max_size=8))
ints = st.one_of(st.integers(-1000, 1000), st.integers(-(2**70), 2**70), st.just(10**4000))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False), texts)
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(texts, kids, max_size=3)), max_leaves=8)
ids = st.one_of(st.integers(), st.text(max_size=10), st.sampled_from(SURROGATES), st.none(), st.booleans(),
                st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(10**4000))
ABSENT = object()


def _progress_params(token: Any) -> dict[str, Any]:
    return {"name": "mp_fuzz_no_such_tool", "arguments": {}, "_meta": {"progressToken": token}}


@st.composite
def params_for(draw: st.DrawFn, method: Any) -> Any:
    odd = draw(st.one_of(values, st.sampled_from(SURROGATES)))
    if method == "broker/status":
        # readOnly: true would make the connection read-only for good (and start a probe engine): never sent
        return draw(st.one_of(
            st.fixed_dictionaries({"timeoutMs": st.one_of(st.just(0), st.integers(10_000, 2**31 - 1), values,
                                                           st.integers(2**31, 2**80), st.integers(-(2**40), -1))}),
            st.fixed_dictionaries({"readOnly": st.one_of(st.just(False), st.none(), texts, ints),
                                   "transport": values, "role": values, "probe": values}),
            st.just(odd)))
    if method == "logging/setLevel":
        return draw(st.one_of(st.fixed_dictionaries({"level": st.one_of(st.sampled_from(["info", "debug", "Info"]),
                                                                          values)}), st.just(odd)))
    if method == "notifications/cancelled":
        return draw(st.fixed_dictionaries({"requestId": ids, "reason": values}))
    if method == "tools/call":
        return draw(st.one_of(
            st.fixed_dictionaries({"name": st.one_of(st.just("mp_fuzz_no_such_tool"), values),
                                   "arguments": st.one_of(st.just({}), values)}),
            st.builds(_progress_params, st.one_of(ids, values)),
            st.just(odd)))
    if method == "initialize":  # the broker answers from its cache: only the known versions (a miss is an engine call)
        return draw(st.one_of(st.just(odd), st.fixed_dictionaries({
            "protocolVersion": st.sampled_from(protocol.KNOWN_PROTOCOL_VERSIONS),
            "capabilities": values, "clientInfo": values})))
    return odd


good_ids = st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=10), st.sampled_from(SURROGATES),
                    st.integers(2**63, 2**200))
bad_ids = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
MUTATIONS = ("jsonrpc missing", "jsonrpc wrong", "id wrong", "id missing", "method wrong", "method missing",
             "params wrong", "result added")


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A valid request for a method the broker knows, or one with a member or two gone wrong; serialized with
    lone surrogates escaped, raw, or as CESU bytes that are not UTF-8."""
    method = draw(st.sampled_from(["ping", "broker/status", "logging/setLevel", "notifications/cancelled",
                                   "broker/auth", "broker/nope", "tools/call", "tools/call", "fuzz/unknown",
                                   "notifications/initialized", "initialize", "tools/list"]))
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(good_ids), "method": method}
    if method.startswith("notifications/"):
        del msg["id"]
    if draw(st.integers(0, 3)):
        msg["params"] = draw(params_for(method))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        field = mutation.split(" ")[0]
        if mutation.endswith("missing"):
            msg.pop(field, None)
        elif mutation == "jsonrpc wrong":
            msg["jsonrpc"] = draw(st.sampled_from(["1.0", 2, None, "2.0 ", ["2.0"]]))
        elif mutation == "id wrong":
            msg["id"] = draw(st.one_of(bad_ids, st.just(10**4000)))
        elif mutation == "method wrong":
            msg["method"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2), texts))
        elif mutation == "params wrong":
            msg["params"] = draw(st.one_of(scalars, st.sampled_from(SURROGATES)))
        else:
            msg["result"] = draw(values)
    how = draw(st.sampled_from(["ascii", "ascii", "utf8", "utf8", "surrogatepass"]))
    return _dumps(msg, how)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting around the limit and far beyond it, bare or inside a request's params."""
    depth = draw(st.one_of(st.integers(protocol.MAX_NESTING - 3, protocol.MAX_NESTING + 3),
                           st.sampled_from([1000, 5000, 100_000])))
    if draw(st.booleans()):
        body = b"[" * depth + b"]" * depth
    else:
        body = b'{"a":' * depth + b"1" + b"}" * depth
    if draw(st.booleans()):
        return body
    return b'{"jsonrpc":"2.0","id":"deep","method":"fuzz/unknown","params":{"x":' + body + b"}}"


def _no_newline(data: bytes) -> bytes:
    return data.replace(b"\n", b" ").replace(b"\r", b" ")


lines = st.one_of(
    messages(),
    messages(),
    deep(),
    st.binary(max_size=40).map(_no_newline),
    st.sampled_from([b"", b" ", b"{}", b"[]", b"null", b"1", b"\"x\"", b"NaN", b"[NaN]", b'{"id":Infinity}',
                     b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"1" * 5000, b'{"id":1e400,"method":"ping"}',
                     b'{"jsonrpc":"2.0","id":1,"method":"ping"', b"\x00", b'"\\ud800"']),
    st.lists(st.builds(lambda i: {"jsonrpc": "2.0", "id": i, "method": "ping"}, st.integers()), max_size=3)
    .map(lambda batch: json.dumps(batch).encode()),
)


# --- talking to the targets --------------------------------------------------------------------------------
class LineChannel:
    """Newline-delimited frames on a blocking byte stream; every frame received is kept as raw bytes."""

    def __init__(self, send: Any, recv_line: Any) -> None:
        self._send = send
        self._recv_line = recv_line
        self.garbage: list[bytes] = []  # frames that were not a JSON-RPC message

    def send(self, data: bytes) -> None:
        self._send(data)

    def next_message(self, timeout: float) -> dict[str, Any] | None:
        raw = self._recv_line(timeout)
        if raw is None:
            return None
        try:
            msg = json.loads(raw)
        except ValueError:
            self.garbage.append(raw)
            return {}
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not ("method" in msg or "id" in msg):
            self.garbage.append(raw)
            return {}
        return msg


def socket_channel(path: str) -> tuple[LineChannel, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = sock.makefile("rb")

    def recv_line(timeout: float) -> bytes | None:
        sock.settimeout(timeout)
        line = reader.readline()
        return line.rstrip(b"\n") if line else None

    return LineChannel(sock.sendall, recv_line), sock


class ShimChannel:
    """A real `mp-shim`: stdin written line by line, stdout read by a thread, stderr kept in a file."""

    def __init__(self, stderr_path: Path) -> None:
        env = dict(os.environ, MP_BRIDGE_ROLE="host", MP_BRIDGE_LOG_LEVEL="WARNING")
        self.stderr_path = stderr_path
        with open(stderr_path, "ab") as err:
            self.proc = subprocess.Popen([SHIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        self._lines: list[bytes] = []
        self._cv = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()
        self.channel = LineChannel(self._write, self._next_line)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self._lines.append(line.rstrip(b"\n"))
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _next_line(self, timeout: float) -> bytes | None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._lines or self._eof, timeout):
                raise TimeoutError(f"mp-shim wrote nothing within {timeout}s; stderr: {self.stderr()[-2000:]}")
            return self._lines.pop(0) if self._lines else None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> int | None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


class Judge:
    """Sends one case and a ping behind it; checks what came back against the oracle; keeps the tallies."""

    def __init__(self, channel: LineChannel, what: str) -> None:
        self.channel = channel
        self.what = what
        self.cases = 0
        self.codes: Counter[str] = Counter()
        self._ping = 0
        self._tag = uuid.uuid4().hex[:8]

    def ping_id(self) -> str:
        self._ping += 1
        return f"fuzz-ping-{self._tag}-{self._ping}"

    def case(self, line: bytes, timeout: float = 60.0) -> None:
        owed, msg_id = expected(line)
        ping = self.ping_id()
        self.channel.send(line + b"\n" + protocol.encode(protocol.request(ping, "ping")))
        replies: list[dict[str, Any]] = []
        pong = False
        deadline = time.monotonic() + timeout
        while not pong or (owed != NO_REPLY and not replies):
            left = deadline - time.monotonic()
            assert left > 0, f"{self.what}: no {'ping reply' if not pong else 'reply'} for {line[:200]!r} (owed {owed})"
            msg = self.channel.next_message(left)
            assert msg is not None, f"{self.what}: connection closed after {line[:200]!r}"
            assert msg, f"{self.what}: not a JSON-RPC frame after {line[:200]!r}: {self.channel.garbage[-1][:200]!r}"
            if "method" in msg:
                continue  # a notification (log notice, list_changed): not a reply
            if msg.get("id") == ping:
                assert "result" in msg, f"{self.what}: ping failed after {line[:200]!r}: {msg}"
                pong = True
            else:
                replies.append(msg)
        self.cases += 1
        if owed == NO_REPLY:
            assert not replies, f"{self.what}: {line[:200]!r} is owed no reply, got {replies}"
            self.codes["no reply"] += 1
            return
        assert len(replies) == 1, f"{self.what}: {line[:200]!r} got {len(replies)} replies: {replies}"
        reply = replies[0]
        assert reply.get("id") == msg_id and type(reply.get("id")) is type(msg_id), \
            f"{self.what}: {line[:200]!r} answered with id {reply.get('id')!r}, not {msg_id!r}"
        got = reply["error"]["code"] if "error" in reply else "result"
        self.codes[str(got)] += 1
        assert got != protocol.INTERNAL_ERROR, f"{self.what}: internal error on {line[:200]!r}: {reply}"
        if owed != ANY:
            assert got == owed, f"{self.what}: {line[:200]!r} owed {owed}, got {reply}"


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _broker_log(broker: BrokerHandle) -> str:
    home = Path(os.environ["HOME"])
    return "\n".join(p.read_text(errors="replace") for p in home.glob("broker-*.log"))


class Bystander:
    """Another client on the broker, pinging all along: it must be served throughout."""

    def __init__(self, path: str) -> None:
        self.channel, self.sock = socket_channel(path)
        self.pings = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            started = time.monotonic()
            try:
                self.channel.send(protocol.encode(protocol.request(n, "ping")))
                while True:
                    msg = self.channel.next_message(30)
                    if msg is None:
                        self.failures.append("connection closed")
                        return
                    if msg.get("id") == n:
                        break
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            self.pings += 1
            self.slowest = max(self.slowest, time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(35)
        self.sock.close()


# --- (a) the broker's UNIX socket ------------------------------------------------------------------------------
@pytest.mark.slow
def test_fuzz_broker_socket(broker: BrokerHandle) -> None:
    """Every hostile line gets exactly its answer on the same connection, which keeps working; nothing raises."""
    cases = scale(300, 10_000)
    rss_before = _rss(broker.proc.pid)
    bystander = Bystander(broker.socket_path)
    channel, sock = socket_channel(broker.socket_path)
    judge = Judge(channel, "broker")
    started = time.monotonic()
    try:
        @_settings(cases)
        @given(lines)
        def one(line: bytes) -> None:
            judge.case(line)

        one()
        judge.case(b'{"jsonrpc":"2.0","id":"final","method":"tools/list"}')
    finally:
        sock.close()
        bystander.stop()
    elapsed = time.monotonic() - started
    rss_after = _rss(broker.proc.pid)
    log = _broker_log(broker)
    assert broker.proc.poll() is None, "the broker died"
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert not bystander.failures and bystander.pings > 0, bystander.failures
    assert not channel.garbage
    record(
        "fuzz_broker_socket",
        f"{judge.cases} hostile lines (random bytes, invalid UTF-8, lone surrogates, nesting to 100,000, wrong "
        "types for jsonrpc/id/method/params, huge numbers, odd cancels and progress tokens, broker/status and "
        "logging/setLevel with odd params, batches) on one UNIX connection to a real broker, a ping after each; "
        "a second client pinging every 50 ms",
        f"every line got exactly the answer it is owed, the connection answered every ping, 0 exceptions in the "
        f"broker, the other client was served throughout ({bystander.pings} pings, slowest "
        f"{bystander.slowest * 1000:.0f} ms); replies by code: {dict(judge.codes)}",
        {"cases": judge.cases, "replies_by_code": dict(judge.codes), "exceptions": 0, "elapsed_s": round(elapsed, 1),
         "broker_rss_before_mb": round(rss_before / 2**20, 1), "broker_rss_after_mb": round(rss_after / 2**20, 1),
         "bystander_pings": bystander.pings, "bystander_slowest_ms": round(bystander.slowest * 1000, 1)},
    )


# --- (b) the shim's stdin -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fuzz_shim_stdin(broker: BrokerHandle, tmp_path: Path) -> None:
    """Whatever the agent writes, mp-shim answers it (or, for a notification, says nothing) and keeps serving."""
    cases = scale(200, 10_000)
    broker_rss_before = _rss(broker.proc.pid)
    shim = ShimChannel(tmp_path / "shim.err")
    judge = Judge(shim.channel, "mp-shim")
    started = time.monotonic()
    try:
        init = protocol.request("init", "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                         "clientInfo": {"name": "fuzz", "version": "1"}})
        judge.case(protocol.encode(init).rstrip(b"\n"), timeout=90)
        shim_rss_before = _rss(shim.proc.pid)

        @_settings(cases)
        @given(lines)
        def one(line: bytes) -> None:
            assert shim.proc.poll() is None, f"mp-shim exited: {shim.stderr()[-2000:]}"
            judge.case(line)

        one()
        judge.case(b'{"jsonrpc":"2.0","id":"final","method":"tools/list"}')
        shim_rss_after = _rss(shim.proc.pid)
    finally:
        code = shim.close()
    elapsed = time.monotonic() - started
    err = shim.stderr()
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert code == 0, err[-2000:]
    assert not shim.channel.garbage
    assert "Traceback" not in _broker_log(broker)
    record(
        "fuzz_shim_stdin",
        f"{judge.cases} hostile lines into a real mp-shim's stdin (the same generator as the socket fuzz), a ping "
        "after each, against a real broker",
        f"every line got exactly the answer it is owed, stdout carried only JSON-RPC frames, stderr no traceback, "
        f"the shim exited 0 at EOF; replies by code: {dict(judge.codes)}",
        {"cases": judge.cases, "replies_by_code": dict(judge.codes), "exceptions": 0, "elapsed_s": round(elapsed, 1),
         "shim_rss_before_mb": round(shim_rss_before / 2**20, 1), "shim_rss_after_mb": round(shim_rss_after / 2**20, 1),
         "broker_rss_before_mb": round(broker_rss_before / 2**20, 1),
         "broker_rss_after_mb": round(_rss(broker.proc.pid) / 2**20, 1)},
    )


# --- regressions: each failure measured on the older tree ----------------------------------------------------------
def _exchange(channel: LineChannel, line: bytes, timeout: float = 30) -> list[dict[str, Any]]:
    """Send `line` and a ping; everything answered before the ping's reply (notifications left out)."""
    ping = f"reg-{uuid.uuid4().hex[:8]}"
    channel.send(line + b"\n" + protocol.encode(protocol.request(ping, "ping")))
    out = []
    while True:
        msg = channel.next_message(timeout)
        assert msg is not None, "connection closed"
        if msg.get("id") == ping and "method" not in msg:
            assert msg["result"] == {}
            return out
        if "method" not in msg:
            out.append(msg)


def _reply_to(channel: LineChannel, line: bytes, msg_id: Any, timeout: float = 90) -> dict[str, Any]:
    """Send a request and wait for its reply (whenever it comes: the engine may answer after a ping)."""
    channel.send(line + b"\n")
    deadline = time.monotonic() + timeout
    while True:
        msg = channel.next_message(max(0.01, deadline - time.monotonic()))
        assert msg is not None, "connection closed"
        if "method" not in msg and msg.get("id") == msg_id:
            return msg


def _error(replies: list[dict[str, Any]]) -> tuple[Any, int]:
    assert len(replies) == 1, replies
    return replies[0]["id"], replies[0]["error"]["code"]


REGRESSIONS: list[tuple[str, bytes, Any, Any]] = [
    # (name, line, expected id, expected code or None for no reply)
    ("dict id", b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', None, protocol.INVALID_REQUEST),
    ("list id", b'{"jsonrpc":"2.0","id":[1],"method":"tools/list"}', None, protocol.INVALID_REQUEST),
    ("bool id", b'{"jsonrpc":"2.0","id":true,"method":"ping"}', None, protocol.INVALID_REQUEST),
    ("float id", b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', None, protocol.INVALID_REQUEST),
    ("wrong jsonrpc", b'{"jsonrpc":"1.0","id":7,"method":"ping"}', 7, protocol.INVALID_REQUEST),
    ("cancel with list requestId", b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":[1]}}',
     None, None),
    ("cancel with object requestId",
     b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":{"a":[]}}}', None, None),
    ("5,000 deep arrays", b"[" * 5000 + b"]" * 5000, None, protocol.PARSE_ERROR),
    ("100,000 deep arrays", b"[" * 100_000 + b"]" * 100_000, None, protocol.PARSE_ERROR),
    ("5,000 deep objects", b'{"a":' * 5000 + b"1" + b"}" * 5000, None, protocol.PARSE_ERROR),
    ("100,000 deep unclosed", b"[" * 100_000, None, protocol.PARSE_ERROR),
    ("deep params", b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":' + b"[" * 5000 + b"]" * 5000 + b"}",
     None, protocol.PARSE_ERROR),
    ("not UTF-8", b'{"jsonrpc":"2.0","id":4,"method":"ping","x":"\xff"}', None, protocol.PARSE_ERROR),
    ("CESU surrogate", b'{"jsonrpc":"2.0","id":"\xed\xa0\x80","method":"ping"}', None, protocol.PARSE_ERROR),
    ("NaN", b'{"jsonrpc":"2.0","id":5,"method":"ping","params":{"x":NaN}}', None, protocol.PARSE_ERROR),
    ("surrogate in a setLevel level", b'{"jsonrpc":"2.0","id":6,"method":"logging/setLevel","params":{"level":"\\ud800"}}',
     6, protocol.INVALID_PARAMS),
    ("object timeoutMs", b'{"jsonrpc":"2.0","id":8,"method":"broker/status","params":{"timeoutMs":{"a":[[[]]]}}}',
     8, protocol.INVALID_PARAMS),
]


def _check_regressions(channel: LineChannel, what: str) -> None:
    """Every REGRESSIONS line, in turn on one connection: its answer (or none), and the connection goes on."""
    for name, line, msg_id, code in REGRESSIONS:
        replies = _exchange(channel, line, timeout=90)
        if code is None:
            assert replies == [], f"{what}, {name}: {replies}"
        else:
            assert len(replies) == 1, f"{what}, {name}: {replies}"
            got = (replies[0]["id"], replies[0].get("error", {}).get("code"))
            assert got == (msg_id, code), f"{what}, {name}: {replies[0]}"


@pytest.mark.slow
def test_regressions_on_the_broker_socket(broker: BrokerHandle) -> None:
    channel, sock = socket_channel(broker.socket_path)
    try:
        _check_regressions(channel, "broker")
        assert "result" in _reply_to(channel, b'{"jsonrpc":"2.0","id":"after","method":"tools/list"}', "after")
    finally:
        sock.close()
    assert broker.proc.poll() is None
    assert "Traceback" not in _broker_log(broker), _broker_log(broker)[-3000:]


@pytest.mark.slow
def test_surrogates_reach_the_engine_and_come_back(broker: BrokerHandle) -> None:
    """A lone surrogate in an id and in a tool's string argument: forwarded as the same escape, answered with the
    same id (it used to raise UnicodeEncodeError inside the broker: "internal error")."""
    channel, sock = socket_channel(broker.socket_path)
    try:
        line = (b'{"jsonrpc":"2.0","id":"q\\ud800","method":"tools/call","params":{"name":"mempalace_search",'
                b'"arguments":{"query":"violet \\udc80 pebbles","limit":1}}}')
        reply = _reply_to(channel, line, "q\ud800", timeout=120)
        assert "result" in reply, reply  # the engine ran the search
        assert _exchange(channel, b"") == []  # and the connection goes on
        assert "Traceback" not in _broker_log(broker) and "internal error" not in _broker_log(broker)
    finally:
        sock.close()


@pytest.mark.slow
def test_bad_tcp_tokens_are_refused_not_raised(broker_factory: Any) -> None:
    """broker/auth with an object, a list or a lone surrogate for a token: -32064 and closed, as documented."""
    broker = broker_factory("--tcp", "127.0.0.1:0", wait_engine=False)
    host, port = broker.record["endpoints"]["tcp"][len("tcp://"):].rsplit(":", 1)
    for token in (b'{"a":1}', b"[1]", b'"\\ud800"', b"null", b'"x\\udfff"'):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"broker/auth","params":{"token":' + token + b"}}\n")
            reply = json.loads(sock.makefile("rb").readline())
            assert reply["id"] == 1 and reply["error"]["code"] == protocol.UNAUTHORIZED, (token, reply)
    assert broker.proc.poll() is None
    assert "Traceback" not in _broker_log(broker), _broker_log(broker)[-3000:]


@pytest.mark.slow
def test_regressions_on_the_shim_stdin(broker: BrokerHandle, tmp_path: Path) -> None:
    shim = ShimChannel(tmp_path / "shim.err")
    try:
        _check_regressions(shim.channel, "mp-shim")
        # and the session goes on: a real request is still served
        final = _reply_to(shim.channel, b'{"jsonrpc":"2.0","id":"after","method":"tools/list"}', "after")
        assert "result" in final, final
    finally:
        exit_code = shim.close()
    assert "Traceback" not in shim.stderr(), shim.stderr()[-3000:]
    assert exit_code == 0


@pytest.mark.slow
def test_shim_echoes_a_surrogate_id(broker: BrokerHandle, tmp_path: Path) -> None:
    """An id holding a lone surrogate is a valid string id: answered with that very id, no traceback."""
    shim = ShimChannel(tmp_path / "shim.err")
    try:
        replies = _exchange(shim.channel, b'{"jsonrpc":"2.0","id":"a\\ud800","method":"ping"}', timeout=90)
        assert replies == [{"jsonrpc": "2.0", "id": "a\ud800", "result": {}}]
        reply = _reply_to(shim.channel, b'{"jsonrpc":"2.0","id":"b\\udfff","method":"fuzz/unknown"}', "b\udfff")
        assert reply["error"]["code"] == protocol.METHOD_NOT_FOUND, reply  # the engine's own answer
    finally:
        exit_code = shim.close()
    assert "Traceback" not in shim.stderr(), shim.stderr()[-3000:]
    assert exit_code == 0


# --- the framing rules themselves (no processes) -------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=5), kids, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=scale(300, 5000), deadline=None, derandomize=not FULL, database=None)
@given(json_values)
def test_encode_decode_round_trip(value: Any) -> None:
    """Any JSON value (lone surrogates included) is one valid UTF-8 frame, and decodes to itself."""
    frame = protocol.encode(value)
    assert frame.endswith(b"\n") and b"\n" not in frame[:-1]
    frame[:-1].decode("utf-8")  # strict: valid UTF-8 whatever the strings held
    assert protocol.decode(frame[:-1]) == value


@settings(max_examples=scale(500, 10_000), deadline=None, derandomize=not FULL, database=None)
@given(st.one_of(st.binary(max_size=64), lines))
def test_decode_raises_only_value_error(line: bytes) -> None:
    """decode's one failure is ValueError, whatever the bytes; check_request_shape, reply_id and brief never raise."""
    try:
        msg = protocol.decode(line)
    except ValueError:
        return
    protocol.check_request_shape(msg)
    protocol.reply_id(msg)
    assert len(protocol.brief(msg)) <= 60


def test_nesting_limit_is_exact() -> None:
    limit = protocol.MAX_NESTING
    for opener, closer in ((b"[", b"]"), (b'{"k":', b"}")):
        inner = b"1" if opener != b"[" else b""
        assert protocol.decode(opener * limit + inner + closer * limit) is not None
        with pytest.raises(ValueError, match="nesting too deep"):
            protocol.decode(opener * (limit + 1) + inner + closer * (limit + 1))
    # brackets inside strings do not count, escaped quotes included
    assert protocol.decode(b'["' + b"[" * 5000 + b'\\"' + b"{" * 5000 + b'"]') is not None
    # linear: 2 MB of nesting just under the limit, and 2 MB that json.loads refuses (an unterminated string
    # full of escaped quotes, where a string regex would retry at every quote: 100 kB took 50 s that way)
    for frame in (b"[" + b",".join([b"[" * 500 + b"]" * 500] * 2000) + b"]", b'"' + b'\\"' * 1_000_000):
        started = time.monotonic()
        with contextlib.suppress(ValueError):
            protocol.decode(frame)
        assert time.monotonic() - started < 10, frame[:20]


def test_brief_is_bounded() -> None:
    assert protocol.brief("x" * 10_000) == repr("x" * 59)[:59] + "…"
    assert protocol.brief("\ud800").isascii()
    assert protocol.brief({"a": 1}) == "<an object of 1 members>"
    assert protocol.brief([[]] * 5) == "<an array of 5 items>"
    assert "bits" in protocol.brief(10**4000)
    assert protocol.brief(7) == "7" and protocol.brief(None) == "None"


def test_event_wait_timeout_survives_odd_numbers() -> None:
    call = {"name": protocol.EVENT_WAIT_TOOL, "arguments": {}}
    for raw, want in ((float("inf"), protocol.EVENT_WAIT_MAX_MS), (float("-inf"), 0), (float("nan"),
                      protocol.EVENT_WAIT_DEFAULT_MS), (10**4000, protocol.EVENT_WAIT_MAX_MS), (1.5, 1)):
        call["arguments"] = {"timeout_ms": raw}
        assert protocol.event_wait_timeout_ms("tools/call", call) == want


def test_oracle_agrees_on_its_own_examples() -> None:
    """The test's oracle is independent of protocol.py; spot-check it on lines whose answers are documented."""
    assert expected(b'{"jsonrpc":"2.0","id":1,"method":"ping"}') == ("result", 1)
    assert expected(b'{"jsonrpc":"2.0","method":"ping"}') == (NO_REPLY, None)
    assert expected(b"[]") == (protocol.INVALID_REQUEST, None)
    assert expected(b"[" * 600 + b"]" * 600) == (protocol.PARSE_ERROR, None)
    assert re.match(r"^fuzz-ping-", Judge(LineChannel(None, None), "x").ping_id())


# --- the last resorts: a bug costs one answer, never the connection or the session ----------------------------------
def test_a_bug_in_the_shim_costs_one_answer(capfd: pytest.CaptureFixture[str]) -> None:
    """from_client raising (a bug) on one line: that line gets -32603 with its id, one line on stderr, and the
    stdin thread reads on."""
    import io

    from mp_ssh_bridge.config import Config
    from mp_ssh_bridge.session import Shim

    read_fd, write_fd = os.pipe()
    lines = b'{"jsonrpc":"2.0","id":5,"method":"boom"}\n[[[\n{"jsonrpc":"2.0","id":6,"method":"boom"}\n'
    shim = Shim(Config(), write_fd, io.BytesIO(lines))
    real = shim.from_client

    def buggy(line: bytes) -> None:
        if b"boom" in line:
            raise RuntimeError("a bug")
        real(line)

    shim.from_client = buggy  # type: ignore[method-assign]
    shim.stdin_loop()  # returns at EOF, after every line
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as out:
        replies = [json.loads(line) for line in out.read().splitlines()]
    assert [(r["id"], r["error"]["code"]) for r in replies] == [
        (5, protocol.INTERNAL_ERROR), (None, protocol.PARSE_ERROR), (6, protocol.INTERNAL_ERROR)]
    err = capfd.readouterr().err
    assert err.count("internal error on a message from the client") == 2 and "Traceback" not in err


def test_a_bug_in_the_mux_costs_one_answer(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mux.handle raising inside (a bug): the request gets -32603 with its id, a notification nothing."""
    import asyncio
    import sys

    from mp_ssh_bridge.settings import load
    from mp_ssh_bridge_broker.mux import ClientSession, Mux

    fake = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"

    async def main() -> list[bytes]:
        mux = Mux(load(engine=fake, mempalace_path=home / ".mempalace"))
        session = ClientSession("unix")

        def buggy(*_: Any) -> None:
            raise RuntimeError("a bug")

        mux._status_request = buggy  # type: ignore[method-assign]
        mux._cancel = buggy  # type: ignore[method-assign]
        mux.handle(session, {"jsonrpc": "2.0", "id": "s\ud800", "method": "broker/status"})
        mux.handle(session, {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        mux.handle(session, {"jsonrpc": "2.0", "id": 2, "method": "ping"})
        out = []
        while not session._outbox.empty():
            out.append(session._outbox.get_nowait())
        return [item for item in out if item]

    frames = asyncio.run(main())
    replies = [json.loads(frame) for frame in frames]
    assert [(r["id"], r.get("error", {}).get("code")) for r in replies] == [("s\ud800", protocol.INTERNAL_ERROR),
                                                                          (2, None)]
    assert "internal error handling a message from client" in caplog.text
