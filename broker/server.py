"""Listeners and per-connection framing.

Every client gets its own read loop: malformed JSON earns that client a
-32700, an oversized line a -32063 and a closed connection, a TCP client
without the token a -32064 — and no other client notices. The UNIX socket
is created owner-only (0600) inside a directory nobody else can write.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
from pathlib import Path
from typing import Any

from mp_ssh_bridge import protocol, state
from mp_ssh_bridge_broker.mux import ClientSession, Mux
from mp_ssh_bridge_broker.tasks import Tasks

log = logging.getLogger("broker.server")


class Server:
    """The broker's listeners, all feeding one Mux."""

    def __init__(self, mux: Mux, max_line_bytes: int, auth_timeout: float = 5.0) -> None:
        self.mux = mux
        self.max_line_bytes = max_line_bytes
        self.auth_timeout = auth_timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._connections = Tasks("server")  # every connection handler asyncio started for us
        self._unattached: set[asyncio.Task[Any]] = set()  # ... of which not yet handed to the Mux (TCP auth)

    async def start_unix(self, path: Path) -> None:
        state.ensure_private_dir(path.parent)
        try:
            # We hold broker.lock, and lifecycle checked that broker.json names no live broker on another
            # machine (liveness.live_foreign_owner): any socket here is a dead broker's.
            path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            srv = await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, None), path=str(path), limit=self.max_line_bytes + 2
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append(srv)
        log.info("listening on unix:%s", path)

    async def start_tcp(self, host: str, port: int, token: str) -> tuple[str, int]:
        srv = await asyncio.start_server(
            lambda r, w: self._accept(r, w, token), host=host, port=port, limit=self.max_line_bytes + 2
        )
        self._servers.append(srv)
        sockname = srv.sockets[0].getsockname()
        log.info("listening on tcp:%s:%s (token required)", sockname[0], sockname[1])
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening, and drop connections still authenticating.

        Connections already attached to the Mux are left open on purpose: the
        Mux's shutdown still owes them answers (queued work "not executed", the
        running request's reply) and then closes them, which ends their handlers
        (`close_connections` reaps any that linger). A connection still in its
        TCP handshake owns nothing, and would otherwise hang on for auth_timeout.
        """
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - wait_closed waits for clients
                pass
        self._servers.clear()
        for task in list(self._unattached):
            task.cancel()

    async def close_connections(self, timeout: float = 2.0) -> None:
        """After Mux.shutdown: wait (bounded) for the connection handlers to end, then cancel the rest."""
        pending = self._connections.pending()
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await self._connections.cancel_all(timeout)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.track(task)
        self._unattached.add(task)
        try:
            await self._serve(reader, writer, token)
        except asyncio.CancelledError:
            # End as done, not cancelled: Python 3.11's start_server calls task.exception()
            # on its handler task and would log a cancelled one as an error.
            pass
        finally:
            self._unattached.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str | None) -> None:
        peer = _peer_name(writer)
        if not self.mux.accepting:
            writer.close()
            return
        session = ClientSession(peer, writer)
        if token is not None:
            session.authenticated = False
            try:
                authenticated = await self._authenticate(session, reader, token)
            except asyncio.CancelledError:  # close(): drop the half-open connection, writer task included
                session.close()
                await session.wait_closed(0.5)
                raise
            if not authenticated:
                await session.wait_closed()
                return
        self.mux.attach(session)
        self._unattached.discard(asyncio.current_task())
        try:
            while not session.closed:
                try:
                    line = await protocol.read_frame(reader, self.max_line_bytes)
                except protocol.LineTooLong as exc:
                    session.send(protocol.error(None, protocol.LINE_TOO_LONG, f"{exc}; closing this connection"))
                    log.warning("client %s sent a line over %d bytes; closed", session.id, self.max_line_bytes)
                    break
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
                self.mux.handle(session, msg)
        finally:
            self.mux.detach(session)
            await session.wait_closed()

    async def _authenticate(self, session: ClientSession, reader: asyncio.StreamReader, token: str) -> bool:
        """The first TCP message must be broker/auth with the token (constant-time compare)."""
        try:
            line = await asyncio.wait_for(protocol.read_frame(reader, 64 * 1024), self.auth_timeout)
        except (asyncio.TimeoutError, protocol.LineTooLong, ConnectionError, OSError):
            line = None
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
        if isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode()):
            session.authenticated = True
            session.send(protocol.result(msg_id, {"ok": True}))
            return True
        log.warning("refused TCP client %s: bad or missing token", session.peer)
        session.send(
            protocol.error(
                msg_id,
                protocol.UNAUTHORIZED,
                "unauthorized: the first message on TCP must be broker/auth with the token from broker.json",
            )
        )
        session.close()
        return False


def _peer_name(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return "unix"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp:{peer[0]}:{peer[1]}"
    return str(peer)
