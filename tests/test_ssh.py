"""The container path through a real OpenSSH server (tests/sshd.py).

Both sides run on this machine. The "host" is the test's HOME with its
`.mempalace` (where the broker runs, reached by the SSH session through a
wrapper script that sets HOME/MEMPALACE_PATH, see write_broker_wrapper); the
"container" is another state directory holding only a copy of the host's
palace.id (as a bind mount would show it), whose broker.sock does not exist,
so the only way to the broker is SSH.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import daemon, protocol, state
from mp_ssh_bridge.connection import Connection
from mp_ssh_bridge.settings import Settings
from tests.conftest import BIN, BrokerHandle
from tests.helpers import engine_facts, pid_alive
from tests.sshd import SSHServer, keygen, two_sides, write_broker_wrapper


class _LazySSH:
    """`mp_ssh_bridge.ssh`, imported at first use rather than at collection, so that tests
    collected alongside (e.g. test_discovery's "as if ssh.py did not exist") see the package
    without it until these tests actually run."""

    def __getattr__(self, name: str) -> Any:
        import importlib

        if name.startswith("_"):  # pytest's collection probes (fixture markers, __test__, ...)
            raise AttributeError(name)

        return getattr(importlib.import_module("mp_ssh_bridge.ssh"), name)


ssh = _LazySSH()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- the two sides ---------------------------------------------------------------------
@pytest.fixture
def host_state(home: Path) -> Path:
    """The host's state dir (the `home` fixture's MEMPALACE_PATH), with its palace.id."""
    return two_sides(home)[0]


@pytest.fixture
def ctr_state(home: Path, host_state: Path) -> Path:
    """The container's view: another path, the same palace.id, no reachable socket."""
    return home.parent / "ctr" / ".mempalace"  # made by two_sides (host_state)


@pytest.fixture
def wrapper(home: Path, host_state: Path) -> Path:
    return home.parent / "remote-broker.sh"  # written by two_sides (host_state)


@pytest.fixture
def make_settings(ctr_state: Path, wrapper: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    # role forced as a container shim would see it; MEMPALACE_PATH of the test process stays the
    # host's (brokers started by fixtures use it); the container's is passed explicitly below.
    monkeypatch.setenv("MP_BRIDGE_ROLE", "container")

    def make(server: SSHServer, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "mempalace_path": ctr_state,
            "ssh_config": server.client_config,
            "ssh_host": "host",
            "remote_broker": str(wrapper),
            "connect_timeout": 5.0,
            "keepalive_interval": 1.0,
            "keepalive_count_max": 3,
        }
        values.update(overrides)
        s = Settings(**values)
        assert s.resolved_role() == "container"
        return s

    return make


# --- raw JSON-RPC over a Connection --------------------------------------------------
class Rpc:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.n = 0

    async def call(self, method: str, params: Any = None, timeout: float = 60.0) -> dict[str, Any]:
        self.n += 1
        msg_id = f"t{self.n}"
        await self.conn.send(protocol.encode(protocol.request(msg_id, method, params)))
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(self.conn.read_frame(), max(0.01, deadline - time.monotonic()))
            assert line is not None, f"connection closed while waiting for {method}"
            msg = json.loads(line)
            if msg.get("id") == msg_id:
                return msg

    async def tool(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        reply = await self.call("tools/call", {"name": name, "arguments": arguments or {}}, timeout)
        assert "result" in reply, reply
        assert not reply["result"].get("isError"), reply
        return json.loads(reply["result"]["content"][0]["text"])


async def list_write_search(conn: Connection, word: str) -> None:
    rpc = Rpc(conn)
    init = await rpc.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}})
    assert init["result"]["serverInfo"], init
    tools = await rpc.call("tools/list")
    names = {t["name"] for t in tools["result"]["tools"]}
    assert {"mempalace_add_drawer", "mempalace_search", "mempalace_status"} <= names
    content = f"the {word} sailed through the ssh tunnel {uuid.uuid4().hex[:8]}"
    added = await rpc.tool("mempalace_add_drawer", {"wing": "sshwing", "room": "r", "content": content})
    assert added.get("success") is True, added
    found = await rpc.tool("mempalace_search", {"query": f"{word} sailed ssh tunnel", "limit": 5})
    assert content in json.dumps(found), found


# --- the happy paths -------------------------------------------------------------------
def test_tools_write_search_through_ssh(sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sshd)
    assert not (settings.paths.root / "broker.sock").exists()

    async def go() -> dict[str, Any]:
        conn = await ssh.connect_container(settings)
        try:
            assert conn.transport == "ssh"
            assert conn.info["transport_detail"] == "ssh-streamlocal"
            assert conn.endpoint == f"ssh://host{broker.socket_path}"
            await list_write_search(conn, "walrus")
            status = await Rpc(conn).call("broker/status")
            return status["result"]
        finally:
            await conn.aclose()

    status = run(go())
    assert status["broker"]["pid"] == broker.proc.pid  # the already running broker, not a new one
    assert status["broker"]["palace_id"] == (settings.paths.palace_id_file.read_text().strip())
    assert status["totals"]["requests"] >= 3


def test_remote_ensure_starts_the_broker(sshd: SSHServer, host_state: Path, make_settings: Callable[..., Settings]) -> None:
    assert state.read_broker_json(host_state / "broker.json") is None
    settings = make_settings(sshd)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        first = await ssh.connect_container(settings)
        try:
            pong = await Rpc(first).call("ping")
            assert pong["result"] == {}
            await list_write_search(first, "otter")
        finally:
            await first.aclose()
        second = await ssh.connect_container(settings)
        try:
            assert (await Rpc(second).call("ping"))["result"] == {}
        finally:
            await second.aclose()
        return first.info["ensure"], second.info["ensure"]

    one, two = run(go())
    assert one["started"] is True and two["started"] is False
    assert one["pid"] == two["pid"] and pid_alive(one["pid"])
    record = state.read_broker_json(host_state / "broker.json")
    assert record is not None and record["pid"] == one["pid"]
    assert one["state_dir"] == str(host_state)  # the host's settings decided, not the container's path


def test_stdio_bridge_fallback(sshd_factory: Callable[..., SSHServer], broker: BrokerHandle, make_settings: Callable[..., Settings]) -> None:
    server = sshd_factory({"AllowStreamLocalForwarding": "no"})
    settings = make_settings(server)

    async def go() -> None:
        # proof that the server really refuses direct-streamlocal
        conn = await ssh.connect(settings)
        try:
            with pytest.raises(Exception) as refused:
                await conn.open_unix_connection(broker.socket_path, encoding=None)
            assert "ChannelOpenError" in type(refused.value).__name__
        finally:
            conn.close()
        c = await ssh.connect_container(settings)
        try:
            assert c.transport == "ssh" and c.info["transport_detail"] == "ssh-stdio"
            await list_write_search(c, "pelican")
        finally:
            await c.aclose()

    run(go())


def test_open_ssh_url(sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sshd)
    url = f"ssh://host{broker.socket_path}"

    async def go() -> dict[str, Any]:
        c = await ssh.open_ssh_url(settings, url)
        try:
            assert c.endpoint == url and c.info["transport_detail"] == "ssh-streamlocal"
            return await Rpc(c).call("broker/status")
        finally:
            await c.aclose()

    assert run(go())["result"]["broker"]["pid"] == broker.proc.pid
    with pytest.raises(ssh.SSHBridgeError):
        run(ssh.open_ssh_url(settings, "unix:///x.sock"))


def test_fast_path_skips_ensure_when_broker_json_is_fresh(
    sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings], ctr_state: Path
) -> None:
    """broker.json seen through the "mount" (a symlink here): fresh heartbeat + same palace.id →
    the socket is opened at once. A record naming a dead socket, or a stale one, → --ensure."""
    settings = make_settings(sshd)
    seen = ctr_state / "broker.json"

    async def connect() -> dict[str, Any]:
        c = await ssh.connect_container(settings)
        try:
            assert (await Rpc(c).call("ping"))["result"] == {}
            assert c.info["transport_detail"] == "ssh-streamlocal"
            return c.info
        finally:
            await c.aclose()

    seen.symlink_to(broker.state_dir / "broker.json")
    info = run(connect())
    assert info["via"] == "broker.json" and info["ensure"] is None
    assert info["palace_id"] == broker.record["palace_id"]
    seen.unlink()

    dead = dict(broker.record, endpoint=f"unix://{ctr_state}/gone.sock")  # fresh, but nobody listens there
    state.write_json_atomic(seen, dead)
    info = run(connect())
    assert info["via"] == "ensure" and info["ensure"]["pid"] == broker.proc.pid

    stale = dict(broker.record, heartbeat=time.time() - 3600)
    state.write_json_atomic(seen, stale)
    assert run(connect())["via"] == "ensure"

    seen.unlink()
    seen.symlink_to(broker.state_dir / "broker.json")

    async def slow() -> str:
        c = await ssh.connect_container(settings, fast=False)
        await c.aclose()
        return c.info["via"]

    assert run(slow()) == "ensure"


# --- TCP + token --------------------------------------------------------------------------
def _tcp_config(state_dir: Path, token: str | None) -> Any:
    from mp_ssh_bridge.config import Config

    cfg = Config()
    cfg.state_dir, cfg.broker_token = str(state_dir), token
    return cfg


def test_tcp_token_path_and_wrong_token(broker_factory: Callable[..., BrokerHandle], home: Path) -> None:
    """TCP + token is one opener (endpoints.dial) for every caller; a wrong token is UNAUTHORIZED."""
    from mp_ssh_bridge import endpoints
    from mp_ssh_bridge.errors import EndpointError

    b = broker_factory("--tcp", "127.0.0.1:0")
    endpoint, token = b.record["endpoints"]["tcp"], b.record["tcp_token"]
    link = endpoints.dial(_tcp_config(home / "nowhere", token), endpoint)
    try:
        assert link.transport == "tcp"
        link.send(protocol.encode(protocol.request(1, "tools/list")))
        assert len(json.loads(link.recv(60) or b"{}")["result"]["tools"]) > 0
    finally:
        link.close()
    with pytest.raises(EndpointError) as bad:
        endpoints.dial(_tcp_config(home / "nowhere", token[:-2] + "xx"), endpoint)
    assert bad.value.code == protocol.UNAUTHORIZED == -32064
    assert "refused the token" in str(bad.value)


def test_tcp_fallback_when_both_ssh_paths_fail(
    sshd_factory: Callable[..., SSHServer],
    broker_factory: Callable[..., BrokerHandle],
    make_settings: Callable[..., Settings],
    home: Path,
    host_state: Path,
    ctr_state: Path,
) -> None:
    b = broker_factory("--tcp", "127.0.0.1:0")
    server = sshd_factory({"AllowStreamLocalForwarding": "no"})
    # a host broker command that cannot --dial-stdio, and broker.json seen through the "mount"
    no_dial = write_broker_wrapper(
        home.parent / "no-dial.sh", home, host_state,
        extra='case "$*" in *--dial-stdio*) echo "no dial-stdio here" >&2; exit 2;; esac\n',
    )
    (ctr_state / "broker.json").symlink_to(host_state / "broker.json")
    settings = make_settings(server, remote_broker=str(no_dial))

    async def go() -> str:
        with pytest.raises(ssh.TcpFallback) as fallback:
            await ssh.connect_container(settings)
        return fallback.value.url

    url = run(go())
    assert url == b.record["endpoints"]["tcp"]
    from mp_ssh_bridge import endpoints

    link = endpoints.dial(_tcp_config(ctr_state, None), url)  # the token from broker.json through the mount
    try:
        link.send(protocol.encode(protocol.request(1, "ping")))
        assert json.loads(link.recv(30) or b"{}")["result"] == {}
    finally:
        link.close()
    # without the TCP listener the error lists every refusal
    (ctr_state / "broker.json").unlink()

    async def fail() -> str:
        with pytest.raises(ssh.SSHBridgeError) as exc:
            await ssh.connect_container(settings)
        return str(exc.value)

    msg = run(fail())
    assert "direct-streamlocal refused" in msg and "no dial-stdio here" in msg and "--tcp" in msg


# --- failures a user must be able to act on ---------------------------------------------------
def test_wrong_host_key_names_known_hosts(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    wrong = sshd.wrong_known_hosts()
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.wrongkey", known_hosts=wrong)
    settings = make_settings(sshd, ssh_config=cfg)
    t0 = time.monotonic()
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect_container(settings))
    msg = str(exc.value)
    assert str(wrong) in msg and f"127.0.0.1:{sshd.port}" in msg and "host key" in msg
    assert time.monotonic() - t0 < 10


def test_known_hosts_none_is_refused(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    cfg = sshd.dir / "ssh_config.nokh"
    cfg.write_text(sshd.client_config.read_text().replace(f"UserKnownHostsFile {sshd.known_hosts}", "UserKnownHostsFile none"))
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect(make_settings(sshd, ssh_config=cfg)))
    assert "UserKnownHostsFile none" in str(exc.value)


def test_permission_denied_names_user_and_key(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    stranger = sshd.dir / "stranger_ed25519"
    keygen(stranger, "stranger")
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.stranger", identity=stranger)
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect(make_settings(sshd, ssh_config=cfg)))
    msg = str(exc.value)
    assert f"user {sshd.user!r}" in msg and str(stranger) in msg and "authorized_keys" in msg


def test_missing_identity_file(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.nokey", identity=sshd.dir / "no_such_key")
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect(make_settings(sshd, ssh_config=cfg)))
    assert "no_such_key" in str(exc.value)


def test_connection_refused_names_host_and_port(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    from tests.sshd import free_port

    port = free_port()
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.closed", port=port)
    t0 = time.monotonic()
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect(make_settings(sshd, ssh_config=cfg)))
    assert f"127.0.0.1:{port}" in str(exc.value) and "refused" in str(exc.value)
    assert time.monotonic() - t0 < 5


def test_hung_sshd_at_connect_hits_the_bound(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    sshd.freeze()  # the kernel still accepts the TCP connection; no SSH banner ever comes
    try:
        t0 = time.monotonic()
        with pytest.raises(ssh.SSHBridgeError) as exc:
            run(ssh.connect_container(make_settings(sshd, connect_timeout=2.0)))
        elapsed = time.monotonic() - t0
    finally:
        sshd.thaw()
    assert "within 2s" in str(exc.value) and f"127.0.0.1:{sshd.port}" in str(exc.value)
    assert elapsed < 10, elapsed


def test_missing_ssh_config(sshd: SSHServer, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect(make_settings(sshd, ssh_config=tmp_path / "nope")))
    assert "MP_BRIDGE_SSH_CONFIG" in str(exc.value)


def test_remote_broker_not_found(sshd: SSHServer, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sshd, remote_broker="mempalace-broker-not-installed")
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect_container(settings))
    msg = str(exc.value)
    assert "mempalace-broker-not-installed" in msg and "MP_BRIDGE_REMOTE_BROKER" in msg and "absolute path" in msg


def test_palace_mismatch(sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings], ctr_state: Path) -> None:
    (ctr_state / "palace.id").write_text(str(uuid.uuid4()) + "\n")
    with pytest.raises(ssh.SSHBridgeError) as exc:
        run(ssh.connect_container(make_settings(sshd)))
    msg = str(exc.value)
    assert exc.value.code == protocol.PALACE_MISMATCH
    assert str(ctr_state / "palace.id") in msg and broker.record["palace"] in msg


def test_palace_mismatch_over_ssh_reaches_the_agent_as_32067(
    sshd: SSHServer, broker: BrokerHandle, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """Before: discovery's `except Exception` turned this into -32066, or even degraded mode."""
    from tests.test_shim_support import ShimProc

    (ctr_state / "palace.id").write_text(str(uuid.uuid4()) + "\n")
    env = sshd.container_env(ctr_state, wrapper)
    s = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.PALACE_MISMATCH == -32067, r
        assert "palace mismatch" in r["error"]["message"]
        assert not (ctr_state / "degraded.json").exists()
    finally:
        s.close()


def test_unverifiable_host_key_never_leads_to_degraded_mode(
    sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """What a man in the middle looks like: the shim refuses with the key error; it does not run its own engine."""
    from tests.test_shim_support import ShimProc

    cfg = sshd.write_client_config(sshd.dir / "ssh_config.mitm", known_hosts=sshd.wrong_known_hosts())
    env = sshd.container_env(ctr_state, wrapper, config=cfg)
    s = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.BROKER_UNREACHABLE, r
        assert "host key" in r["error"]["message"] and "known_hosts" in r["error"]["message"]
        assert not (ctr_state / "degraded.json").exists()
        assert "degraded mode" not in s.stderr()
    finally:
        s.close()


def test_missing_local_palace_id_is_accepted(
    sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings], ctr_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (ctr_state / "palace.id").unlink()

    async def go() -> dict[str, Any]:
        c = await ssh.connect_container(make_settings(sshd))
        try:
            return await Rpc(c).call("ping")
        finally:
            await c.aclose()

    with caplog.at_level(logging.WARNING, logger="mp_ssh_bridge.ssh"):
        assert run(go())["result"] == {}
    assert any("no palace.id" in r.getMessage() for r in caplog.records)


def test_ensure_command_is_quoted(make_settings: Callable[..., Settings], sshd: SSHServer, ctr_state: Path) -> None:
    s = make_settings(sshd, remote_broker="'/opt/my tools/mempalace-broker' --log-level DEBUG", remote_palace="/Users/a b/palace")
    cmd = ssh.ensure_command(s)
    import shlex

    assert shlex.split(cmd) == ["/opt/my tools/mempalace-broker", "--log-level", "DEBUG", "--ensure", "--palace", "/Users/a b/palace"]
    assert str(ctr_state) not in cmd
    plain = ssh.ensure_command(make_settings(sshd, remote_broker="mempalace-broker; rm -rf /"))
    assert shlex.split(plain) == ["mempalace-broker;", "rm", "-rf", "/", "--ensure"]
    assert "--palace" not in plain
    assert ssh.parse_ensure_output('motd line\n{"endpoint": "unix:///x.sock", "pid": 1}\n\n')["pid"] == 1


# --- a lost host -----------------------------------------------------------------------------
async def _ends(conn: Connection, bound: float) -> float:
    """Seconds until the connection ends (read_frame returns None or raises); fails after `bound`."""
    t0 = time.monotonic()
    try:
        while True:
            line = await asyncio.wait_for(conn.read_frame(), bound)
            if line is None:
                break
    except asyncio.TimeoutError:
        raise AssertionError(f"connection still open {bound}s after the host went away") from None
    except Exception:  # noqa: BLE001 - ConnectionLost & co. are an end too
        pass
    return time.monotonic() - t0


def test_sshd_killed_mid_session_then_recovers(sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sshd)

    async def go() -> float:
        c = await ssh.connect_container(settings)
        try:
            assert (await Rpc(c).call("ping"))["result"] == {}
            sshd.kill()
            elapsed = await _ends(c, 10)
            with pytest.raises(ssh.SSHBridgeError) as down:
                await ssh.connect_container(settings)
            assert "refused" in str(down.value)
        finally:
            await c.aclose()
        sshd.start()
        again = await ssh.connect_container(settings)
        try:
            assert again.info["ensure"]["pid"] == broker.proc.pid  # the broker outlived sshd
            await list_write_search(again, "phoenix")
        finally:
            await again.aclose()
        return elapsed

    assert run(go()) < 10


def test_hung_host_detected_by_keepalive(sshd: SSHServer, broker: BrokerHandle, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sshd)  # keepalive 1 s x 3

    async def go() -> float:
        c = await ssh.connect_container(settings)
        try:
            assert (await Rpc(c).call("ping"))["result"] == {}
            sshd.freeze()
            try:
                return await _ends(c, 20)
            finally:
                sshd.thaw()
        finally:
            await c.aclose()

    elapsed = run(go())
    assert 2 < elapsed < 12, elapsed  # ~4 s: keepalive, not TCP


# --- the stdio bridge on its own ----------------------------------------------------------
def test_dial_stdio_without_socket_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "broker.sock"
    p = subprocess.run(
        [str(BIN / "mempalace-broker"), "--dial-stdio", "--socket", str(missing)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1
    assert str(missing) in p.stderr and "--ensure" in p.stderr


def test_dial_stdio_bridges_bytes(broker: BrokerHandle) -> None:
    """Default socket from broker.json (MEMPALACE_PATH of the environment); two frames in one write."""
    proc = subprocess.Popen(
        [str(BIN / "mempalace-broker"), "--dial-stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        frames = protocol.encode(protocol.request(1, "ping")) + protocol.encode(protocol.request(2, "broker/status"))
        out, err = proc.communicate(frames, timeout=30)  # stdin EOF → broker closes → bridge exits
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    replies = {m["id"]: m for m in map(json.loads, out.splitlines())}
    assert replies[1]["result"] == {} and replies[2]["result"]["broker"]["pid"] == broker.proc.pid


def test_asyncssh_stays_off_the_host_path() -> None:
    code = "import sys, mp_ssh_bridge.connection, mp_ssh_bridge.state, broker.dial; print('asyncssh' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == "False"


# --- end to end: the official MCP client → mp-shim (container role) → SSH → broker --------------
def test_mcp_sdk_client_through_shim_over_ssh(
    sshd: SSHServer, home: Path, host_state: Path, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    shim = shutil.which("mp-shim", path=str(BIN))
    assert shim, "mp-shim console script missing"
    env = dict(os.environ)
    env.update(
        MP_BRIDGE_ROLE="container",
        MEMPALACE_PATH=str(ctr_state),
        MP_BRIDGE_SSH_CONFIG=str(sshd.client_config),
        MP_BRIDGE_SSH_HOST="host",
        MP_BRIDGE_REMOTE_BROKER=str(wrapper),
    )
    marker = f"ssh-heron-{uuid.uuid4().hex[:8]}"
    content = f"The {marker} crossed the virtiofs mount by way of an SSH channel."

    def text(result: Any) -> str:
        return "\n".join(getattr(item, "text", "") for item in result.content)

    async def session() -> tuple[int, str]:
        params = StdioServerParameters(command=shim, args=[], env=env, cwd=str(home))
        with open(tmp_path / "shim.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    tools = (await s.list_tools()).tools
                    added = await s.call_tool("mempalace_add_drawer", {"wing": "ssh", "room": "e2e", "content": content})
                    assert not added.is_error, text(added)
                    found = await s.call_tool("mempalace_search", {"query": f"{marker} SSH channel"})
                    assert not found.is_error, text(found)
                    return len(tools), text(found)

    try:
        n_tools, found = asyncio.run(asyncio.wait_for(session(), 180))
    except BaseException:
        print((tmp_path / "shim.err").read_text()[-3000:])
        raise
    assert n_tools == engine_facts()["tools"]
    assert marker in found
    record = state.read_broker_json(host_state / "broker.json")  # the broker the remote --ensure started
    assert record is not None and pid_alive(record["pid"])
    assert not (ctr_state / "broker.json").exists()  # nothing was started on the container side

    async def status() -> dict[str, Any]:
        from tests.helpers import RawClient

        c = await RawClient.connect(record["endpoint"])
        try:
            return (await c.call("broker/status"))["result"]
        finally:
            await c.close()

    assert asyncio.run(status())["totals"]["requests"] >= 3


def test_shim_over_ssh_survives_sshd_restart(
    sshd: SSHServer, broker: BrokerHandle, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """The shim's contract over SSH: an in-flight call gets a clear error when sshd dies, then
    (once sshd is back) the next call works without restarting the agent."""
    from tests.test_shim_support import ShimProc

    env = sshd.container_env(ctr_state, wrapper, MEMPALACE_MCP_TIMEOUT_MS="60000")
    s = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    try:
        init = s.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}, timeout=60)
        assert init["result"]["serverInfo"]["name"] == "mempalace", init
        first = s.tool("mempalace_add_drawer", {"wing": "ssh", "room": "r", "content": "before the outage"}, timeout=60)
        assert "result" in first, first
        # A long poll is in flight when the host's sshd dies with all its sessions.
        wait_id = s.request("tools/call", {"name": "mempalace_event_wait", "arguments": {"timeout_ms": 20000}})
        time.sleep(0.5)
        sshd.kill()
        lost = s.wait_reply(wait_id, timeout=30)
        assert lost["error"]["code"] in (protocol.OUTCOME_UNKNOWN, protocol.BROKER_UNREACHABLE), lost
        sshd.start()
        after = s.tool("mempalace_add_drawer", {"wing": "ssh", "room": "r", "content": "after the outage"}, timeout=90)
        assert "result" in after and "success" in after["result"]["content"][0]["text"], after
        assert broker.proc.poll() is None  # the host broker outlived sshd
    except BaseException:
        print((tmp_path / "shim.err").read_text()[-3000:])
        raise
    finally:
        s.close()


def test_host_and_container_sessions_write_at_once_and_nothing_is_lost(
    sshd: SSHServer, broker: BrokerHandle, host_state: Path, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """The reason the project exists: a session on the host and one in a "container" (another HOME, another
    path to the palace, reaching the host over SSH) write at the same time; every acknowledged write is
    stored and found again by its vector."""
    import threading

    from tests.test_shim_support import ShimProc

    ctr_home = tmp_path / "ctr-home"
    ctr_home.mkdir()
    host = ShimProc(env={"MP_BRIDGE_ROLE": "host"}, stderr_path=tmp_path / "host.err")
    ctr = ShimProc(
        env={
            "HOME": str(ctr_home),
            "MP_BRIDGE_ROLE": "container",
            "MEMPALACE_PATH": str(ctr_state),
            "MP_BRIDGE_SSH_CONFIG": str(sshd.client_config),
            "MP_BRIDGE_REMOTE_BROKER": str(wrapper),
        },
        stderr_path=tmp_path / "ctr.err",
    )
    n = 30
    acked: dict[str, list[str]] = {"host": [], "ctr": []}

    def writer(name: str, s: ShimProc) -> None:
        for i in range(n):
            content = f"{name} note {i}: {uuid.uuid4().hex} about the shared palace"
            r = s.tool("mempalace_add_drawer", {"wing": f"w_{name}", "room": "r", "content": content}, timeout=120)
            if "result" in r and '"success": true' in r["result"]["content"][0]["text"]:
                acked[name].append(content)

    try:
        for s in (host, ctr):
            assert "result" in s.initialize()
        threads = [threading.Thread(target=writer, args=(k, s)) for k, s in (("host", host), ("ctr", ctr))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert len(acked["host"]) == n and len(acked["ctr"]) == n, {k: len(v) for k, v in acked.items()}
        total = json.loads(host.tool("mempalace_status")["result"]["content"][0]["text"])["total_drawers"]
        assert total == 2 * n
        missing = []
        for content in acked["host"] + acked["ctr"]:
            found = ctr.tool("mempalace_search", {"query": content, "limit": 3}, timeout=60)
            if content not in found["result"]["content"][0]["text"]:
                missing.append(content)
        assert missing == [], f"{len(missing)} of {2 * n} acknowledged writes not found by search"
        relay = daemon.read_record(str(ctr_state))  # the container session went through its daemon, over SSH
        assert relay is not None and relay.get("mode") == "relay", relay
        assert (relay.get("ssh") or {}).get("state") == "connected", relay
        assert "daemon" in ctr.stderr() and "daemon" not in host.stderr()
        assert broker.record["pid"] == broker.proc.pid  # one broker, one engine served both sides
    finally:
        host.close()
        ctr.close()


def test_aes_gcm_first_unless_the_config_chose_ciphers(tmp_path: Path) -> None:
    """asyncssh's chacha20-poly1305 costs every relayed call ~0.2 ms more than AES-GCM: AES-GCM goes first, but a
    `Ciphers` line in the user's SSH config is theirs to keep."""
    import asyncssh

    from mp_ssh_bridge import ssh

    plain = ssh._prefer_aes_gcm(asyncssh.SSHClientConnectionOptions(host="h", known_hosts=None))
    assert [a.decode() for a in plain.encryption_algs[:2]] == list(ssh.AES_GCM)
    assert b"chacha20-poly1305@openssh.com" in plain.encryption_algs  # still offered, after them
    config = tmp_path / "ssh_config"
    config.write_text("Host h\n  Ciphers aes256-ctr\n")
    chosen = ssh._prefer_aes_gcm(asyncssh.SSHClientConnectionOptions(config=[str(config)], host="h", known_hosts=None))
    assert list(chosen.encryption_algs) == [b"aes256-ctr"]
