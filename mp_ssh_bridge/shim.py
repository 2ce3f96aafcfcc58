"""`mp-shim`: the agent's MCP stdio command, a drop-in for `mempalace-mcp`.

It speaks MCP over stdio (one JSON-RPC object per line) and forwards every
message to the one broker that owns the palace. Nothing but protocol ever
reaches stdout: at start the real stdout is moved to a private descriptor and
fd 1 is pointed at stderr, so a stray print (ours, a library's or a child's)
cannot corrupt the stream.

The fast path is the point of this module. With a broker already running it
reads the environment (and the TOML config file only when one exists),
`broker.json`, connects the UNIX socket, proves the broker with one
`broker/status` round trip (palace identity), and pumps. It imports only
`os, sys, json, socket, threading, signal, time, heapq, errno`: on the
measuring machine `import asyncio` alone costs 45-70 ms and
`mp_ssh_bridge.protocol`/`state` pull in asyncio, dataclasses, tempfile and
uuid (30-80 ms), which is more than upstream's whole stdio proxy takes to
answer its first call. So the pump is threads and blocking I/O (the shape of
upstream's `mcp_proxy.py`), and the constants and rules it shares with those
modules are repeated here and kept equal by tests. Everything else -
settings model, election, SSH, degraded mode - lives in
`mp_ssh_bridge.discovery` / `endpoints` and is imported only when needed.

Threads: `stdin` (client -> broker), `link` (broker -> stdout, one per
connection), `deadlines` (per-request timers), `connect` (discovery, may take
seconds). Shared state is under one lock; stdout writes under another, one
whole frame per write.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import signal
import socket
import sys
import threading
import time

from mp_ssh_bridge.protocol import (  # stdlib-only and light: json, nothing else
    BROKER_UNREACHABLE,
    DEADLINE_EXCEEDED,
    DEFAULT_MAX_LINE_BYTES,
    EVENT_WAIT_TOOL,
    INVALID_REQUEST,
    JSONRPC,
    LINE_TOO_LONG,
    OUTCOME_UNKNOWN,
    PALACE_MISMATCH,
    PARSE_ERROR,
    encode,
    error,
    event_wait_timeout_ms,
)

# --- defaults shared with mp_ssh_bridge.state / settings (tests keep them equal) ---
DEFAULT_STATE_DIR = "~/.mempalace"
DEFAULT_TIMEOUT_MS = 60000
DEFAULT_CONNECT_TIMEOUT = 5.0
APP_NAME = "mp-ssh-bridge"
ENGINE_CHILD_ENV = "MP_SHIM_ENGINE_CHILD"  # set in a degraded-mode engine: a shim seeing it refuses to run

DRAIN_ON_EOF = 5.0  # after stdin closes, how long answers to pending requests may still arrive

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}
_log_threshold = 30


def log(level: int, message: str) -> None:
    """stderr only, one line, quiet by default (WARNING); MP_BRIDGE_LOG_LEVEL changes it."""
    if level >= _log_threshold:
        try:
            sys.stderr.write(f"mp-shim[{os.getpid()}]: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def set_log_level(name: str | None) -> None:
    global _log_threshold
    if name:
        _log_threshold = _LEVELS.get(name.strip().upper(), _log_threshold)


class ShimError(Exception):
    """A failure the agent is told about as a JSON-RPC error with this code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PalaceMismatch(ShimError):
    def __init__(self, message: str) -> None:
        super().__init__(PALACE_MISMATCH, message)


def id_key(value: object) -> tuple:
    return (type(value).__name__, value)  # 1 and "1" are different ids


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------- configuration
class Config:
    """What the shim needs, read cheaply; `discovery.config_from_settings` builds the same from the model."""

    def __init__(self) -> None:
        self.state_dir = expand(DEFAULT_STATE_DIR)
        self.timeout_ms = DEFAULT_TIMEOUT_MS
        self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self.max_line_bytes = DEFAULT_MAX_LINE_BYTES
        self.role = "auto"
        self.broker_url: str | None = None
        self.palace_flag: str | None = None  # --palace on our command line
        self.palace: str | None = None  # explicitly requested palace (flag, MP_BRIDGE_PALACE, config, MEMPALACE_PALACE_PATH)
        self.log_level: str | None = None
        self.read_only = False  # `--read-only` / MEMPALACE_MCP_READ_ONLY: the engine's read-only tool surface

    def resolved_role(self) -> str:
        if self.role != "auto":
            return self.role
        from mp_ssh_bridge.hostinfo import in_container  # os and sys only

        return "container" if in_container() else "host"


def config_file_path(environ=os.environ) -> str:
    """Same rule as `settings.config_file()` (platformdirs.user_config_dir), without platformdirs."""
    explicit = environ.get("MP_BRIDGE_CONFIG")
    if explicit:
        return expand(explicit)
    if sys.platform == "darwin":
        base = expand("~/Library/Application Support")
    else:
        base = (environ.get("XDG_CONFIG_HOME") or "").strip() or expand("~/.config")
    return os.path.join(base, APP_NAME, "config.toml")


class NeedSettings(Exception):
    """The cheap reader is not sure it would agree with the settings model: load the model."""


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise NeedSettings("bool where an int is expected")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise NeedSettings(f"not an integer: {value!r}")


def _bool(value: object) -> bool:
    """pydantic's bool rule for the spellings people use; anything else: ask the model."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y", "t"):
        return True
    if text in ("0", "false", "no", "off", "n", "f"):
        return False
    raise NeedSettings(f"not a boolean: {value!r}")


def _float(value: object) -> float:
    if isinstance(value, bool):
        raise NeedSettings("bool where a number is expected")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise NeedSettings(f"not a number: {value!r}") from exc
    if not out > 0:
        raise NeedSettings("must be > 0")
    return out


def fast_config(palace_flag: str | None, environ=os.environ) -> Config:
    """Environment (and the config file when present) read as the settings model would.

    Precedence, as in the model: CLI flag > environment > config file > default.
    Raises NeedSettings whenever it would have to guess.
    """
    file_values: dict = {}
    path = config_file_path(environ)
    if os.path.exists(path):
        try:
            import tomllib  # 3.11+; only users with a config file pay for it
        except ImportError as exc:
            raise NeedSettings("no tomllib") from exc
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, ValueError) as exc:
            raise NeedSettings(f"config file {path}: {exc}") from exc
        file_values = {str(k).lower(): v for k, v in raw.items()}

    def pick(env_names: tuple, file_names: tuple) -> object:
        for name in env_names:
            if name in environ:
                return environ[name]
        for name in file_names:
            if name in file_values:
                return file_values[name]
        return None

    cfg = Config()
    cfg.palace_flag = palace_flag
    value = pick(("MEMPALACE_PATH",), ("mempalace_path",))
    if value is not None:
        if not isinstance(value, str) or not value:
            raise NeedSettings("unusual MEMPALACE_PATH")
        cfg.state_dir = expand(value)
    value = pick(("MEMPALACE_MCP_TIMEOUT_MS",), ("mempalace_mcp_timeout_ms", "mcp_timeout_ms"))
    if value is not None:
        cfg.timeout_ms = _int(value)
    value = pick(("MP_BRIDGE_CONNECT_TIMEOUT",), ("connect_timeout",))
    if value is not None:
        cfg.connect_timeout = _float(value)
    value = pick(("MP_BRIDGE_MAX_LINE_BYTES",), ("max_line_bytes",))
    if value is not None:
        cfg.max_line_bytes = _int(value)
        if cfg.max_line_bytes < 1024:
            raise NeedSettings("max_line_bytes below 1024")
    value = pick(("MP_BRIDGE_ROLE",), ("role",))
    if value is not None:
        if value not in ("auto", "host", "container"):
            raise NeedSettings(f"role {value!r}")
        cfg.role = value  # type: ignore[assignment]
    value = pick(("MEMPALACE_BROKER",), ("mempalace_broker", "broker"))
    if value is not None:
        if not isinstance(value, str):
            raise NeedSettings("broker must be a string")
        cfg.broker_url = value or None
    value = pick(("MEMPALACE_MCP_READ_ONLY",), ("mempalace_mcp_read_only", "read_only"))
    if value is not None:
        cfg.read_only = _bool(value)
    value = pick(("MP_BRIDGE_LOG_LEVEL",), ("log_level",))
    if isinstance(value, str):
        cfg.log_level = value
    if palace_flag:
        cfg.palace = expand(palace_flag)
    else:
        value = pick(("MP_BRIDGE_PALACE",), ("palace",))
        if value is not None:
            if not isinstance(value, str) or not value:
                raise NeedSettings("unusual palace")
            cfg.palace = expand(value)
        else:
            env = environ.get("MEMPALACE_PALACE_PATH") or environ.get("MEMPALACE_PALACE")
            cfg.palace = expand(env) if env else None
    return cfg


# --------------------------------------------------------------------------- links
class Link:
    """One blocking byte stream to a broker (or, degraded, to an engine)."""

    endpoint = "?"
    transport = "?"
    degraded = False
    reason = ""

    def recv(self, timeout: float | None = None) -> bytes | None:  # frame without newline; None at EOF
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SocketLink(Link):
    """A UNIX or TCP stream socket."""

    def __init__(self, sock: socket.socket, endpoint: str, transport: str, max_line_bytes: int) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.transport = transport
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self._closed = False

    def recv(self, timeout: float | None = None) -> bytes | None:
        self.sock.settimeout(timeout)
        scanned = 0  # big frames arrive in many chunks: never rescan or recopy what we have
        try:
            while True:
                nl = self._buf.find(b"\n", scanned)
                if nl >= 0:
                    line = bytes(self._buf[:nl])
                    del self._buf[: nl + 1]
                    return line.rstrip(b"\r")
                scanned = len(self._buf)
                if scanned > self.max_line_bytes:
                    raise ShimError(LINE_TOO_LONG, f"broker sent a line above {self.max_line_bytes} bytes")
                chunk = self.sock.recv(262144)
                if not chunk:
                    if self._buf:
                        line = bytes(self._buf)
                        self._buf.clear()
                        return line
                    return None
                self._buf += chunk
        finally:
            if timeout is not None and not self._closed:
                try:
                    self.sock.settimeout(None)
                except OSError:
                    pass

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def connect_unix(path: str, timeout: float, max_line_bytes: int, endpoint: str | None = None) -> SocketLink:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return SocketLink(sock, endpoint or f"unix://{path}", "unix", max_line_bytes)


_status_seq = 0


def broker_status(link: Link, timeout: float, read_only: bool = False) -> dict:
    """One `broker/status` round trip before the pump starts; raises OSError/ShimError/TimeoutError.

    With `read_only` it also makes this connection a read-only session (the broker keeps it).
    """
    global _status_seq
    _status_seq += 1
    req_id = f"mp-shim/status/{os.getpid()}/{_status_seq}"
    msg: dict = {"jsonrpc": JSONRPC, "id": req_id, "method": "broker/status"}
    if read_only:
        msg["params"] = {"readOnly": True}
    link.send(encode(msg))
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer to broker/status within {timeout:g}s")
        frame = link.recv(remaining)
        if frame is None:
            raise ConnectionError("the broker closed the connection during the health check")
        try:
            msg = json.loads(frame)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("id") == req_id:
            res = msg.get("result")
            if not isinstance(res, dict):
                raise ConnectionError(f"broker/status failed: {msg.get('error')}")
            return res


def read_palace_id(state_dir: str) -> str | None:
    try:
        with open(os.path.join(state_dir, "palace.id"), encoding="ascii") as fh:
            return fh.read().strip() or None
    except (OSError, ValueError):
        return None


def _same_path(a: str, b: str) -> bool:
    if expand(a) == expand(b):
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def check_identity(status: dict, cfg: Config, endpoint: str, role: str) -> None:
    """One broker per palace: the broker's palace.id must be ours; on the host an explicit palace must match."""
    broker = status.get("broker") if isinstance(status.get("broker"), dict) else {}
    their_palace = broker.get("palace")
    their_id = broker.get("palace_id")
    our_id = read_palace_id(cfg.state_dir)
    want = cfg.palace or os.path.join(cfg.state_dir, "palace")
    if our_id and their_id and our_id != their_id:
        raise PalaceMismatch(
            f"palace mismatch: the broker at {endpoint} serves palace {their_palace} (palace.id {their_id}), "
            f"but this session's state directory {cfg.state_dir} belongs to palace id {our_id} (palace {want}); "
            "one broker serves one palace — point MEMPALACE_BROKER / MEMPALACE_PATH at the right one"
        )
    if role == "host" and cfg.palace and isinstance(their_palace, str) and not _same_path(their_palace, cfg.palace):
        raise PalaceMismatch(
            f"palace mismatch: the broker at {endpoint} (pid {broker.get('pid')}) serves palace {their_palace}, "
            f"but this session asked for palace {cfg.palace}; one state directory ({cfg.state_dir}) serves one "
            f"palace — use the same --palace everywhere, or set MEMPALACE_PATH to another directory for {cfg.palace}"
        )


def fast_connect(cfg: Config) -> Link:
    """Host role, no MEMPALACE_BROKER: broker.json -> UNIX socket -> broker/status -> identity."""
    with open(os.path.join(cfg.state_dir, "broker.json"), encoding="utf-8") as fh:
        record = json.load(fh)
    endpoint = record.get("endpoint") if isinstance(record, dict) else None
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        raise ConnectionError(f"broker.json names no unix endpoint ({endpoint!r})")
    link = connect_unix(endpoint[len("unix://") :], cfg.connect_timeout, cfg.max_line_bytes, endpoint)
    try:
        status = broker_status(link, cfg.connect_timeout, cfg.read_only)
        check_identity(status, cfg, endpoint, "host")
    except BaseException:
        link.close()
        raise
    return link


# --------------------------------------------------------------------------- the session
class Pending:
    __slots__ = ("msg_id", "method", "frame", "deadline", "link", "tool")

    def __init__(self, msg_id: object, method: str, frame: bytes, deadline: float | None, tool: str | None) -> None:
        self.msg_id = msg_id
        self.method = method
        self.frame = frame
        self.deadline = deadline
        self.link: Link | None = None  # None: waiting in the backlog, not sent yet
        self.tool = tool


def deadline_ms(cfg_timeout_ms: int, method: str, params: object) -> int | None:
    """The shim's deadline for one request in ms (None = no deadline)."""
    if cfg_timeout_ms <= 0:
        return None
    extra = event_wait_timeout_ms(method, params) or 0
    return cfg_timeout_ms + extra


DEGRADED_NOTICE = (
    "NOTE from mp-shim: MemPalace memory is running WITHOUT its broker (degraded mode): this session "
    "runs its own memory engine directly. Memory works, but writes from other agent sessions are not "
    "serialized with this one. Reason: {reason}"
)


class Shim:
    def __init__(self, cfg: Config, out_fd: int, in_file) -> None:
        self.cfg = cfg
        self.out_fd = out_fd
        self.in_file = in_file
        self.lock = threading.RLock()
        self.out_lock = threading.Lock()
        self.pending: dict[tuple, Pending] = {}
        self.backlog: list[tuple[tuple | None, bytes]] = []  # frames waiting for a connection
        self.link: Link | None = None
        self.flushing: Link | None = None
        self.connecting = False
        self.last_error: ShimError | None = None
        self.init_msg: dict | None = None
        self.client_initialized = False
        self.swallow: set = set()
        self.notice_sent = False
        self.stdin_done = False
        self.done = threading.Event()
        self._heap: list = []
        self._heap_cv = threading.Condition(self.lock)
        self._seq = 0
        self.generation = 0
        self._fast_failed = ""

    # ---- output -------------------------------------------------------------------------------
    def write_out(self, data: bytes) -> None:
        with self.out_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.out_fd, view)
                except BlockingIOError:
                    import select

                    select.select([], [self.out_fd], [], 1.0)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    log(40, f"cannot write to stdout ({exc}); ending the session")
                    self.done.set()
                    return
                view = view[n:]

    def reply_error(self, msg_id: object, code: int, message: str, data: object = None) -> None:
        self.write_out(encode(error(msg_id, code, message, data)))

    # ---- client -> broker ---------------------------------------------------------------------
    def stdin_loop(self) -> None:
        limit = self.cfg.max_line_bytes
        try:
            while True:
                line = self.in_file.readline(limit + 1)
                if not line:
                    break
                if not line.endswith(b"\n") and len(line) > limit:
                    while True:  # discard the rest of the oversized line
                        rest = self.in_file.readline(1 << 20)
                        if not rest or rest.endswith(b"\n"):
                            break
                    self.reply_error(None, LINE_TOO_LONG, f"message line exceeds {limit} bytes; dropped")
                    continue
                line = line.rstrip(b"\r\n")
                if line.strip():
                    self.from_client(line)
        except (OSError, ValueError) as exc:
            log(30, f"stdin: {exc}")
        finally:
            self.on_stdin_closed()

    def from_client(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            self.reply_error(None, PARSE_ERROR, f"Parse error: {exc}")
            return
        if not isinstance(msg, dict):
            why = "JSON-RPC batches are not supported" if isinstance(msg, list) else "a message must be a JSON object"
            self.reply_error(None, INVALID_REQUEST, f"Invalid Request: {why}")
            return
        frame = line + b"\n"
        method = msg.get("method")
        key = None
        if isinstance(method, str) and "id" in msg:
            msg_id = msg["id"]
            if not (isinstance(msg_id, str) or (isinstance(msg_id, int) and not isinstance(msg_id, bool))):
                self.reply_error(None, INVALID_REQUEST, "Invalid Request: 'id' must be a string or an integer")
                return
            params = msg.get("params")
            ms = deadline_ms(self.cfg.timeout_ms, method, params)
            tool = params.get("name") if method == "tools/call" and isinstance(params, dict) else None
            key = id_key(msg_id)
            with self.lock:
                if key in self.pending:
                    self.reply_error(msg_id, INVALID_REQUEST, f"id {msg_id!r} is already used by a pending request")
                    return
                pend = Pending(msg_id, method, frame, None if ms is None else time.monotonic() + ms / 1000, tool)
                self.pending[key] = pend
                if method == "initialize":
                    self.init_msg = msg
                if pend.deadline is not None:
                    self._seq += 1
                    heapq.heappush(self._heap, (pend.deadline, self._seq, key, pend))
                    self._heap_cv.notify()
        elif isinstance(method, str):
            if method == "notifications/initialized":
                self.client_initialized = True
            elif method == "notifications/cancelled":
                params = msg.get("params")
                rid = params.get("requestId") if isinstance(params, dict) else None
                with self.lock:
                    pend = self.pending.get(id_key(rid))
                    if pend is not None and pend.link is None:
                        del self.pending[id_key(rid)]  # never sent: nothing to tell the broker
                        return
                    if pend is not None:
                        del self.pending[id_key(rid)]  # no reply is expected any more
        self.send_or_queue(key, frame)

    def send_or_queue(self, key: tuple | None, frame: bytes) -> None:
        with self.lock:
            link = self.link
            if link is None:
                self.backlog.append((key, frame))
                start = not self.connecting
                if start:
                    self.connecting = True
            else:
                pend = self.pending.get(key) if key is not None else None
                if pend is not None:
                    pend.link = link
        if link is None:
            if start:
                self.start_connect()
            return
        try:
            link.send(frame)
        except (OSError, ShimError) as exc:
            self.link_lost(link, f"send failed: {exc}")

    def on_stdin_closed(self) -> None:
        """The client closed stdin: let answers to pending requests arrive (bounded), then end."""
        self.stdin_done = True
        end = time.monotonic() + DRAIN_ON_EOF
        while time.monotonic() < end:
            with self.lock:
                if not self.pending:
                    break
            time.sleep(0.01)
        self.done.set()

    # ---- broker -> client ---------------------------------------------------------------------
    def link_loop(self, link: Link) -> None:
        reason = "the broker closed the connection"
        try:
            while True:
                frame = link.recv()
                if frame is None:
                    break
                self.from_broker(link, frame)
        except (OSError, ShimError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.link_lost(link, reason)

    def from_broker(self, link: Link, frame: bytes) -> None:
        try:
            msg = json.loads(frame)
        except ValueError:
            log(30, "broker sent malformed JSON; dropped")
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg:  # a notification (progress, log) or a request from the server: pass through
            self.write_out(frame + b"\n")
            return
        msg_id = msg.get("id")
        key = id_key(msg_id)
        with self.lock:
            if key in self.swallow:
                self.swallow.discard(key)
                if "error" in msg:
                    log(30, f"replayed initialize failed: {msg['error']}")
                return
            pend = self.pending.get(key)
            if pend is None or pend.link is not link:
                if msg_id is None:
                    pend = None  # an error about a frame the broker could not read: pass it on
                else:
                    log(20, f"late or unknown reply id {msg_id!r} dropped")
                    return
            else:
                del self.pending[key]
            add_notice = (
                link.degraded and not self.notice_sent and pend is not None and pend.method == "tools/call"
                and isinstance(msg.get("result"), dict) and isinstance(msg["result"].get("content"), list)
            )
            if add_notice:
                self.notice_sent = True
        if add_notice:
            msg["result"]["content"].append({"type": "text", "text": DEGRADED_NOTICE.format(reason=link.reason)})
            self.write_out(encode(msg))
        else:
            self.write_out(frame + b"\n")

    def link_lost(self, link: Link, reason: str) -> None:
        errors: list[Pending] = []
        with self.lock:
            if self.link is link:
                self.link = None
            elif self.flushing is link:
                self.flushing = None
            else:
                link.close()
                return
            for key, pend in list(self.pending.items()):
                if pend.link is not link:
                    continue
                if pend.method == "initialize":  # no effect on the palace: send it again on the next link
                    pend.link = None
                    self.backlog.insert(0, (key, pend.frame))
                else:
                    del self.pending[key]
                    errors.append(pend)
            self.swallow.clear()
            start = bool(self.backlog) and not self.connecting and not self.stdin_done
            if start:
                self.connecting = True
        link.close()
        what = "the memory engine (degraded mode)" if link.degraded else f"the broker ({link.endpoint})"
        log(30, f"lost the connection to {what}: {reason}")
        for pend in errors:
            self.reply_error(
                pend.msg_id,
                OUTCOME_UNKNOWN,
                f"connection to the broker was lost; outcome unknown; not retried ({reason})",
                {"outcome": "unknown", "method": pend.method, "tool": pend.tool},
            )
        if start:
            self.start_connect()

    # ---- deadlines ------------------------------------------------------------------------------
    def deadline_loop(self) -> None:
        while not self.done.is_set():
            expired: list[Pending] = []
            with self._heap_cv:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, key, pend = heapq.heappop(self._heap)
                    if self.pending.get(key) is pend:
                        del self.pending[key]
                        expired.append(pend)
                if not expired:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._heap_cv.wait(wait if wait is None else max(0.001, wait))
                    continue
            for pend in expired:
                self.expire(pend)

    def expire(self, pend: Pending) -> None:
        waited = self.cfg.timeout_ms / 1000
        if pend.link is None:
            with self.lock:
                reason = f" ({self.last_error})" if self.last_error else ""
            self.reply_error(
                pend.msg_id,
                DEADLINE_EXCEEDED,
                f"no broker connection within the request's deadline (MEMPALACE_MCP_TIMEOUT_MS={self.cfg.timeout_ms})"
                f"{reason}; the request was NOT sent",
                {"outcome": "not_executed"},
            )
            return
        self.reply_error(
            pend.msg_id,
            DEADLINE_EXCEEDED,
            f"no answer from the broker within the request's deadline (MEMPALACE_MCP_TIMEOUT_MS={self.cfg.timeout_ms}"
            f"{', plus the event_wait timeout' if pend.tool == EVENT_WAIT_TOOL else ''}, ~{waited:g}s); outcome unknown; "
            "a late answer will be dropped",
            {"outcome": "unknown"},
        )
        try:  # let the broker drop it if it is still queued
            pend.link.send(
                encode({"jsonrpc": JSONRPC, "method": "notifications/cancelled",
                        "params": {"requestId": pend.msg_id, "reason": "mp-shim deadline exceeded"}})
            )
        except (OSError, ShimError):
            pass

    # ---- connecting -----------------------------------------------------------------------------
    def start_connect(self) -> None:
        threading.Thread(target=self.connect_worker, name="connect", daemon=True).start()

    def dial(self) -> Link:
        cfg = self.cfg
        if cfg.broker_url is None and cfg.resolved_role() == "host" and not self._fast_failed:
            try:
                return fast_connect(cfg)
            except PalaceMismatch:
                raise
            except FileNotFoundError:
                self._fast_failed = "no broker.json"
            except (OSError, ShimError, ValueError) as exc:
                self._fast_failed = f"{type(exc).__name__}: {exc}"
                log(20, f"fast path failed ({self._fast_failed}); running discovery")
        elif cfg.broker_url is not None and cfg.broker_url.startswith("unix://"):
            from mp_ssh_bridge import endpoints  # stdlib only

            return endpoints.dial_checked(cfg, cfg.broker_url)
        from mp_ssh_bridge import discovery  # the slow path: settings, election, SSH, degraded mode

        fast_reason, self._fast_failed = self._fast_failed, ""
        return discovery.discover(cfg, fast_failure=fast_reason)

    def connect_worker(self) -> None:
        try:
            link = self.dial()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer to the agent
            if isinstance(exc, ShimError):
                err = exc
            else:
                err = ShimError(BROKER_UNREACHABLE, f"no broker reachable: {type(exc).__name__}: {exc}")
            self.connect_failed(err)
            return
        self.adopt(link)

    def connect_failed(self, err: ShimError) -> None:
        with self.lock:
            self.connecting = False
            self.last_error = err
            waiting = [self.pending.pop(k) for k, _ in self.backlog if k is not None and k in self.pending]
            self.backlog.clear()
        log(40, str(err))
        for pend in waiting:
            self.reply_error(pend.msg_id, err.code, f"{err}; the request was NOT sent", {"outcome": "not_executed"})

    def adopt(self, link: Link) -> None:
        """Replay initialize if the client already did it, flush the backlog, then go live."""
        self.generation += 1
        with self.lock:
            self.flushing = link  # link_lost() recognises it while we flush
            pending_init = any(
                k is not None and k in self.pending and self.pending[k].method == "initialize" for k, _ in self.backlog
            )
            replay: list[bytes] = []
            if self.init_msg is not None and not pending_init:
                rid = f"mp-shim/replay-initialize/{self.generation}"
                self.swallow.add(id_key(rid))
                replay.append(encode(dict(self.init_msg, id=rid)))
                if self.client_initialized:
                    replay.append(encode({"jsonrpc": JSONRPC, "method": "notifications/initialized"}))
        threading.Thread(target=self.link_loop, args=(link,), name=f"link-{self.generation}", daemon=True).start()
        if link.degraded:
            log(30, f"memory runs WITHOUT the broker (degraded mode): {link.reason}")
        else:
            log(20, f"connected to {link.endpoint} ({link.transport})")
        failure = ""
        try:
            for frame in replay:
                link.send(frame)
            while True:
                with self.lock:
                    if self.flushing is not link:
                        break  # lost while flushing; link_lost() has answered what was sent
                    if not self.backlog:
                        self.flushing = None
                        self.link = link
                        self.connecting = False
                        self.last_error = None
                        return
                    key, frame = self.backlog.pop(0)
                    if key is not None:
                        pend = self.pending.get(key)
                        if pend is None:
                            continue  # expired or cancelled while waiting
                        pend.link = link
                link.send(frame)
        except (OSError, ShimError) as exc:
            failure = f"send failed: {exc}"
        self.link_lost(link, failure or "connection lost while sending")
        with self.lock:
            self.connecting = False
            restart = bool(self.backlog) and not self.stdin_done
            if restart:
                self.connecting = True
        if restart:
            self.start_connect()

    # ---- run --------------------------------------------------------------------------------------
    def run(self) -> int:
        with self.lock:
            self.connecting = True
        self.start_connect()  # connect while the client is still starting
        threading.Thread(target=self.deadline_loop, name="deadlines", daemon=True).start()
        threading.Thread(target=self.stdin_loop, name="stdin", daemon=True).start()
        try:
            while not self.done.wait(1.0):
                pass
        finally:
            with self.lock:
                link, self.link = self.link, None
                self._heap_cv.notify_all()
            if link is not None:
                link.close()
        return 0


# --------------------------------------------------------------------------- command line
USAGE = """usage: mp-shim [--palace PATH] [--backend NAME] [--transport stdio] [--read-only] ...

MCP stdio server for MemPalace through the single-writer broker (a drop-in for
mempalace-mcp: its arguments are accepted; those that do not apply are ignored).

environment: MEMPALACE_PATH (state dir, default ~/.mempalace), MEMPALACE_BROKER
(endpoint URL: unix:///path, tcp://host:port, ssh://alias/path),
MEMPALACE_BROKER_TOKEN, MEMPALACE_MCP_TIMEOUT_MS (per-request deadline, default
60000, 0 = none), MP_BRIDGE_ENGINE (the real engine for degraded mode),
MP_BRIDGE_LOG_LEVEL (stderr logging, default WARNING)."""

_VALUE_FLAGS = ("--palace", "--backend", "--transport", "--host", "--port", "--tls-cert", "--tls-key")


def parse_args(argv: list[str]) -> dict:
    """mempalace-mcp's arguments; unknown ones are ignored with a warning (stderr)."""
    out: dict = {"palace": None, "ignored": [], "help": False, "version": False, "read_only": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            out["help"] = True
        elif arg == "--version":
            out["version"] = True
        elif arg == "--read-only":
            out["read_only"] = True
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if name == "--palace":
                out["palace"] = value or None
            else:
                out["ignored"].append(f"{name}={value}")
        else:
            out["ignored"].append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args["help"]:
        print(USAGE)
        return 0
    if args["version"]:
        from mp_ssh_bridge import __version__

        print(f"mp-shim {__version__}")
        return 0
    set_log_level(os.environ.get("MP_BRIDGE_LOG_LEVEL"))
    if os.environ.get(ENGINE_CHILD_ENV):
        log(50, "refusing to run: this mp-shim was started as the memory engine of another mp-shim (degraded "
                "mode); set MP_BRIDGE_ENGINE to the real mempalace-mcp, not to the shim")
        return 3
    for item in args["ignored"]:
        if item.startswith("--transport=") and item != "--transport=stdio":
            log(30, f"{item} ignored: mp-shim always speaks stdio")
        else:
            log(20, f"argument {item} ignored")
    try:
        cfg = fast_config(args["palace"])
    except NeedSettings as why:
        log(20, f"loading the settings model ({why})")
        from mp_ssh_bridge import discovery

        try:
            cfg = discovery.config_from_settings(args["palace"])
        except Exception as exc:  # noqa: BLE001 - invalid settings are the user's to fix
            log(50, f"invalid settings: {exc}")
            return 2
    cfg.read_only = cfg.read_only or args["read_only"]
    set_log_level(cfg.log_level or os.environ.get("MP_BRIDGE_LOG_LEVEL") or "WARNING")
    # Protocol only on the real stdout: keep it privately, send fd 1 (and sys.stdout) to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    in_file = open(0, "rb", buffering=65536, closefd=False)  # noqa: SIM115
    shim = Shim(cfg, out_fd, in_file)
    signal.signal(signal.SIGTERM, lambda *_: shim.done.set())
    try:
        return shim.run()
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            os.close(out_fd)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
