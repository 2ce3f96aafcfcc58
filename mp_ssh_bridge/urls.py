"""The one parser of broker endpoint URLs (`unix://`, `tcp://`, `ssh://`).

The dialer (`endpoints`), the SSH transport and `mp-bridge` all read URLs
the user wrote in MEMPALACE_BROKER; one parser means one set of rules and
one wording of what is wrong. Stdlib only.
"""

from __future__ import annotations

from mp_ssh_bridge.errors import EndpointError

SCHEMES = ("unix", "tcp", "ssh")


class Endpoint(tuple):  # a NamedTuple without importing typing (start-up cost)
    """(scheme, host, port, path, user)."""

    __slots__ = ()

    def __new__(cls, scheme: str, host: str, port: int | None, path: str, user: str | None = None) -> Endpoint:
        return super().__new__(cls, (scheme, host, port, path, user))

    scheme = property(lambda self: self[0])
    host = property(lambda self: self[1])
    port = property(lambda self: self[2])
    path = property(lambda self: self[3])
    user = property(lambda self: self[4])


def parse(url: str) -> Endpoint:
    """Split an endpoint URL; raises EndpointError naming the variable and the expected form."""
    if url.startswith("unix://") and "%" not in url:  # the fast path's case: no urllib (~4 ms per agent start)
        path = url[len("unix://"):]
        if not path:
            raise EndpointError(f"MEMPALACE_BROKER={url!r}: a unix:// URL needs a socket path (unix:///path)")
        return Endpoint("unix", "", None, path)
    from urllib.parse import unquote, urlsplit

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
        return Endpoint(scheme, "", None, path)
    try:
        port = parts.port
    except ValueError as exc:
        raise EndpointError(f"MEMPALACE_BROKER={url!r}: bad port ({exc})") from exc
    if scheme == "tcp":
        if not parts.hostname or port is None:
            raise EndpointError(f"MEMPALACE_BROKER={url!r}: a tcp:// URL needs host and port (tcp://host:port)")
        return Endpoint(scheme, parts.hostname, port, "")
    if not parts.hostname or not parts.path or parts.path == "/":
        raise EndpointError(f"MEMPALACE_BROKER={url!r}: expected ssh://[user@]alias[:port]/absolute/path/to/broker.sock")
    user = unquote(parts.username) if parts.username else None
    return Endpoint(scheme, parts.hostname, port, unquote(parts.path), user)
