"""broker/hubroute.py against a scripted stand-in for the hub's HTTP (faults the real hub does not produce on cue):
what each answer means for the call — executed, NOT executed, or outcome unknown — and upstream's 401 retry."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import hub, protocol
from mp_ssh_bridge_broker import hubroute
from mp_ssh_bridge_broker.hubroute import HubLost, HubNotReached, HubRoute

Handler = Callable[[bytes, dict[str, str], asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, int, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        seen.append(headers)
        try:
            await handler(body, headers, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def respond(status: int, body: bytes, length: bool = True) -> Handler:
    async def handler(_: bytes, __: dict[str, str], w: asyncio.StreamWriter) -> None:
        w.write(
            f"HTTP/1.1 {status} X\r\n".encode()
            + (f"Content-Length: {len(body)}\r\n".encode() if length else b"")
            + b"Connection: close\r\n\r\n"
            + body
        )
        await w.drain()

    return handler


def route(port: int, palace: str = "/nowhere") -> HubRoute:
    found = hub.Hub(
        pid=os.getpid(),
        host="127.0.0.1",
        port=port,
        scheme="http",
        read_only=False,
        palace_path=None,
        record=Path("/nowhere/serverinfo.json"),
    )
    return HubRoute(found, palace, connect_timeout=2, max_bytes=1024 * 1024)


REQUEST = protocol.request(7, "tools/call", {"name": "mempalace_status", "arguments": {}})


def run(handler: Handler, palace: str = "/nowhere") -> tuple[Any, list[dict[str, str]]]:
    async def go() -> tuple[Any, list[dict[str, str]]]:
        server, port, seen = await serve(handler)
        try:
            try:
                return await route(port, palace).post(REQUEST), seen
            except (HubLost, HubNotReached) as exc:
                return exc, seen
        finally:
            server.close()

    return asyncio.run(go())


def test_an_answer_is_returned_as_the_hub_sent_it() -> None:
    reply = {"jsonrpc": "2.0", "id": 7, "result": {"ok": True}}
    got, seen = run(respond(200, json.dumps(reply).encode()))
    assert got == reply
    assert seen[0]["host"].startswith("127.0.0.1:") and seen[0]["content-type"] == "application/json"
    assert "authorization" not in seen[0]  # no token configured: none sent


def test_an_answer_without_content_length_runs_to_the_close() -> None:
    got, _ = run(respond(200, b'{"jsonrpc":"2.0","id":7,"result":{}}', length=False))
    assert got == {"jsonrpc": "2.0", "id": 7, "result": {}}


def test_202_is_a_notification_answered() -> None:
    got, _ = run(respond(202, b""))
    assert got is None


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refused_before_dispatch_is_not_executed(status: int) -> None:
    got, _ = run(respond(status, b"nope"))
    assert isinstance(got, HubNotReached), got
    err = hubroute.error_reply(7, got)["error"]
    assert err["data"]["outcome"] == "not_executed" and "NOT executed" in err["message"]


def test_a_refused_token_is_tried_again_with_the_next_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    palace = str(tmp_path / "palace")
    d = hub.state_dir(palace)
    d.mkdir(parents=True)
    (d / "token").write_text("old-file-token\n")
    monkeypatch.setenv(hub.TOKEN_ENV, "current")

    async def handler(_: bytes, headers: dict[str, str], w: asyncio.StreamWriter) -> None:
        ok = headers.get("authorization") == "Bearer current"
        await respond(200 if ok else 401, b'{"jsonrpc":"2.0","id":7,"result":{}}' if ok else b"")(b"", headers, w)

    got, seen = run(handler, palace)
    assert got == {"jsonrpc": "2.0", "id": 7, "result": {}}
    assert [h.get("authorization") for h in seen] == ["Bearer old-file-token", "Bearer current"]


def test_no_connection_is_not_executed() -> None:
    async def go() -> Exception:
        server, port, _ = await serve(respond(200, b""))
        server.close()
        await server.wait_closed()
        try:
            await route(port).post(REQUEST)
        except HubNotReached as exc:
            return exc
        raise AssertionError("no error")

    assert "cannot connect" in str(asyncio.run(go()))


@pytest.mark.parametrize(
    "answer",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"jsonrpc"',
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",
        b"HTTP/1.1 500 X\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
    ],
)
def test_a_broken_answer_is_outcome_unknown(answer: bytes) -> None:
    async def handler(_: bytes, __: dict[str, str], w: asyncio.StreamWriter) -> None:
        w.write(answer)
        await w.drain()

    got, _ = run(handler)
    assert isinstance(got, HubLost), got
    err = hubroute.error_reply(7, got)["error"]
    assert err["code"] == protocol.OUTCOME_UNKNOWN and err["data"]["outcome"] == "unknown"
