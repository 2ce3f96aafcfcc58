"""Discovery pieces: endpoint URLs, tcp+token, engine resolution (no recursion), no broker -> a refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mp_ssh_bridge import config, discovery, endpoints, protocol
from mp_ssh_bridge.errors import EndpointError
from mp_ssh_bridge.settings import load
from tests.helpers import children_of
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

    with pytest.raises(enginecmd.EngineNotFound, match="mp-shim itself"):
        enginecmd.resolve(load(engine=SHIM).engine_argv)
    # the shim installed under the name mempalace-mcp (a copy of the console script)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    impostor = fake_bin / "mempalace-mcp"
    impostor.write_bytes(Path(SHIM).read_bytes())
    impostor.chmod(0o755)
    with pytest.raises(enginecmd.EngineNotFound, match="mp-shim itself"):
        enginecmd.resolve(load(engine=str(impostor)).engine_argv)
    with pytest.raises(enginecmd.EngineNotFound, match="mp-shim itself"):
        enginecmd.resolve(load(engine=f"{sys.executable} -m mp_ssh_bridge.shim").engine_argv)
    # A bare name skips the impostor that comes first on PATH and finds the real engine.
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    real = enginecmd.resolve(load().engine_argv)
    assert real[0] != str(impostor) and real[0].endswith("mempalace-mcp") and not enginecmd.is_shim(real[0])
    # Only impostors on PATH: a clear refusal that names them.
    with pytest.raises(enginecmd.EngineNotFound, match="is mp-shim itself"):
        enginecmd.resolve(["mempalace-mcp"], path_env=str(fake_bin), beside=[])
    assert enginecmd.resolve(["mempalace-mcp"], path_env="/usr/bin:/bin")[0] == str(Path(sys.executable).parent / "mempalace-mcp")
    with pytest.raises(enginecmd.EngineNotFound, match="not found on PATH"):
        enginecmd.resolve(["mempalace-mcp"], path_env=str(tmp_path), beside=[])


def test_no_broker_is_a_clear_refusal_and_no_engine_of_its_own(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """No broker can start (an unsafe state directory): a refusal that says why, and no engine of the session's
    own (MP_BRIDGE_ENGINE names the shim: a child shim would recurse)."""
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    sd = home / ".mempalace"
    sd.mkdir(mode=0o700)
    os.chmod(sd, 0o775)  # unsafe: ensure refuses
    s = ShimProc(env={"MP_BRIDGE_ENGINE": SHIM}, stderr_path=tmp_path / "err")
    try:
        r = s.call("ping", timeout=60)
        assert r["error"]["code"] == protocol.BROKER_UNREACHABLE
        msg = r["error"]["message"]
        assert "writable by group" in msg and "will NOT start its own memory engine" in msg, msg
        assert children_of(s.proc.pid) == []
    finally:
        s.close()


def test_a_refusal_says_each_fact_once() -> None:
    plain = str(discovery._refuse("no broker could be started: the broker exited"))
    assert plain.count("second writer") == 1 and "will NOT start its own memory engine" in plain
    said = str(discovery._refuse("no broker could be started: starting one here would make a second writer on the palace"))
    assert said.count("second writer") == 1 and "will NOT start its own memory engine" in said


def test_engine_child_marker_refuses(home: Path) -> None:
    import subprocess

    out = subprocess.run([SHIM], input=b"", capture_output=True, timeout=30,
                         env=dict(os.environ, **{config.ENGINE_CHILD_ENV: "1"}))
    assert out.returncode == 3 and b"MP_BRIDGE_ENGINE" in out.stderr and out.stdout == b""
