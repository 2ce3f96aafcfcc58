"""Hub mode: the broker sends its sessions' calls to upstream's hub (`mempalace serve`) instead of an engine.

Why: when a hub owns the palace (mempalace/server_registry.py; mp_ssh_bridge/hub.py reads its record), it is the
one writer — mempalace 3.11 gives it the writer lease, so an engine of the broker's beside it is refused every
write, and a 3.4.0 engine, which has no lease, would write beside it. The broker opens no engine then: each call
is one HTTP POST to the hub's `/mcp` (JSON-RPC in the body, the answer in the response, 202 for a notification;
the hub closes every connection after one answer). Everything else the broker adds stays: fairness, per-client
bounds, deadlines (the mux's stall bound turns a hung hub into the usual "outcome unknown" error, not upstream's
600 s wait), cancellation (the broker answers it and closes that call's connection; the hub is not told), the
cached initialize, and the container path over SSH — the hub's port is never
exposed.

What a failure means for the call (docs/PROTOCOL.md "Hub mode"):
- `HubNotReached`: nothing reached the hub's dispatcher (no connection; the hub refused every token, the Host or
  the path before dispatch): the call was NOT executed;
- `HubLost`: the request was written and no complete answer came back: its outcome is unknown.

Stdlib only (asyncio streams; https with the default verifying context, as upstream's own proxy dials it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

from mp_ssh_bridge import hostinfo, hub, protocol

log = logging.getLogger("broker.hub")

HEADER_MAX = 64 * 1024  # a status line and headers beyond this are no hub's answer
NOT_DISPATCHED = {
    401: "refused the bridge's token",
    403: "refused the request's Host or Origin",
    404: "has no /mcp",
    405: "does not take POST",
    411: "wanted a length",
}


class HubNotReached(Exception):
    """Nothing reached the hub's dispatcher: the call was not executed. `no_connection`: not even a connection
    (the hub may be dying: its port closes before its pid is gone)."""

    def __init__(self, message: str, *, no_connection: bool = False) -> None:
        super().__init__(message)
        self.no_connection = no_connection


class HubLost(Exception):
    """The request was sent and no complete answer came: outcome unknown."""


class HubRoute:
    """Calls to one live hub."""

    def __init__(self, found: hub.Hub, palace: str, *, connect_timeout: float, max_bytes: int) -> None:
        self.hub = found
        self.palace = palace
        self.connect_timeout = connect_timeout
        self.max_bytes = max_bytes
        self.calls = 0
        self.failures = 0

    def alive(self, thorough: bool = False) -> bool:
        """The hub's process still runs: a signal-0 probe (cheap enough for every call); `thorough` also rules out
        a zombie (on macOS that runs `ps`)."""
        if not hostinfo.pid_alive(self.hub.pid):
            return False
        return not (thorough and hostinfo.is_zombie(self.hub.pid))

    def as_dict(self) -> dict[str, Any]:
        return {**self.hub.as_dict(), "calls": self.calls, "failures": self.failures}

    async def post(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """POST one JSON-RPC message; the hub's answer (None for a notification). Raises HubNotReached, HubLost.

        A 401 is tried again with the next token (upstream's rule: the hub refused it before dispatch)."""
        body = json.dumps(message, ensure_ascii=False, allow_nan=False).encode("utf-8")
        candidates = hub.tokens(self.palace) or ("",)
        self.calls += 1
        for index, token in enumerate(candidates):
            status, answer = await self._exchange(body, token)
            if status == 401 and index + 1 < len(candidates):
                continue
            return self._answer(status, answer)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _answer(self, status: int, answer: bytes) -> dict[str, Any] | None:
        if status in NOT_DISPATCHED:
            self.failures += 1
            raise HubNotReached(f"the hub at {self.hub.url} {NOT_DISPATCHED[status]} (HTTP {status})")
        if status == 202 or (status == 200 and not answer.strip()):
            return None
        try:
            reply = json.loads(answer)
        except ValueError as exc:
            self.failures += 1
            raise HubLost(f"the hub at {self.hub.url} answered HTTP {status} with no JSON-RPC message") from exc
        if not isinstance(reply, dict):
            self.failures += 1
            raise HubLost(f"the hub at {self.hub.url} answered HTTP {status} with a {type(reply).__name__}")
        return reply

    async def _exchange(self, body: bytes, token: str) -> tuple[int, bytes]:
        h = self.hub
        host = f"[{h.dial_host}]" if ":" in h.dial_host else h.dial_host
        try:  # before any connection: a token HTTP cannot carry reaches nothing
            head = (
                f"POST /mcp HTTP/1.1\r\nHost: {host}:{h.port}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {token}\r\n" if token else "")
                + "\r\n"
            ).encode("latin-1")
        except UnicodeEncodeError as exc:
            self.failures += 1
            raise HubNotReached(f"the hub's token for {h.url} is not plain text: {exc.reason}") from None
        context = ssl.create_default_context() if h.scheme == "https" else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(h.dial_host, h.port, ssl=context, limit=HEADER_MAX), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.failures += 1
            raise HubNotReached(
                f"cannot connect to the hub at {h.url}: {exc or type(exc).__name__}", no_connection=True
            ) from exc
        try:
            try:
                writer.write(head + body)
                await writer.drain()
            except OSError as exc:
                self.failures += 1
                raise HubLost(f"the request to the hub at {h.url} broke off: {exc}") from exc
            try:
                return await self._read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                self.failures += 1
                raise HubLost(f"the hub at {h.url} sent no complete answer: {exc or type(exc).__name__}") from exc
        finally:
            writer.close()

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "transfer-encoding" and value.strip().lower() != "identity":
                raise ValueError(f"transfer-encoding {value.strip()!r} is not what the hub sends")
        if length is not None:
            if length < 0 or length > self.max_bytes:
                raise ValueError(f"an answer of {length} bytes is over the limit of {self.max_bytes}")
            return status, await reader.readexactly(length)
        data = bytearray()  # Connection: close — the body runs to EOF
        while len(data) <= self.max_bytes:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        if len(data) > self.max_bytes:
            raise ValueError(f"an answer over the limit of {self.max_bytes} bytes")
        return status, bytes(data)


def error_reply(engine_id: int, exc: Exception) -> dict[str, Any]:
    """The JSON-RPC error a failed hub call becomes (the mux gives it the client's id)."""
    if isinstance(exc, HubNotReached):
        return protocol.error(
            engine_id,
            protocol.ENGINE_UNAVAILABLE,
            f"{exc}; the request was NOT executed (safe to retry)",
            {"outcome": "not_executed", "hub": True},
        )
    return protocol.error(
        engine_id,
        protocol.OUTCOME_UNKNOWN,
        f"{exc}; whether the request took effect is unknown and it was NOT retried",
        {"outcome": "unknown", "hub": True},
    )
