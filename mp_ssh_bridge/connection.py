"""An asyncio byte stream to the broker over SSH (a streamlocal channel or a remote stdio bridge).

asyncssh is asyncio, so the SSH transport hands out this; the shim sees it
through `links.AsyncLink`, like every other transport. Frames follow the one
rule of `protocol.FrameBuffer`. Stdlib only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

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
        self._frames = protocol.FrameBuffer(max_line_bytes)
        self._closed = False

    async def read_frame(self) -> bytes | None:
        """Next frame without its newline; None at EOF. Raises protocol.LineTooLong."""
        if isinstance(self.reader, asyncio.StreamReader):
            return await protocol.read_frame(self.reader, self.max_line_bytes)
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                return frame
            chunk = await self.reader.read(262144)
            if not chunk:
                return self._frames.rest()
            self._frames.feed(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a stream that is already broken: nothing to report
            pass
        wait_closed = getattr(self.writer, "wait_closed", None)
        if wait_closed is not None:
            try:
                await asyncio.wait_for(wait_closed(), 2)
            except Exception:  # noqa: BLE001 - a peer that vanished; the close is done either way
                pass
        if self._on_close is not None:
            try:
                await asyncio.wait_for(self._on_close(), 5)
            except Exception:  # noqa: BLE001 - the SSH connection behind it is gone already
                pass
