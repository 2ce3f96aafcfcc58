"""The container daemon's relay mode (mp_ssh_bridge/relay.py) through a real OpenSSH server (tests/sshd.py).

The "host" is the test's HOME with its `.mempalace` and a real broker over the real engine; the "container"
is another state directory holding a copy of the host's palace.id (tests/sshd.py `two_sides`). The relay
runs as a subprocess (`python -m mp_ssh_bridge.relay`) with the container's environment; real sessions are
`mp-shim` processes pointed at the relay's socket with MEMPALACE_BROKER=unix://<socket> (so they dial exactly
that), and raw socket clients where a test needs the bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol, state
from tests.conftest import REPO, BrokerHandle
from tests.helpers import wait_for
from tests.sshd import SSHServer, two_sides, write_broker_wrapper
from tests.test_shim_support import ShimProc


# --- the two sides and the relay ------------------------------------------------------------------
class Sides:
    def __init__(self, home: Path) -> None:
        self.host_state, self.ctr_state, self.wrapper = two_sides(home)


@pytest.fixture
def sides(home: Path) -> Sides:
    return Sides(home)


class RelayProc:
    """`python -m mp_ssh_bridge.relay` with a container-side environment; its log in `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = dict(os.environ)
        self.env.update(env)
        self.log_path = log_path
        self.paths = state.StatePaths(state.expand(self.env["MEMPALACE_PATH"])).daemon_paths()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mp_ssh_bridge.relay"], env=self.env, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )

    @property
    def socket(self) -> Path:
        return self.paths.socket()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def record(self) -> dict[str, Any] | None:
        return state.read_json_object(self.paths.json)

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}: {self.log()}")
            rec = self.record()
            return rec if rec and rec.get("pid") == self.proc.pid and self.socket.exists() else None

        return wait_for(ready, timeout, what="relay ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"relay did not stop within {timeout}s: {self.log()}") from None


@pytest.fixture
def relay_factory(sides: Sides, tmp_path: Path) -> Any:
    relays: list[RelayProc] = []

    def start(server: SSHServer, config: Path | None = None, wait: bool = True, **extra: str) -> RelayProc:
        env = server.container_env(sides.ctr_state, sides.wrapper, config=config, MP_BRIDGE_LOG_LEVEL="INFO", **extra)
        relay = RelayProc(env, tmp_path / f"relay-{len(relays)}.log")
        relays.append(relay)
        if wait:
            relay.wait_ready()
        return relay

    yield start
    for relay in relays:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait(10)
    if relays:
        shutil.rmtree(relays[0].paths.own, ignore_errors=True)  # /tmp/mp-bridge-<uid>/daemon-<key> of this test


def shim_env(sides: Sides, server: SSHServer, relay: RelayProc) -> dict[str, str]:
    return server.container_env(sides.ctr_state, sides.wrapper, MEMPALACE_BROKER=relay.url,
                                MEMPALACE_MCP_TIMEOUT_MS="60000")


def status_round_trip(path: str | Path, timeout: float = 30) -> tuple[float, dict[str, Any]]:
    """Seconds from connect to the `broker/status` answer on a UNIX socket (what a shim's handshake costs), and
    the answer."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(protocol.encode(protocol.request("rtt", "broker/status", {"probe": True})))
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed before answering: {buf!r}"
            buf += chunk
    return time.monotonic() - t0, json.loads(buf.split(b"\n", 1)[0])


def raw_exchange(path: Path, line: bytes, timeout: float = 30) -> tuple[list[dict[str, Any]], bool]:
    """Send `line`, read until EOF (or `timeout`): (the JSON lines received, whether the relay closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line)
        buf, closed = b"", False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                buf += chunk
        except TimeoutError:
            pass
    return [json.loads(ln) for ln in buf.splitlines() if ln.strip()], closed


def accepted_logins(server: SSHServer) -> int:
    """SSH connections sshd has authenticated (its VERBOSE log says `Accepted publickey` once per connection)."""
    return server.log.read_text(errors="replace").count("Accepted publickey")


def host_clients(broker: BrokerHandle) -> list[dict[str, Any]]:
    _, reply = status_round_trip(broker.socket_path)
    return [c for c in reply["result"]["clients"] if c.get("role") == "container"]


def text_of(reply: dict[str, Any]) -> str:
    assert "result" in reply, reply
    assert not reply["result"].get("isError"), reply
    return str(reply["result"]["content"][0]["text"])


# --- many sessions, one SSH connection -------------------------------------------------------------
def test_eight_sessions_share_one_ssh_connection(
    sides: Sides, sshd: SSHServer, broker: BrokerHandle, relay_factory: Any, tmp_path: Path
) -> None:
    """8 mp-shim sessions through one relay: sshd authenticated ONE connection, the host broker lists 8 clients,
    each session writes a drawer and finds it again; SIGTERM ends the relay cleanly. Prints the set-up costs."""
    relay = relay_factory(sshd)
    # figures: the first session pays the SSH connection (+ --ensure: no broker.json through the mount here)
    cold, first = status_round_trip(relay.socket)
    assert first["result"]["broker"]["pid"] == broker.proc.pid
    warm = min(status_round_trip(relay.socket)[0] for _ in range(5))
    direct = min(status_round_trip(broker.socket_path)[0] for _ in range(5))
    print(f"\nbroker/status from connect: cold relay {cold * 1000:.0f} ms, warm relay {warm * 1000:.1f} ms, "
          f"host socket {direct * 1000:.1f} ms")

    shims = [ShimProc(env=shim_env(sides, sshd, relay), stderr_path=tmp_path / f"shim-{i}.err") for i in range(8)]
    results: dict[int, str] = {}
    errors: list[str] = []

    def work(i: int, s: ShimProc) -> None:
        try:
            assert "result" in s.initialize(), s.stderr()
            content = f"relay session {i} wrote this {uuid.uuid4().hex}"
            added = s.tool("mempalace_add_drawer", {"wing": "relay", "room": f"r{i}", "content": content}, timeout=90)
            assert '"success": true' in text_of(added), added
            found = s.tool("mempalace_search", {"query": content, "limit": 3}, timeout=90)
            assert content in text_of(found), found
            results[i] = content
        except BaseException as exc:  # reported below with the session's stderr
            errors.append(f"session {i}: {exc!r}; stderr: {s.stderr()}")

    try:
        threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(shims)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [], errors
        assert sorted(results) == list(range(8))
        clients = host_clients(broker)  # every shim is still connected: 8 clients of the host broker
        assert len(clients) == 8 and len({c["id"] for c in clients}) == 8, clients
        rec = relay.record()
        assert rec is not None and rec["mode"] == "relay" and rec["ssh"]["state"] == "connected"
        wait_for(lambda: len((relay.record() or {}).get("sessions", [])) == 8, 5, what="8 sessions in the record")
        assert accepted_logins(sshd) == 1, sshd.log_tail()  # ONE SSH connection for 7 probes and 8 sessions
        for s in shims:
            assert "connected to " + relay.url in s.stderr()
    finally:
        for s in shims:
            s.close()
    assert relay.stop(signal.SIGTERM) == 0, relay.log()
    assert not relay.paths.json.exists() and not relay.socket.exists()
    log = relay.log()
    assert "session 1 open: ssh-streamlocal" in log and "(via ensure)" in log and "stopping: signal SIGTERM" in log
    assert log.count("(via known)") == 13  # every later session reused the socket the first one learnt
    assert broker.proc.poll() is None


# --- the host's sshd dies and comes back ------------------------------------------------------------
def test_sessions_survive_sshd_restart(
    sides: Sides, sshd: SSHServer, broker: BrokerHandle, relay_factory: Any, tmp_path: Path
) -> None:
    """sshd killed with every session on it: the call in flight gets -32060 (outcome unknown, not retried), the
    relay notes the loss, and after sshd is back the next call of EVERY session succeeds over a new connection."""
    relay = relay_factory(sshd)
    shims = [ShimProc(env=shim_env(sides, sshd, relay), stderr_path=tmp_path / f"shim-{i}.err") for i in range(3)]
    try:
        for i, s in enumerate(shims):
            assert "result" in s.initialize(), s.stderr()
            assert '"success": true' in text_of(
                s.tool("mempalace_add_drawer", {"wing": "relay", "room": "before", "content": f"before {i}"}))
        wait_id = shims[0].request("tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 20000}})
        time.sleep(0.5)  # the long poll is pending (held by the host's broker between its looks)
        sshd.kill()
        lost = shims[0].wait_reply(wait_id, timeout=20)
        assert lost["error"]["code"] == protocol.OUTCOME_UNKNOWN, lost
        assert "outcome unknown" in lost["error"]["message"] and "not retried" in lost["error"]["message"]
        assert lost["error"]["data"]["outcome"] == "unknown"
        down = wait_for(lambda: (r := relay.record() or {}).get("ssh", {}).get("state") == "down" and not r["sessions"]
                        and r, 10, what="ssh down and no session in the record")  # every session's socket closed
        assert "lost" in down["ssh"]["last_error"]
        sshd.start()
        for i, s in enumerate(shims):
            after = s.tool("mempalace_add_drawer", {"wing": "relay", "room": "after", "content": f"after {i}"}, timeout=60)
            assert '"success": true' in text_of(after), (after, s.stderr())
        rec = relay.record() or {}
        assert rec["ssh"]["state"] == "connected" and rec["ssh"]["reconnects"] == 1, rec
        assert accepted_logins(sshd) == 2  # one connection before, one after: not one per session
        assert "SSH connection to host lost" in relay.log()
        assert broker.proc.poll() is None  # the host broker outlived sshd
    finally:
        for s in shims:
            s.close()
    assert relay.stop() == 0


# --- a host key that does not match ------------------------------------------------------------------
def test_host_key_mismatch_is_refused_through_the_relay(
    sides: Sides, sshd: SSHServer, relay_factory: Any, tmp_path: Path
) -> None:
    """A man in the middle: the session's first request is answered with the refusal naming known_hosts (its id,
    -32066, refuse true, not executed), quickly; nothing falls back (no login, no stdio bridge, no TCP, no
    degraded mode); a shim through the relay reports the same error."""
    wrong = sshd.wrong_known_hosts()
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.mitm", known_hosts=wrong)
    relay = relay_factory(sshd, config=cfg)
    t0 = time.monotonic()
    replies, closed = raw_exchange(relay.socket, protocol.encode(protocol.request("first-7", "broker/status")))
    assert time.monotonic() - t0 < 10 and closed
    assert len(replies) == 1, replies
    err = replies[0]
    assert err["id"] == "first-7" and err["error"]["code"] == protocol.BROKER_UNREACHABLE
    assert "host key" in err["error"]["message"] and str(wrong) in err["error"]["message"]
    assert err["error"]["data"] == {"outcome": "not_executed", "refuse": True}
    # a second session (within the backoff, or after it) gets the same answer; a notification-only line: id null
    replies, closed = raw_exchange(relay.socket, b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
    assert closed and replies[0]["id"] is None and "known_hosts" in replies[0]["error"]["message"]

    s = ShimProc(env=shim_env(sides, sshd, relay), stderr_path=tmp_path / "shim.err")
    try:
        r = s.call("ping", timeout=30)
        assert r["error"]["code"] == protocol.BROKER_UNREACHABLE, r
        assert "host key" in r["error"]["message"] and "known_hosts" in r["error"]["message"]
        assert "degraded mode" not in s.stderr()
    finally:
        s.close()
    rec = wait_for(lambda: (r := relay.record() or {}).get("ssh", {}).get("last_error") and r, 5, what="last_error")
    assert rec["ssh"]["state"] == "down" and "host key" in rec["ssh"]["last_error"]
    assert rec["ssh"]["connects"] == 0 and rec["ssh"]["transport_detail"] is None
    assert accepted_logins(sshd) == 0
    log = relay.log()
    assert "stdio bridge" not in log and "TCP" not in log and "session 1 open" not in log
    assert not (sides.ctr_state / "degraded.json").exists()
    assert not (sides.host_state / "broker.json").exists()  # no --ensure ever ran on the host
    assert relay.stop() == 0


# --- the record, the lock, idle exit --------------------------------------------------------------
def test_record_lock_and_idle_exit(
    sides: Sides, sshd: SSHServer, broker: BrokerHandle, relay_factory: Any
) -> None:
    """paths.json says what the relay is and does (mode, SSH state, sessions), beats, is owner-only; a second
    relay for the same memory refuses (exit 1); with no session for idle_exit_minutes the relay exits 0 and
    removes its record and socket."""
    relay = relay_factory(sshd, MP_BRIDGE_IDLE_EXIT_MINUTES="0.04", MP_BRIDGE_HEARTBEAT_INTERVAL="0.5",
                          MP_BRIDGE_MAX_CONNECTIONS="1")
    rec = relay.record()
    assert rec is not None
    assert rec["mode"] == "relay" and rec["pid"] == relay.proc.pid and rec["endpoint"] == relay.url
    assert rec["ssh"]["host"] == "host" and rec["ssh"]["state"] == "down"  # lazy: no session yet
    assert rec["sessions"] == [] and rec["palace_id"] == (sides.ctr_state / "palace.id").read_text().strip()
    assert rec["loop"] == "asyncio"  # `python -m mp_ssh_bridge.relay` alone; the daemon's runs on uvloop (test_container_daemon)
    for key in ("version", "started", "heartbeat", "host", "boot_id", "pid_ns", "palace"):
        assert key in rec, key
    assert stat.S_IMODE(relay.paths.json.stat().st_mode) == 0o600
    assert stat.S_IMODE(relay.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(relay.paths.own.stat().st_mode) == 0o700

    second = relay_factory(sshd, wait=False)
    assert second.proc.wait(30) == 1
    assert "holds" in second.log() and str(relay.paths.lock) in second.log()

    # one session held open: the record lists it with its transport; the idle clock does not run
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(relay.socket))
        s.sendall(protocol.encode(protocol.request(1, "ping")))
        assert json.loads(s.recv(65536).split(b"\n")[0])["result"] == {}

        def listed() -> dict[str, Any] | None:
            r = relay.record() or {}
            return r if r.get("sessions") and r["sessions"][0]["transport_detail"] else None

        held = wait_for(listed, 5, what="the session in the record")
        assert held["sessions"][0]["transport_detail"] == "ssh-streamlocal" and held["sessions"][0]["id"] == 1
        assert held["ssh"]["state"] == "connected" and held["ssh"]["host_endpoint"] == f"ssh://host{broker.socket_path}"
        # max_connections = 1: one more session gets the broker's -32068 line, and is closed
        replies, closed = raw_exchange(relay.socket, protocol.encode(protocol.request(2, "ping")))
        assert closed and len(replies) == 1 and replies[0]["id"] is None
        assert replies[0]["error"]["code"] == protocol.LIMIT_REACHED
        assert replies[0]["error"]["data"] == {"outcome": "not_executed", "limit": "max_connections", "value": 1}
        assert "MP_BRIDGE_MAX_CONNECTIONS" in replies[0]["error"]["message"]
        beat = held["heartbeat"]
        time.sleep(3)  # longer than the idle limit (2.4 s): a session is open, so no exit
        assert relay.proc.poll() is None
        assert (relay.record() or {})["heartbeat"] > beat
    wait_for(lambda: relay.proc.poll() is not None, 15, what="idle exit")
    assert relay.proc.returncode == 0, relay.log()
    assert not relay.paths.json.exists() and not relay.socket.exists()
    assert "idle for 0.04 min" in relay.log() and "session 1 closed" in relay.log()


# --- neither SSH way: TCP + token -------------------------------------------------------------------------
def test_tcp_fallback_through_the_relay(
    sides: Sides, sshd_factory: Callable[..., SSHServer], broker_factory: Callable[..., BrokerHandle],
    relay_factory: Any, home: Path,
) -> None:
    """sshd refuses streamlocal and the host cannot --dial-stdio, but broker.json (through the mount) advertises
    TCP: sessions reach the broker over TCP + token (authenticated by endpoints.dial), and the record says so."""
    b = broker_factory("--tcp", "127.0.0.1:0")
    server = sshd_factory({"AllowStreamLocalForwarding": "no"})
    no_dial = write_broker_wrapper(
        home.parent / "no-dial.sh", home, sides.host_state,
        extra='case "$*" in *--dial-stdio*) echo "no dial-stdio here" >&2; exit 2;; esac\n',
    )
    (sides.ctr_state / "broker.json").symlink_to(sides.host_state / "broker.json")
    relay = relay_factory(server, MP_BRIDGE_REMOTE_BROKER=str(no_dial))
    for _ in range(2):  # the first finds TCP the long way; the second dials it at once
        _, reply = status_round_trip(relay.socket)
        assert reply["result"]["broker"]["pid"] == b.proc.pid
    rec = wait_for(lambda: (r := relay.record() or {}).get("ssh", {}).get("transport_detail") and r, 5, what="record")
    assert rec["ssh"]["transport_detail"] == "tcp" and rec["ssh"]["host_endpoint"] == b.record["endpoints"]["tcp"]
    assert relay.stop() == 0
    assert relay.log().count("session 2 open: tcp") == 1


def test_stdio_bridge_through_the_relay(
    sides: Sides, sshd_factory: Callable[..., SSHServer], broker: BrokerHandle, relay_factory: Any
) -> None:
    """sshd refuses streamlocal: the first session learns the `--dial-stdio` way; the next ones take it at once."""
    server = sshd_factory({"AllowStreamLocalForwarding": "no"})
    relay = relay_factory(server)
    for _ in range(2):
        _, reply = status_round_trip(relay.socket)
        assert reply["result"]["broker"]["pid"] == broker.proc.pid
    assert relay.stop() == 0
    log = relay.log()
    assert "session 1 open: ssh-stdio" in log and "session 2 open: ssh-stdio" in log and "(via known)" in log
    assert accepted_logins(server) == 1
