"""One link type: a blocking byte stream to a broker, whatever carries it.

The shim pumps with threads and blocking I/O (`import asyncio` alone costs the
fast path 45–70 ms), so every transport is seen through `Link`: `SocketLink`
for unix and tcp sockets, `AsyncLink` for an asyncio connection (an SSH
channel) run on a background loop. Both frame with `protocol.FrameBuffer`: one framing rule
and one max-line rule. Stdlib only at import.
"""

from __future__ import annotations

import threading

# The C module under `socket`: the wrapper module, with the selectors, array and enum set-up it brings, costs every
# agent start ~2 ms, and a UNIX link needs none of it (socket.socket is this class plus conveniences). TCP imports it.
from _socket import AF_UNIX, SHUT_RDWR, SOCK_STREAM
from _socket import socket as RawSocket

from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.protocol import LINE_TOO_LONG, FrameBuffer, LineTooLong

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every agent start ~3 ms; annotations only
    from typing import Any


RECV_BYTES = 262144  # one read from a broker socket, at most


class Link:
    """One blocking byte stream to a broker (or a local-owner daemon, which is one)."""

    endpoint = "?"
    transport = "?"

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next frame without its newline; None at EOF. Raises OSError, ShimError, TimeoutError."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _too_long(exc: LineTooLong) -> ShimError:
    return ShimError(LINE_TOO_LONG, f"the broker sent a line above {exc.limit} bytes")


class SocketLink(Link):
    """A UNIX or TCP stream socket."""

    def __init__(self, sock: RawSocket, endpoint: str, transport: str, max_line_bytes: int) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.transport = transport
        self._frames = FrameBuffer(max_line_bytes)
        self._send_lock = threading.Lock()
        self._closed = False
        # One receive buffer for the link's life: `sock.recv(n)` would allocate n bytes and shrink them for
        # every reply (an mmap, mremap and munmap per call at this size); `recv_into` reuses these.
        self._chunk = bytearray(RECV_BYTES)
        self._view = memoryview(self._chunk)
        self._blocking = self.sock.gettimeout() is None

    def recv(self, timeout: float | None = None) -> bytes | None:
        if timeout is not None or not self._blocking:  # a blocking socket stays so: no syscall per frame
            self.sock.settimeout(timeout)
            self._blocking = timeout is None
        try:
            while True:
                try:
                    frame = self._frames.next_frame()
                except LineTooLong as exc:
                    raise _too_long(exc) from exc
                if frame is not None:
                    return frame
                n = self.sock.recv_into(self._chunk)
                if not n:
                    return self._frames.rest()
                self._frames.feed(self._view[:n])
        finally:
            if timeout is not None and not self._closed:
                try:
                    self.sock.settimeout(None)
                    self._blocking = True
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
            self.sock.shutdown(SHUT_RDWR)  # wakes a thread blocked in recv
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def connect_unix(path: str, timeout: float, max_line_bytes: int, endpoint: str | None = None) -> SocketLink:
    """Connect a UNIX socket; raises OSError."""
    sock = RawSocket(AF_UNIX, SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return SocketLink(sock, endpoint or f"unix://{path}", "unix", max_line_bytes)


def connect_tcp(host: str, port: int, timeout: float, max_line_bytes: int, endpoint: str) -> SocketLink:
    """Connect a TCP socket (no delay: one small frame per call); raises OSError."""
    import socket

    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SocketLink(sock, endpoint, "tcp", max_line_bytes)


# --------------------------------------------------------------------------- asyncio on the side
_loop: Any = None
_loop_lock = threading.Lock()


def background_loop() -> Any:
    """One asyncio loop in a daemon thread, started on first use (SSH transports are asyncio)."""
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
    """A blocking face on an asyncio `connection.Connection` (e.g. an SSH channel)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.endpoint = getattr(conn, "endpoint", "?")
        self.transport = getattr(conn, "transport", "?")
        self._send_lock = threading.Lock()

    def recv(self, timeout: float | None = None) -> bytes | None:
        try:
            frame: bytes | None = run_async(self.conn.read_frame(), timeout)
        except LineTooLong as exc:
            raise _too_long(exc) from exc
        except (OSError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - asyncssh's ConnectionLost and kin are not OSErrors: make them one
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        return frame

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                run_async(self.conn.send(data), 30)
            except (ConnectionError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - asyncssh's errors are not OSErrors: make them one
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        try:
            run_async(self.conn.aclose(), 8)
        except Exception:  # noqa: BLE001 - closing a broken channel; nothing left to tell anyone
            pass
