"""Host-key and login failures never lead to running without the broker (real sshd, tests/sshd.py).

What a man in the middle looks like (a known_hosts entry with another key), a host whose key was never
recorded, a key the host does not accept, a key file that is missing: the shim answers the agent's call
with a JSON-RPC error naming the key or login problem, writes no degraded.json and starts no engine of
its own. sshd down (connection refused) proves nothing either: with the host broker alive (its
broker.json visible through the bind mount) the shim refuses; only with no broker anywhere — no record,
broker.lock free — may it run the engine itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from mp_ssh_bridge import protocol
from tests import test_ssh
from tests.conftest import BrokerHandle
from tests.helpers import wait_for
from tests.sshd import SSHServer, free_port, keygen
from tests.test_shim_support import ShimProc

# the two sides (host and container state directories, the remote broker wrapper): test_ssh's fixtures
host_state, ctr_state, wrapper = test_ssh.host_state, test_ssh.ctr_state, test_ssh.wrapper


def engines_below(pid: int) -> list[str]:
    """Command lines of mempalace-mcp processes among `pid`'s descendants."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for kid in kids:
        try:
            cmd = kid.cmdline()
            if kid.status() != psutil.STATUS_ZOMBIE and any(os.path.basename(w) == "mempalace-mcp" for w in cmd[:2]):
                out.append(" ".join(cmd))
        except psutil.Error:
            continue
    return out


def refused(env: dict[str, str], ctr_state: Path, tmp_path: Path, *words: str) -> dict[str, object]:
    """Start a container shim with `env`; its tool call must fail naming `words`, with no engine of its own."""
    s = ShimProc(env=env, stderr_path=tmp_path / "shim.err")
    try:
        r = s.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=60)
        assert "error" in r, r
        err = r["error"]
        assert err["code"] == protocol.BROKER_UNREACHABLE, r
        for word in words:
            assert word in err["message"], (word, err["message"])
        assert engines_below(s.proc.pid) == [], "the shim started an engine of its own"
        assert not (ctr_state / "degraded.json").exists()
        assert "degraded mode" not in s.stderr() and "runs its own engine" not in s.stderr()
        r2 = s.call("ping", timeout=60)  # and a second call too: still the error, still no engine
        assert "error" in r2 and engines_below(s.proc.pid) == []
        return err
    finally:
        s.close()


def test_unknown_host_key_is_refused(sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path) -> None:
    empty = sshd.dir / "known_hosts.empty"
    empty.write_text("")
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.unknown", known_hosts=empty)
    refused(sshd.container_env(ctr_state, wrapper, config=cfg), ctr_state, tmp_path, "host key", str(empty))


def test_changed_host_key_is_refused(sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path) -> None:
    """A known_hosts entry with another key: what a man in the middle looks like."""
    wrong = sshd.wrong_known_hosts()
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.changed", known_hosts=wrong)
    refused(sshd.container_env(ctr_state, wrapper, config=cfg), ctr_state, tmp_path, "host key", str(wrong))


def test_wrong_key_login_is_refused(sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path) -> None:
    stranger = sshd.dir / "stranger_ed25519"
    keygen(stranger, "stranger")
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.stranger", identity=stranger)
    refused(sshd.container_env(ctr_state, wrapper, config=cfg), ctr_state, tmp_path, "login", "refused",
            str(stranger), "authorized_keys")


def test_missing_key_file_is_refused(sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path) -> None:
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.nokey", identity=sshd.dir / "no_such_key")
    refused(sshd.container_env(ctr_state, wrapper, config=cfg), ctr_state, tmp_path, "no_such_key")


def test_sshd_down_with_the_broker_alive_is_refused(
    sshd: SSHServer, broker: BrokerHandle, host_state: Path, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """Connection refused alone proves nothing: broker.json (seen through the bind mount) names a live broker."""
    record = dict(broker.record)
    record["endpoint"] = f"unix://{ctr_state / 'not-here.sock'}"  # the host's socket is not connectable from a VM
    record["endpoints"] = {"unix": record["endpoint"]}
    (ctr_state / "broker.json").write_text(json.dumps(record))
    cfg = sshd.write_client_config(sshd.dir / "ssh_config.down", port=free_port())
    err = refused(sshd.container_env(ctr_state, wrapper, config=cfg), ctr_state, tmp_path, "refused",
                  f"broker pid {broker.proc.pid}", "will NOT start its own")
    assert "second writer" in str(err["message"])
    # Once no broker may be alive, the relay that only refused steps down: the next session's daemon decides
    # again, and (still no way to the host) owns the palace itself.
    from mp_ssh_bridge import daemon

    relay = daemon.read_record(str(ctr_state)) or {}
    assert relay.get("mode") == "relay", relay
    broker.stop()  # gone for real (two state directories here name one palace: never two engines on it)
    (ctr_state / "broker.json").unlink()
    wait_for(lambda: daemon.read_record(str(ctr_state)) is None, 20, what="the refusing relay to step down")
    s = ShimProc(env=sshd.container_env(ctr_state, wrapper, config=cfg), stderr_path=tmp_path / "after.err")
    try:
        r = s.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=90)
        assert "result" in r, (r, s.stderr())
        assert (daemon.read_record(str(ctr_state)) or {}).get("mode") == "local-owner"
    finally:
        s.close()


def test_sshd_down_and_no_broker_anywhere_the_daemon_owns_the_palace(
    sshd: SSHServer, ctr_state: Path, wrapper: Path, tmp_path: Path
) -> None:
    """The one case with proof that no broker exists (no record): the container's daemon runs the one engine as
    the palace's local owner, and a second session of the container shares it (no session runs its own)."""
    from mp_ssh_bridge import daemon

    cfg = sshd.write_client_config(sshd.dir / "ssh_config.down", port=free_port())
    env = sshd.container_env(ctr_state, wrapper, config=cfg)
    first = ShimProc(env=env, stderr_path=tmp_path / "shim-1.err")
    second = ShimProc(env=env, stderr_path=tmp_path / "shim-2.err")
    try:
        for s in (first, second):
            r = s.call("tools/call", {"name": "mempalace_status", "arguments": {}}, timeout=90)
            assert "result" in r, (r, s.stderr())
            assert engines_below(s.proc.pid) == [], "a container session never runs an engine itself"
        record = daemon.read_record(str(ctr_state)) or {}
        assert record.get("mode") == "local-owner", record
        assert len(engines_below(record["pid"])) == 1, "one engine, the daemon's, for both sessions"
        held = json.loads((ctr_state / "owner.json").read_text())
        assert held["kind"] == "local" and held["pid"] == record["pid"], held
        assert not (ctr_state / "degraded.json").exists()
    finally:
        first.close()
        second.close()
