"""Test helpers: a raw newline-JSON client for the broker socket, and waiting utilities."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mp_ssh_bridge import protocol


class RawClient:
    """A bare JSON-RPC client on the broker's socket, for tests that need to see every frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._next = 0
        self.inbox: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, endpoint: str | Path, limit: int = 64 * 1024 * 1024) -> RawClient:
        path = str(endpoint)
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=limit), 5)
        return cls(reader, writer)

    def next_id(self) -> int:
        self._next += 1
        return self._next

    async def send(self, message: Any) -> None:
        self.writer.write(protocol.encode(message))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """Next frame, or None at EOF."""
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            return None
        return json.loads(line)

    async def recv_id(self, msg_id: Any, timeout: float = 30.0) -> dict[str, Any]:
        """The reply with this id; other frames are kept in `inbox`."""
        for i, msg in enumerate(self.inbox):
            if msg.get("id") == msg_id and "method" not in msg:
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if msg is None:
                raise EOFError(f"connection closed while waiting for id {msg_id!r}")
            if msg.get("id") == msg_id and "method" not in msg:
                return msg
            self.inbox.append(msg)

    async def call(self, method: str, params: Any = None, msg_id: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        msg_id = self.next_id() if msg_id is None else msg_id
        await self.send(protocol.request(msg_id, method, params))
        return await self.recv_id(msg_id, timeout)

    async def tool(self, name: str, arguments: dict[str, Any] | None = None, msg_id: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        return await self.call("tools/call", {"name": name, "arguments": arguments or {}}, msg_id, timeout)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:  # noqa: BLE001
            pass


def tool_json(reply: dict[str, Any]) -> Any:
    """The JSON a mempalace tool returned in its first text content item."""
    assert "result" in reply, reply
    return json.loads(reply["result"]["content"][0]["text"])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child not yet reaped still "exists")."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied: another user's process, alive
        return True


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def kill_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- processes (psutil: the same on Linux and macOS) ------------------------------------------
def children_of(pid: int) -> list[int]:
    """Live (non-zombie) child processes of `pid`."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for kid in kids:
        try:
            if kid.status() != psutil.STATUS_ZOMBIE:
                out.append(kid.pid)
        except psutil.Error:
            continue
    return out


def broker_pids(state_dir: Path) -> list[int]:
    """Live broker processes (not `--ensure` callers) whose MEMPALACE_PATH is `state_dir`."""
    found = []
    want = str(state_dir)
    for proc in psutil.process_iter():
        try:
            cmd = proc.cmdline()
            if proc.status() == psutil.STATUS_ZOMBIE or "--ensure" in cmd:
                continue
            is_broker = cmd[1:3] == ["-m", "mp_ssh_bridge_broker"] or any(c.endswith("mempalace-broker") for c in cmd[:2])
            if is_broker and proc.environ().get("MEMPALACE_PATH") == want:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@functools.cache
def engine_facts() -> dict[str, Any]:
    """What the INSTALLED engine says of itself, so a mempalace patch release does not break the suite:
    its version, and how many tools it lists with and without --read-only (asked once, directly)."""
    import importlib.metadata
    import shutil
    import tempfile

    engine = shutil.which("mempalace-mcp", path=str(Path(sys.executable).parent))
    assert engine, "mempalace-mcp missing from the venv"

    def count(*flags: str) -> int:
        with tempfile.TemporaryDirectory(prefix="mpb-facts-") as home:
            msgs = [protocol.request(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                       "clientInfo": {"name": "facts", "version": "0"}}),
                    protocol.request(2, "tools/list")]
            out = subprocess.run([engine, *flags], input=b"".join(protocol.encode(m) for m in msgs),
                                 capture_output=True, timeout=120, env={"HOME": home, "PATH": os.environ["PATH"]})
        for line in out.stdout.splitlines():
            reply = json.loads(line)
            if reply.get("id") == 2:
                return len(reply["result"]["tools"])
        raise AssertionError(f"no tools/list answer from {engine}: {out.stderr[-500:]!r}")

    return {"version": importlib.metadata.version("mempalace"), "tools": count(), "read_only_tools": count("--read-only")}
