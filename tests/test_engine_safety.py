"""Safe fallbacks around the engine: never two engines on one palace, a warm engine after a non-idle exit,
and no error message with an empty field.

The record logic (broker/enginerecord.py) runs against a fake process table; the real-engine tests
kill a broker with -9 while its engine is busy and sample the process table for a second engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from mp_ssh_bridge import liveness, state
from mp_ssh_bridge_broker import enginerecord
from mp_ssh_bridge_broker.engine import (
    describe_budget,
    describe_cooldown,
    engine_idle_limit,
    is_idle_exit,
)
from mp_ssh_bridge_broker.startup import NO_REASON
from tests.conftest import BrokerHandle
from tests.helpers import RawClient, pid_alive, tool_json, wait_for
from tests.platforms import require_linux

ME = liveness.Machine("box", "boot-1", "pid:[1]")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- a fake process table
class FakeProcs:
    """pid -> start time; signals are recorded; a process may die on a given signal (or on its own later)."""

    def __init__(self, procs: dict[int, str], dies_on: dict[int, int] | None = None, machine: liveness.Machine = ME,
                 holds: bool | None = None) -> None:
        self.procs = dict(procs)
        self.dies_on = dies_on or {}
        self.sent: list[tuple[int, int]] = []
        self.machine = machine
        self.holds = holds

    def table(self) -> enginerecord.ProcessTable:
        return enginerecord.ProcessTable(
            alive=lambda pid: pid in self.procs,
            start=lambda pid: self.procs.get(pid),
            zombie=lambda pid: False,
            send=self.send,
            machine=lambda: self.machine,
            holds_palace=lambda pid, record: self.holds,
        )

    def send(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))  # every attempt, also one that finds it gone
        if pid not in self.procs:
            raise ProcessLookupError(pid)
        if self.dies_on.get(pid) == sig:
            del self.procs[pid]


def record(pid: int = 4242, start: str | None = "1000", **over: Any) -> dict[str, Any]:
    return {"version": 1, "pid": pid, "proc_start": start, "broker_pid": 77, "palace": None, "started_at": 1.0,
            "host": ME.host, "boot_id": ME.boot_id, "pid_ns": ME.pid_ns, **over}


@pytest.fixture
def paths(tmp_path: Path) -> state.StatePaths:
    return state.StatePaths(tmp_path)


def clear(paths: state.StatePaths, procs: FakeProcs) -> str | None:
    return run(enginerecord.clear(paths, procs.table(), waits=(0.2, 0.2, 0.2), poll=0.02))


def test_judge_by_pid_start_time_and_boot() -> None:
    live = FakeProcs({4242: "1000"}).table()
    assert enginerecord.judge(None, live).kind == "none"
    assert enginerecord.judge(record(), live).kind == "ours"
    assert enginerecord.judge(record(pid=5), live).kind == "gone"
    assert enginerecord.judge(record(start="999"), live).kind == "gone"  # a reused pid: never ours
    assert enginerecord.judge(record(start=None), live).kind == "unproven"  # no start time recorded: no proof
    assert enginerecord.judge(record(boot_id="boot-0"), live).kind == "gone"  # before this boot
    # another boot under another name: a Mac renamed by its network after a restart, not a live engine
    assert enginerecord.judge(record(host="other", boot_id="boot-9"), live).kind == "gone"
    assert enginerecord.judge(record(host="renamed"), live).kind == "ours"  # same boot: a renamed host is still here
    assert enginerecord.judge(record(pid_ns="pid:[2]"), live).kind == "elsewhere"  # a container on this kernel
    assert enginerecord.judge(record(pid=True), live).kind == "gone"
    unknown_start = FakeProcs({4242: "1000"}).table()
    unknown_start.start = lambda pid: None  # e.g. /proc hidden: the live pid cannot be proven
    assert enginerecord.judge(record(), unknown_start).kind == "unproven"
    no_boot = FakeProcs({4242: "1000"}, machine=liveness.Machine("box", None, None)).table()
    assert enginerecord.judge(record(), no_boot).kind == "unproven"  # "this boot" cannot be proven


def test_clear_without_a_record_does_nothing(paths: state.StatePaths) -> None:
    procs = FakeProcs({})
    assert clear(paths, procs) is None and procs.sent == []


def test_clear_removes_a_record_whose_engine_is_gone(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record())
    procs = FakeProcs({})
    assert "is gone" in (clear(paths, procs) or "")
    assert not paths.engine.exists() and procs.sent == []


def test_reused_pid_is_never_signalled(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record(start="1000"))
    procs = FakeProcs({4242: "2000"})
    assert "another process" in (clear(paths, procs) or "")
    assert procs.sent == [] and not paths.engine.exists()


def test_proven_engine_that_exits_by_itself_is_not_signalled(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record())
    procs = FakeProcs({4242: "1000"})
    threading.Timer(0.05, lambda: procs.procs.pop(4242)).start()  # EOF on stdin: it exits after its call
    assert "stopped" in (clear(paths, procs) or "")
    assert procs.sent == [] and not paths.engine.exists()


def test_proven_engine_gets_sigterm_then_sigkill(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record())
    procs = FakeProcs({4242: "1000"}, dies_on={4242: signal.SIGTERM})
    clear(paths, procs)
    assert procs.sent == [(4242, signal.SIGTERM), (4242, signal.SIGCONT)]
    enginerecord.write(paths, record())
    procs = FakeProcs({4242: "1000"}, dies_on={4242: signal.SIGKILL})
    clear(paths, procs)
    assert procs.sent == [(4242, signal.SIGTERM), (4242, signal.SIGCONT), (4242, signal.SIGKILL)]
    assert not paths.engine.exists()


def test_engine_that_survives_sigkill_refuses_the_start(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record())
    procs = FakeProcs({4242: "1000"})
    with pytest.raises(enginerecord.OldEngineLives, match="did not exit even after SIGKILL"):
        clear(paths, procs)
    assert paths.engine.exists()  # still the truth: it lives


def test_unproven_process_is_never_signalled(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record(start=None))
    for holds in (True, None):
        procs = FakeProcs({4242: "1000"}, holds=holds)
        with pytest.raises(enginerecord.OldEngineLives) as exc:
            clear(paths, procs)
        assert procs.sent == [] and "Not starting a second engine" in str(exc.value) and "4242" in str(exc.value)
    procs = FakeProcs({4242: "1000"}, holds=False)  # the holders check: it writes no file of the palace
    assert "no engine of ours" in (clear(paths, procs) or "")
    assert procs.sent == [] and not paths.engine.exists()


def test_another_machines_engine_refuses_and_names_the_file(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record(pid_ns="pid:[2]"))  # this kernel, another pid namespace: not provable here
    procs = FakeProcs({4242: "1000"})
    with pytest.raises(enginerecord.OldEngineLives) as exc:
        clear(paths, procs)
    assert str(paths.engine) in str(exc.value) and procs.sent == []


def test_record_is_private_and_removed_only_for_its_pid(paths: state.StatePaths) -> None:
    rec = enginerecord.make(os.getpid(), 1, "/p")
    assert rec["proc_start"] and rec["boot_id"] == liveness.this_machine().boot_id
    enginerecord.write(paths, rec)
    assert paths.engine.stat().st_mode & 0o777 == 0o600
    enginerecord.remove(paths, os.getpid() + 1)  # a newer broker's record stays
    assert paths.engine.exists()
    enginerecord.remove(paths, os.getpid())
    assert not paths.engine.exists()
    enginerecord.remove(paths, os.getpid())  # absent: fine


# --------------------------------------------------------------------------- PR_SET_PDEATHSIG, by its inputs
class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def prctl(self, *args: int) -> int:
        self.calls.append(args)
        return 0


def test_pdeathsig_only_on_linux() -> None:
    assert enginerecord.pdeathsig_hook("darwin", load_libc=FakeLibc) is None
    libc = FakeLibc()
    exits: list[int] = []
    hook = enginerecord.pdeathsig_hook("linux", load_libc=lambda: libc, parent=10, getppid=lambda: 10,
                                       exit_now=exits.append)
    assert hook is not None
    hook()
    assert libc.calls == [(1, int(signal.SIGTERM), 0, 0, 0)] and exits == []


def test_pdeathsig_child_exits_when_the_broker_is_already_gone() -> None:
    exits: list[int] = []
    hook = enginerecord.pdeathsig_hook("linux", load_libc=FakeLibc, parent=10, getppid=lambda: 1, exit_now=exits.append)
    assert hook is not None
    hook()
    assert exits == [1]


def test_pdeathsig_without_libc_costs_only_that_defence() -> None:
    def broken() -> Any:
        raise OSError("no libc")

    assert enginerecord.pdeathsig_hook("linux", load_libc=broken) is None


# --------------------------------------------------------------------------- messages and the idle rule
def test_no_message_has_an_empty_field() -> None:
    paused = describe_cooldown(0, 29.6, "")
    assert "0 times" not in paused and "restart budget" in paused and "no error recorded" in paused
    assert paused.endswith("no error recorded") and "in 30s" in paused
    three = describe_cooldown(3, 10, "engine exited (exit code 1)")
    assert "failed to start 3 times in a row" in three and three.endswith("engine exited (exit code 1)")
    assert "1 time in a row" in describe_cooldown(1, 1, "x")
    budget = describe_budget(5, 300, 30, None, "")
    assert "no exit recorded" in budget and "wrote nothing on stderr" in budget
    assert not any(part.strip() == "" for part in budget.split(":")[1:]), budget
    assert "exit code 1" in describe_budget(5, 300, 30, "exit code 1", "boom") and budget.count("  ") == 0


def test_unavailable_error_is_never_empty() -> None:
    from mp_ssh_bridge_broker.engine import EngineUnavailable
    from mp_ssh_bridge_broker.startup import StartupNotices

    notices = StartupNotices.__new__(StartupNotices)
    notices.last_failure = ""
    message, data = notices.unavailable_error(EngineUnavailable(""))
    assert NO_REASON in message and data["last_error"] == NO_REASON


def test_idle_exit_rule() -> None:
    assert engine_idle_limit({}) == 8 * 3600
    assert engine_idle_limit({"MEMPALACE_MCP_IDLE_HOURS": "0"}) is None
    assert engine_idle_limit({"MEMPALACE_MCP_IDLE_HOURS": "nope"}) is None
    assert engine_idle_limit({"MEMPALACE_MCP_IDLE_HOURS": "0.5"}) == 1800
    assert is_idle_exit(0, False, 1800, 1800)
    assert not is_idle_exit(0, False, 5, 1800)  # an exit 0 nobody asked for (SIGTERM from outside)
    assert not is_idle_exit(0, True, 1800, 1800)  # something was outstanding
    assert not is_idle_exit(-9, False, 1800, 1800)  # a crash or kill
    assert not is_idle_exit(0, False, 1e9, None)  # no idle watchdog: never its idle exit


# --------------------------------------------------------------------------- the real engine
def engine_pids(state_dir: Path) -> list[int]:
    """Live engine processes (any parent) started for `state_dir`: they inherit the broker's MEMPALACE_PATH."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmd = proc.cmdline()
            if not any(os.path.basename(word) == "mempalace-mcp" for word in cmd[:2]) or "-c" in cmd:
                continue  # (the broker's `python -c` question to the engine's interpreter is no engine)
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("MEMPALACE_PATH") == str(state_dir):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return ["?"]


class Sampler:
    """Samples the engines of one state directory every 20 ms in a thread; keeps the largest count seen."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.most: list[int] = []
        self.commands: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = engine_pids(self.state_dir)
            self.samples += 1
            if len(pids) > len(self.most):
                self.most = pids
                self.commands = [" ".join(_cmdline(pid)) for pid in pids]
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def engine_status(endpoint: str) -> dict[str, Any]:
    c = await RawClient.connect(endpoint)
    try:
        return (await c.call("broker/status"))["result"]["engine"]
    finally:
        await c.close()


def test_broker_killed_while_its_engine_is_busy_never_leaves_two_engines(
    broker_factory: Callable[..., BrokerHandle], home: Path
) -> None:
    """kill -9 of the broker while its engine is busy (SIGSTOPped: it cannot act on EOF or SIGTERM, as a long
    call on macOS): the next broker waits for it, stops it, and only then starts its own engine."""
    state_dir = home / ".mempalace"
    first = broker_factory()
    note = f"acknowledged before the kill {time.time()}"

    async def write_then_stall() -> int:
        c = await RawClient.connect(first.endpoint)
        reply = await c.tool("mempalace_add_drawer", {"wing": "safety", "room": "r", "content": note}, timeout=60)
        assert tool_json(reply)["success"] is True, reply
        pid = (await c.call("broker/status"))["result"]["engine"]["pid"]
        os.kill(pid, signal.SIGSTOP)  # busy: the next write is queued in it and never answered
        await c.send({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {
            "name": "mempalace_add_drawer", "arguments": {"wing": "safety", "room": "r", "content": "queued"}}})
        await asyncio.sleep(0.3)
        await c.close()
        return int(pid)

    old = run(write_then_stall())
    recorded = state.read_broker_json(state_dir / "engine.json")
    assert recorded is not None and recorded["pid"] == old and recorded["broker_pid"] == first.proc.pid
    try:
        with Sampler(state_dir) as sampler:
            first.proc.kill()
            first.proc.wait(10)
            assert pid_alive(old), "a stopped engine outlives its broker (no SIGTERM acts on it)"
            t0 = time.monotonic()
            second = broker_factory(timeout=90)
            took = time.monotonic() - t0
            new = run(engine_status(second.endpoint))["pid"]
            time.sleep(0.5)
        assert len(sampler.most) <= 1, f"two engines at once: {sampler.commands} ({sampler.samples} samples)"
        assert sampler.samples > 20 and new != old and not pid_alive(old)
        assert took >= enginerecord.EXIT_WAIT_S * 0.9, "the old engine was given its time to finish first"
        log = (home / "broker-1.log").read_text()
        assert f"engine pid {old}" in log and "SIGTERM" in log
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(old, sig)
            except ProcessLookupError:
                pass

    async def find() -> None:
        c = await RawClient.connect(second.endpoint)
        got = tool_json(await c.tool("mempalace_search", {"query": note, "limit": 5}, timeout=60))
        assert note in json.dumps(got), got
        await c.close()

    run(find())
    assert (state_dir / "engine.json").exists()  # the new engine's record
    second.stop()
    assert not (state_dir / "engine.json").exists(), "removed once its engine has exited"


def test_engine_dies_with_a_killed_broker_on_linux(broker_factory: Callable[..., BrokerHandle], home: Path) -> None:
    require_linux("PR_SET_PDEATHSIG")
    b = broker_factory()
    old = run(engine_status(b.endpoint))["pid"]
    b.proc.kill()
    b.proc.wait(10)
    wait_for(lambda: not pid_alive(old), 10, what="the engine to die with its broker")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_engine_killed_from_outside_is_back_warm_without_a_call(
    broker_factory: Callable[..., BrokerHandle], sig: signal.Signals
) -> None:
    """mempalace-mcp exits 0 on SIGTERM: an exit nobody asked for is no idle exit; the engine is restarted
    at once and answers initialize before any client calls."""
    b = broker_factory()
    old = run(engine_status(b.endpoint))
    os.kill(old["pid"], sig)

    def back() -> dict[str, Any] | None:
        st = run(engine_status(b.endpoint))
        return st if st["state"] == "ready" and st["pid"] not in (None, old["pid"]) else None

    st = wait_for(back, 60, interval=0.1, what="a warm engine again")
    assert st["starts"] == old["starts"] + 1 and "idle" not in (st["last_exit"] or "")
    assert st["last_exit"] == ("exit code 0" if sig == signal.SIGTERM else "signal SIGKILL (9)")


def test_idle_exit_stays_cold_until_needed(broker_factory: Callable[..., BrokerHandle]) -> None:
    b = broker_factory(env={"MEMPALACE_MCP_IDLE_HOURS": "0.001"})  # 3.6 s
    first = run(engine_status(b.endpoint))
    st = wait_for(lambda: (s := run(engine_status(b.endpoint)))["state"] == "stopped" and s, 30, interval=0.2,
                  what="the engine's own idle exit")
    assert "its own idle exit" in st["last_exit"] and st["pid"] is None
    time.sleep(2)
    st = run(engine_status(b.endpoint))
    assert st["state"] == "stopped" and st["starts"] == first["starts"], "an idle exit stays cold"

    async def call() -> None:
        c = await RawClient.connect(b.endpoint)
        assert "result" in await c.tool("mempalace_status", timeout=60)
        await c.close()

    run(call())
    assert run(engine_status(b.endpoint))["starts"] == first["starts"] + 1


def test_unclearable_old_engine_reaches_the_client_as_32062(broker_factory: Callable[..., BrokerHandle], home: Path) -> None:
    """A record this machine can neither prove nor clear (an engine in another pid namespace of this kernel):
    no second engine, and the client is told why with ENGINE_UNAVAILABLE."""
    here = liveness.this_machine()
    if here.pid_ns is None or here.boot_id is None:
        pytest.skip("needs a pid namespace and a boot id to tell another namespace of this kernel (Linux)")
    state_dir = home / ".mempalace"
    state.ensure_private_dir(state_dir)
    enginerecord.write(state.StatePaths(state_dir), record(host=here.host, boot_id=here.boot_id,
                                                           pid_ns="pid:[4026531836-other]"))
    b = broker_factory(wait_engine=False)

    async def call() -> dict[str, Any]:
        c = await RawClient.connect(b.endpoint)
        try:
            return await c.tool("mempalace_status", timeout=60)
        finally:
            await c.close()

    reply = run(call())
    assert reply["error"]["code"] == -32062, reply
    message = reply["error"]["message"]
    assert "another pid namespace" in message and str(state_dir / "engine.json") in message, message
    assert reply["error"]["data"]["outcome"] == "not_executed"
    assert engine_pids(state_dir) == [] and run(engine_status(b.endpoint))["pid"] is None


def test_proof_lost_while_waiting_means_no_signal_and_no_start(paths: state.StatePaths) -> None:
    enginerecord.write(paths, record())
    procs = FakeProcs({4242: "1000"})
    table = procs.table()
    calls = {"n": 0}

    def start(pid: int) -> str | None:
        calls["n"] += 1
        return "1000" if calls["n"] == 1 else None  # readable once, then not (e.g. ps stopped answering)

    table.start = start
    with pytest.raises(enginerecord.OldEngineLives, match="no longer provably"):
        run(enginerecord.clear(paths, table, waits=(0.1, 0.1, 0.1), poll=0.02))
    assert procs.sent == [] and paths.engine.exists()


# --- a dead engine's logs (hot journal, WAL) are recovered before the next engine opens the palace ---------
def test_walrecover_recovers_a_killed_writers_log(tmp_path: Path) -> None:
    import sqlite3
    import subprocess
    import sys

    from mp_ssh_bridge import walrecover

    palace = tmp_path / "palace"
    palace.mkdir()
    db = palace / "chroma.sqlite3"
    kg = tmp_path / "knowledge_graph.sqlite3"  # no such file: nothing to do for it
    writer = (
        "import os, signal, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode=WAL'); c.execute('create table t(x)')\n"
        "c.executemany('insert into t values (?)', [(i,) for i in range(500)]); c.commit()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # no checkpoint, no close: what kill -9 mid-work leaves
    )
    subprocess.run([sys.executable, "-c", writer, str(db)], check=False)
    assert (palace / "chroma.sqlite3-wal").stat().st_size > 0, "the killed writer left no log to recover"
    assert walrecover.pending_logs(str(palace), str(kg)) == [str(db)]
    said = walrecover.recover_all(str(palace), str(kg))
    assert said == [f"{db}: recovered its log"]
    assert walrecover.pending_logs(str(palace), str(kg)) == []  # checkpointed: the log is empty
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("select count(*) from t").fetchone() == (500,)  # every committed row kept
    finally:
        conn.close()
    assert walrecover.recover_all(str(palace), str(kg)) == []  # nothing pending: nothing touched


def test_walrecover_rolls_back_a_killed_writers_hot_journal(tmp_path: Path) -> None:
    """chromadb keeps chroma.sqlite3 in rollback-journal mode: a writer killed mid-transaction leaves a hot
    `-journal`, and a read-only open (mempalace 3.11's start-up quick_check) cannot roll it back."""
    import sqlite3
    import subprocess
    import sys

    from mp_ssh_bridge import walrecover

    palace = tmp_path / "palace"
    palace.mkdir()
    db = palace / "chroma.sqlite3"
    writer = (
        "import os, signal, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('create table t(x)')\n"
        "c.executemany('insert into t values (?)', [('x' * 500,) for _ in range(2000)])\n"
        "c.execute('PRAGMA cache_size=2'); c.execute('begin'); c.execute(\"update t set x = x || 'y'\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # the cache spilled changed pages into the file: the journal is hot
    )
    subprocess.run([sys.executable, "-c", writer, str(db)], check=False)
    assert (palace / "chroma.sqlite3-journal").stat().st_size > 0, "the killed writer left no journal"

    def read_only_check() -> str:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return str(conn.execute("PRAGMA quick_check").fetchone()[0])
        except sqlite3.Error as exc:
            return str(exc)
        finally:
            conn.close()

    assert read_only_check() == "attempt to write a readonly database"  # what the engine's start-up check meets
    assert walrecover.pending_logs(str(palace), str(tmp_path / "kg.sqlite3")) == [str(db)]
    assert walrecover.recover_all(str(palace), str(tmp_path / "kg.sqlite3")) == [f"{db}: recovered its log"]
    assert not (palace / "chroma.sqlite3-journal").exists()  # rolled back and removed
    assert read_only_check() == "ok"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("select count(*) from t where x like '%y'").fetchone() == (0,)  # the update was undone
    finally:
        conn.close()


def test_walrecover_reports_a_database_it_cannot_open(tmp_path: Path) -> None:
    from mp_ssh_bridge import walrecover

    palace = tmp_path / "palace"
    palace.mkdir()
    (palace / "chroma.sqlite3").write_bytes(b"not a database at all" * 100)
    (palace / "chroma.sqlite3-wal").write_bytes(b"x" * 100)
    said = walrecover.recover_all(str(palace), str(tmp_path / "kg.sqlite3"))
    assert len(said) == 1 and "could not recover" in said[0], said
