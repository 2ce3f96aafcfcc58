"""Listeners and per-connection framing.

Every client gets its own read loop: malformed JSON earns that client a
-32700, an oversized line a -32063 and a closed connection, a TCP client
without the token a -32064 — and no other client notices. The UNIX socket
is created owner-only (0600) inside a directory nobody else can write.

Every connection is bounded (broker/bounds.py, docs/PROTOCOL.md "Bounds"):
connections in all and per peer, what a TCP peer may send and how long it may
take before it authenticates (its first line is read with the small
`preauth_max_bytes` cap, never the connection's 16 MiB one), and what the
broker reads ahead: lines are framed here from small reads, and a client whose
replies pile up unread (over half its outbox cap) is not read from until they
drain. Connections are accepted by broker/accept.py's loop, which keeps
descriptors in reserve for the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mp_ssh_bridge import protocol, state
from mp_ssh_bridge_broker import accept
from mp_ssh_bridge_broker.accept import Acceptor, FdBudget, RefusalLog, refuse
from mp_ssh_bridge_broker.bounds import Bounds, ConnectionCount, limit_error, peer_key
from mp_ssh_bridge_broker.mux import ClientSession, Mux
from mp_ssh_bridge_broker.tasks import Tasks

log = logging.getLogger("broker.server")

READ_CHUNK = 64 * 1024  # one read from a client; the StreamReader holds at most twice this before pausing
BACKLOG = 128
OUTBOX_STALL_S = 30.0  # a client paused for unread replies that does not read them down this long is disconnected


class Server:
    """The broker's listeners, all feeding one Mux."""

    def __init__(self, mux: Mux, max_line_bytes: int, auth_timeout: float | None = None,
                 bounds: Bounds | None = None) -> None:
        self.mux = mux
        self.max_line_bytes = max_line_bytes
        self.bounds = bounds or Bounds.from_settings(mux.settings)
        if auth_timeout is not None:
            self.bounds = replace(self.bounds, preauth_timeout=auth_timeout)
        self.auth_timeout = self.bounds.preauth_timeout
        self.connections = ConnectionCount(self.bounds)
        self._budget = FdBudget(self.bounds.fd_reserve)
        self._over_connections = RefusalLog()
        self._listeners: list[socket.socket] = []
        self._acceptors = Tasks("accept")
        self._connections = Tasks("server")  # every connection handler
        self._unattached: set[asyncio.Task[Any]] = set()  # ... of which not yet handed to the Mux (TCP auth)

    async def start_unix(self, path: Path) -> None:
        state.ensure_private_dir(path.parent)
        clear_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listen(sock, None, f"unix:{path}")
        log.info("listening on unix:%s", path)

    async def start_tcp(self, host: str, port: int, token: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        bound: list[tuple[str, int]] = []
        for family, kind, proto, _, addr in dict.fromkeys(infos):  # the same as asyncio.start_server binds
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
            except OSError:
                sock.close()
                for other in self._listeners[len(self._listeners) - len(bound):]:
                    other.close()
                raise
            name = sock.getsockname()
            bound.append((name[0], name[1]))
            self._listen(sock, token, f"tcp:{name[0]}:{name[1]}")
        log.info("listening on tcp:%s:%s (token required)", bound[0][0], bound[0][1])
        return bound[0]

    def _listen(self, sock: socket.socket, token: str | None, name: str) -> None:
        sock.listen(BACKLOG)
        self._listeners.append(sock)
        acceptor = Acceptor(sock, lambda conn: self._connected(conn, token), self._budget, name)
        self._acceptors.spawn(acceptor.run(), name=f"accept-{name}")

    def _connected(self, conn: socket.socket, token: str | None) -> None:
        self._connections.spawn(self._accept(conn, token), name=f"connection-{conn.fileno()}")

    async def close(self) -> None:
        """Stop listening, and drop connections still authenticating.

        Connections already attached to the Mux are left open on purpose: the
        Mux's shutdown still owes them answers (queued work "not executed", the
        running request's reply) and then closes them, which ends their handlers
        (`close_connections` reaps any that linger). A connection still in its
        TCP handshake owns nothing, and would otherwise hang on for auth_timeout.
        """
        await self._acceptors.cancel_all(1.0)
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        for task in list(self._unattached):
            task.cancel()

    async def close_connections(self, timeout: float = 2.0) -> None:
        """After Mux.shutdown: wait (bounded) for the connection handlers to end, then cancel the rest."""
        pending = self._connections.pending()
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await self._connections.cancel_all(timeout)

    async def _accept(self, conn: socket.socket, token: str | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._unattached.add(task)
        key = peer_key(conn, _peername(conn))
        over = self.connections.admit(key)
        if over is not None:
            self._unattached.discard(task)
            self._over_connections.refuse(f"connection limit {over[0]} = {over[1]} reached (peer {key})")
            await refuse(conn, limit_error(None, *over, "too many connections; this one is closed"))
            return
        try:
            reader, writer = await _streams(conn)
            await self._serve(reader, writer, token)
        except asyncio.CancelledError:
            pass  # close(): a connection still authenticating ends here, quietly
        finally:
            self.connections.release(key)
            self._unattached.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str | None) -> None:
        peer = _peer_name(writer)
        if not self.mux.accepting:
            writer.close()
            return
        session = ClientSession(peer, writer, outbox_max=self.bounds.max_client_outbox_bytes)
        frames = protocol.FrameBuffer(self.max_line_bytes)
        if token is not None:
            session.authenticated = False
            frames.limit = self.bounds.preauth_max_bytes  # what an unknown peer may make us hold
            try:
                authenticated = await self._authenticate(session, reader, frames, token)
            except asyncio.CancelledError:  # close(): drop the half-open connection, writer task included
                session.abort()
                await session.wait_closed(0.5)
                raise
            if not authenticated:  # the refusal is flushed, then our side half-closed (ClientSession.close)
                await session.wait_closed()
                await _discard(reader, accept.LINGER_S)  # so the peer's unread bytes do not reset the line away
                writer.close()
                return
            frames.limit = self.max_line_bytes
        self.mux.attach(session)
        self._unattached.discard(asyncio.current_task())
        too_long = False
        try:
            too_long = await self._read_loop(session, reader, frames)
        finally:
            self.mux.detach(session)
            await session.wait_closed()
        if too_long:  # the -32063 is flushed and our side half-closed: drop the rest of that line, or the
            await _discard(reader, accept.LINGER_S)  # close would turn into a reset that loses the error
            writer.close()

    async def _read_loop(self, session: ClientSession, reader: asyncio.StreamReader,
                         frames: protocol.FrameBuffer) -> bool:
        """Read and hand on requests until the client leaves; True when it ended on a line over the cap."""
        while not session.closed:
            if session.backlogged() and not await session.wait_drained(OUTBOX_STALL_S):
                log.warning("client %s read none of its %d bytes of replies in %.0fs; disconnecting it",
                            session.id, session.outbox_bytes, OUTBOX_STALL_S)
                session.abort()
                break
            try:
                line = await _next_frame(reader, frames)
            except protocol.LineTooLong as exc:
                session.send(protocol.error(None, protocol.LINE_TOO_LONG, f"{exc}; closing this connection"))
                session.close(half=True)
                log.warning("client %s sent a line over %d bytes; closed", session.id, self.max_line_bytes)
                return True
            except (ConnectionError, OSError):
                break
            if line is None:
                break
            if not line.strip():
                continue
            try:
                msg = protocol.decode(line)
            except ValueError as exc:
                session.send(protocol.error(None, protocol.PARSE_ERROR, f"Parse error: {exc}"))
                continue
            session.line_bytes = len(line)
            self.mux.handle(session, msg)
            await asyncio.sleep(0)  # one line at a time: a client's pipelined burst never holds the loop
        return False

    async def _authenticate(self, session: ClientSession, reader: asyncio.StreamReader,
                            frames: protocol.FrameBuffer, token: str) -> bool:
        """The first TCP message must be broker/auth with the token (constant-time compare), within the bounds."""
        refusal: dict[str, Any] | None = None
        line: bytes | None = None
        try:
            line = await asyncio.wait_for(_next_frame(reader, frames), self.bounds.preauth_timeout)
        except asyncio.TimeoutError:
            refusal = limit_error(None, "preauth_timeout", self.bounds.preauth_timeout,
                                  "unauthorized: no broker/auth in time; closing this connection")
        except protocol.LineTooLong:
            refusal = limit_error(None, "preauth_max_bytes", self.bounds.preauth_max_bytes,
                                  "unauthorized: first message too long; closing this connection")
        except (ConnectionError, OSError):
            pass
        msg: Any = None
        if line:
            try:
                msg = protocol.decode(line)
            except ValueError:
                msg = None
        msg_id = msg.get("id") if isinstance(msg, dict) and protocol.valid_id(msg.get("id")) else None
        given = None
        if isinstance(msg, dict) and msg.get("method") == "broker/auth" and isinstance(msg.get("params"), dict):
            given = msg["params"].get("token")
        if isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode()):
            session.authenticated = True
            session.send(protocol.result(msg_id, {"ok": True}))
            return True
        log.warning("refused TCP client %s: %s", session.peer,
                    refusal["error"]["data"]["limit"] if refusal else "bad or missing token")
        session.send(refusal or protocol.error(
            msg_id,
            protocol.UNAUTHORIZED,
            "unauthorized: the first message on TCP must be broker/auth with the token from broker.json",
        ))
        session.close(half=True)
        return False


async def _next_frame(reader: asyncio.StreamReader, frames: protocol.FrameBuffer) -> bytes | None:
    """The next line from small reads (the FrameBuffer's limit applies); None at EOF."""
    while True:
        frame = frames.next_frame()
        if frame is not None:
            return frame
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            return frames.rest()
        frames.feed(chunk)


async def _discard(reader: asyncio.StreamReader, seconds: float) -> None:
    """Read and drop what a refused peer still sends, until it closes or `seconds` pass (one chunk held at a time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while (left := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(reader.read(READ_CHUNK), left):
                return
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


async def _streams(conn: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over an accepted socket, with a read-ahead of at most 2 x READ_CHUNK."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    proto = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: proto, conn)
    except BaseException:
        conn.close()
        raise
    return reader, asyncio.StreamWriter(transport, proto, reader, loop)


def _peername(conn: socket.socket) -> Any:
    try:
        return conn.getpeername()
    except OSError:
        return None


def clear_socket_path(path: Path) -> None:
    """Make room for our socket: a dead broker's socket is removed, anything else is moved aside, never deleted.

    We hold broker.lock, and lifecycle checked that broker.json names no live broker on another machine
    (liveness.live_foreign_owner): a socket here is a dead broker's. A regular file or a directory is not
    ours to delete (someone's data, a mistaken bind mount): it is renamed to `<name>.foreign-<time>` beside
    it, and the log says where it went.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        path.unlink()
        return
    aside = path.with_name(f"{path.name}.foreign-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    path.rename(aside)
    log.warning("%s was not a socket (%s): moved it aside to %s, not deleted", path,
                "a directory" if stat.S_ISDIR(mode) else "a file" if stat.S_ISREG(mode) else "another kind of file",
                aside)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return "unix"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp:{peer[0]}:{peer[1]}"
    return str(peer)
