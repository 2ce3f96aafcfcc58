"""Bounds: every resource one client can make the broker hold has a limit, and hitting it is an answer.

One broker serves every session of a memory, so one misbehaving client — a loop that pipelines
calls and never reads, a connection flood, a TCP peer that sends megabytes before authenticating —
must not cost the others their broker. Each bound is a broker setting (docs/PROTOCOL.md "Bounds");
a request over a per-connection bound is answered at once with -32068 LIMIT_REACHED (`data.outcome`
`not_executed`, `data.limit` the setting) and the connection stays usable; a connection over a
connection bound gets that one line and is closed.

The peer of a UNIX-socket connection is its process (SO_PEERCRED on Linux, LOCAL_PEERPID on macOS);
the platform and `getsockopt` are parameters, so the macOS branch is tested on Linux.
"""

from __future__ import annotations

import collections
import socket
import struct
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from mp_ssh_bridge import config, protocol

# macOS <sys/un.h>: getsockopt(fd, SOL_LOCAL, LOCAL_PEERPID) gives the peer's pid (Python has no constants).
SOL_LOCAL = 0
LOCAL_PEERPID = 0x002
UNKNOWN_UNIX_PEER = "unix"  # one shared key when the peer's process cannot be learnt


@dataclass(frozen=True)
class Bounds:
    """The broker's bounds, as its settings give them (mp_ssh_bridge/settings.py, broker section)."""

    max_queued_per_client: int = 256
    max_client_queued_bytes: int = 16 * 1024 * 1024
    max_client_outbox_bytes: int = 32 * 1024 * 1024
    max_connections: int = 1024
    max_connections_per_peer: int = 256
    preauth_max_bytes: int = 4096
    preauth_timeout: float = 5.0
    fd_reserve: int = 64

    @classmethod
    def from_settings(cls, settings: Any) -> Bounds:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def limit_error(msg_id: Any, limit: str, value: int | float, what: str) -> dict[str, Any]:
    """-32068 for a bound hit: the message names the bound, its setting and its variable; nothing was executed."""
    return protocol.error(
        msg_id,
        protocol.LIMIT_REACHED,
        f"{what}: the broker's limit {limit} = {value if isinstance(value, int) else f'{value:g}'} was reached (setting {limit}, env "
        f"{config.env_name(limit)}); request NOT executed",
        {"outcome": "not_executed", "limit": limit, "value": value},
    )


V = TypeVar("V")


class PendingJobs(dict[tuple[str, Any], V]):
    """A session's pending requests by id, with the bytes of their request lines.

    `add` records a request's size; every way an entry leaves (del, pop, clear) forgets it, so
    `queued_bytes` is always the size of what is still pending, whoever removes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[tuple[str, Any], int] = {}
        self.queued_bytes = 0

    def add(self, key: tuple[str, Any], job: V, size: int) -> None:
        self._forget(key)
        super().__setitem__(key, job)
        self._sizes[key] = size
        self.queued_bytes += size

    def _forget(self, key: tuple[str, Any]) -> None:
        self.queued_bytes -= self._sizes.pop(key, 0)

    def __setitem__(self, key: tuple[str, Any], job: V) -> None:
        self._forget(key)
        super().__setitem__(key, job)

    def __delitem__(self, key: tuple[str, Any]) -> None:
        super().__delitem__(key)
        self._forget(key)

    def pop(self, key: tuple[str, Any], *default: Any) -> Any:
        self._forget(key)
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self._sizes.clear()
        self.queued_bytes = 0


def over_queue_limit(bounds: Bounds, pending: int, queued_bytes: int, size: int) -> tuple[str, int] | None:
    """The per-connection bound a new request of `size` bytes would break: (setting, its value), or None."""
    if pending >= bounds.max_queued_per_client:
        return "max_queued_per_client", bounds.max_queued_per_client
    if pending and queued_bytes + size > bounds.max_client_queued_bytes:  # one request alone is always let in
        return "max_client_queued_bytes", bounds.max_client_queued_bytes
    return None


# --- who is on the other end ----------------------------------------------------------------------
def parse_peercred(raw: bytes) -> int | None:
    """Linux SO_PEERCRED: struct ucred {pid, uid, gid} as three C ints; the pid, or None when unknown."""
    if len(raw) < struct.calcsize("3i"):
        return None
    pid = struct.unpack("3i", raw[: struct.calcsize("3i")])[0]
    return pid if pid > 0 else None


def parse_peerpid(raw: bytes) -> int | None:
    """macOS LOCAL_PEERPID: one C int; the pid, or None when unknown."""
    if len(raw) < struct.calcsize("i"):
        return None
    pid = struct.unpack("i", raw[: struct.calcsize("i")])[0]
    return pid if pid > 0 else None


def unix_peer_pid(getsockopt: Callable[[int, int, int], bytes], platform: str | None = None) -> int | None:
    """The pid of the process at the other end of a UNIX socket, or None where it cannot be learnt."""
    plat = platform or sys.platform
    try:
        if plat.startswith("linux"):
            so_peercred = getattr(socket, "SO_PEERCRED", 17)
            return parse_peercred(getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i")))
        if plat == "darwin":
            return parse_peerpid(getsockopt(SOL_LOCAL, LOCAL_PEERPID, struct.calcsize("i")))
    except OSError:
        return None
    return None


def peer_key(sock: socket.socket | None, peername: Any, platform: str | None = None) -> str:
    """What max_connections_per_peer counts by: a TCP client's address (not its port), a UNIX client's pid."""
    if sock is not None and sock.family == socket.AF_UNIX:
        pid = unix_peer_pid(sock.getsockopt, platform)
        return f"unix:pid:{pid}" if pid is not None else UNKNOWN_UNIX_PEER
    if isinstance(peername, tuple) and peername:
        return f"tcp:{peername[0]}"
    return str(peername)


class ConnectionCount:
    """Connections held, in all and per peer: `admit` says which bound a new one would break."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.total = 0
        self.by_peer: collections.Counter[Hashable] = collections.Counter()

    def admit(self, key: Hashable) -> tuple[str, int] | None:
        """Count the connection in, or return (setting, value) of the bound it breaks (then it is not counted)."""
        if self.total >= self.bounds.max_connections:
            return "max_connections", self.bounds.max_connections
        if self.by_peer[key] >= self.bounds.max_connections_per_peer:
            return "max_connections_per_peer", self.bounds.max_connections_per_peer
        self.total += 1
        self.by_peer[key] += 1
        return None

    def release(self, key: Hashable) -> None:
        self.total -= 1
        self.by_peer[key] -= 1
        if self.by_peer[key] <= 0:
            del self.by_peer[key]
