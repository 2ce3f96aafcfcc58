"""One byte stream to a broker, whatever carries it (unix, tcp, ssh channel, ssh stdio).

The transport is chosen once, from the endpoint URL; after that the shim only
ever sees a Connection, as docker's connhelper does. Stdlib only.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from mp_ssh_bridge import protocol


class Connection:
    """Frames in, frames out, one close. `reader`/`writer` follow asyncio's stream API
    (asyncssh's SSHReader/SSHWriter in bytes mode do too)."""

    def __init__(
        self,
        reader: Any,
        writer: Any,
        *,
        transport: str,
        endpoint: str,
        max_line_bytes: int = protocol.DEFAULT_MAX_LINE_BYTES,
        on_close: Callable[[], Awaitable[None]] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = transport
        self.endpoint = endpoint
        self.max_line_bytes = max_line_bytes
        self.info: dict[str, Any] = dict(info or {})
        self._on_close = on_close
        self._closed = False

    async def read_frame(self) -> bytes | None:
        """Next frame without its newline; None at EOF."""
        if isinstance(self.reader, asyncio.StreamReader):
            return await protocol.read_frame(self.reader, self.max_line_bytes)
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            line = exc.partial
        if isinstance(line, str):
            line = line.encode("utf-8")
        if len(line) > self.max_line_bytes + 1:
            raise protocol.LineTooLong(self.max_line_bytes)
        return line.rstrip(b"\r\n") if line else None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass
        wait_closed = getattr(self.writer, "wait_closed", None)
        if wait_closed is not None:
            try:
                await asyncio.wait_for(wait_closed(), 2)
            except Exception:  # noqa: BLE001
                pass
        if self._on_close is not None:
            try:
                await asyncio.wait_for(self._on_close(), 5)
            except Exception:  # noqa: BLE001
                pass
