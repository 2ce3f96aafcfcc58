"""Endpoint URL -> connection. The transport is chosen here, once, from the scheme.

Like docker/cli's connhelper: one dialer per scheme, and everything after it
is just a connection.

- `unix:///path/to/broker.sock`
- `tcp://host:port` — the first message is `broker/auth` with the token from
  `MEMPALACE_BROKER_TOKEN` (settings `broker_token`) or broker.json's `tcp_token`.
- `ssh://alias/path/to/broker.sock` — `mp_ssh_bridge.ssh.open_ssh_url(settings, url)`,
  imported only when such a URL is used.

Two faces of the same thing: `dial()` returns the shim's blocking `Link`
(unix and tcp are plain sockets; an ssh connection, which is asyncio, runs
on a background event loop), `open_connection()` returns an asyncio
`mp_ssh_bridge.connection.Connection` for async callers (`mp-bridge`).
Module level is stdlib only: the shim imports it for a `unix://` MEMPALACE_BROKER.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

from mp_ssh_bridge import shim
from mp_ssh_bridge.protocol import BROKER_UNREACHABLE, UNAUTHORIZED
from mp_ssh_bridge.shim import Config, Link, ShimError, SocketLink

SCHEMES = ("unix", "tcp", "ssh")


class EndpointError(ShimError):
    """A URL that names no usable endpoint (the message says why and what to set)."""

    def __init__(self, message: str, code: int = BROKER_UNREACHABLE) -> None:
        super().__init__(code, message)


def parse(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path) of an endpoint URL; raises EndpointError."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointError(
            f"MEMPALACE_BROKER={url!r}: unsupported scheme {parts.scheme or '(none)'!r}; "
            "use unix:///path/to/broker.sock, tcp://host:port or ssh://alias/path/to/broker.sock"
        )
    if scheme == "unix":
        path = unquote(parts.netloc + parts.path) if parts.netloc else unquote(parts.path)
        if not path:
            raise EndpointError(f"MEMPALACE_BROKER={url!r}: a unix:// URL needs a socket path (unix:///path)")
        return scheme, "", None, path
    if scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise EndpointError(f"MEMPALACE_BROKER={url!r}: bad port ({exc})") from exc
        if not parts.hostname or port is None:
            raise EndpointError(f"MEMPALACE_BROKER={url!r}: a tcp:// URL needs host and port (tcp://host:port)")
        return scheme, parts.hostname, port, ""
    if not parts.hostname:
        raise EndpointError(f"MEMPALACE_BROKER={url!r}: an ssh:// URL needs a host alias (ssh://alias/path)")
    return scheme, parts.hostname, parts.port, unquote(parts.path)


def tcp_token(state_dir: str, explicit: str | None = None) -> str | None:
    """MEMPALACE_BROKER_TOKEN (or settings), else `tcp_token` from broker.json in the state dir."""
    token = explicit or os.environ.get("MEMPALACE_BROKER_TOKEN")
    if token:
        return token
    try:
        with open(os.path.join(state_dir, "broker.json"), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    value = record.get("tcp_token") if isinstance(record, dict) else None
    return value if isinstance(value, str) and value else None


def _auth_message(token: str) -> bytes:
    return shim.encode({"jsonrpc": "2.0", "id": "mp-shim/auth", "method": "broker/auth", "params": {"token": token}})


def _check_auth_reply(url: str, frame: bytes | None) -> None:
    if frame is None:
        raise EndpointError(f"{url}: the broker closed the connection during broker/auth", UNAUTHORIZED)
    try:
        reply = json.loads(frame)
    except ValueError as exc:
        raise EndpointError(f"{url}: malformed answer to broker/auth") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("result"), dict) or not reply["result"].get("ok"):
        err = reply.get("error") if isinstance(reply, dict) else None
        raise EndpointError(
            f"{url}: the broker refused the token ({(err or {}).get('message', err)}); set MEMPALACE_BROKER_TOKEN "
            "to the tcp_token in the broker's broker.json",
            UNAUTHORIZED,
        )


# --------------------------------------------------------------------------- asyncio on the side
_loop: Any = None
_loop_lock = threading.Lock()


def background_loop() -> Any:
    """One asyncio loop in a daemon thread, started on first use (ssh transports are asyncio)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            import asyncio

            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="asyncio", daemon=True).start()
            _loop = loop
    return _loop


def run_async(coro: Any, timeout: float | None) -> Any:
    """Run a coroutine on the background loop from a plain thread; TimeoutError after `timeout`."""
    import asyncio
    import concurrent.futures

    fut = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError as exc:
        fut.cancel()
        raise TimeoutError(f"no result within {timeout:g}s") from exc


class AsyncLink(Link):
    """A blocking face on an asyncio `Connection` (e.g. an SSH channel)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.endpoint = getattr(conn, "endpoint", "?")
        self.transport = getattr(conn, "transport", "?")
        self._send_lock = threading.Lock()

    def recv(self, timeout: float | None = None) -> bytes | None:
        return run_async(self.conn.read_frame(), timeout)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                run_async(self.conn.send(data), 30)
            except (ConnectionError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - asyncssh errors are not OSErrors
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        try:
            run_async(self.conn.aclose(), 8)
        except Exception:  # noqa: BLE001
            pass


def _ssh_opener() -> Any:
    try:
        from mp_ssh_bridge import ssh  # asyncssh: only for ssh:// URLs
    except ImportError as exc:
        raise EndpointError(
            f"ssh:// endpoints are not supported yet (mp_ssh_bridge.ssh cannot be imported: {exc}); "
            "use unix:// or tcp:// in MEMPALACE_BROKER"
        ) from exc
    opener = getattr(ssh, "open_ssh_url", None)
    if opener is None:
        raise EndpointError(
            "ssh:// endpoints are not supported yet (this version has no mp_ssh_bridge.ssh.open_ssh_url); "
            "use unix:// or tcp:// in MEMPALACE_BROKER"
        )
    return opener


def _settings_for(cfg: Config, settings: Any) -> Any:
    if settings is not None:
        return settings
    from mp_ssh_bridge.settings import load

    return load(palace=cfg.palace_flag)


# --------------------------------------------------------------------------- blocking dialers (the shim)
def dial(cfg: Config, url: str, *, settings: Any = None, timeout: float | None = None) -> Link:
    """Open the endpoint `url` names; for tcp:// also authenticate. Raises ShimError/OSError."""
    scheme, host, port, path = parse(url)
    limit = cfg.connect_timeout if timeout is None else timeout
    if scheme == "unix":
        try:
            return shim.connect_unix(path, limit, cfg.max_line_bytes, url)
        except OSError as exc:
            raise EndpointError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
    if scheme == "tcp":
        try:
            sock = socket.create_connection((host, port), timeout=limit)
        except OSError as exc:
            raise EndpointError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = SocketLink(sock, url, "tcp", cfg.max_line_bytes)
        token = tcp_token(cfg.state_dir, getattr(settings, "broker_token", None))
        if not token:
            link.close()
            raise EndpointError(
                f"{url} needs a token: set MEMPALACE_BROKER_TOKEN (the tcp_token in the broker's broker.json)",
                UNAUTHORIZED,
            )
        try:
            link.send(_auth_message(token))
            _check_auth_reply(url, link.recv(limit))
        except BaseException:
            link.close()
            raise
        return link
    settings = _settings_for(cfg, settings)
    opener = _ssh_opener()
    try:
        conn = run_async(opener(settings, url), settings.connect_timeout + settings.ensure_timeout + 5)
    except ShimError:
        raise
    except Exception as exc:  # noqa: BLE001 - asyncssh's errors carry the user-actionable text
        raise EndpointError(f"cannot open {url}: {exc}") from exc
    return AsyncLink(conn)


def dial_checked(cfg: Config, url: str, *, settings: Any = None, role: str | None = None) -> Link:
    """`dial()`, then prove it is a broker for our palace (broker/status + identity)."""
    link = dial(cfg, url, settings=settings)
    try:
        status = shim.broker_status(link, cfg.connect_timeout, cfg.read_only)
        shim.check_identity(status, cfg, url, role or cfg.resolved_role())
    except ShimError:
        link.close()
        raise
    except (OSError, ValueError) as exc:
        link.close()
        raise EndpointError(f"{url} does not answer as a broker: {exc}") from exc
    return link


# --------------------------------------------------------------------------- asyncio dialer (mp-bridge)
async def open_connection(
    url: str,
    *,
    settings: Any = None,
    state_dir: str | None = None,
    token: str | None = None,
    timeout: float = shim.DEFAULT_CONNECT_TIMEOUT,
    max_line_bytes: int = shim.DEFAULT_MAX_LINE_BYTES,
) -> Any:
    """The same choice for async callers: returns a `mp_ssh_bridge.connection.Connection`."""
    import asyncio

    from mp_ssh_bridge.connection import Connection

    scheme, host, port, path = parse(url)
    if scheme == "unix":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=max_line_bytes + 2), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise EndpointError(f"cannot connect to {url}: {exc}") from exc
        return Connection(reader, writer, transport="unix", endpoint=url, max_line_bytes=max_line_bytes)
    if scheme == "tcp":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=max_line_bytes + 2), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise EndpointError(f"cannot connect to {url}: {exc}") from exc
        conn = Connection(reader, writer, transport="tcp", endpoint=url, max_line_bytes=max_line_bytes)
        if state_dir is None:
            state_dir = str(settings.mempalace_path) if settings is not None else os.fspath(shim.expand(
                os.environ.get("MEMPALACE_PATH") or shim.DEFAULT_STATE_DIR))
        secret = tcp_token(state_dir, token or getattr(settings, "broker_token", None))
        if not secret:
            await conn.aclose()
            raise EndpointError(f"{url} needs a token: set MEMPALACE_BROKER_TOKEN", UNAUTHORIZED)
        try:
            await conn.send(_auth_message(secret))
            _check_auth_reply(url, await asyncio.wait_for(conn.read_frame(), timeout))
        except BaseException:
            await conn.aclose()
            raise
        return conn
    if settings is None:
        from mp_ssh_bridge.settings import load

        settings = load()
    return await _ssh_opener()(settings, url)
