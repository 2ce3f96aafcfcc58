"""Discovery pieces: endpoint URLs, tcp+token, engine resolution (no recursion), the degraded-mode decision."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mp_ssh_bridge import config, discovery, endpoints, protocol, state
from mp_ssh_bridge.errors import EndpointError, ShimError
from mp_ssh_bridge.settings import load
from tests.test_shim_support import SHIM, ShimProc


def test_parse_urls() -> None:
    assert endpoints.parse("unix:///run/b.sock")[:4] == ("unix", "", None, "/run/b.sock")
    assert endpoints.parse("tcp://127.0.0.1:7000")[:4] == ("tcp", "127.0.0.1", 7000, "")
    assert endpoints.parse("ssh://host/Users/me/.mempalace/broker.sock")[:2] == ("ssh", "host")
    assert endpoints.parse("ssh://me@host:2222/a/b.sock") == ("ssh", "host", 2222, "/a/b.sock", "me")
    for bad in ("http://x", "unix://", "tcp://host", "/just/a/path", "ssh://host", "ssh://host/", "ssh://h:x/a"):
        with pytest.raises(EndpointError):
            endpoints.parse(bad)


def test_tcp_endpoint_with_token(home: Path, monkeypatch: pytest.MonkeyPatch, broker_factory, tmp_path: Path) -> None:
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    b = broker_factory("--tcp", "127.0.0.1:0", wait_engine=False)
    url = b.record["endpoints"]["tcp"]
    s = ShimProc(env={"MEMPALACE_BROKER": url}, stderr_path=tmp_path / "ok.err")  # token from broker.json
    try:
        assert s.call("ping", timeout=60)["result"] == {}
    finally:
        s.close()
    status = subprocess.run([str(Path(sys.executable).parent / "mp-bridge"), "status", "--json"], capture_output=True,
                            text=True, timeout=60)
    token = b.record["tcp_token"]
    assert status.returncode == 0 and token not in status.stdout and '"<hidden>"' in status.stdout  # never a secret
    bad = ShimProc(env={"MEMPALACE_BROKER": url, "MEMPALACE_BROKER_TOKEN": "wrong"}, stderr_path=tmp_path / "bad.err")
    try:
        r = bad.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.UNAUTHORIZED, r
    finally:
        bad.close()


def test_engine_that_is_the_shim_is_refused_or_skipped(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mp_ssh_bridge import enginecmd

    with pytest.raises(ShimError, match="mp-shim itself"):
        discovery.resolve_engine(load(engine=SHIM))
    # the shim installed under the name mempalace-mcp (a copy of the console script)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    impostor = fake_bin / "mempalace-mcp"
    impostor.write_bytes(Path(SHIM).read_bytes())
    impostor.chmod(0o755)
    with pytest.raises(ShimError, match="mp-shim itself"):
        discovery.resolve_engine(load(engine=str(impostor)))
    with pytest.raises(ShimError, match="mp-shim itself"):
        discovery.resolve_engine(load(engine=f"{sys.executable} -m mp_ssh_bridge.shim"))
    # A bare name skips the impostor that comes first on PATH and finds the real engine.
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    real = discovery.resolve_engine(load())
    assert real[0] != str(impostor) and real[0].endswith("mempalace-mcp") and not enginecmd.is_shim(real[0])
    # Only impostors on PATH: a clear refusal that names them.
    with pytest.raises(enginecmd.EngineNotFound, match="is mp-shim itself"):
        enginecmd.resolve(["mempalace-mcp"], path_env=str(fake_bin), beside=[])
    assert enginecmd.resolve(["mempalace-mcp"], path_env="/usr/bin:/bin")[0] == str(Path(sys.executable).parent / "mempalace-mcp")
    with pytest.raises(enginecmd.EngineNotFound, match="not found on PATH"):
        enginecmd.resolve(["mempalace-mcp"], path_env=str(tmp_path), beside=[])


def test_degraded_mode_never_recurses_into_the_shim(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MP_BRIDGE_ENGINE names the shim and no broker can start: a clear error, no child shim."""
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    sd = home / ".mempalace"
    sd.mkdir(mode=0o700)
    os.chmod(sd, 0o775)  # unsafe: ensure refuses
    s = ShimProc(env={"MP_BRIDGE_ENGINE": SHIM}, stderr_path=tmp_path / "err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.BROKER_UNREACHABLE
        assert "mp-shim itself" in r["error"]["message"] and "writable by group" in r["error"]["message"]
    finally:
        s.close()


def test_engine_child_marker_refuses(home: Path) -> None:
    import subprocess

    out = subprocess.run([SHIM], input=b"", capture_output=True, timeout=30,
                         env=dict(os.environ, **{config.ENGINE_CHILD_ENV: "1"}))
    assert out.returncode == 3 and b"MP_BRIDGE_ENGINE" in out.stderr and out.stdout == b""


def _settings(home: Path):
    sd = home / ".mempalace"
    sd.mkdir(mode=0o700, exist_ok=True)
    return load(heartbeat_stale_after=30)


def test_degraded_decision_refuses_when_the_record_may_be_alive(home: Path) -> None:
    s = _settings(home)
    cfg = s.session_config()
    record = {"pid": os.getpid(), "host": "elsewhere", "boot_id": "other-boot", "heartbeat": time.time(),
              "endpoint": "unix:///nonexistent"}
    state.write_json_atomic(s.paths.json, record)
    try:  # (the record names this very process: remove it before the home fixture "stops" that broker)
        with pytest.raises(ShimError, match="second writer") as info:
            discovery.degraded_or_refuse(cfg, s, "test", "container")
        assert info.value.code == protocol.BROKER_UNREACHABLE
        # An hour-old heartbeat from another machine is not "dead" by itself (clocks drift across a VM
        # boundary): only one seen standing still for the stale limit is (tests/test_liveness.py).
        record["heartbeat"] = time.time() - 3600
        state.write_json_atomic(s.paths.json, record)
        with pytest.raises(ShimError, match="second writer"):
            discovery.degraded_or_refuse(cfg, s, "test", "container")
    finally:
        s.paths.json.unlink()


def test_degraded_decision_refuses_while_someone_holds_the_lock(home: Path) -> None:
    s = _settings(home)
    cfg = s.session_config()
    fd, held = discovery.hold_lock(s.paths)
    assert fd is not None and not held
    try:
        fd2, held2 = discovery.hold_lock(s.paths)  # flock is per open file description: a second open conflicts
        assert fd2 is None and held2
        with pytest.raises(ShimError, match="holds"):
            discovery.degraded_or_refuse(cfg, s, "test", "host")
    finally:
        os.close(fd)
    assert stat.S_IMODE(s.paths.lock.stat().st_mode) == 0o600


def test_degraded_mode_waits_for_a_killed_brokers_engine(home: Path) -> None:
    """engine.json naming a live engine of this machine (its broker killed with -9): no second engine."""
    from mp_ssh_bridge import hostinfo, liveness

    s = _settings(home)
    cfg = s.session_config()
    state.ensure_private_dir(s.paths.root)
    alive = {"pid": os.getpid(), "proc_start": hostinfo.proc_start(os.getpid()), **liveness.writer_identity()}
    state.write_json_atomic(s.paths.engine, alive)
    assert discovery.orphan_engine(s.paths) is not None
    with pytest.raises(ShimError, match="engine.json names engine pid"):
        discovery.degraded_or_refuse(cfg, s, "test", "host")
    state.write_json_atomic(s.paths.engine, dict(alive, proc_start="another start"))  # the pid was reused
    assert discovery.orphan_engine(s.paths) is None
    state.write_json_atomic(s.paths.engine, dict(alive, host="the-mac", boot_id="mac-boot"))  # not checkable here
    assert discovery.orphan_engine(s.paths) is None
