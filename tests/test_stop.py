"""`mp-bridge stop` signals only a process proven to be this host's broker.

Real brokers (the real engine, or tests/fake_engine.py where a fault is
needed) and unrelated processes (`sleep`) named by hand-written broker.json
records; `mp-bridge` always runs as a subprocess, as a person would run it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import hostinfo, state
from tests import platforms
from tests.conftest import BIN, BrokerHandle
from tests.helpers import pid_alive, wait_for

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"


def bridge(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([str(BIN / "mp-bridge"), *args], capture_output=True, text=True, timeout=timeout, env=full)


def output(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def write_record(state_dir: Path, pid: int, **fields: Any) -> Path:
    """A broker.json as this machine's broker would write it, naming `pid` and a socket nobody serves."""
    state.ensure_private_dir(state_dir)
    record: dict[str, Any] = {
        "version": state.BROKER_JSON_VERSION,
        "pid": pid,
        "host": hostinfo.host_name(),
        "boot_id": hostinfo.boot_id(),
        "endpoint": f"unix://{state_dir / 'broker.sock'}",
        "palace": str(state_dir / "palace"),
        "engine": {"pid": None},
    }
    record.update(fields)
    record = {k: v for k, v in record.items() if v is not None or k == "engine"}
    state.write_json_atomic(state_dir / "broker.json", record)
    return state_dir / "broker.json"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process whose pid a bad broker.json may name."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(5)


@pytest.fixture
def state_dir(home: Path) -> Path:
    return home / ".mempalace"


# --- (a) a real broker ------------------------------------------------------------------------
def test_stop_a_real_broker(broker: BrokerHandle) -> None:
    record, sock_path = broker.record, broker.socket_path
    pid = broker.proc.pid
    assert record["proc_start"] == hostinfo.proc_start(pid)  # the broker records its own start identity
    engine_pid = wait_for(lambda: broker.record["engine"]["pid"], 10, what="engine pid in broker.json")
    res = bridge("stop")
    assert res.returncode == 0, output(res)
    assert f"stopped broker pid {pid} (palace {record['palace']}) in " in res.stdout
    assert broker.proc.wait(5) == 0  # a clean exit: it drained and cleaned up after itself
    assert not (broker.state_dir / "broker.json").exists()
    assert not Path(sock_path).exists()
    assert not pid_alive(engine_pid)
    again = bridge("stop")  # nothing left to stop: says so, exit 0
    assert again.returncode == 0 and "no broker is running for" in again.stdout


# --- (b) an unrelated live process ---------------------------------------------------------------
def test_unrelated_process_with_wrong_or_missing_proc_start_is_not_signalled(
    state_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    for proc_start in ("1", None):  # a wrong start identity; none (as an older broker wrote)
        write_record(state_dir, sleeper.pid, proc_start=proc_start)
        for extra in ((), ("--force",)):
            res = bridge("stop", *extra)
            text = output(res)
            assert f"pid {sleeper.pid} is alive but is not proven to be this broker" in text, text
            assert "nothing was signalled" in text and "Traceback" not in text
            if proc_start is None or not extra:
                assert res.returncode == 1, text
            assert sleeper.poll() is None
    # the start identity differs: the record is surely stale, and --force removes it (still no signal)
    write_record(state_dir, sleeper.pid, proc_start="1")
    res = bridge("stop", "--force")
    assert res.returncode == 0 and "pid was reused" in res.stdout and "removed" in res.stdout, output(res)
    assert not (state_dir / "broker.json").exists()
    assert sleeper.poll() is None


def test_the_right_proc_start_alone_does_not_prove_a_broker(state_dir: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """Start identity matches, but nothing answers on the socket and no one holds broker.lock."""
    write_record(state_dir, sleeper.pid, proc_start=hostinfo.proc_start(sleeper.pid))
    plain = bridge("stop")
    assert plain.returncode == 1 and "does not answer broker/status" in plain.stderr and "--force" in plain.stderr
    forced = bridge("stop", "--force")
    assert forced.returncode == 1 and "broker.lock is free" in forced.stderr, output(forced)
    assert sleeper.poll() is None


# --- (c) another machine ------------------------------------------------------------------------------
def test_record_from_another_host_or_boot_is_refused(state_dir: Path, sleeper: subprocess.Popen[bytes]) -> None:
    start = hostinfo.proc_start(sleeper.pid)
    for fields in ({"host": "the-mac-host"}, {"boot_id": "another-boot"}):
        write_record(state_dir, sleeper.pid, proc_start=start, **fields)
        for extra in ((), ("--force",)):
            res = bridge("stop", *extra)
            assert res.returncode == 1, output(res)
            assert f"broker.json names pid {sleeper.pid} on host" in res.stderr and "not this machine" in res.stderr
            assert "other side of a shared mount" in res.stderr and "nothing was signalled" in res.stderr
            assert sleeper.poll() is None
    assert (state_dir / "broker.json").exists()  # not ours to remove


# --- (d) a dead pid ---------------------------------------------------------------------------------
def test_dead_pid_is_a_stale_record(state_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_record(state_dir, dead.pid, proc_start="12345")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(state_dir / "broker.sock"))  # the socket file a killed broker leaves behind
    sock.close()
    res = bridge("stop")
    assert res.returncode == 1 and f"pid {dead.pid}, which is not running" in res.stderr and "stale" in res.stderr
    assert (state_dir / "broker.json").exists()
    forced = bridge("stop", "--force")
    assert forced.returncode == 0, output(forced)
    assert "stale" in forced.stdout and "removed" in forced.stdout
    assert not (state_dir / "broker.json").exists() and not (state_dir / "broker.sock").exists()


# --- (e) a hung broker, and one that takes longer than --timeout ---------------------------------------
def test_hung_broker_needs_force_which_kills_it_and_its_engine(broker_factory: Callable[..., BrokerHandle]) -> None:
    b = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE})
    pid, sock_path = b.proc.pid, b.socket_path
    engine_pid = wait_for(lambda: b.record["engine"]["pid"], 10, what="engine pid in broker.json")
    os.kill(pid, signal.SIGSTOP)
    os.kill(engine_pid, signal.SIGSTOP)  # so only our SIGKILL can end it (not EOF on its stdin)
    plain = bridge("stop")
    assert plain.returncode == 1, output(plain)
    assert "does not answer broker/status" in plain.stderr and "mp-bridge stop --force" in plain.stderr
    assert "nothing was signalled" in plain.stderr
    assert b.proc.poll() is None and pid_alive(engine_pid)
    forced = bridge("stop", "--force")
    assert forced.returncode == 0, output(forced)
    assert f"killed broker pid {pid}" in forced.stdout and "SIGKILL" in forced.stdout
    assert f"killed its engine pid {engine_pid}" in forced.stdout and "removed" in forced.stdout
    assert b.proc.wait(5) == -signal.SIGKILL
    wait_for(lambda: not pid_alive(engine_pid), 5, what="engine gone")
    assert not (b.state_dir / "broker.json").exists() and not Path(sock_path).exists()


def test_plain_stop_gives_up_after_timeout_and_says_force(broker_factory: Callable[..., BrokerHandle]) -> None:
    b = broker_factory(env={"MP_BRIDGE_ENGINE": FAKE, "MP_BRIDGE_SHUTDOWN_GRACE": "10"})
    sock_path = b.socket_path
    with socket.socket(socket.AF_UNIX) as client:  # a call in flight: the broker lets it finish on SIGTERM
        client.connect(sock_path)
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "fake_sleep", "arguments": {"seconds": 3}}}
        client.sendall((json.dumps(call) + "\n").encode())
        time.sleep(0.3)
        t0 = time.monotonic()
        res = bridge("stop", "--timeout", "0.5")
        assert res.returncode == 1, output(res)
        assert f"broker pid {b.proc.pid}" in res.stderr and "did not exit within 0.5 s" in res.stderr
        assert "mp-bridge stop --force" in res.stderr
        assert time.monotonic() - t0 < 10
        assert b.proc.wait(15) == 0  # it drained the call, then exited on its own
    assert not Path(sock_path).exists() and not (b.state_dir / "broker.json").exists()


# --- (f) bad input: one line, exit 2, no traceback ------------------------------------------------
def test_garbage_broker_json(state_dir: Path) -> None:
    state.ensure_private_dir(state_dir)
    (state_dir / "broker.json").write_text("{not json")
    res = bridge("stop")
    assert res.returncode == 2 and "broker.json is not valid JSON" in res.stderr
    assert "Traceback" not in output(res)
    (state_dir / "broker.json").write_text('{"pid": "twelve"}')
    res = bridge("stop")
    assert res.returncode == 2 and "names no valid pid" in res.stderr and "Traceback" not in output(res)


def test_invalid_settings(home: Path) -> None:
    for cmd in ("stop", "status"):
        res = bridge(cmd, env={"MP_BRIDGE_CONNECT_TIMEOUT": "-1"})
        text = output(res)
        assert res.returncode == 2, text
        assert "invalid settings" in text and "connect_timeout" in text and "Traceback" not in text
        assert len(res.stderr.strip().splitlines()) == 1
    (home / "mp-bridge.toml").write_text("this is = = not toml\n")
    res = bridge("stop")
    assert res.returncode == 2 and "invalid settings" in res.stderr and "Traceback" not in output(res), output(res)


# --- (g) the platform parsing, by its inputs --------------------------------------------------------
STAT = "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 200 18446744073709551615"


def test_parse_proc_stat() -> None:
    fields = hostinfo.parse_proc_stat(STAT)
    assert fields is not None and fields[0] == "S"
    assert hostinfo.parse_linux_start_time(STAT) == "987654"  # field 22, after a comm holding ") "
    assert hostinfo.parse_linux_ppid(STAT) == 1
    assert hostinfo.parse_linux_state(STAT) == "S"
    assert hostinfo.parse_linux_state(STAT.replace(") S ", ") Z ")) == "Z"
    for bad in ("", None, "123 no parens", "123 (x) S 1"):
        assert hostinfo.parse_linux_start_time(bad) is None
    assert hostinfo.parse_linux_ppid("123 (x)") is None
    # and the real thing (Linux only: elsewhere the test ends here, skipped, its parsers checked)
    me = platforms.proc_stat_text(os.getpid())
    assert hostinfo.parse_linux_ppid(me) == os.getppid()
    assert hostinfo.proc_start(os.getpid()) == hostinfo.parse_linux_start_time(me)
    assert hostinfo.parent_pid(os.getpid()) == os.getppid()
    assert hostinfo.proc_start(0) is None and hostinfo.proc_start(os.getpid(), "sunos") is None


def test_parse_ps_output() -> None:
    assert hostinfo.parse_ps_lstart("Thu Nov 27 12:14:03 2025\n") == "Thu Nov 27 12:14:03 2025"
    assert hostinfo.parse_ps_lstart("Thu Nov  7 02:04:03 2025") == "Thu Nov 7 02:04:03 2025"
    assert hostinfo.parse_ps_lstart("") is None and hostinfo.parse_ps_lstart(None) is None
    assert hostinfo.parse_ps_int("    1\n") == 1
    assert hostinfo.parse_ps_int("") is None and hostinfo.parse_ps_int("x") is None


def test_settings_error_is_one_line() -> None:
    from pydantic import ValidationError

    from mp_ssh_bridge.settings import Settings
    from mp_ssh_bridge.stopping import describe_settings_error

    with pytest.raises(ValidationError) as exc:
        Settings(connect_timeout=-1, shutdown_grace=-2)
    line = describe_settings_error(exc.value, "see the config")
    assert "\n" not in line and "connect_timeout" in line and "shutdown_grace" in line and line.endswith("see the config")
    assert describe_settings_error(ValueError("bad\n  toml")) == "invalid settings: bad toml"


# --- the container role: the host's broker over the real sshd -------------------------------------
def test_container_stops_the_host_broker_over_ssh(sshd: Any, broker: BrokerHandle, home: Path) -> None:
    from tests.sshd import write_broker_wrapper

    host_state = home / ".mempalace"
    ctr_state = home.parent / "ctr" / ".mempalace"
    ctr_state.mkdir(parents=True, mode=0o700)
    wrapper = write_broker_wrapper(home.parent / "remote-broker.sh", home, host_state)
    env = sshd.container_env(ctr_state, wrapper)
    res = bridge("stop", env=env)
    assert res.returncode == 0, output(res)
    assert f"stopped broker pid {broker.proc.pid}" in res.stdout
    assert broker.proc.wait(5) == 0 and not (host_state / "broker.json").exists()
    # no SSH config: one line saying why, exit 1
    res = bridge("stop", env=dict(env, MP_BRIDGE_SSH_CONFIG=str(home / "no-such-config")))
    assert res.returncode == 1 and "cannot stop the host's broker over SSH" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in output(res)
