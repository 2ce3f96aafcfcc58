"""Reliability: faults, each with a clear outcome within a bound (issue #10).

- the engine SIGSTOPped mid-call: the call gets a deadline error that says whether it ran, and the
  broker kills and restarts the engine (stall_timeout);
- an engine that crashes at start (a SCRIPTED FAKE ENGINE: a shell script that prints an error and
  exits, which the real engine cannot be made to do on demand): the session gets -32062 naming the
  engine's own error, "not executed", and the broker lives on;
- the host's sshd killed and restarted under a connected container session: the next call gets a
  clear error or succeeds after reconnecting; nothing hangs beyond the deadline;
- broker.json truncated / garbage: the next session still gets a working broker, no traceback;
- broker.sock taken by a foreign regular file or directory: the broker refuses or moves it aside
  and says so; a foreign file is never deleted silently;
- the state directory read-only (a read-only bind mount) or full (a full tmpfs): a clear error or a
  documented fallback, no traceback, nothing hangs (skipped, with the reason, where mounting is not
  permitted).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol, state
from tests.conftest import BrokerHandle
from tests.helpers import RawClient, broker_pids, children_of, kill_pid, pid_alive, wait_for
from tests.reliability import record, scale
from tests.sshd import SSHServer, two_sides
from tests.test_shim_support import ShimProc

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

DEADLINE_MS = 3000
BOUND_S = DEADLINE_MS / 1000 + 2 + 3  # deadline + the shim's backstop grace + slack on a busy 2-core machine


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback (most recent call last)" not in text, text[-3000:]


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def _init_then_status(s: ShimProc, bound: float = 120) -> dict[str, Any]:
    """initialize, then a tool call: the first answer that is not a success, or the tool's."""
    init = s.initialize(timeout=bound)
    return s.tool("mempalace_status", timeout=bound) if "result" in init else init


# --- the engine SIGSTOPped -------------------------------------------------------------------------
def test_engine_sigstop_gets_a_deadline_verdict_and_a_restart(broker_factory: Callable[..., BrokerHandle]) -> None:
    b = broker_factory(env={"MP_BRIDGE_STALL_TIMEOUT": "5"})
    engine = children_of(b.proc.pid)
    assert len(engine) == 1, engine

    async def main() -> dict[str, Any]:
        c = await RawClient.connect(b.endpoint)
        try:
            assert "result" in await c.call("broker/status", {"timeoutMs": DEADLINE_MS})
            assert "result" in await c.tool("mempalace_status", timeout=60)
            os.kill(engine[0], signal.SIGSTOP)
            t0 = time.monotonic()
            stuck = await c.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": f"frozen {uuid.uuid4().hex}"},
                                 timeout=BOUND_S)
            answered = time.monotonic() - t0
            # the broker kills the stopped engine at stall_timeout and starts another
            t1 = time.monotonic()
            while time.monotonic() - t1 < 60:
                kids = children_of(b.proc.pid)
                st = (await c.call("broker/status"))["result"]
                if kids and kids != engine and st["engine"]["state"] == "ready":
                    break
                await asyncio.sleep(0.2)
            restarted = time.monotonic() - t1
            after = await c.tool("mempalace_status", timeout=60)
            return {"stuck": stuck, "answered_s": answered, "restart_s": restarted, "after": after,
                    "status": (await c.call("broker/status"))["result"], "new_engine": children_of(b.proc.pid)}
        finally:
            await c.close()

    try:
        out = asyncio.run(main())
    finally:
        if pid_alive(engine[0]):
            os.kill(engine[0], signal.SIGCONT)
    err = out["stuck"].get("error", {})
    record("fault-engine-sigstop", tried=f"SIGSTOP of the engine, then a write with a {DEADLINE_MS} ms session deadline "
           "(broker stall_timeout 5 s)",
           happened=f"answered {err.get('code')} outcome={err.get('data', {}).get('outcome')} after {out['answered_s']:.1f} s; "
           f"engine replaced (restarts={out['status']['engine'].get('restarts')}) within {out['restart_s']:.1f} s; next call "
           f"{'ok' if 'result' in out['after'] else out['after']}",
           figures={"answered_s": round(out["answered_s"], 2), "restart_s": round(out["restart_s"], 2)})
    assert err.get("code") == protocol.DEADLINE_EXCEEDED, out["stuck"]
    assert err["data"]["outcome"] == "unknown", err  # it had reached the engine: the verdict says so
    assert "result" in out["after"], out["after"]
    assert out["new_engine"] and out["new_engine"] != engine, (engine, out["new_engine"])
    assert not pid_alive(engine[0])
    assert b.proc.poll() is None


# --- an engine that crashes at start (scripted fake) -----------------------------------------------
def test_engine_crash_at_start_is_a_clear_not_executed_error(home: Path, tmp_path: Path) -> None:
    fake = tmp_path / "crashing-engine.sh"  # a SCRIPTED FAKE ENGINE: dies at start with its own words
    fake.write_text("#!/bin/sh\necho 'fake engine: chroma.sqlite3 is locked by another process' >&2\nexit 3\n")
    fake.chmod(0o755)
    s = ShimProc(env={"MP_BRIDGE_ENGINE": str(fake), "MEMPALACE_MCP_TIMEOUT_MS": "20000"}, stderr_path=tmp_path / "shim.err")
    try:
        init, init_s = timed(lambda: s.initialize(timeout=60))
        r, call_s = timed(lambda: s.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": "x"}, timeout=40))
        again = s.tool("mempalace_status", timeout=40)
    finally:
        s.close()
    rec = state.read_broker_json(home / ".mempalace" / "broker.json")
    log = read(home / ".mempalace" / "broker.log")
    record("fault-engine-crash-at-start", tried="a scripted fake engine that prints an error and exits 3 at every start",
           happened=f"initialize {'answered' if 'result' in init else init}; a write got {r.get('error', {}).get('code')} "
           f"after {call_s:.1f} s: {r.get('error', {}).get('message', '')[:200]!r}",
           figures={"call_s": round(call_s, 2), "init_s": round(init_s, 2)})
    assert r["error"]["code"] == protocol.ENGINE_UNAVAILABLE, r
    assert r["error"]["data"]["outcome"] == "not_executed", r
    assert "locked by another process" in r["error"]["message"] or "locked by another process" in json.dumps(r["error"]["data"]), r
    assert again["error"]["code"] == protocol.ENGINE_UNAVAILABLE, again
    assert rec is not None and pid_alive(rec["pid"]), "the broker itself must stay up"
    no_traceback(read(tmp_path / "shim.err"), log)


# --- sshd killed and restarted under a container session -------------------------------------------
@pytest.fixture
def container(home: Path, sshd: SSHServer) -> dict[str, Any]:
    host_state, ctr_state, wrapper = two_sides(home)
    return {"env": sshd.container_env(ctr_state, wrapper, MEMPALACE_MCP_TIMEOUT_MS=str(DEADLINE_MS * 5)),
            "ctr_state": ctr_state, "host_state": host_state}


def test_sshd_killed_and_restarted_under_a_container_session(sshd: SSHServer, broker: BrokerHandle,
                                                             container: dict[str, Any], tmp_path: Path) -> None:
    bound = DEADLINE_MS * 5 / 1000 + 2 + 5
    s = ShimProc(env=container["env"], stderr_path=tmp_path / "ctr.err")
    try:
        assert "result" in s.initialize()
        assert "result" in s.tool("mempalace_status", timeout=60)
        sshd.kill()
        down, down_s = timed(lambda: s.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": "while down"}, timeout=bound))
        sshd.start()
        up, up_s = timed(lambda: s.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": "back up"}, timeout=bound * 2))
        alive = s.proc.poll() is None
    finally:
        s.close()
    code = down.get("error", {}).get("code")
    record("fault-sshd-restart", tried="the host's sshd SIGKILLed (with its sessions) under a connected container session, "
           "a write, sshd started again, another write",
           happened=f"while down: {code or 'ok'} after {down_s:.1f} s ({down.get('error', {}).get('message', '')[:160]!r}); "
           f"after restart: {'ok' if 'result' in up else up} after {up_s:.1f} s",
           figures={"down_s": round(down_s, 2), "up_s": round(up_s, 2)})
    assert "result" in down or code in (protocol.BROKER_UNREACHABLE, protocol.OUTCOME_UNKNOWN), down
    if code == protocol.BROKER_UNREACHABLE:
        assert down["error"].get("data", {}).get("outcome") in (None, "not_executed"), down
    assert "result" in up and '"success": true' in up["result"]["content"][0]["text"], up
    assert alive and broker.proc.poll() is None
    assert not (container["ctr_state"] / "degraded.json").exists()
    no_traceback(read(tmp_path / "ctr.err"))


# --- broker.json damaged ---------------------------------------------------------------------------
GARBAGE = {
    "truncated": lambda rec: json.dumps(rec)[: len(json.dumps(rec)) // 2],
    "garbage": lambda rec: "\x00\xff not json at all \x7f" * 10,
    "empty": lambda rec: "",
    "a list": lambda rec: json.dumps([rec]),
    "wrong types": lambda rec: json.dumps(dict(rec, endpoint=42, endpoints=[], heartbeat="soon", engine="x")),
}


@pytest.mark.parametrize("damage", list(GARBAGE))
def test_damaged_broker_json_still_gets_a_working_broker(home: Path, tmp_path: Path, damage: str) -> None:
    state_dir = home / ".mempalace"
    first = ShimProc(stderr_path=tmp_path / "first.err")
    try:
        assert "result" in first.initialize()
        assert "result" in first.tool("mempalace_status", timeout=120)
    finally:
        first.close()
    rec = state.read_broker_json(state_dir / "broker.json")
    assert rec is not None
    kill_pid(rec["pid"], signal.SIGKILL)  # a crash leaves broker.json behind; then it is damaged
    wait_for(lambda: not broker_pids(state_dir), 20, what="old broker gone")
    (state_dir / "broker.json").write_text(GARBAGE[damage](rec), errors="surrogateescape")
    s = ShimProc(stderr_path=tmp_path / "next.err")
    try:
        r, took = timed(lambda: _init_then_status(s))
    finally:
        s.close()
    new = state.read_broker_json(state_dir / "broker.json")
    record(f"fault-broker-json-{damage.replace(' ', '-')}", tried=f"broker.json left {damage} by a crashed broker, then a new session",
           happened=f"{'served' if 'result' in r else r} after {took:.1f} s by broker {new and new.get('pid')}",
           figures={"seconds": round(took, 2)})
    assert "result" in r, (r, read(tmp_path / "next.err"))
    assert new is not None and new["pid"] != rec["pid"] and pid_alive(new["pid"])
    no_traceback(read(tmp_path / "next.err"), read(state_dir / "broker.log"))


def test_broker_json_garbage_under_a_live_broker(home: Path, tmp_path: Path) -> None:
    """The live broker holds broker.lock; its record is overwritten with garbage. A new session must still be
    served (by that broker, once its heartbeat rewrites the record), never by a second broker."""
    state_dir = home / ".mempalace"
    first = ShimProc(stderr_path=tmp_path / "first.err")
    try:
        assert "result" in first.initialize()
        assert "result" in first.tool("mempalace_status", timeout=120)
        rec = state.read_broker_json(state_dir / "broker.json")
        assert rec is not None
        (state_dir / "broker.json").write_text("{\"version\": 1, \"pid\": ")
        s = ShimProc(stderr_path=tmp_path / "next.err")
        try:
            r, took = timed(lambda: _init_then_status(s))
        finally:
            s.close()
    finally:
        first.close()
    record("fault-broker-json-garbage-live", tried="broker.json overwritten with a truncated record under a live broker, then a new session",
           happened=f"{'served' if 'result' in r else r} after {took:.1f} s; brokers running: {len(broker_pids(state_dir))}",
           figures={"seconds": round(took, 2)})
    assert "result" in r, (r, read(tmp_path / "next.err"))
    assert broker_pids(state_dir) == [rec["pid"]]
    no_traceback(read(tmp_path / "next.err"), read(state_dir / "broker.log"))


# --- broker.sock taken by a foreign file -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["regular file", "directory"])
def test_socket_path_taken_by_a_foreign_file(home: Path, tmp_path: Path, kind: str) -> None:
    state_dir = home / ".mempalace"
    state.ensure_private_dir(state_dir)
    sock = state.StatePaths(state_dir).socket()
    precious = f"someone's data {uuid.uuid4().hex}\n"
    if kind == "regular file":
        sock.write_text(precious)
    else:
        sock.mkdir()
        (sock / "inside.txt").write_text(precious)
    s = ShimProc(stderr_path=tmp_path / "shim.err")
    try:
        r, took = timed(lambda: _init_then_status(s))
    finally:
        s.close()
    log = read(state_dir / "broker.log")
    err = read(tmp_path / "shim.err")
    # where did the foreign data go? still there, or moved aside somewhere in the state directory
    kept = [str(p) for p in state_dir.rglob("*") if p.is_file() and not p.is_socket() and precious in read(p)]
    words = ("not a socket", "foreign", "moved", "replac", "refus", "is a directory", "exists")
    said = any(str(sock) in line and any(w in line.lower() for w in words)
               for line in (log + "\n" + err + "\n" + json.dumps(r)).splitlines())
    record(f"fault-socket-foreign-{kind.replace(' ', '-')}", tried=f"a {kind} (with data) where broker.sock goes, then a session",
           happened=f"session: {'served' if 'result' in r else r.get('error', r)} after {took:.1f} s; foreign data kept at: "
           f"{kept or 'NOWHERE (deleted)'}; path named in the log or the error: {said}",
           figures={"seconds": round(took, 2), "kept": kept})
    assert kept, f"the foreign {kind} at {sock} was deleted"
    assert said, f"nobody said what happened to {sock}: log tail {log[-1500:]!r}; shim {err[-1500:]!r}"
    no_traceback(err, log)


# --- the state directory read-only or full ----------------------------------------------------------
def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    done: list[Path] = []
    yield done
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _need_root_and_mount() -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) to make a read-only or full state directory")


def _session_outcome(tmp_path: Path, state_dir: Path, bound: float) -> tuple[dict[str, Any], float, str]:
    s = ShimProc(env={"MEMPALACE_MCP_TIMEOUT_MS": "20000"}, stderr_path=tmp_path / "shim.err")
    try:
        def go() -> dict[str, Any]:
            init = s.initialize(timeout=bound)
            return s.tool("mempalace_status", timeout=bound) if "result" in init else init
        r, took = timed(go)
    finally:
        s.close()
    return r, took, read(tmp_path / "shim.err")


def _judge(case: str, what: str, r: dict[str, Any], took: float, err: str, state_dir: Path) -> None:
    if "result" in r:
        text = "\n".join(item.get("text", "") for item in r["result"].get("content") or [])
        outcome = "served"
    else:
        text = r.get("error", {}).get("message", "")
        outcome = f"error {r.get('error', {}).get('code')}: {text[:200]!r}"
    record(case, tried=what, happened=f"{outcome} after {took:.1f} s", figures={"seconds": round(took, 2)})
    if "error" in r:
        assert r["error"]["code"] in (protocol.BROKER_UNREACHABLE, protocol.ENGINE_UNAVAILABLE), r
        assert str(state_dir) in text or "read-only" in text.lower() or "space" in text.lower(), r
    else:  # served: by a broker (a session never runs an engine of its own), which must then exist
        assert "degraded mode" not in err and broker_pids(state_dir), (r, err[-1500:])
    no_traceback(err)


def test_state_directory_read_only(home: Path, tmp_path: Path, mounts: list[Path]) -> None:
    _need_root_and_mount()
    state_dir = home / ".mempalace"
    state.ensure_private_dir(state_dir)
    state.palace_id(state.StatePaths(state_dir))
    bind = _mount("--bind", str(state_dir), str(state_dir))
    if bind.returncode != 0:
        pytest.skip(f"mount --bind not permitted here: {bind.stderr.strip()}")
    mounts.append(state_dir)
    ro = _mount("-o", "remount,ro,bind", str(state_dir))
    if ro.returncode != 0:
        pytest.skip(f"remount read-only not permitted here: {ro.stderr.strip()}")
    try:
        (state_dir / "probe").write_text("x")
        pytest.skip("the read-only remount still accepts writes here")
    except OSError:
        pass
    r, took, err = _session_outcome(tmp_path, state_dir, 60)
    _judge("fault-state-dir-read-only", "the state directory a read-only bind mount, no broker running, then a session",
           r, took, err, state_dir)
    assert took < 60


def test_state_directory_full(home: Path, tmp_path: Path, mounts: list[Path]) -> None:
    _need_root_and_mount()
    state_dir = home / ".mempalace"
    state_dir.mkdir(mode=0o700)
    made = _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(state_dir))
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs not permitted here: {made.stderr.strip()}")
    mounts.append(state_dir)
    state.palace_id(state.StatePaths(state_dir))
    fd = os.open(state_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # fill it to the last block
    try:
        while os.write(fd, b"\0" * 4096) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    r, took, err = _session_outcome(tmp_path, state_dir, 60)
    _judge("fault-state-dir-full", "the state directory a full 64 KiB tmpfs, no broker running, then a session",
           r, took, err, state_dir)
    assert took < 60


# --- the engine SIGKILLed mid-write, again and again -------------------------------------------------
KILLS = 4  # per broker: the restart budget allows 5 restarts in 300 s
ROUNDS = scale(1, 3)


def test_engine_killed_mid_write_the_next_engine_serves(broker_factory: Callable[..., BrokerHandle]) -> None:
    """After a SIGKILL in the middle of writes, the restarted engine must serve writes again. Seen with mempalace
    3.11.0: the new engine's start-up `PRAGMA quick_check` opens chroma.sqlite3 read-only while the killed engine's
    WAL is still hot, fails with "attempt to write a readonly database", takes that for corruption and refuses
    every later tool call with -32002 until it is restarted."""
    refused: list[dict[str, Any]] = []
    outcomes: dict[str, int] = {}

    async def one_broker(b: BrokerHandle) -> None:
        c = await RawClient.connect(b.endpoint)
        try:
            for it in range(KILLS):
                kids = children_of(b.proc.pid)
                ids = []
                for i in range(6):
                    mid = c.next_id()
                    await c.send(protocol.request(mid, "tools/call", {"name": "mempalace_add_drawer", "arguments": {
                        "wing": "w", "room": "r", "content": f"killed mid-write {uuid.uuid4().hex} {i}"}}))
                    ids.append(mid)
                await asyncio.sleep(0.15 + 0.05 * (it % 4))
                for k in kids:
                    os.kill(k, signal.SIGKILL)
                for mid in ids:
                    r = await c.recv_id(mid, 120)
                    key = "ok" if "result" in r else str(r["error"]["code"])
                    outcomes[key] = outcomes.get(key, 0) + 1
                for _ in range(3):
                    r = await c.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": f"after {uuid.uuid4().hex}"},
                                     timeout=120)
                    if "error" in r:
                        refused.append({"kill": it, **r["error"]})
        finally:
            await c.close()

    for _ in range(ROUNDS):
        b = broker_factory()
        asyncio.run(one_broker(b))
        b.stop()
    record("fault-engine-kill-mid-write", tried=f"{ROUNDS * KILLS} SIGKILLs of the engine, each with 6 writes queued, then 3 writes "
           "to the restarted engine", happened=f"writes in flight: {outcomes}; writes after a restart refused: {len(refused)}"
           + (f" (first: {refused[0].get('code')} {refused[0].get('message')!r} {json.dumps(refused[0].get('data'))[:300]})" if refused else ""),
           figures={"kills": ROUNDS * KILLS, "in_flight": outcomes, "refused_after_restart": len(refused)})
    assert refused == [], refused[:3]
