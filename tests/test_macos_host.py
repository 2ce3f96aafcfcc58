"""A broker that fits a Mac: open-file limits, launchd's job type, the TCP address it advertises, signal names.

The macOS inputs (sysctl's kern.maxfilesperproc, setrlimit's refusal above it, RLIM_INFINITY as the hard
limit) are substituted, so these run on Linux; the broker itself is started with the soft limit launchd
gives a job (256) and must serve 300 clients.
"""

from __future__ import annotations

import asyncio
import os
import plistlib
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from mp_ssh_bridge import hostinfo, state, urls
from mp_ssh_bridge.doctor import tcp_check
from mp_ssh_bridge.errors import EndpointError
from mp_ssh_bridge.settings import load_broker
from mp_ssh_bridge_broker import limits
from mp_ssh_bridge_broker.engine import EngineExited, describe_exit, signal_name
from tests.conftest import BIN, REPO, BrokerHandle
from tests.helpers import RawClient, stop_process, wait_for
from tests.test_broker_fake import FAKE

INF = -1  # RLIM_INFINITY as the fakes below spell it


class FakeResource:
    """`resource` as macOS behaves: setrlimit refuses a soft limit above kern.maxfilesperproc (or infinite)."""

    RLIMIT_NOFILE = 8
    RLIM_INFINITY = INF

    def __init__(self, soft: int, hard: int, per_process: int = 10240) -> None:
        self.limits = (soft, hard)
        self.per_process = per_process
        self.set_calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, value: tuple[int, int]) -> None:
        self.set_calls.append(value)
        if value[0] == INF or value[0] > self.per_process:
            raise ValueError("current limit exceeds maximum limit")  # what CPython raises for EINVAL here
        self.limits = value


def sysctl(output: str, calls: list[list[str]] | None = None) -> Callable[..., Any]:
    def run(argv: list[str], **kwargs: Any) -> Any:
        if calls is not None:
            calls.append(argv)
        return SimpleNamespace(stdout=output, returncode=0)

    return run


# --------------------------------------------------------------------------- open-file limits, by their inputs
def test_the_target_is_the_hard_limit_within_the_system_bound() -> None:
    assert limits.nofile_target(256, INF, 10240, INF) == 10240  # macOS: hard unlimited, kern.maxfilesperproc
    assert limits.nofile_target(256, INF, None, INF) == limits.NOFILE_CAP
    assert limits.nofile_target(1024, 524288, None, INF) == limits.NOFILE_CAP  # systemd --user: capped
    assert limits.nofile_target(1024, 4096, None, INF) == 4096
    assert limits.nofile_target(90000, 1048576, None, INF) == 90000, "never lowered"
    assert limits.nofile_target(INF, INF, 10240, INF) == INF


def test_macos_reads_kern_maxfilesperproc_once_and_avoids_the_open_max_refusal() -> None:
    calls: list[list[str]] = []
    fake = FakeResource(256, INF, per_process=24576)
    assert limits.raise_nofile("darwin", fake, sysctl("24576\n", calls)) == (256, 24576)
    assert calls == [[limits.SYSCTL, "-n", "kern.maxfilesperproc"]]
    assert fake.set_calls == [(24576, INF)], "the hard limit is left as it was; the soft one never RLIM_INFINITY"


def test_linux_needs_no_sysctl_and_a_refusal_is_survived() -> None:
    calls: list[list[str]] = []
    assert limits.raise_nofile("linux", FakeResource(256, 4096, per_process=10**9), sysctl("", calls)) == (256, 4096)
    assert calls == []
    refusing = FakeResource(256, INF, per_process=100)  # sysctl silent: the cap is tried, and refused
    assert limits.raise_nofile("darwin", refusing, sysctl("")) == (256, 256)
    enough = FakeResource(70000, INF)
    assert limits.raise_nofile("darwin", enough, sysctl("", calls)) == (70000, 70000) and enough.set_calls == []


def test_sysctl_output_parsing() -> None:
    assert limits.parse_sysctl_int("10240\n") == 10240
    for bad in ("", None, "0", "-1", "unlimited", "sysctl: unknown oid"):
        assert limits.parse_sysctl_int(bad) is None, bad
    assert limits.max_files_per_process("linux", sysctl("10240")) is None

    def failing(argv: list[str], **kwargs: Any) -> Any:
        raise FileNotFoundError(argv[0])

    assert limits.max_files_per_process("darwin", failing) is None


def _soft_256() -> None:
    """preexec_fn: the soft limit launchd and Terminal give a process on macOS."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


@pytest.mark.slow
def test_a_broker_started_at_256_open_files_serves_300_clients(home: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:  # this test's own 300 connections (a Mac's Terminal starts pytest at 256 too)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard if hard != resource.RLIM_INFINITY else 4096), hard))
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}: no room for 300 clients")
    log = home / "broker-limits.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([str(BIN / "mempalace-broker")], env=dict(os.environ, MP_BRIDGE_ENGINE=FAKE,
                                         # all 300 come from this one process: past the per-peer bound (256)
                                         MP_BRIDGE_MAX_CONNECTIONS_PER_PEER="400"),
                                stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, preexec_fn=_soft_256)
    broker = BrokerHandle(proc, home / ".mempalace")
    try:
        wait_for(lambda: (state.read_broker_json(broker.state_dir / "broker.json") or {}).get("pid") == proc.pid
                 or proc.poll() is not None, 30, what="broker.json")
        assert proc.poll() is None, log.read_text()
        assert "open-file limit raised from 256 to" in log.read_text()
        if hasattr(psutil.Process, "rlimit"):  # Linux: the broker's limit, and the engine's, inherited
            raised = psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            assert raised > 1024
            engine = wait_for(lambda: (state.read_broker_json(broker.state_dir / "broker.json") or {})
                              .get("engine", {}).get("pid"), 30, what="engine pid")
            assert psutil.Process(engine).rlimit(psutil.RLIMIT_NOFILE)[0] == raised

        async def clients() -> None:
            conns: list[Any] = []
            for _ in range(6):
                # In batches, each answered before the next: the listen backlog is 128, and asyncio takes
                # a UNIX connect refused with EAGAIN (backlog full) for "in progress", so an unaccepted
                # overflow would only surface later, as EINVAL from recv (seen on a loaded CI machine).
                batch = await asyncio.gather(*(RawClient.connect(broker.endpoint) for _ in range(50)))
                replies = await asyncio.gather(*(c.call("ping", timeout=30) for c in batch))
                assert all(r.get("result") == {} for r in replies)
                conns += batch
            served = await conns[-1].call("tools/call", {"name": "fake_sleep", "arguments": {"seconds": 0}})
            assert "result" in served, served
            status = await conns[0].call("broker/status")
            assert len(status["result"]["clients"]) == 300
            await asyncio.gather(*(c.close() for c in conns))

        asyncio.run(clients())
        assert proc.poll() is None
        assert "Too many open files" not in log.read_text()
    finally:
        stop_process(proc, 20)


def test_the_launchd_agent_runs_interactive_with_room_for_files() -> None:
    with open(REPO / "configs" / "com.mempalace.broker.plist", "rb") as fh:
        job = plistlib.load(fh)
    assert job["ProcessType"] in ("Interactive", "Standard"), "Background throttles the engine's CPU and I/O"
    assert job["SoftResourceLimits"]["NumberOfFiles"] >= 4096
    assert job["HardResourceLimits"]["NumberOfFiles"] >= job["SoftResourceLimits"]["NumberOfFiles"]


# --------------------------------------------------------------------------- the TCP address a broker advertises
def test_ipv6_addresses_are_bracketed_and_parse_back() -> None:
    for host in ("::1", "fe80::1", "2001:db8::7"):
        url = urls.tcp_url(host, 8765)
        assert url == f"tcp://[{host}]:8765"
        assert urls.parse(url)[:3] == ("tcp", host, 8765)
    assert urls.tcp_url("127.0.0.1", 1) == "tcp://127.0.0.1:1" and urls.tcp_url("[::1]", 1) == "tcp://[::1]:1"
    with pytest.raises(EndpointError, match="brackets"):
        urls.parse("tcp://::1:8765")
    assert urls.parse("ssh://me:secret@alias:22/s.sock").host == "alias", "a password's colon is no IPv6 address"


def test_what_is_advertised() -> None:
    assert urls.advertised_tcp("127.0.0.1", 9, None) == "tcp://127.0.0.1:9"
    assert urls.advertised_tcp("::1", 9, None) == "tcp://[::1]:9"
    for wildcard in ("0.0.0.0", "::", ""):
        assert urls.advertised_tcp(wildcard, 9, None) is None, "names no host: a container would dial itself"
    assert urls.advertised_tcp("0.0.0.0", 9, "host.docker.internal") == "tcp://host.docker.internal:9"
    assert urls.advertised_tcp("::", 9, "host.orb.internal:7000") == "tcp://host.orb.internal:7000"
    assert urls.advertised_tcp("0.0.0.0", 9, "fd00::2") == "tcp://[fd00::2]:9"
    assert urls.advertised_tcp("0.0.0.0", 9, "[fd00::2]:70") == "tcp://[fd00::2]:70"


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "[::]", "host:", "host:0", "host:70000", "[fd00::2", "[x]y",
                                 "a b", "tcp://h:1", "h:x"])
def test_tcp_advertise_is_validated(bad: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_BRIDGE_TCP_ADVERTISE", bad)
    with pytest.raises(ValueError):
        load_broker()


def test_tcp_advertise_setting(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_broker().tcp_advertise is None
    monkeypatch.setenv("MP_BRIDGE_TCP_ADVERTISE", " host.lima.internal ")
    assert load_broker().tcp_advertise == "host.lima.internal"
    monkeypatch.setenv("MP_BRIDGE_TCP_ADVERTISE", "")
    assert load_broker().tcp_advertise is None


def test_doctor_says_why_nothing_is_advertised() -> None:
    assert tcp_check({"endpoints": {"unix": "unix:///s"}}) is None, "no TCP listener: no check"
    silent = tcp_check({"tcp_token": "t", "tcp_listen": "0.0.0.0:8765", "endpoints": {"unix": "unix:///s"}})
    assert silent is not None and silent.level == "warn"
    assert "0.0.0.0:8765" in silent.detail and "MP_BRIDGE_TCP_ADVERTISE" in silent.fix
    assert "host.docker.internal" in silent.fix and "host.orb.internal" in silent.fix
    told = tcp_check({"tcp_token": "t", "tcp_listen": "0.0.0.0:8765",
                      "endpoints": {"tcp": "tcp://host.docker.internal:8765"}})
    assert told is not None and told.level == "ok" and "tcp://host.docker.internal:8765" in told.detail
    old = tcp_check({"tcp_token": "t", "endpoints": {"tcp": "tcp://::1:8765"}})  # an older broker's record
    assert old is not None and old.level == "warn" and "brackets" in old.detail


def _tcp_broker(broker_factory: Callable[..., BrokerHandle], bind: str, **env: str) -> BrokerHandle:
    return broker_factory("--tcp", bind, wait_engine=False, env={"MP_BRIDGE_ENGINE": FAKE, **env})


def test_a_wildcard_bind_advertises_only_what_it_is_told(broker_factory: Callable[..., BrokerHandle]) -> None:
    silent = _tcp_broker(broker_factory, "0.0.0.0:0")
    record = silent.record
    assert "tcp" not in record["endpoints"] and record["tcp_token"]
    assert record["tcp_listen"].startswith("0.0.0.0:")
    silent.stop()
    told = _tcp_broker(broker_factory, "0.0.0.0:0", MP_BRIDGE_TCP_ADVERTISE="127.0.0.1").record
    port = int(told["tcp_listen"].rsplit(":", 1)[1])
    assert told["endpoints"]["tcp"] == f"tcp://127.0.0.1:{port}"
    _dial(told["endpoints"]["tcp"], told["tcp_token"])


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_bind_is_advertised_in_brackets(broker_factory: Callable[..., BrokerHandle]) -> None:
    record = _tcp_broker(broker_factory, "[::1]:0").record
    url = record["endpoints"]["tcp"]
    assert url.startswith("tcp://[::1]:") and urls.parse(url).host == "::1"
    _dial(url, record["tcp_token"])


def _dial(url: str, token: str) -> None:
    from mp_ssh_bridge import handshake
    from mp_ssh_bridge.links import connect_tcp

    endpoint = urls.parse(url)
    link = connect_tcp(endpoint.host, endpoint.port, 5.0, 1 << 20, url)
    try:
        handshake.authenticate(link, token, url, 5.0)
        assert "broker" in handshake.broker_status(link, 5.0, {"probe": True})
    finally:
        link.close()


# --------------------------------------------------------------------------- signal names
def test_engine_exits_are_named_by_signal() -> None:
    assert describe_exit(0) == "exit code 0" and describe_exit(3) == "exit code 3"
    assert describe_exit(-15) == "signal SIGTERM (15)"
    assert describe_exit(-9) == "signal SIGKILL (9)"
    assert signal_name(250) == "250", "a number this platform has no name for"
    assert str(EngineExited(-11, "")) == "engine exited (signal SIGSEGV (11))"
    assert str(EngineExited(None, "")) == "engine exited (killed)"


def test_an_engine_killed_by_a_signal_is_logged_by_name(broker_factory: Callable[..., BrokerHandle],
                                                         home: Path) -> None:
    broker = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})
    engine = broker.record["engine"]["pid"]
    os.kill(engine, 15)

    async def last_exit() -> Any:
        c = await RawClient.connect(broker.endpoint)
        try:
            return (await c.call("broker/status", {"probe": True}))["result"]["engine"]["last_exit"]
        finally:
            await c.close()

    assert wait_for(lambda: asyncio.run(last_exit()), 20, what="the engine's exit") == "signal SIGTERM (15)"
    assert "exited: signal SIGTERM (15)" in "".join(p.read_text() for p in home.glob("broker-*.log"))



def test_ps_reads_start_times_in_the_c_locale_and_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ps -o lstart=` prints in the locale's format and local time: a broker under launchd (no LANG) and one
    from a German terminal in another zone must read one process's start alike, or the proof fails."""
    import subprocess as sp

    seen: dict[str, Any] = {}

    def fake_run(argv: list[str], **kw: Any) -> sp.CompletedProcess[str]:
        seen.update(argv=argv, env=kw.get("env"))
        return sp.CompletedProcess(argv, 0, stdout="Fri Nov 27 09:00:00 2026\n", stderr="")

    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    monkeypatch.setattr(sp, "run", fake_run)
    assert hostinfo.proc_start(4242, platform="darwin") is not None
    assert seen["argv"][:3] == ["ps", "-o", "lstart="]
    assert seen["env"]["LC_ALL"] == "C" and seen["env"]["TZ"] == "UTC"
