"""`mempalace-broker --dial-stdio [--socket PATH]`: bridge this process's stdio to the broker socket.

The SSH fallback for hosts whose sshd forbids stream-local forwarding (the
docker CLI's `dial-stdio` pattern): the container runs this command over SSH
and speaks the broker protocol on its stdin/stdout. Bytes are copied as they
are, both ways, until either side closes. Two threads and blocking I/O: the
cheapest thing that works for pipes, socketpairs and ttys alike.

Without --socket the socket comes from broker.json of the host's settings
(MEMPALACE_PATH etc.). Exit 0 when the broker or stdin closed, 1 when there is
no broker socket to connect to.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

CHUNK = 256 * 1024


def default_socket(mempalace_path: str | None = None) -> str:
    """The socket named by broker.json (host's settings), else where the broker would bind it."""
    from mp_ssh_bridge import state
    from mp_ssh_bridge.settings import load

    settings = load(mempalace_path=mempalace_path)
    record = state.read_broker_json(settings.paths.json) or {}
    endpoint = record.get("endpoint")
    if isinstance(endpoint, str) and endpoint.startswith("unix://"):
        return endpoint[len("unix://") :]
    return str(settings.paths.socket())


def connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _stdin_to_socket(sock: socket.socket, fd: int) -> None:
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)  # the broker sees EOF, finishes, and closes its side
    except OSError:
        pass


def _socket_to_stdout(sock: socket.socket, fd: int) -> None:
    while True:
        try:
            data = sock.recv(CHUNK)
        except OSError:
            return
        if not data:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BrokenPipeError:
                return
            view = view[n:]


def bridge(sock: socket.socket, in_fd: int = 0, out_fd: int = 1) -> None:
    """Copy in_fd → sock and sock → out_fd until the broker closes (or stdout breaks)."""
    pump = threading.Thread(target=_stdin_to_socket, args=(sock, in_fd), name="stdin->socket", daemon=True)
    pump.start()
    _socket_to_stdout(sock, out_fd)


def run(path: str | None, timeout: float = 5.0, mempalace_path: str | None = None) -> int:
    if path is None:
        try:
            path = default_socket(mempalace_path)
        except Exception as exc:  # noqa: BLE001 - settings error: the user's to fix
            print(f"mempalace-broker --dial-stdio: cannot find the broker socket: {exc}", file=sys.stderr)
            return 1
    try:
        sock = connect(path, timeout)
    except FileNotFoundError:
        print(
            f"mempalace-broker --dial-stdio: no broker socket at {path} (is a broker running? "
            f"start one with `mempalace-broker --ensure`)",
            file=sys.stderr,
        )
        return 1
    except ConnectionRefusedError:
        print(f"mempalace-broker --dial-stdio: {path} refuses connections: the broker that made it is gone", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"mempalace-broker --dial-stdio: connecting to {path} timed out after {timeout:g}s", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mempalace-broker --dial-stdio: cannot connect to {path}: {exc}", file=sys.stderr)
        return 1
    try:
        bridge(sock)
    finally:
        sock.close()
    return 0


def main(args: Any) -> int:
    """Entry from `broker.__main__` (args: the parsed namespace; uses .socket and .timeout)."""
    timeout = args.timeout if getattr(args, "timeout", None) else 5.0
    return run(getattr(args, "socket", None), timeout, getattr(args, "mempalace_path", None))
