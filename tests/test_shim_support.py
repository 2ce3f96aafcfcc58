"""Helpers for the shim tests (no tests here): a raw stdio client for mp-shim, a scriptable fake broker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mp_ssh_bridge.palace import resolve
from tests.conftest import BIN

SHIM = str(BIN / "mp-shim")
INIT_PARAMS = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}


class ShimProc:
    """mp-shim (or, with `command`, any stdio MCP server: the plain engine) as a child, spoken to with raw
    newline-delimited JSON-RPC."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, stderr_path: Path | None = None,
                 command: str = SHIM) -> None:
        full = dict(os.environ)
        full.setdefault("MP_BRIDGE_ROLE", "host")
        full.setdefault("MP_BRIDGE_LOG_LEVEL", "INFO")
        full.update(env or {})
        self.stderr_path = stderr_path
        err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([command, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=full)
        if stderr_path:
            err.close()
        self.inbox: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)  # anything but JSON on stdout fails the test here
            with self._cv:
                self.inbox.append(msg)
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def request(self, method: str, params: Any = None, msg_id: Any = None) -> Any:
        if msg_id is None:
            self._next += 1
            msg_id = self._next
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return msg_id

    def wait_reply(self, msg_id: Any, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, msg in enumerate(self.inbox):
                    if msg.get("id") == msg_id and "method" not in msg:
                        return self.inbox.pop(i)
                if self._eof:
                    raise EOFError(f"mp-shim closed stdout while waiting for id {msg_id!r}; stderr: {self.stderr()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no reply to id {msg_id!r} within {timeout}s; stderr: {self.stderr()}")
                self._cv.wait(left)

    def call(self, method: str, params: Any = None, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_reply(self.request(method, params), timeout)

    def initialize(self, timeout: float = 90.0) -> dict[str, Any]:
        reply = self.call("initialize", INIT_PARAMS, timeout)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply

    def tool(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        return self.call("tools/call", {"name": name, "arguments": arguments or {}}, timeout)

    def stderr(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")[-3000:]
        return "(not captured)"

    def close(self, timeout: float = 20.0) -> int | None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)




class FakeBroker:
    """A UNIX-socket server that answers broker/status for our palace and does what the test scripts.

    `handler(conn_no, msg) -> reply | None | "close"` decides every other request.
    Writes broker.json (and palace.id) in `state_dir` so the shim's fast path finds it.
    """

    def __init__(self, state_dir: Path, handler: Callable[[int, dict], Any], palace: str | None = None) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.palace_id = str(uuid.uuid4())
        (state_dir / "palace.id").write_text(self.palace_id + "\n")
        self.palace = palace or resolve(None).palace  # what a shim with this environment resolves
        self.path = str(state_dir / "broker.sock")
        self.handler = handler
        self.received: list[tuple[int, dict]] = []
        self.connections: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        record = {"version": 1, "pid": os.getpid(), "host": socket.gethostname(), "endpoint": f"unix://{self.path}",
                  "palace": self.palace, "palace_id": self.palace_id, "heartbeat": time.time()}
        (state_dir / "broker.json").write_text(json.dumps(record))

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(len(self.connections), conn), daemon=True).start()

    def _serve(self, no: int, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            for line in f:
                msg = json.loads(line)
                self.received.append((no, msg))
                if msg.get("method") == "broker/status":
                    reply: Any = {"jsonrpc": "2.0", "id": msg["id"], "result": {
                        "broker": {"pid": os.getpid(), "palace": self.palace, "palace_id": self.palace_id}}}
                else:
                    reply = self.handler(no, msg)
                if reply == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                    return
                if reply is not None:
                    self.send(conn, reply)
        except (OSError, ValueError):
            pass

    @staticmethod
    def send(conn: socket.socket, msg: dict) -> None:
        try:
            conn.sendall((json.dumps(msg) + "\n").encode())
        except OSError:
            pass

    def methods(self) -> list[tuple[int, str]]:
        return [(no, m.get("method")) for no, m in self.received]

    def close(self) -> None:
        """Also removes broker.json: it names the test process's pid, which the home fixture would SIGTERM."""
        try:
            (self.state_dir / "broker.json").unlink()
        except FileNotFoundError:
            pass
        self._stop = True
        # shutdown() wakes the accept() thread; a bare close() would leave it blocked, and its fd
        # number could be handed to the next test's socket while the thread still uses it.
        for sock in (self.sock, *self.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for sock in (self.sock, *self.connections):
            try:
                sock.close()
            except OSError:
                pass
