"""Shared fixtures: a throwaway HOME with the offline embedding model, real brokers, every engine.

Tests never touch the real ~/.mempalace: every test gets its own HOME and
MEMPALACE_PATH under pytest's tmp dir; `.cache` links to the model that
`scripts/provision-model.sh` put in `.test-home` (provisioned here if missing).

The `engine` fixture runs a test once per supported engine version: the pinned
mempalace in .venv, and mempalace 3.4.0 in .venv-engine-3.4.0
(`scripts/setup-engine.sh`, part of `make test`; skipped when missing). Only the
tests whose outcome depends on the engine's version use it (marker `engines`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import liveness, state
from tests.helpers import kill_pid, stop_process, wait_for

pytest_plugins = ("tests.sshd",)  # the throwaway OpenSSH server fixtures

REPO = Path(__file__).resolve().parent.parent
MODEL_HOME = REPO / ".test-home"
MODEL_FILE = MODEL_HOME / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/model.onnx"
BIN = Path(sys.executable).parent

# Variables of ours that must never leak from the developer's shell into a test.
_SCRUB = ("MEMPALACE_BROKER", "MEMPALACE_BROKER_TOKEN", "MEMPALACE_MCP_TIMEOUT_MS", "MEMPALACE_PALACE_PATH", "MEMPALACE_PALACE")


# Every engine version the bridge supports, by test id: the pinned one, and older releases in their own venvs.
ENGINES: dict[str, Path] = {
    "pinned": BIN / "mempalace-mcp",
    "3.4.0": REPO / ".venv-engine-3.4.0" / "bin" / "mempalace-mcp",
}


@dataclass(frozen=True)
class EngineUnderTest:
    """One engine version: its test id ("pinned", "3.4.0") and its mempalace-mcp."""

    name: str
    path: Path

    @property
    def argv(self) -> list[str]:
        return [str(self.path)]

    @property
    def pinned(self) -> bool:
        return self.name == "pinned"


def engine_under_test(name: str) -> EngineUnderTest:
    """The engine `name`, or a skip that says how to install it."""
    path = ENGINES[name]
    if not os.access(path, os.X_OK):
        pytest.skip(f"mempalace {name} is not installed at {path}: run scripts/setup-engine.sh {name}")
    return EngineUnderTest(name, path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m engines` selects every test that runs once per engine version."""
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engines)


@pytest.fixture(params=sorted(ENGINES), ids=lambda name: f"engine-{name}")
def engine(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> EngineUnderTest:
    """Each supported engine in turn, as MP_BRIDGE_ENGINE (brokers and shims started afterwards run it).

    Request it before `broker` (which starts a broker at once); `broker_factory` reads the environment
    when it starts one.
    """
    chosen = engine_under_test(request.param)
    monkeypatch.setenv("MP_BRIDGE_ENGINE", str(chosen.path))
    return chosen


@pytest.fixture(scope="session")
def model_cache() -> Path:
    if not MODEL_FILE.exists():
        subprocess.run(["bash", str(REPO / "scripts/provision-model.sh"), str(MODEL_HOME)], check=True)
    return MODEL_HOME / ".cache"


@pytest.fixture
def home(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh HOME (short path, so socket paths fit) with MEMPALACE_PATH inside it."""
    root = Path(tempfile.mkdtemp(prefix="mpb-", dir="/tmp"))
    h = root / "home"
    h.mkdir()
    (h / ".cache").symlink_to(model_cache)
    for name in list(os.environ):
        if name.startswith("MP_BRIDGE_") or name in _SCRUB:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("MEMPALACE_PATH", str(h / ".mempalace"))
    monkeypatch.setenv("MP_BRIDGE_CONFIG", str(h / "mp-bridge.toml"))  # never the developer's own
    # This CI machine is itself a container (/.dockerenv): tests play the host side
    # unless they say otherwise.
    monkeypatch.setenv("MP_BRIDGE_ROLE", "host")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    yield h
    _kill_brokers(h / ".mempalace")
    _kill_daemons(root)
    _kill_strays(root)
    if not os.environ.get("MPB_TEST_KEEP_HOME"):  # set it to read a failed test's broker logs afterwards
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _kill_brokers(state_dir: Path) -> None:
    """Leave no broker (or its engine) behind, whatever the test did: the one of MEMPALACE_PATH,
    and those of per-memory state directories (~/.mempalace/brokers/<key>)."""
    for record_file in [state_dir / "broker.json", *state_dir.glob("brokers/*/broker.json")]:
        record = state.read_broker_json(record_file)
        if record and isinstance(record.get("pid"), int) and record["pid"] != os.getpid():
            kill_pid(record["pid"], signal.SIGTERM, timeout=10)


def _kill_daemons(root: Path) -> None:
    """Leave no container daemon behind (mp_ssh_bridge/daemon.py): those whose record names a state directory
    under this test's `root`, in this machine's runtime directory and in the container directories the test
    bound over it (tests/platforms.container_argv, under `root`)."""
    dirs = [*state.runtime_dir().glob("daemon-*"), *root.glob("**/daemon-*")]
    for d in dirs:
        record = state.read_broker_json(d / "broker.json")
        where = str((record or {}).get("state_dir") or "")
        pid = (record or {}).get("pid")
        # only a process proven to be that daemon (pid and start time as recorded): a reused pid is someone else's
        if record and where.startswith(str(root)) and isinstance(pid, int) and pid != os.getpid() \
                and liveness.pid_gone(record) is None:
            kill_pid(pid, signal.SIGTERM, timeout=10)
        if where.startswith(str(root)):
            subprocess.run(["rm", "-rf", str(d)], check=False)


STRAY_MARKS = ("mp_ssh_bridge_broker", "mp_ssh_bridge.containerd", "mp_ssh_bridge.relay")


def _kill_strays(root: Path) -> None:
    """Brokers and daemons that no record names any more but whose command line names this test's `root` (a
    broker a remote `--ensure` started just before the end, whose broker.json was not written yet): ours by
    construction, so they are stopped too, instead of running on until their idle exit."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] != os.getpid() and str(root) in cmd and any(m in cmd for m in STRAY_MARKS):
            kill_pid(proc.info["pid"], signal.SIGTERM, timeout=10)


class BrokerHandle:
    """A broker started by a test in the foreground (not detached)."""

    def __init__(self, proc: subprocess.Popen[Any], state_dir: Path) -> None:
        self.proc = proc
        self.state_dir = state_dir

    @property
    def record(self) -> dict[str, Any]:
        rec = state.read_broker_json(self.state_dir / "broker.json")
        assert rec is not None, "broker.json missing"
        return rec

    @property
    def endpoint(self) -> str:
        return self.record["endpoint"]

    @property
    def socket_path(self) -> str:
        return self.endpoint[len("unix://") :]

    def stop(self) -> int | None:
        stop_process(self.proc, timeout=20)
        return self.proc.returncode


@pytest.fixture
def broker_factory(home: Path) -> Iterator[Callable[..., BrokerHandle]]:
    """Start `mempalace-broker` (foreground) with extra env/flags; wait until it answers."""
    handles: list[BrokerHandle] = []

    def start(*args: str, env: dict[str, str] | None = None, wait_engine: bool = True, timeout: float = 60) -> BrokerHandle:
        full_env = dict(os.environ)
        full_env.update(env or {})
        log = open(home / f"broker-{len(handles)}.log", "ab")
        proc = subprocess.Popen(
            [str(BIN / "mempalace-broker"), *args], env=full_env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        handle = BrokerHandle(proc, Path(full_env["MEMPALACE_PATH"]))
        handles.append(handle)
        from mp_ssh_bridge.election import probe

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"broker exited with {proc.returncode}: {(home / f'broker-{len(handles) - 1}.log').read_text()[-2000:]}")
            rec = state.read_broker_json(handle.state_dir / "broker.json")
            if not rec or rec.get("pid") != proc.pid:
                return False
            status = probe(rec["endpoint"], 1.0)
            if not status:
                return False
            return not wait_engine or status["engine"]["state"] == "ready"

        wait_for(ready, timeout, what="broker ready")
        return handle

    yield start
    for h in handles:
        h.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerHandle]) -> BrokerHandle:
    """One real broker over the real mempalace-mcp, engine warm."""
    return broker_factory()
