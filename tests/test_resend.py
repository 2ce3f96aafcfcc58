"""A request a stopping broker did not run (-32065, outcome not_executed) and mp-shim's resend of it.

Real restarts over the scripted fake engine (tests/fake_engine.py) where a call must take a known time; the
shim's backlog on its own (a fake link) for what no broker can provoke on cue: a cancelled id reused.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol
from mp_ssh_bridge.config import Config
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.session import Shim, id_key
from tests.conftest import BIN
from tests.helpers import wait_for

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"


def _status() -> dict[str, Any]:
    out = subprocess.run([str(BIN / "mp-bridge"), "status", "--json"], capture_output=True, text=True, timeout=30)
    try:
        return json.loads(out.stdout).get("status") or {}
    except ValueError:
        return {}


def _restart(env: dict[str, str], result: dict[str, Any]) -> threading.Thread:
    t = threading.Thread(target=lambda: result.update(r=subprocess.run(
        [str(BIN / "mp-bridge"), "restart"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **env))))
    t.start()
    return t


# --- against real brokers ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_resend_with_little_time_left_is_answered_not_executed_and_never_reaches_the_new_broker(
    home: Path, tmp_path: Path
) -> None:
    """B's call is refused by the stopping broker at once, but the old broker's connection stays open while A's
    call finishes (8 s): by the time B reconnects, less than half of its 10 s timeout is left before its backstop
    (12 s), so mp-shim answers it itself instead of letting the new broker run it after that backstop."""
    from tests.test_shim_support import ShimProc

    env = {"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_SHUTDOWN_GRACE": "20"}
    a = ShimProc(env=env, stderr_path=tmp_path / "a.err")
    b = ShimProc(env=dict(env, MEMPALACE_MCP_TIMEOUT_MS="10000"), stderr_path=tmp_path / "b.err")
    result: dict[str, Any] = {}
    t: threading.Thread | None = None
    try:
        assert "result" in a.initialize() and "result" in b.initialize()
        slow = a.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 8, "log": "MARKER-A-ran"}})
        wait_for(lambda: _status().get("in_flight"), 10, what="the slow call in flight")
        queued = b.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0.1, "log": "MARKER-B-ran"}})
        wait_for(lambda: _status().get("queue_depth") == 1, 10, what="B's call queued")
        t = _restart(env, result)
        reply = b.wait_reply(queued, 30)
        err = reply.get("error")
        assert err and err["code"] == protocol.DEADLINE_EXCEEDED, (reply, b.stderr())
        assert err["data"] == {"outcome": "not_executed"}, err
        assert "NOT executed (the broker was restarting)" in err["message"] and "safe to retry" in err["message"]
        assert "result" in a.wait_reply(slow, 30), a.stderr()
        t.join(60)
        assert result["r"].returncode == 0, result["r"]
        assert "result" in b.tool("fake_sleep", {"seconds": 0.1}), b.stderr()  # the session goes on, on the new broker
        time.sleep(0.5)
        log = (home / ".mempalace" / "broker.log").read_text(errors="replace")
        assert "MARKER-A-ran" in log  # the engine's stderr is in the log...
        assert "MARKER-B-ran" not in log  # ...and no engine, old or new, ever ran B's call
        assert sum(1 for m in b.inbox if m.get("id") == queued) == 0, b.inbox  # one answer only
    finally:
        if t is not None:
            t.join(60)
        a.close()
        b.close()


@pytest.mark.slow
def test_a_call_waiting_for_a_slow_engine_start_is_resent_when_the_broker_stops(home: Path, tmp_path: Path) -> None:
    """The dispatcher took the call from the queue and waits for the engine to start: the stopping broker still
    says it did not run it (it used to say nothing, and the shim reported "outcome unknown")."""
    from tests.test_shim_support import ShimProc

    env = {"MP_BRIDGE_ENGINE": FAKE, "FAKE_START_DELAY": "8"}  # the restart must land within it, even on a loaded machine
    shim = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    result: dict[str, Any] = {}
    t: threading.Thread | None = None
    try:
        call = shim.request("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0.1}})
        wait_for(lambda: _status().get("engine", {}).get("state") == "starting" and _status().get("queue_depth") == 0
                 and _status().get("clients"), 20, what="the call taken by the dispatcher, the engine starting")
        t = _restart(env, result)
        reply = shim.wait_reply(call, 60)
        assert "result" in reply, (reply, shim.stderr())
        said = (tmp_path / "shim.err").read_text(errors="replace")
        assert "was not executed by a stopping broker; it waits for the next one" in said, said
        t.join(60)
        assert result["r"].returncode == 0, result["r"]
    finally:
        if t is not None:
            t.join(60)
        shim.close()


# --- the shim's backlog on its own --------------------------------------------------------------------
class FakeLink(Link):
    endpoint = "unix:///fake"
    transport = "unix"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = threading.Event()

    def send(self, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def recv(self, timeout: float | None = None) -> bytes | None:
        self.closed.wait()
        return None

    def close(self) -> None:
        self.closed.set()


class Harness:
    def __init__(self, timeout_ms: int) -> None:
        cfg = Config()
        cfg.timeout_ms = timeout_ms
        self.read_fd, self.write_fd = os.pipe()
        self.stdin = open(os.devnull, "rb")  # noqa: SIM115
        self.shim = Shim(cfg, self.write_fd, self.stdin)
        self.dials = 0
        self.shim.start_connect = self._dial  # type: ignore[method-assign]  # no real broker: the test adopts
        self.old = FakeLink()
        self.shim.link = self.old
        self._buf = b""

    def _dial(self) -> None:
        self.dials += 1

    def client(self, msg: dict[str, Any]) -> None:
        self.shim.from_client(json.dumps(dict(msg, jsonrpc="2.0")).encode())

    def call(self, msg_id: Any, tool: str) -> None:
        self.client({"id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})

    def shutting_down(self, link: Link, msg_id: Any) -> None:
        self.shim.from_broker(link, protocol.encode(protocol.error(
            msg_id, protocol.SHUTTING_DOWN, "broker is shutting down; request NOT executed",
            {"outcome": "not_executed"})).rstrip(b"\n"))

    def replies(self, wait: float = 0.2) -> list[dict[str, Any]]:
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                break
            self._buf += os.read(self.read_fd, 65536)
        lines, _, self._buf = self._buf.rpartition(b"\n")
        return [json.loads(line) for line in lines.split(b"\n") if line]

    def close(self) -> None:
        self.shim.done.set()
        with self.shim.lock:
            self.shim._heap_cv.notify_all()
        os.close(self.read_fd)
        os.close(self.write_fd)
        self.stdin.close()


@pytest.mark.parametrize("lost_first", [False, True])
def test_the_backlog_never_sends_a_cancelled_request_under_its_reused_id(lost_first: bool) -> None:
    """Refused by a stopping broker, waiting in the backlog, cancelled, its id reused: only the new request is
    sent to the next broker (the reused id either went to the stopping broker too, or straight to the backlog)."""
    h = Harness(0)
    try:
        h.call(5, "first")
        h.shutting_down(h.old, 5)
        assert h.shim.backlog and h.old.sent[-1]["params"]["name"] == "first"
        h.client({"method": "notifications/cancelled", "params": {"requestId": 5}})
        assert h.old.sent[-1]["params"]["name"] == "first"  # never sent again: nothing to cancel at the broker
        if lost_first:
            h.shim.link_lost(h.old, "the broker closed the connection")
            h.call(5, "second")
        else:
            h.call(5, "second")  # still the old link: the stopping broker refuses it too
            assert h.old.sent[-1]["params"]["name"] == "second"
            h.shutting_down(h.old, 5)
            h.shim.link_lost(h.old, "the broker closed the connection")
        new = FakeLink()
        h.shim.adopt(new)
        assert [m["params"]["name"] for m in new.sent if m.get("method") == "tools/call"] == ["second"], new.sent
        assert not [m for m in new.sent if m.get("method") == "notifications/cancelled"], new.sent
        assert h.shim.pending[id_key(5)].link is new
        h.shim.from_broker(new, protocol.encode(protocol.result(5, {"content": []})).rstrip(b"\n"))
        assert [r.get("id") for r in h.replies()] == [5]  # one answer, the second request's
    finally:
        h.close()


def test_a_failed_reconnect_answers_only_the_request_that_holds_the_reused_id() -> None:
    h = Harness(0)
    try:
        h.call(5, "first")
        h.shutting_down(h.old, 5)
        h.client({"method": "notifications/cancelled", "params": {"requestId": 5}})
        h.shim.link_lost(h.old, "the broker closed the connection")
        h.call(5, "second")
        h.shim.connect_failed(ShimError(protocol.BROKER_UNREACHABLE, "no broker reachable"))
        replies = h.replies()
        assert [(r["id"], r["error"]["code"]) for r in replies] == [(5, protocol.BROKER_UNREACHABLE)], replies
        assert not h.shim.pending and not h.shim.backlog
    finally:
        h.close()


def test_a_resend_with_less_than_half_its_timeout_left_is_answered_locally() -> None:
    h = Harness(1000)  # backstop 1 s + 2 s grace
    try:
        h.call(7, "slowish")
        pend = h.shim.pending[id_key(7)]
        h.shutting_down(h.old, 7)
        assert h.shim.backlog and not h.replies(0.05)  # plenty left: it waits for the next broker
        pend.deadline = time.monotonic() + 0.3  # the reconnect took long: 0.3 s left < half of 1 s
        h.shim.link_lost(h.old, "the broker closed the connection")
        new = FakeLink()
        h.shim.adopt(new)
        assert not [m for m in new.sent if m.get("method") == "tools/call"], new.sent
        (reply,) = h.replies()
        err = reply["error"]
        assert reply["id"] == 7 and err["code"] == protocol.DEADLINE_EXCEEDED, reply
        assert err["data"] == {"outcome": "not_executed"} and "broker was restarting" in err["message"], err
        assert id_key(7) not in h.shim.pending
    finally:
        h.close()


def test_too_little_time_left_when_the_stopping_broker_answers_is_answered_at_once() -> None:
    h = Harness(1000)
    try:
        h.call(8, "x")
        h.shim.pending[id_key(8)].deadline = time.monotonic() + 0.2
        h.shutting_down(h.old, 8)
        (reply,) = h.replies()
        assert reply["id"] == 8 and reply["error"]["data"] == {"outcome": "not_executed"}, reply
        assert not h.shim.backlog and not h.shim.pending
    finally:
        h.close()


def test_a_resent_request_gets_a_fresh_backstop_and_the_old_one_never_fires() -> None:
    h = Harness(200)  # backstop 0.2 s + 2 s grace
    threading.Thread(target=h.shim.deadline_loop, daemon=True).start()
    try:
        sent = time.monotonic()
        h.call(9, "x")
        h.shutting_down(h.old, 9)
        time.sleep(0.8)
        h.shim.link_lost(h.old, "the broker closed the connection")
        new = FakeLink()
        h.shim.adopt(new)  # 1.4 s left, more than half of 0.2 s: sent, backstop re-armed at now + 2.2 s
        assert [m["params"]["name"] for m in new.sent if m.get("method") == "tools/call"] == ["x"]
        assert not h.replies(sent + 2.6 - time.monotonic())  # the original backstop (sent + 2.2 s) stayed quiet
        replies = h.replies(1.5)
        assert [(r["id"], r["error"]["data"]["outcome"]) for r in replies] == [(9, "unknown")], replies
        assert time.monotonic() - sent >= 2.9
    finally:
        h.close()
