"""The container daemon's relay mode: one SSH connection to the host, one broker channel per local session.

Why: a container session that reaches the host broker on its own (`ssh.connect_container`) pays an SSH
connection (TCP, key exchange, authentication) and, without a fresh broker.json through the mount, a remote
`mempalace-broker --ensure` — about 680 ms from the shim's start to its first `broker/status`, against
~30 ms for a session on the host, which only opens the broker's UNIX socket. This relay pays the connection
once per container and keeps it (keepalive on): a session that connects to the relay's own UNIX socket gets
a fresh broker channel over it (one `direct-streamlocal` channel open: a round trip to the host).

Every session stays its own client of the host broker: the relay opens ONE channel per session and copies
bytes both ways without parsing them, so the broker's fairness, per-client bounds, cancellation and
`broker/status` per client work as they do for a direct session, and the shim does its own `broker/status`
handshake and palace identity check through it. The one exception: a session whose channel cannot be opened
gets one JSON-RPC error line answering its first request (`protocol.BROKER_UNREACHABLE`, or the
`SSHBridgeError`'s code, `data: {"outcome": "not_executed", "refuse": ...}`), then is closed. A host key or
login refusal is never answered any other way.

When the SSH connection drops (keepalive, sshd killed) every session's local socket is closed at once (the
shim reports its in-flight calls as outcome unknown and reconnects, re-initializing transparently); the
relay connects again on the next session, with a backoff between failed attempts. Its record (`paths.json`,
owner-only, atomic) says how it is (`mode: "relay"`, the SSH state, its sessions) for `mp-bridge status` and
`doctor`; it and the socket are removed at exit. Exit: no session for `idle_exit_minutes` (0 = never),
SIGTERM or SIGINT.

Run by the container daemon in relay mode (mp_ssh_bridge/containerd.py calls `serve`), or standalone:
`python -m mp_ssh_bridge.relay [--mempalace-path P] [--palace P]`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mp_ssh_bridge import __version__, config, endpoints, hostinfo, liveness, protocol, ssh, state
from mp_ssh_bridge.connection import Connection
from mp_ssh_bridge.election import open_lock, try_lock
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.links import SocketLink

if TYPE_CHECKING:
    from mp_ssh_bridge.settings import Settings

log = logging.getLogger("mp_ssh_bridge.relay")

CHUNK = 64 * 1024  # one read per side at a time: at most this much of a session in the relay's hands
RECHECK_S = 5.0  # while relaying without a way to the host because a broker may be alive: how often to look again
DRAIN_TIMEOUT_S = 60.0  # a side that takes no bytes for this long (a stuck reader) ends its session
BACKOFF_MIN_S = 0.5  # after a failed SSH connect, sessions get that error without a new attempt this long...
BACKOFF_MAX_S = 5.0  # ... doubling up to this
RECORD_MIN_GAP_S = 0.25  # the record is rewritten at most 4 times a second
REFUSE_LINGER_S = 0.5  # a refused session's unread input is drained this long before the close
CLOSE_BOUND_S = 3.0  # closing one side (a channel on a dead connection) waits at most this long
STOP_BOUND_S = 5.0  # at exit, tasks get this long to end after being cancelled


class Session:
    """One local client of the relay and its broker channel."""

    def __init__(self, sid: int, writer: asyncio.StreamWriter) -> None:
        self.id = sid
        self.since = time.time()
        self.writer = writer
        self.channel: Connection | None = None
        self.transport_detail: str | None = None
        self.end_reason = "client closed"

    def as_record(self) -> dict[str, Any]:
        return {"id": self.id, "since": self.since, "transport_detail": self.transport_detail}

    def abort(self, reason: str) -> None:
        """Close the local socket at once (no flush): the shim sees its connection end now."""
        self.end_reason = reason
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


class Relay:
    """One relay run: the listening socket, the shared SSH connection, the sessions, the record."""

    def __init__(self, settings: Settings, paths: state.StatePaths, conn: ssh.SSHConnection | None = None) -> None:
        self.settings = settings
        self.paths = paths
        self.socket_path = paths.socket()
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.exit_reason = ""
        self.tasks: set[asyncio.Task[Any]] = set()
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.idle_since = time.monotonic()
        self.server: asyncio.AbstractServer | None = None
        # the SSH connection
        self.conn: ssh.SSHConnection | None = None
        self.ssh_state = "down"
        self.ssh_since = time.time()
        self.connects = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.note: str | None = None  # appended to a refusal: why the daemon relays although the host is unreachable
        # With no SSH connection: True once the reason to relay is gone (containerd: no broker may be alive any more)
        self.recheck: Callable[[], bool] | None = None
        self._recheck_at = 0.0
        self.transport_detail: str | None = None
        self.host_endpoint: str | None = None
        self._connecting: asyncio.Task[ssh.SSHConnection] | None = None
        self._failure: ssh.SSHBridgeError | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN_S
        # what the first open learnt, reused by the next ones (no broker.json read, no --ensure)
        self.known_path: str | None = None
        self.known_detail: str | None = None
        self.tcp_url: str | None = None
        self._learning = asyncio.Lock()
        # the record
        self._dirty = asyncio.Event()
        self.beats = liveness.BeatSchedule(settings.heartbeat_interval)
        self.palace = _palace(settings)
        self.record_base = {
            "version": state.BROKER_JSON_VERSION,
            "mode": "relay",
            "pid": os.getpid(),
            "proc_start": hostinfo.proc_start(os.getpid()),
            "host": hostinfo.host_name(),
            "boot_id": hostinfo.boot_id(),
            "pid_ns": hostinfo.pid_namespace(),
            "endpoint": f"unix://{self.socket_path}",
            "endpoints": {"unix": f"unix://{self.socket_path}"},
            "palace": self.palace,
            "palace_id": state.read_palace_id(settings.paths),
            "state_dir": str(paths.root),
            "broker_version": __version__,
            "started": self.started,
            "started_at": self.started,
            "heartbeat_interval": settings.heartbeat_interval,
        }
        if conn is not None:
            self._adopt(conn)

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, ssh.SSHBridgeError):  # a failed connect is logged where it happens
                log.error("task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc)

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.exit_reason = reason
            self.stop_event.set()

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        try:
            sock = _bind(self.socket_path)
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.socket_path, exc)
            await self._close_conn()
            return 1
        self.server = await asyncio.start_unix_server(self._accepted, sock=sock)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        try:
            try:
                self._write_record()
            except OSError as exc:
                log.error("cannot write %s: %s", self.paths.json, exc)
                return 1
            log.info(
                "relay %s listening on %s for palace %s; SSH host %s (%s)",
                os.getpid(), self.socket_path, self.palace, self.settings.ssh_host, self.ssh_state,
            )
            self.spawn(self._record_loop(), name="record")
            await self.stop_event.wait()
        finally:
            log.info("stopping: %s", self.exit_reason or "error")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions.values()):
            session.abort("relay stopping")
        for task in list(self.tasks):
            task.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=STOP_BOUND_S)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_BOUND_S)
            except (asyncio.TimeoutError, OSError):
                pass
        if conn is not None:
            try:
                await asyncio.wait_for(conn.wait_closed(), CLOSE_BOUND_S)
            except Exception:  # noqa: BLE001 - a dead or hung host: close() was sent, waiting is best effort
                pass
        self._remove_state()

    def _remove_state(self) -> None:
        current = state.read_json_object(self.paths.json)
        if current is not None and current.get("pid") == os.getpid():
            _unlink(self.paths.json)
        _unlink(self.socket_path)

    # ------------------------------------------------------------------ the record
    def record(self) -> dict[str, Any]:
        return {
            **self.record_base,
            "heartbeat": time.time(),
            "ssh": {
                "host": self.settings.ssh_host,
                "state": self.ssh_state,
                "since": self.ssh_since,
                "connects": self.connects,
                "reconnects": self.reconnects,
                "last_error": self.last_error,
                "transport_detail": self.transport_detail,
                "host_endpoint": self.host_endpoint,
            },
            "sessions": [s.as_record() for s in self.sessions.values()],
            "loop": "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio",
        }

    def _write_record(self) -> None:
        state.write_json_atomic(self.paths.json, self.record())
        self.beats.beaten()

    def changed(self) -> None:
        self._dirty.set()

    async def _record_loop(self) -> None:
        """Rewrite the record when something changed (at most 1/RECORD_MIN_GAP_S a second) or a beat is due;
        end the relay after `idle_exit_minutes` without a session."""
        idle_limit = self.settings.idle_exit_minutes * 60
        tick = min(self.beats.tick, idle_limit / 4) if idle_limit > 0 else self.beats.tick
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), tick)
            except asyncio.TimeoutError:
                pass
            if self._dirty.is_set() or self.beats.due():
                self._dirty.clear()
                try:
                    self._write_record()
                except OSError as exc:
                    log.error("cannot write %s: %s", self.paths.json, exc)
                await asyncio.sleep(RECORD_MIN_GAP_S)
            if idle_limit > 0 and not self.sessions and time.monotonic() - self.idle_since >= idle_limit:
                self.request_stop(f"idle for {self.settings.idle_exit_minutes:g} min without sessions")
                return
            if self.recheck is not None and self.conn is None and time.monotonic() >= self._recheck_at:
                self._recheck_at = time.monotonic() + RECHECK_S
                if await asyncio.to_thread(self.recheck):
                    # Relaying only because a broker might be alive, with no way to it: once it is gone, exit so the
                    # next session elects a daemon that decides again (it may own the palace now).
                    self.request_stop("the broker that kept this container from owning the palace is gone")
                    return

    # ------------------------------------------------------------------ the SSH connection
    def _adopt(self, conn: ssh.SSHConnection) -> None:
        self.conn = conn
        if self.connects:
            self.reconnects += 1
        self.connects += 1
        self._set_ssh("connected", None)
        self._failure, self._backoff, self._retry_at = None, BACKOFF_MIN_S, 0.0
        self.spawn(self._watch(conn), name="ssh-watch")

    def _set_ssh(self, what: str, error: str | None) -> None:
        if what != self.ssh_state:
            self.ssh_state, self.ssh_since = what, time.time()
        if error is not None:
            self.last_error = error
        self.changed()

    async def _watch(self, conn: ssh.SSHConnection) -> None:
        """Until the connection ends (the relay's exit cancels this); then every session ends with it."""
        await conn.wait_closed()
        if self.conn is not conn or self.stop_event.is_set():
            return
        self.conn = None
        self._set_ssh("down", f"SSH connection to {self.settings.ssh_host} lost")
        sessions = list(self.sessions.values())
        log.warning(
            "SSH connection to %s lost; closing %d session(s); reconnecting on the next session",
            self.settings.ssh_host, len(sessions),
        )
        for session in sessions:
            session.abort("SSH connection lost")

    async def connection(self) -> ssh.SSHConnection:
        """The shared SSH connection: the live one, the attempt under way, or a new attempt. Within the backoff
        after a failed attempt: a refusal (host key, login, set-up) is answered at once; otherwise the session
        waits for the backoff's end (at most BACKOFF_MAX_S) and shares the next attempt, so a host that came back
        a moment ago is found, and many sessions still make one attempt. Raises SSHBridgeError."""
        if self.conn is not None and not self.conn.is_closed():
            return self.conn
        if self._connecting is None and self._failure is not None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                if self._failure.refuse:
                    raise self._failure
                await asyncio.sleep(min(wait, BACKOFF_MAX_S))
                if self.conn is not None and not self.conn.is_closed():
                    return self.conn
        if self._connecting is None:
            self._connecting = self.spawn(self._connect(), name="ssh-connect")
        bound = self.settings.connect_timeout + 5  # ssh.connect bounds itself at connect_timeout + 2
        try:
            conn: ssh.SSHConnection = await asyncio.wait_for(asyncio.shield(self._connecting), bound)
        except asyncio.TimeoutError as exc:
            raise ssh.SSHBridgeError(f"SSH connection to {self.settings.ssh_host} did not complete within {bound:g}s") from exc
        return conn

    async def _connect(self) -> ssh.SSHConnection:
        self._set_ssh("connecting", None)
        t0 = time.monotonic()
        try:
            try:
                conn = await ssh.connect(self.settings)
            except ssh.SSHBridgeError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else asyncssh raises is a failed connect too
                raise ssh.SSHBridgeError(f"SSH connection to {self.settings.ssh_host} failed: {exc}") from exc
        except ssh.SSHBridgeError as exc:
            self._failure = exc
            self._retry_at = time.monotonic() + self._backoff
            log.warning("SSH connection to %s failed (next attempt in %.1fs at the earliest): %s",
                        self.settings.ssh_host, self._backoff, exc)
            self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)
            self._set_ssh("down", str(exc))
            raise
        finally:
            self._connecting = None
        log.info("SSH connected to %s in %.3fs%s", self.settings.ssh_host, time.monotonic() - t0,
                 f" (reconnect {self.reconnects + 1})" if self.connects else "")
        self._adopt(conn)
        return conn

    async def _close_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), CLOSE_BOUND_S)
            except Exception:  # noqa: BLE001 - best effort: close() was sent
                pass

    # ------------------------------------------------------------------ channels
    async def open_channel(self) -> Connection:
        """A broker channel for one session. Raises SSHBridgeError."""
        s = self.settings
        bound = s.connect_timeout + s.ensure_timeout + 30  # what discovery gives connect_container
        try:
            return await asyncio.wait_for(self._open_channel(), bound)
        except asyncio.TimeoutError as exc:
            raise ssh.SSHBridgeError(f"opening a channel to the host broker did not finish within {bound:g}s") from exc

    async def _open_channel(self) -> Connection:
        if self.tcp_url is not None and ssh.tcp_from_broker_json(self.settings) != self.tcp_url:
            # The broker moved (a restart on another port): its token must not go to whatever listens there now.
            log.info("broker.json no longer advertises TCP %s; trying SSH again", self.tcp_url)
            self.tcp_url = None
        if self.tcp_url is not None:
            try:
                return await self._dial_tcp(self.tcp_url, "TCP + token, as the first session found")
            except ssh.SSHBridgeError as exc:
                log.info("TCP %s no longer works (%s); trying SSH again", self.tcp_url, exc)
                self.tcp_url = None
        conn = await self.connection()
        if self.known_path is None:
            async with self._learning:  # the first sessions: one of them learns the way, the others reuse it
                return await self._open_over(conn)
        return await self._open_over(conn)

    async def _open_over(self, conn: ssh.SSHConnection) -> Connection:
        try:
            channel = await ssh.open_broker_channel(
                self.settings, conn, known_path=self.known_path, known_detail=self.known_detail
            )
        except ssh.TcpFallback as fallback:
            channel = await self._dial_tcp(fallback.url, str(fallback))
            self.tcp_url = fallback.url
        except ssh.SSHBridgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - asyncssh's errors on a connection that just died, and kin
            raise ssh.SSHBridgeError(f"cannot open a channel to the host broker over SSH: {type(exc).__name__}: {exc}") from exc
        else:
            path = channel.info.get("host_socket")
            if isinstance(path, str):
                self.known_path, self.known_detail = path, channel.info.get("transport_detail")
        self.transport_detail = channel.info.get("transport_detail")
        self.host_endpoint = channel.endpoint
        self.changed()
        return channel

    async def _dial_tcp(self, url: str, why: str) -> Connection:
        """TCP + token, authenticated by the one TCP opener (`endpoints.dial`), as an asyncio stream."""
        s = self.settings
        cfg = config.Config()
        cfg.state_dir = str(s.paths.root)  # broker.json through the mount holds the token
        cfg.broker_token = s.broker_token or None
        cfg.connect_timeout = s.connect_timeout
        cfg.max_line_bytes = s.max_line_bytes
        try:
            link = await asyncio.to_thread(endpoints.dial, cfg, url)  # bounded by cfg.connect_timeout (connect, auth)
        except (ShimError, OSError) as exc:
            code = exc.code if isinstance(exc, ShimError) else protocol.BROKER_UNREACHABLE
            raise ssh.SSHBridgeError(f"{why}; and TCP {url}: {exc}", code) from exc
        if not isinstance(link, SocketLink):
            link.close()
            raise ssh.SSHBridgeError(f"{why}; and TCP {url} gave no socket")
        reader, writer = await asyncio.open_connection(sock=link.sock, limit=CHUNK)
        return Connection(reader, writer, transport="tcp", endpoint=url, max_line_bytes=s.max_line_bytes,
                          info={"transport_detail": "tcp"})

    # ------------------------------------------------------------------ sessions
    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid = next(self._ids)
        if self.stop_event.is_set():
            writer.transport.abort()
            return
        if len(self.sessions) >= self.settings.max_connections:
            log.warning("session %d refused: max_connections = %d reached", sid, self.settings.max_connections)
            self.spawn(self._refuse(reader, writer, _limit_error(self.settings.max_connections)), name=f"refuse-{sid}")
            return
        session = Session(sid, writer)
        self.sessions[sid] = session
        self.changed()
        self.spawn(self._session(session, reader, writer), name=f"session-{sid}")

    async def _session(self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        try:
            try:
                channel = await self.open_channel()
            except ssh.SSHBridgeError as exc:
                session.end_reason = "refused"
                log.warning("session %d: no channel to the host broker: %s", session.id, exc)
                await self._refuse(reader, writer, _channel_error(None, exc, self.note), first_line=True)
                return
            session.channel = channel
            session.transport_detail = channel.info.get("transport_detail")
            self.changed()
            log.info("session %d open: %s to %s in %.3fs (via %s)", session.id, session.transport_detail,
                     channel.endpoint, time.monotonic() - t0, channel.info.get("via", "tcp"))
            await self._pipe(session, reader, writer, channel)
        finally:
            if not writer.is_closing():  # an orderly end: what was written to the session is flushed first
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), CLOSE_BOUND_S)
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - a client that vanished
                    session.abort(session.end_reason)
            if session.channel is not None:
                try:
                    await asyncio.wait_for(session.channel.aclose(), CLOSE_BOUND_S)
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - a channel on a dead connection
                    pass
            self.sessions.pop(session.id, None)
            if not self.sessions:
                self.idle_since = time.monotonic()
            self.changed()
            log.info("session %d closed after %.1fs (%s)", session.id, time.monotonic() - t0, session.end_reason)

    async def _pipe(self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    channel: Connection) -> None:
        """Bytes both ways, one chunk in hand per direction; the first side to end ends both."""
        up = self.spawn(_copy(reader, channel.writer), name=f"session-{session.id}-up")
        down = self.spawn(_copy(channel.reader, writer), name=f"session-{session.id}-down")
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if session.end_reason == "client closed":  # not aborted meanwhile (SSH lost, relay stopping)
                first = up if up in done else down
                why = first.result() if not first.cancelled() else ""
                session.end_reason = ("client closed" if first is up else "broker side closed") + (f": {why}" if why else "")
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.wait({up, down}, timeout=CLOSE_BOUND_S)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: dict[str, Any],
                      *, first_line: bool = False) -> None:
        """One JSON-RPC error line, then close. With `first_line`, it answers the session's first request (its id;
        read within preauth_timeout, at most max_line_bytes); the rest of its input is drained, briefly, so the
        close does not turn into a reset that loses the line."""
        s = self.settings
        try:
            if first_line:
                line = await _first_line(reader, s.preauth_timeout, s.max_line_bytes)
                message = dict(message, id=_request_id(line))
            writer.write(protocol.encode(message))
            await asyncio.wait_for(writer.drain(), CLOSE_BOUND_S)
            if writer.can_write_eof():
                writer.write_eof()
            deadline = time.monotonic() + REFUSE_LINGER_S
            while (left := deadline - time.monotonic()) > 0:
                if not await asyncio.wait_for(reader.read(CHUNK), left):
                    break
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.transport.abort()


# ---------------------------------------------------------------------- helpers
async def _copy(src: Any, dst: Any) -> str:
    """src → dst until src ends; each write waits (bounded) for dst to take it. Why it ended ("" at EOF)."""
    try:
        while True:
            chunk = await src.read(CHUNK)
            if not chunk:
                return ""
            dst.write(chunk)
            if _buffered(dst):  # most writes go straight out: no timer, no task per chunk (it costs every call)
                await asyncio.wait_for(dst.drain(), DRAIN_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"a side took no bytes for {DRAIN_TIMEOUT_S:g}s"
    except Exception as exc:  # noqa: BLE001 - a reset socket, asyncssh's ConnectionLost / BrokenPipe: an end
        return f"{type(exc).__name__}: {exc}"


def _buffered(writer: Any) -> int:
    """Bytes `writer` still holds (an asyncio StreamWriter's transport, an asyncssh SSHWriter's channel); when it
    cannot tell, assume some (then `drain` decides)."""
    holder = getattr(writer, "transport", None) or getattr(writer, "channel", None)
    try:
        return int(holder.get_write_buffer_size()) if holder is not None else 1
    except Exception:  # noqa: BLE001 - a closed transport: let drain() say so
        return 1


async def _first_line(reader: asyncio.StreamReader, timeout: float, limit: int) -> bytes | None:
    """The first line a session sends (without its newline), or None: none within `timeout`, EOF, or more than
    `limit` bytes without a newline."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            return bytes(buf[:nl])
        if len(buf) > limit:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            chunk = await asyncio.wait_for(reader.read(CHUNK), left)
        except (asyncio.TimeoutError, OSError):
            return None
        if not chunk:
            return bytes(buf) or None
        buf += chunk


def _request_id(line: bytes | None) -> Any:
    """The id to answer the request in `line` with (`protocol.reply_id`): null when there is none to use."""
    if not line:
        return None
    try:
        return protocol.reply_id(protocol.decode(line))
    except ValueError:  # not one JSON value in UTF-8: JSON-RPC's answer goes out with id null
        return None


def _channel_error(msg_id: Any, exc: ssh.SSHBridgeError, note: str | None = None) -> dict[str, Any]:
    """A session's answer when no channel to the host broker opened; `note`: why the daemon relays at all (a broker
    that may be alive beside an unreachable host), so the agent is told that too."""
    text = str(exc) + (f"; {note}" if note else "")
    return protocol.error(msg_id, exc.code, text, {"outcome": "not_executed", "refuse": bool(exc.refuse)})


def _limit_error(value: int) -> dict[str, Any]:
    """-32068 for one session over `max_connections`, worded as the broker words it (broker/bounds.limit_error)."""
    return protocol.error(
        None,
        protocol.LIMIT_REACHED,
        f"too many connections; this one is closed: the relay's limit max_connections = {value} was reached "
        f"(setting max_connections, env {config.env_name('max_connections')}); request NOT executed",
        {"outcome": "not_executed", "limit": "max_connections", "value": value},
    )


def _palace(settings: Settings) -> str | None:
    try:
        return str(settings.memory.palace)
    except Exception as exc:  # noqa: BLE001 - the record names what it can; the relay works without it
        log.warning("cannot resolve the palace path: %s", exc)
        return None


def _bind(path: Path) -> socket.socket:
    """A listening UNIX socket at `path`, owner-only. A socket file already there is removed only when nobody
    answers on it (ECONNREFUSED: its listener is gone); one that answers is a live relay: OSError(EADDRINUSE)."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(errno.EADDRINUSE, f"{path} exists and cannot be probed ({exc}); not removing it") from exc
        else:
            raise OSError(errno.EADDRINUSE, f"another process listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # the socket is born 0600 (the directory is 0700 anyway)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


# ---------------------------------------------------------------------- entry points
async def serve(
    settings: Settings, paths: state.StatePaths, lock_fd: int | None, conn: ssh.SSHConnection | None = None,
    note: str | None = None, recheck: Callable[[], bool] | None = None,
) -> int:
    """Run the relay until idle exit or SIGTERM/SIGINT; returns the process exit code.

    `paths` is `settings.paths.daemon_paths()`; `lock_fd` an fd already holding an exclusive flock on
    `paths.lock` (None: taken here, non-blocking; exit 1 when held); `conn` an SSH connection the caller already
    made (the relay owns it from now on), or None to connect on the first session.
    """
    asyncssh_log = logging.getLogger("asyncssh")
    if asyncssh_log.getEffectiveLevel() < logging.WARNING:  # it logs every channel open and close at INFO
        asyncssh_log.setLevel(logging.WARNING)
    own_lock = lock_fd is None
    try:
        if paths.own.parent == state.runtime_dir():
            state.ensure_private_dir(paths.own.parent)  # /tmp/mp-bridge-<uid>: 0700 too, as its other users expect
        state.ensure_private_dir(paths.own)
        if lock_fd is None:
            lock_fd = open_lock(paths)
            if not try_lock(lock_fd):
                holder = state.read_json_object(paths.json) or {}
                log.error("another container daemon (pid %s) holds %s: not starting a second relay",
                          holder.get("pid", "?"), paths.lock)
                os.close(lock_fd)
                lock_fd = None
                if conn is not None:
                    conn.close()
                return 1
        else:
            os.set_inheritable(lock_fd, False)
    except (OSError, state.UnsafeDirectory) as exc:
        log.error("cannot take %s: %s", paths.lock, exc)
        if conn is not None:
            conn.close()
        return 1
    try:
        relay = Relay(settings, paths, conn)
        relay.note, relay.recheck = note, recheck
        if note:
            relay.last_error = note  # status and doctor say why from the start, not only after a session's retry
        return await relay.run()
    finally:
        if own_lock and lock_fd is not None:
            os.close(lock_fd)  # releases the flock, after the record and the socket are gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mp_ssh_bridge.relay",
        description="The container daemon's relay mode, standalone: one SSH connection to the host broker for "
        "every session that connects to its socket.",
    )
    parser.add_argument("--mempalace-path", help="state directory (env MEMPALACE_PATH)")
    parser.add_argument("--palace", help="palace path (as mp-shim --palace)")
    args = parser.parse_args(argv)
    from mp_ssh_bridge.settings import load

    try:
        settings = load(mempalace_path=args.mempalace_path, palace=args.palace)
    except ValueError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr, level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    return asyncio.run(serve(settings, settings.paths.daemon_paths(), None))


if __name__ == "__main__":
    sys.exit(main())
