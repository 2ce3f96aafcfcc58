"""Bounds (issue #10): the broker holds under abuse, with every resource bounded (docs/PROTOCOL.md "Bounds").

Counts, never timings: an excess request is answered -32068 naming its setting and the connection
still answers; a client that pipelines and never reads is cut off and the broker's RSS stays bounded
while others are served; connection floods (in all, per peer) get one line and are closed; a TCP peer
that sends too much or too slowly before authenticating is cut off; at its open-file limit the broker
refuses quietly, keeps its engine working, and serves again by itself once files are free.
The pure parts (peer pid parsing for Linux and macOS, byte accounting, the fd budget, the backoff and
the once-per-interval log) are tested by their inputs. Under RELIABILITY=full the floods are heavier
and their figures are recorded (tests/reliability.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from mp_ssh_bridge import protocol, state
from mp_ssh_bridge_broker import accept, bounds, server
from tests.conftest import BIN, BrokerHandle
from tests.helpers import RawClient, stop_process, wait_for
from tests.reliability import FULL, record, scale

pytestmark = [pytest.mark.reliability]

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
MB = 1024 * 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def assert_limit(reply: dict[str, Any], limit: str) -> None:
    err = reply["error"]
    assert err["code"] == protocol.LIMIT_REACHED, reply
    assert err["data"]["outcome"] == "not_executed" and err["data"]["limit"] == limit, reply
    assert isinstance(err["data"]["value"], (int, float))
    assert limit in err["message"] and f"MP_BRIDGE_{limit.upper()}" in err["message"]


class Bystander:
    """Another client polling broker/status on its own thread (a blocking socket), for others' p99 during a flood.

    Connected before the flood starts, so it holds its connection through it (at the fd limit too).
    """

    def __init__(self, path: str, every: float = 0.01) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.every = every
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._buf = b""

    def _call(self, n: int) -> bool:
        self.sock.sendall(protocol.encode(protocol.request(f"b{n}", "broker/status")))
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return "result" in json.loads(line)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                ok = self._call(n)
            except OSError:
                ok = False
            if not ok:
                self.failures += 1
                return
            self.latencies.append(time.monotonic() - t0)
            time.sleep(self.every)

    def __enter__(self) -> Bystander:
        self._call(0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.sock.close()

    def p99_ms(self) -> float:
        lat = sorted(self.latencies)
        return round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1000, 1) if lat else float("nan")


# --- the pure parts -------------------------------------------------------------------------------
def test_peer_pid_on_linux_and_macos_by_their_inputs() -> None:
    assert bounds.parse_peercred(struct.pack("3i", 4242, 501, 20)) == 4242
    assert bounds.parse_peercred(struct.pack("3i", 0, 0, 0)) is None
    assert bounds.parse_peercred(b"\x01") is None
    assert bounds.parse_peerpid(struct.pack("i", 77)) == 77
    assert bounds.parse_peerpid(b"") is None
    calls: list[tuple[int, int, int]] = []

    def mac_getsockopt(level: int, opt: int, size: int) -> bytes:
        calls.append((level, opt, size))
        return struct.pack("i", 99)

    assert bounds.unix_peer_pid(mac_getsockopt, "darwin") == 99
    assert calls == [(bounds.SOL_LOCAL, bounds.LOCAL_PEERPID, 4)]

    def failing(level: int, opt: int, size: int) -> bytes:
        raise OSError(errno.ENOPROTOOPT, "no")

    assert bounds.unix_peer_pid(failing, "darwin") is None
    assert bounds.unix_peer_pid(mac_getsockopt, "freebsd13") is None
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        if sys.platform.startswith("linux"):
            assert bounds.peer_key(a, None) == f"unix:pid:{os.getpid()}"
        assert bounds.peer_key(a, None, platform="sunos") == bounds.UNKNOWN_UNIX_PEER
    finally:
        a.close()
        b.close()
    assert bounds.peer_key(None, ("10.0.0.5", 5555)) == bounds.peer_key(None, ("10.0.0.5", 6666)) == "tcp:10.0.0.5"


def test_pending_jobs_count_the_bytes_of_what_is_still_pending() -> None:
    p: bounds.PendingJobs[str] = bounds.PendingJobs()
    p.add(("int", 1), "a", 100)
    p.add(("int", 2), "b", 50)
    assert p.queued_bytes == 150 and len(p) == 2
    del p[("int", 1)]
    assert p.queued_bytes == 50
    p.add(("int", 2), "b2", 10)  # the same id again replaces
    assert p.queued_bytes == 10
    assert p.pop(("int", 2)) == "b2" and p.queued_bytes == 0
    p.add(("int", 3), "c", 7)
    p.clear()
    assert p.queued_bytes == 0 and not p
    b = bounds.Bounds(max_queued_per_client=2, max_client_queued_bytes=1000)
    assert bounds.over_queue_limit(b, 0, 0, 5000) is None  # one request alone is always let in
    assert bounds.over_queue_limit(b, 1, 900, 200) == ("max_client_queued_bytes", 1000)
    assert bounds.over_queue_limit(b, 2, 0, 1) == ("max_queued_per_client", 2)
    big = bounds.limit_error(7, "max_client_queued_bytes", 16 * MB, "too much")
    assert big["id"] == 7 and "= 16777216 " in big["error"]["message"]  # an exact number, not 1.67772e+07


def test_connection_count_per_peer_and_in_all() -> None:
    c = bounds.ConnectionCount(bounds.Bounds(max_connections=3, max_connections_per_peer=2))
    assert c.admit("a") is None and c.admit("a") is None
    assert c.admit("a") == ("max_connections_per_peer", 2)
    assert c.admit("b") is None
    assert c.admit("c") == ("max_connections", 3)
    c.release("a")
    assert c.admit("c") is None and c.total == 3
    for key in ("a", "b", "c"):
        c.release(key)
    assert c.total == 0 and not c.by_peer


def test_fd_budget_backoff_and_the_once_per_interval_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    counted = [0]
    open_now = [10]

    def count() -> int:
        counted[0] += 1
        return open_now[0]

    budget = accept.FdBudget(8, limit=lambda: 30, count=count, clock=lambda: now[0])  # room below 22
    assert budget.room() and counted[0] == 1
    for _ in range(2):
        budget.accepted()
    assert budget.room() and counted[0] == 1  # an estimate between recounts
    open_now[0] = 22
    for _ in range(10):
        budget.accepted()  # estimate 22 >= 30 - 8: recounted at once
    assert not budget.room() and counted[0] == 2
    open_now[0] = 5
    assert budget.room() and counted[0] == 3  # files freed: room again
    assert accept.FdBudget(8, limit=lambda: None).room()

    backoff = accept.Backoff()
    assert [backoff.next() for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.reset()
    assert backoff.next() == 0.1

    refusals = accept.RefusalLog(every=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="broker.accept"):
        wrote = [refusals.refuse("at the limit") for _ in range(1000)]
        now[0] += 61
        wrote.append(refusals.refuse("at the limit"))
    assert wrote.count(True) == 2 and refusals.total == 1001
    lines = [r.getMessage() for r in caplog.records if r.name == "broker.accept"]
    assert len(lines) == 2 and "refused 1000 connection(s)" in lines[1]


def test_accept_at_emfile_backs_off_quietly_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    """A real EMFILE from accept(): no spin, one log line, and the waiting clients are served once files free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> tuple[int, int]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        served: list[socket.socket] = []
        acceptor = accept.Acceptor(listener, served.append, accept.FdBudget(8, limit=lambda: None), "test")
        clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        filler: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (accept.open_fds() + 40, hard))
        try:
            while True:  # use up every descriptor this process may open
                try:
                    filler.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            task = asyncio.create_task(acceptor.run())
            for c in clients:
                c.connect(listener.getsockname())  # the kernel completes these; accept() cannot take them
            await asyncio.sleep(1.5)
            refused = acceptor.refusals.total
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for _ in range(100):
            if len(served) == 3:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        for s in [*served, *clients, listener]:
            s.close()
        return refused, len(served)

    with caplog.at_level(logging.WARNING, logger="broker.accept"):
        refused, served = run(main())
    assert 1 <= refused <= 8  # backoff 0.1, 0.2, 0.4, 0.8 s: a handful of tries in 1.5 s, not a spin
    assert served == 3
    assert len([r for r in caplog.records if r.name == "broker.accept"]) == 1


# --- a real broker over the fake engine -----------------------------------------------------------
def sleep_call(seconds: float, pad: int = 0) -> dict[str, Any]:
    return {"name": "fake_sleep", "arguments": {"seconds": seconds, "pad": "x" * pad}}


def test_excess_requests_are_refused_and_the_connection_stays_usable(broker_factory: Any) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_MAX_QUEUED_PER_CLIENT": "4",
                                 "MP_BRIDGE_MAX_CLIENT_QUEUED_BYTES": "4096"})

    async def main() -> None:
        c = await RawClient.connect(broker.endpoint)
        for i in range(1, 8):
            await c.send(protocol.request(i, "tools/call", sleep_call(0.5 if i == 1 else 0)))
        refused = [await c.recv_id(i, 10) for i in (5, 6, 7)]  # answered at once, before the first finishes
        for reply in refused:
            assert_limit(reply, "max_queued_per_client")
            assert reply["error"]["data"]["value"] == 4
        assert "result" in await c.call("ping")  # still usable
        for i in (1, 2, 3, 4):
            assert "result" in await c.recv_id(i, 20)  # the first four ran
        # Bytes: one large request alone is let in; a second one over max_client_queued_bytes is not.
        await c.send(protocol.request(10, "tools/call", sleep_call(0.5, pad=3000)))
        await c.send(protocol.request(11, "tools/call", sleep_call(0, pad=3000)))
        assert_limit(await c.recv_id(11, 10), "max_client_queued_bytes")
        assert "result" in await c.recv_id(10, 20)
        assert "result" in await c.call("tools/call", sleep_call(0, pad=3000))  # room again
        status = (await c.call("broker/status"))["result"]
        assert status["totals"]["errors"] >= 4
        await c.close()

    run(main())


def _flood(path: str, lines: bytes, stop: threading.Event) -> socket.socket:
    """Pipeline `lines` on a new connection without ever reading (until the broker stops taking them)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(0.5)
    view = memoryview(lines)
    while view and not stop.is_set():
        try:
            sent = s.send(view[: 256 * 1024])
        except (TimeoutError, BlockingIOError):
            continue  # the broker stopped reading (backpressure); keep trying until told to stop
        except OSError:
            break  # cut off
        view = view[sent:]
    return s


def test_a_client_that_never_reads_is_cut_off_with_memory_bounded(broker_factory: Any) -> None:
    outbox = 32 * MB if FULL else 1 * MB
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_MAX_CLIENT_OUTBOX_BYTES": str(outbox)})
    calls = scale(5_000, 50_000)
    lines = b"".join(protocol.encode(protocol.request(i, "tools/list" if i % 2 else "ping")) for i in range(calls))
    pid = broker.proc.pid
    idle = rss(pid)
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flooder: list[socket.socket] = []
    flood_thread = threading.Thread(target=lambda: flooder.append(_flood(broker.socket_path, lines, stop)), daemon=True)

    flood_started, cut_off_s = [0.0], [0.0]

    async def observe() -> tuple[list[float], int]:
        c = await RawClient.connect(broker.endpoint)
        await c.call("broker/status")
        flood_thread.start()
        flood_started[0] = time.monotonic()
        latencies = []
        for _ in range(scale(100, 400)):
            t0 = time.monotonic()
            reply = await c.call("broker/status", timeout=10)
            latencies.append(time.monotonic() - t0)
            assert "result" in reply
            await asyncio.sleep(0.01)

        # The flood is cut off: over its outbox cap at once, or (paused at half of it, its queue's replies
        # not filling the rest) after OUTBOX_STALL_S without reading. Then only this client is left.
        deadline = time.monotonic() + server.OUTBOX_STALL_S + 30
        while time.monotonic() < deadline:
            status = (await c.call("broker/status", timeout=10))["result"]
            if len(status["clients"]) == 1:
                break
            await asyncio.sleep(0.1)
        clients = len(status["clients"])
        cut_off_s[0] = time.monotonic() - flood_started[0]
        assert "result" in await c.call("tools/list", timeout=20)  # and the engine still serves
        await c.close()
        return latencies, clients

    latencies, clients = run(observe())
    stop.set()
    flood_thread.join(10)
    sampler.join(2)
    for s in flooder:
        s.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    grown_mb = (peak[0] - idle) / MB
    record("bounds: never-reading client",
           f"one client pipelines {calls} calls (tools/list and ping) and never reads; max_client_outbox_bytes "
           f"{outbox // MB} MiB; another client polls broker/status meanwhile",
           f"the flood was disconnected after {cut_off_s[0]:.1f}s (clients left: {clients}); broker RSS grew {grown_mb:.1f} MB at peak; "
           f"the other client's broker/status p99 {p99 * 1000:.1f} ms over {len(latencies)} calls",
           {"calls": calls, "rss_idle_mb": round(idle / MB, 1), "rss_peak_mb": round(peak[0] / MB, 1),
            "rss_growth_mb": round(grown_mb, 1), "status_p99_ms": round(p99 * 1000, 1),
            "status_calls": len(latencies), "cut_off_s": round(cut_off_s[0], 1)})
    assert clients == 1, "the client that never reads is still connected"
    assert peak[0] < idle + 150 * MB, f"broker RSS grew {grown_mb:.0f} MB"


HOLD = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
out, socks = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(5); socks.append(s)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    out.append(json.loads(data) if data else None)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


async def _hold(path: str, n: int) -> list[Any]:
    """Open n connections from this process; each sends a ping and reads one line (None: closed unanswered)."""
    out = []
    for _ in range(n):
        c = await RawClient.connect(path)
        await c.send(protocol.request(1, "ping"))
        try:
            out.append((c, await c.recv(5)))
        except (asyncio.TimeoutError, ConnectionError):
            out.append((c, None))
    return out


def test_connection_floods_are_refused_with_one_line(broker_factory: Any) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_MAX_CONNECTIONS": "14",
                                 "MP_BRIDGE_MAX_CONNECTIONS_PER_PEER": "10"})

    rounds = scale(1, 30)

    async def main() -> None:
        mine = await _hold(broker.socket_path, 12)  # this process is one peer
        replies = [r for _, r in mine]
        assert all("result" in r for r in replies[:10]), replies
        for r in replies[10:]:
            assert_limit(r, "max_connections_per_peer")
        for c, _ in mine[10:]:
            assert await c.recv(5) is None  # one line, then closed
        other = subprocess.Popen([sys.executable, "-c", HOLD, broker.socket_path, "6"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            theirs = json.loads(await asyncio.to_thread(other.stdout.readline))  # type: ignore[union-attr]
        finally:
            other.stdin.close()  # type: ignore[union-attr]
            other.wait(10)
        assert all("result" in r for r in theirs[:4]), theirs  # another process is another peer ...
        for r in theirs[4:]:
            assert_limit(r, "max_connections")  # ... up to the total
        for c, _ in mine:
            await c.close()
        await asyncio.sleep(0.3)
        c = await RawClient.connect(broker.endpoint)  # everything freed: served again
        assert "result" in await c.call("tools/call", sleep_call(0))
        await c.close()

    run(main())
    with Bystander(broker.socket_path) as other:  # the same flood again, with another client polling throughout
        run(_flood_rounds(broker.socket_path, rounds))
    assert other.failures == 0 and other.latencies
    record("bounds: connection flood",
           f"16 connections from one process against max_connections 14 / per peer 10 (then a second process), "
           f"and {rounds} more such round(s) while another client polls broker/status",
           f"the excess got one -32068 line each and was closed; the other client's broker/status p99 "
           f"{other.p99_ms()} ms over {len(other.latencies)} calls, none failed",
           {"rounds": rounds, "status_p99_ms": other.p99_ms(), "status_calls": len(other.latencies)})


async def _flood_rounds(path: str, rounds: int) -> None:
    for _ in range(rounds):
        flood = await _hold(path, 16)
        assert any(r is not None and "error" in r for _, r in flood)  # over the bound: refused
        for c, _ in flood:
            await c.close()
        await asyncio.sleep(0.2)


async def _tcp(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> list[dict[str, Any]]:
    data = await asyncio.wait_for(reader.read(), timeout)  # to EOF: the broker closed the connection
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_unauthenticated_tcp_peers_are_cut_off(broker_factory: Any) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_TCP": "127.0.0.1:0",
                                 "MP_BRIDGE_PREAUTH_TIMEOUT": "1"})
    host, port = broker.record["tcp_listen"].rsplit(":", 1) if "tcp_listen" in broker.record else (None, None)
    if host is None:
        host, port = broker.record["endpoints"]["tcp"][len("tcp://"):].rsplit(":", 1)
    token = broker.record["tcp_token"]
    pid = broker.proc.pid
    before = rss(pid)

    async def main() -> None:
        # Oversize: megabytes before any newline; cut off after preauth_max_bytes.
        flooders = []
        for _ in range(scale(5, 20)):
            r, w = await _tcp(host, int(port))
            w.write(b"x" * (4 * MB))
            flooders.append((r, w))
        for r, w in flooders:
            try:
                await w.drain()
            except ConnectionError:
                pass
            got = await _read_all(r, 10)
            assert len(got) == 1
            assert_limit(got[0], "preauth_max_bytes")
            w.close()
        # Slow: says nothing; cut off after preauth_timeout.
        r, w = await _tcp(host, int(port))
        got = await _read_all(r, 10)
        assert len(got) == 1
        assert_limit(got[0], "preauth_timeout")
        w.close()
        # Wrong token: -32064, closed.
        r, w = await _tcp(host, int(port))
        w.write(protocol.encode(protocol.request(1, "broker/auth", {"token": "nope"})))
        got = await _read_all(r, 10)
        assert [m["error"]["code"] for m in got] == [protocol.UNAUTHORIZED]
        w.close()
        # The right token, with a request pipelined behind it: served.
        r, w = await _tcp(host, int(port))
        w.write(protocol.encode(protocol.request(1, "broker/auth", {"token": token}))
                + protocol.encode(protocol.request(2, "ping")))
        first = json.loads(await asyncio.wait_for(r.readline(), 10))
        second = json.loads(await asyncio.wait_for(r.readline(), 10))
        assert first["result"] == {"ok": True} and second["id"] == 2 and "result" in second
        w.close()

    with Bystander(broker.socket_path) as other:
        run(main())
    grown_mb = (rss(pid) - before) / MB
    assert other.failures == 0 and other.latencies
    record("bounds: unauthenticated TCP peers",
           f"{scale(5, 20)} TCP peers each send 4 MiB without a newline before authenticating, one says nothing, "
           "one sends a wrong token; another client polls broker/status on the UNIX socket meanwhile",
           f"each flooder got one -32068 preauth_max_bytes line and was closed, the silent one -32068 "
           f"preauth_timeout, the wrong token -32064; broker RSS grew {grown_mb:.1f} MB; the other client's "
           f"broker/status p99 {other.p99_ms()} ms over {len(other.latencies)} calls",
           {"flooders": scale(5, 20), "rss_growth_mb": round(grown_mb, 1), "status_p99_ms": other.p99_ms()})
    assert rss(pid) < before + 60 * MB


def _start_low_nofile_broker(home: Path, limit: int, env: dict[str, str]) -> tuple[BrokerHandle, Path]:
    """A broker whose open-file limit is `limit` (soft and hard: it cannot raise it)."""
    full_env = dict(os.environ, **env)
    log_path = home / "broker-lowfd.log"
    log = open(log_path, "ab")

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = subprocess.Popen([str(BIN / "mempalace-broker")], env=full_env, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, preexec_fn=lower)
    log.close()
    handle = BrokerHandle(proc, Path(full_env["MEMPALACE_PATH"]))
    from mp_ssh_bridge.election import probe

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        rec = state.read_broker_json(handle.state_dir / "broker.json")
        status = probe(rec["endpoint"], 1.0) if rec and rec.get("pid") == proc.pid else None
        return bool(status) and status["engine"]["state"] == "ready"

    wait_for(ready, 60, what="broker ready")
    return handle, log_path


def _log_size(path: Path) -> int:
    """Bytes in the broker's log files (its own rotating log in the state dir, and its stderr)."""
    return path.stat().st_size


def test_at_the_open_file_limit_the_broker_refuses_quietly_and_recovers(home: Path) -> None:
    limit, reserve = 128, 32
    broker, log_path = _start_low_nofile_broker(home, limit, {"MP_BRIDGE_ENGINE": FAKE,
                                                              "MP_BRIDGE_FD_RESERVE": str(reserve)})
    broker_log = broker.state_dir / "broker.log"
    try:
        async def main() -> None:
            held: list[tuple[RawClient, Any]] = []
            refusal = None
            for _ in range(limit):
                held.extend(await _hold(broker.socket_path, 1))
                reply = held[-1][1]
                if reply is None or "error" in reply:
                    refusal = reply
                    break
            assert refusal is not None, "never refused"
            assert_limit(refusal, "fd_reserve")
            served = sum(1 for _, r in held if r is not None and "result" in r)
            facts["served"] = served
            assert limit - reserve - 20 <= served <= limit - reserve
            sizes = (_log_size(log_path), broker_log.stat().st_size if broker_log.exists() else 0)
            more = await _hold(broker.socket_path, 3)  # still at the limit: refused, and not logged again
            assert all(r is None or "error" in r for _, r in more)
            await asyncio.sleep(2)
            grown = _log_size(log_path) - sizes[0] + (broker_log.stat().st_size if broker_log.exists() else 0) - sizes[1]
            facts["log_bytes_at_limit"] = grown
            assert grown < 2000, f"log grew {grown} bytes at the limit"
            said = [line for line in log_path.read_text().splitlines() if "open-file limit" in line]
            assert len(said) == 1, said  # once per LOG_EVERY_S, with the count of refusals
            # The engine still works, and can be restarted from the reserve.
            c = held[0][0]
            assert "result" in await c.call("tools/call", sleep_call(0), msg_id="e1")
            engine_pid = (await c.call("broker/status"))["result"]["engine"]["pid"]
            os.kill(engine_pid, 9)
            reply = await c.call("tools/call", sleep_call(0), msg_id="e2", timeout=30)
            if "error" in reply:  # the one in flight when it died, or a restart backoff: try once more
                await asyncio.sleep(1)
                reply = await c.call("tools/call", sleep_call(0), msg_id="e3", timeout=30)
            assert "result" in reply, reply
            assert (await c.call("broker/status"))["result"]["engine"]["pid"] != engine_pid
            for conn, _ in held + more:
                await conn.close()
            await asyncio.sleep(0.5)
            fresh = None
            for _ in range(20):  # accepting again by itself (within one backoff)
                got = await _hold(broker.socket_path, 1)
                fresh = got[0][1]
                await got[0][0].close()
                if fresh is not None and "result" in fresh:
                    break
                await asyncio.sleep(0.5)
            assert fresh is not None and "result" in fresh, fresh

        facts: dict[str, Any] = {}
        with Bystander(broker.socket_path, every=0.05) as other:  # connected before the limit is reached
            run(main())
        assert broker.proc.poll() is None
        assert other.failures == 0 and other.latencies
        record("bounds: open-file limit",
               f"a broker at RLIMIT_NOFILE {limit} (soft = hard) with fd_reserve {reserve}; connections opened until "
               "refused, 3 more at the limit, the engine killed and restarted there, then everything closed",
               f"{facts['served']} clients served, then -32068 fd_reserve; the log grew {facts['log_bytes_at_limit']} "
               "bytes in 2 s at the limit (one line); the engine restarted from the reserve; a new client was "
               "served again without restarting the broker; another client's broker/status p99 "
               f"{other.p99_ms()} ms over {len(other.latencies)} calls, none failed",
               {"limit": limit, "reserve": reserve, "served": facts["served"],
                "log_bytes_at_limit": facts["log_bytes_at_limit"], "status_p99_ms": other.p99_ms(),
                "recovered_without_restart": True})
    finally:
        stop_process(broker.proc, timeout=20)
