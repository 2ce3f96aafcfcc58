"""Upstream's hub (`mempalace serve`) and the bridge: found with the bridge's own code, and the one writer.

- Discovery (mp_ssh_bridge/hub.py) against mempalace 3.11's own `server_registry` on the same inputs: the same
  directory for every spelling of a palace, the same verdict on live, dead, malformed and missing records.
- Hub mode (broker/hubroute.py), with the real hub and the real engine: sessions through mp-shim write and read
  through the hub, a plain `mempalace-mcp` (upstream's proxy) sees their drawers, the broker runs no engine; the
  hub killed → the broker's own engine takes over (and mempalace's writer lease with it) and every acknowledged
  drawer is there; a 3.4.0 engine configured for the broker never starts beside a 3.11 hub. A hub that comes
  after the broker cannot start at all: tests/test_lease.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import hub
from tests.conftest import BIN, ENGINES
from tests.helpers import children_of, pid_alive, tool_json, wait_for
from tests.sshd import free_port

server_registry = pytest.importorskip("mempalace.server_registry")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children_of reads /proc")


# --------------------------------------------------------------------------- discovery, against upstream's code
@pytest.fixture
def reg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.chdir(tmp_path)
    return h


def test_state_dir_is_upstreams_for_every_spelling_of_a_palace(reg_home: Path, tmp_path: Path) -> None:
    real = tmp_path / "palaces" / "Pälace one"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "palaces")
    spellings = [
        str(real),
        str(real) + "/",
        str(real) + "/.",
        "palaces/Pälace one",
        str(tmp_path / "link" / "Pälace one"),
        "~/p",
        "~/p/../q",
        str(tmp_path / "palaces" / "missing"),
        "./palaces//Pälace one",
    ]
    for p in spellings:
        assert hub.state_dir(p) == server_registry.server_state_dir(p), p
        assert hub.state_dir(p, reg_home) == server_registry.server_state_dir(p), p


def write_record(palace: str, **fields: Any) -> None:
    d = hub.state_dir(palace)
    d.mkdir(parents=True, exist_ok=True)
    (d / "serverinfo.json").write_text(fields.pop("_raw", None) or json.dumps(fields))


def test_live_agrees_with_upstream_on_every_record(reg_home: Path, tmp_path: Path) -> None:
    palace = str(tmp_path / "palace")
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        good = {"pid": sleeper.pid, "host": "127.0.0.1", "port": 8765, "scheme": "http", "read_only": False}
        cases: list[dict[str, Any]] = [
            good,
            dict(good, host="0.0.0.0"),
            dict(good, pid=dead.pid),
            dict(good, port="8765"),
            dict(good, host=""),
            dict(good, pid="12"),
            {"_raw": "not json"},
            {"_raw": "[1, 2]"},
        ]
        for record in cases:
            write_record(palace, **dict(record))
            theirs = server_registry.read_live_serverinfo(palace)
            mine = hub.live(palace)
            assert (mine is None) == (theirs is None), (record, theirs, mine)
            if mine is not None:
                assert mine.base_url == server_registry.client_base_url(theirs), record
        (hub.state_dir(palace) / "serverinfo.json").unlink()
        assert hub.live(palace) is None and server_registry.read_live_serverinfo(palace) is None
        write_record(palace, **dict(good, pid=os.getpid()))
        assert hub.live(palace) is None  # our own pid is never a hub to route to (upstream's discover_hub: same)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_tokens_in_upstreams_order(reg_home: Path, tmp_path: Path) -> None:
    palace = str(tmp_path / "palace")
    assert hub.tokens(palace, environ={}) == ()
    d = hub.state_dir(palace)
    d.mkdir(parents=True)
    (d / "token").write_text("file-token\n")
    env = {hub.TOKEN_ENV: "env-token"}
    assert hub.tokens(palace, environ=env) == ("file-token", "env-token")
    os.environ[hub.TOKEN_ENV] = "env-token"
    try:
        assert hub.tokens(palace) == server_registry.load_server_tokens(palace)
    finally:
        del os.environ[hub.TOKEN_ENV]


# --------------------------------------------------------------------------- hub mode with the real hub
class Hub:
    def __init__(self, palace: Path, home: Path, port: int, **extra: str) -> None:
        self.port = port
        self.log = home / f"hub-{port}.log"
        env = dict(os.environ, MEMPALACE_PALACE_PATH=str(palace), HOME=str(home), **extra)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mempalace"), "serve", "--palace", str(palace), "--port", str(port)],
                env=env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: self._up(palace, home), 90, what=f"the hub to register ({self.log})")

    def _up(self, palace: Path, home: Path) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the hub exited: {self.log.read_text()[-2000:]}")
        return hub.live(str(palace), home) is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def palace(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = home / "palace"
    monkeypatch.setenv("MEMPALACE_PALACE_PATH", str(p))  # hub, broker and plain engine: one palace
    return p


@pytest.fixture
def running_hub(palace: Path, home: Path) -> Iterator[Hub]:
    h = Hub(palace, home, free_port())
    yield h
    h.kill()


class Shim:
    """mp-shim as an agent runs it (or, with `command`, another stdio MCP server): raw JSON-RPC on its stdio."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, command: Path = BIN / "mp-shim") -> None:
        self.proc = subprocess.Popen(
            [str(command), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, **(env or {})),
        )
        self.n = 0

    def call(self, method: str, params: Any = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        self.proc.stdin.write(
            (
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": self.n,
                        "method": method,
                        **({"params": params} if params is not None else {}),
                    }
                )
                + "\n"
            ).encode()
        )
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "the shim closed its stdout"
            msg = json.loads(line)
            if msg.get("id") == self.n:
                return msg

    def start(self) -> dict[str, Any]:
        init = self.call(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        self.proc.stdin.flush()
        return init

    def tool(self, name: str, **arguments: Any) -> dict[str, Any]:
        return self.call("tools/call", {"name": name, "arguments": arguments})

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def broker_status(home: Path) -> dict[str, Any]:
    from mp_ssh_bridge import state
    from mp_ssh_bridge.election import probe

    record = state.read_broker_json(home / ".mempalace" / "broker.json") or {}
    status = probe(record["endpoint"], 5.0)
    assert status, "the broker does not answer"
    return status


def add(shim: Shim, text: str) -> str:
    reply = shim.tool("mempalace_add_drawer", wing="hub", room="r", content=text)
    assert "result" in reply and not reply["result"].get("isError"), reply
    return str(tool_json(reply).get("drawer_id"))


def found(shim: Shim, text: str) -> bool:
    reply = shim.tool("mempalace_search", query=text, limit=20)
    assert "result" in reply, reply
    return text in json.dumps(reply)


def test_sessions_go_through_the_hub_and_a_plain_engine_sees_their_drawers(
    home: Path, palace: Path, running_hub: Hub
) -> None:
    shims = [Shim() for _ in range(3)]
    try:
        for s in shims:
            assert "result" in s.start()
        status = broker_status(home)
        via = status["engine"].get("hub")
        assert via and via["pid"] == running_hub.proc.pid and via["url"].endswith(f":{running_hub.port}/mcp"), status
        for command in (["status"], ["doctor"]):  # what a person runs says where the calls go
            out = subprocess.run(
                [str(BIN / "mp-bridge"), *command],
                capture_output=True,
                text=True,
                timeout=60,
                env=dict(os.environ, COLUMNS="300"),
            )
            assert f"via hub (pid {running_hub.proc.pid}" in out.stdout, (command, out.stdout, out.stderr)
        broker_pid = status["broker"]["pid"]
        assert not [p for p in children_of(broker_pid) if p != running_hub.proc.pid], "the broker ran an engine"
        texts = [f"hub drawer {i} written by session {i % 3} about lighthouses" for i in range(6)]
        for i, text in enumerate(texts):
            add(shims[i % 3], text)
        for text in texts:
            assert found(shims[0], text), text
        # upstream's own proxy (a plain mempalace-mcp on this palace) sees the hub: the drawers are the hub's
        engine = subprocess.Popen(
            [str(ENGINES["pinned"])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        proxy = Shim.__new__(Shim)
        proxy.proc, proxy.n = engine, 0
        try:
            assert "result" in proxy.start()
            for text in texts:
                assert found(proxy, text), text
        finally:
            proxy.close()
        # the hub dies: the broker's own engine takes over, and every acknowledged drawer is there
        running_hub.kill()  # the broker notices by itself and starts its own engine, before any call asks
        wait_for(lambda: isinstance(broker_status(home)["engine"]["pid"], int), 60, what="the broker's own engine")
        late = "written after the hub died, about harbours"
        add(shims[1], late)
        for text in [*texts, late]:
            assert found(shims[2], text), text
        status = broker_status(home)
        assert "hub" not in status["engine"] and isinstance(status["engine"]["pid"], int), status["engine"]
    finally:
        for s in shims:
            s.close()


def old_engine() -> Path:
    """mempalace 3.4.0's mempalace-mcp (its own venv), or the test is skipped."""
    old = ENGINES["3.4.0"]
    if not os.access(old, os.X_OK):
        pytest.skip(f"mempalace 3.4.0 is not installed at {old}: run scripts/setup-engine.sh 3.4.0")
    return old


def test_a_3_4_0_engine_never_starts_beside_a_3_11_hub(home: Path, palace: Path, running_hub: Hub) -> None:
    shim = Shim(env={"MP_BRIDGE_ENGINE": str(old_engine())})
    try:
        assert "result" in shim.start()
        add(shim, "a drawer for the hub only, about tides")
        status = broker_status(home)
        assert status["engine"].get("hub", {}).get("pid") == running_hub.proc.pid, status["engine"]
        assert not [p for p in children_of(status["broker"]["pid"]) if pid_alive(p)], "an engine ran beside the hub"
        assert found(shim, "a drawer for the hub only, about tides")
    finally:
        shim.close()


def test_mp_bridge_run_refuses_while_a_hub_owns_the_palace(home: Path, palace: Path, running_hub: Hub) -> None:
    marker = home / "cmd-ran"
    cmd = [str(BIN / "mp-bridge"), "run", "--timeout", "20", "--", "touch", str(marker)]
    # no broker yet: the host sees the hub's registry itself
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 75 and f"hub (pid {running_hub.proc.pid}" in out.stderr, out
    shim = Shim()
    try:
        assert "result" in shim.start()
        owner_file = home / ".mempalace" / "owner.json"
        wait_for(lambda: json.loads(owner_file.read_text() or "{}").get("kind") == "hub", 30, what="owner.json: hub")
        # a container cannot judge the host's pids: it asks the broker, whose record says it routes to the hub
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, MP_BRIDGE_ROLE="container")
        )
        assert out.returncode == 75 and f"upstream's hub (pid {running_hub.proc.pid}" in out.stderr, out
        assert not marker.exists()
        assert broker_status(home)["engine"].get("hub"), "the broker left hub mode"
        add(shim, "still served through the hub after the refused grants")
    finally:
        shim.close()


def test_a_long_poll_waits_at_the_hub_beside_the_queue(home: Path, palace: Path, running_hub: Hub) -> None:
    import threading

    waiter, other = Shim(), Shim()
    got: dict[str, Any] = {}
    try:
        assert "result" in waiter.start() and "result" in other.start()
        thread = threading.Thread(
            target=lambda: got.update(
                reply=waiter.tool("mempalace_event_wait", correlation_id="hub-c1", timeout_ms=60000)
            )
        )
        thread.start()
        wait_for(lambda: broker_status(home).get("long_polls_beside") == 1, 20, what="the wait to be at the hub")
        for _ in range(5):  # the queue is not held by the wait: other calls are answered while it waits
            assert "result" in other.tool("mempalace_status")
        assert thread.is_alive() and not got
        appended = other.tool(
            "mempalace_event_append",
            type="task.reply",
            stream="s",
            room="r",
            from_agent="other",
            correlation_id="hub-c1",
        )
        assert "result" in appended and not appended["result"].get("isError"), appended
        thread.join(30)
        assert not thread.is_alive(), "the wait was not woken by the event"
        assert "hub-c1" in json.dumps(got["reply"]) and '"timed_out": true' not in tool_text(got["reply"]), got
    finally:
        waiter.close()
        other.close()


def tool_text(reply: dict[str, Any]) -> str:
    return " ".join(c.get("text", "") for c in (reply.get("result") or {}).get("content") or [])


def doctor_json(env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [str(BIN / "mp-bridge"), "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, **(env or {})),
    )
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def named(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, (name, [c["name"] for c in report["checks"]])
    return found[-1]


def test_doctor_on_both_sides_says_how_the_hub_stands(home: Path, palace: Path, running_hub: Hub, sshd: Any) -> None:
    import shutil

    from tests.sshd import write_broker_wrapper

    # a user-run hub and no broker: the host's doctor warns (a container could not see it)
    report = doctor_json()
    assert named(report, "hub")["status"] == "warn" and "no broker routes to it" in named(report, "hub")["detail"]
    assert named(report, "stray writers")["status"] == "ok", named(report, "stray writers")  # the hub is no stray
    shim = Shim()
    try:
        assert "result" in shim.start()
        owner_file = home / ".mempalace" / "owner.json"
        wait_for(lambda: json.loads(owner_file.read_text() or "{}").get("kind") == "hub", 30, what="owner.json: hub")
        assert named(doctor_json(), "hub")["status"] == "ok"
        # the container's doctor: the host's --check over the real sshd, owner.json through the mount
        ctr = home.parent / "ctr" / ".mempalace"
        ctr.mkdir(parents=True, mode=0o700)
        shutil.copyfile(home / ".mempalace" / "palace.id", ctr / "palace.id")
        for name in ("broker.json", "owner.json"):
            (ctr / name).symlink_to(home / ".mempalace" / name)
        wrapper = write_broker_wrapper(
            home.parent / "remote-broker.sh",
            home,
            home / ".mempalace",
            extra=f"export MEMPALACE_PALACE_PATH='{palace}'\n",
        )
        report = doctor_json(sshd.container_env(ctr, wrapper))
        hub_line = named(report, "hub")
        assert hub_line["status"] == "ok" and "on the host" in hub_line["detail"], report
        assert f"pid {running_hub.proc.pid}" in hub_line["detail"]
    finally:
        shim.close()


def test_hub_killed_mid_storm_host_and_container_writers_lose_nothing(
    home: Path, palace: Path, running_hub: Hub, sshd: Any, tmp_path: Path
) -> None:
    """3 host sessions and 1 container session (real sshd, through its daemon) write while the hub serves the
    palace; the hub is killed with -9 mid-storm; the broker's own engine takes over. Every acknowledged drawer is
    stored; a call the hub's death interrupted is reported (not executed, or outcome unknown), never lost silently."""
    import threading
    import time

    from tests.sshd import two_sides
    from tests.test_shim_support import ShimProc

    _, ctr_state, wrapper = two_sides(home, extra=f"export MEMPALACE_PALACE_PATH='{palace}'\n")
    ctr_home = tmp_path / "ctr-home"
    ctr_home.mkdir()
    ctr_env = dict(sshd.container_env(ctr_state, wrapper, MEMPALACE_MCP_TIMEOUT_MS="60000"), HOME=str(ctr_home))
    writers = [ShimProc(env={"MP_BRIDGE_ROLE": "host"}, stderr_path=tmp_path / f"host-{i}.err") for i in range(3)]
    writers.append(ShimProc(env=ctr_env, stderr_path=tmp_path / "ctr.err"))
    per_writer = int(os.environ.get("HUB_STORM_WRITES", "12"))
    acked: list[str] = []
    reported: list[dict[str, Any]] = []
    lock = threading.Lock()
    halfway = threading.Event()

    def write(i: int, s: ShimProc) -> None:
        for n in range(per_writer):
            text = f"storm drawer {n} of writer {i} about rivers and ferries"
            reply = s.tool("mempalace_add_drawer", {"wing": "storm", "room": f"w{i}", "content": text}, timeout=120)
            with lock:
                if "result" in reply and not reply["result"].get("isError"):
                    acked.append(text)
                else:
                    reported.append(reply)
                if len(acked) >= per_writer * 2:
                    halfway.set()

    try:
        for s in writers:
            assert "result" in s.initialize(), s.stderr()
        assert broker_status(home)["engine"].get("hub"), "not in hub mode"
        threads = [threading.Thread(target=write, args=(i, s)) for i, s in enumerate(writers)]
        for t in threads:
            t.start()
        assert halfway.wait(120), "the storm did not get halfway"
        killed = time.monotonic()
        running_hub.kill()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        took_over = broker_status(home)["engine"]
        assert "hub" not in took_over and isinstance(took_over["pid"], int), took_over
        # mempalace's writer lease went from the dead hub to the broker, then to its engine (broker/lease.py)
        assert took_over["lease"]["state"] == "engine", took_over["lease"]
        assert took_over["lease"]["holder"].startswith(f"PID {took_over['pid']} ("), took_over["lease"]
        for reply in reported:  # every failed write says what became of it
            assert reply["error"]["data"]["outcome"] in ("not_executed", "unknown"), reply
        check = ShimProc(env={"MP_BRIDGE_ROLE": "host"}, stderr_path=tmp_path / "check.err")
        try:
            assert "result" in check.initialize()
            listed = check.tool("mempalace_list_drawers", {"wing": "storm", "limit": 1000}, timeout=120)
            missing = [t for t in acked if t not in json.dumps(listed)]
            assert not missing, (len(missing), missing[:3])
        finally:
            check.close()
        print(
            f"hub storm: {len(acked)} acknowledged and stored, {len(reported)} reported; broker took over "
            f"{time.monotonic() - killed:.1f}s after the kill (upper bound)"
        )
    finally:
        for s in writers:
            s.close()


def test_an_event_appended_through_the_bridge_reaches_a_peer_replica(home: Path, tmp_path: Path) -> None:
    """Two palaces in two homes, each with its hub on loopback and the other in its peers.json (mempalace's
    logstream sync, MEMPALACE_SYNC_INTERVAL=1): an event appended through the bridge on one is listed on the other."""
    from tests.test_shim_support import ShimProc

    sides = []
    ports = [free_port(), free_port()]
    for i in range(2):
        h = home if i == 0 else tmp_path / "home2"
        h.mkdir(exist_ok=True)
        if i:
            (h / ".cache").symlink_to((home / ".cache").resolve())
        p = h / f"palace{i}"
        p.mkdir()
        (p / "peers.json").write_text(
            json.dumps({"peers": [{"name": f"side{1 - i}", "url": f"http://127.0.0.1:{ports[1 - i]}"}]})
        )
        sides.append((h, p))
    hubs = [Hub(p, h, ports[i], MEMPALACE_SYNC_INTERVAL="1") for i, (h, p) in enumerate(sides)]
    shims = [
        ShimProc(
            env={
                "HOME": str(h),
                "MEMPALACE_PATH": str(h / ".mempalace"),
                "MEMPALACE_PALACE_PATH": str(p),
                "MP_BRIDGE_CONFIG": str(h / "mp-bridge.toml"),
            },
            stderr_path=tmp_path / f"shim{i}.err",
        )
        for i, (h, p) in enumerate(sides)
    ]
    try:
        for s in shims:
            assert "result" in s.initialize(), s.stderr()
        appended = shims[0].tool(
            "mempalace_event_append",
            {
                "type": "task.request",
                "stream": "sync-test",
                "room": "r",
                "from_agent": "side0",
                "correlation_id": "across-replicas",
            },
        )
        assert "result" in appended and not appended["result"].get("isError"), appended

        def listed() -> bool:
            reply = shims[1].tool("mempalace_event_list", {"stream": "sync-test"})
            assert "result" in reply, reply
            return "across-replicas" in json.dumps(reply)

        wait_for(listed, 60, interval=0.5, what="the event on the other replica")
        for i, (h, _) in enumerate(sides):  # both went through their broker to their hub
            from mp_ssh_bridge import state
            from mp_ssh_bridge.election import probe

            record = state.read_broker_json(h / ".mempalace" / "broker.json") or {}
            status = probe(record["endpoint"], 5.0)
            assert status and status["engine"].get("hub", {}).get("pid") == hubs[i].proc.pid, status
    finally:
        for s in shims:
            s.close()
        for hb in hubs:
            hb.kill()
        from tests.conftest import _kill_brokers

        _kill_brokers(tmp_path / "home2" / ".mempalace")
