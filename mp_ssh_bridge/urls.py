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
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.count(":") >= 2 and "[" not in hostport:
        raise EndpointError(f"MEMPALACE_BROKER={url!r}: an IPv6 address goes in brackets ({scheme}://[::1]:PORT)")
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


# --------------------------------------------------------------------------- the TCP address a broker advertises
# A broker listening on TCP writes one `tcp://` URL into broker.json for the other side of a VM boundary to
# dial. The address it is bound to is not always that URL: `::1` must be bracketed to parse back, and a
# wildcard (`0.0.0.0`, `::`) names no host at all — a container dialling it reaches itself. So a wildcard
# bind is advertised only as the `tcp_advertise` setting says (`host.docker.internal`, `host.orb.internal`,
# `host.lima.internal`, ...), and every IPv6 address goes in brackets.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 address in brackets (`[::1]`), anything else as is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int) -> str:
    """`HOST:PORT`, with an IPv6 host in brackets: `[::1]:8765`."""
    return f"{url_host(host)}:{port}"


def tcp_url(host: str, port: int) -> str:
    return f"tcp://{host_port(host, port)}"


def is_wildcard(host: str) -> bool:
    """A bind-to-every-address host, which no other machine can dial."""
    return host.strip("[]") in WILDCARD_HOSTS


def split_host_port(value: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT`, or a bare IPv6 address (two colons or more: no port) ->
    (host without brackets, port or None). Raises ValueError saying which form is expected."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPV6] or [IPV6]:PORT, got {value!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") >= 2:
        host, port_text = text, None  # a bare IPv6 address; write [V6]:PORT to give a port
    else:
        host, sep, port_text_raw = text.partition(":")
        port_text = port_text_raw if sep else None
    if not host or any(c in host for c in "/@ ") or is_wildcard(host):
        raise ValueError(f"expected a host another machine can dial (HOST or HOST:PORT), got {value!r}")
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"bad port in {value!r} (1-65535)")
    return host, int(port_text)


def advertised_tcp(bound_host: str, bound_port: int, advertise: str | None) -> str | None:
    """The `tcp://` URL a broker bound to (bound_host, bound_port) writes into broker.json, or None.

    With `advertise` (the tcp_advertise setting: HOST or HOST:PORT), that host, and its port or the bound one.
    Without it, the bound address itself, unless it is a wildcard: nothing is advertised then.
    """
    if advertise:
        host, port = split_host_port(advertise)
        return tcp_url(host, port or bound_port)
    if is_wildcard(bound_host):
        return None
    return tcp_url(bound_host, bound_port)
