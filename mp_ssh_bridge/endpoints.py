"""Endpoint URL -> proven link. The transport is chosen here, once, from the scheme.

Like docker/cli's connhelper: one dialer per scheme, and everything after it
is just a `links.Link`.

- `unix:///path/to/broker.sock`
- `tcp://host:port` — the first message is `broker/auth` with the token from
  `MEMPALACE_BROKER_TOKEN` (settings `broker_token`) or broker.json's `tcp_token`.
- `ssh://alias/path/to/broker.sock` — `mp_ssh_bridge.ssh.open_ssh_url`, imported
  only when such a URL is used (asyncssh costs ~130 ms and ~40 MB).

`connect()` then proves the link (`handshake.prove`): every transport gives the
same errors with the same codes. Module level is stdlib only: the shim imports
it for a `unix://` MEMPALACE_BROKER.
"""

from __future__ import annotations

import json
import os

from mp_ssh_bridge import handshake, urls
from mp_ssh_bridge.config import Config
from mp_ssh_bridge.errors import EndpointError, ShimError
from mp_ssh_bridge.links import AsyncLink, Link, connect_tcp, connect_unix, run_async
from mp_ssh_bridge.protocol import BROKER_UNREACHABLE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mp_ssh_bridge.settings import SessionSettings

parse = urls.parse


def tcp_token(state_dir: str, explicit: str | None = None) -> str | None:
    """The explicit token (MEMPALACE_BROKER_TOKEN), else `tcp_token` from broker.json in the state dir."""
    if explicit:
        return explicit
    try:
        with open(os.path.join(state_dir, "broker.json"), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    value = record.get("tcp_token") if isinstance(record, dict) else None
    return value if isinstance(value, str) and value else None


def dial(cfg: Config, url: str, *, settings: SessionSettings | None = None, timeout: float | None = None) -> Link:
    """Open the endpoint `url` names (for tcp:// also authenticate); not yet proven. Raises ShimError."""
    scheme, host, port, path, _user = parse(url)
    limit = cfg.connect_timeout if timeout is None else timeout
    if scheme == "unix":
        try:
            return connect_unix(path, limit, cfg.max_line_bytes, url)
        except OSError as exc:
            raise EndpointError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
    if scheme == "tcp":
        assert port is not None
        try:
            link = connect_tcp(host, port, limit, cfg.max_line_bytes, url)
        except OSError as exc:
            raise EndpointError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
        try:
            handshake.authenticate(link, tcp_token(cfg.state_dir, cfg.broker_token), url, limit)
        except BaseException:
            link.close()
            raise
        return link
    from mp_ssh_bridge import ssh  # asyncssh: only for ssh:// URLs

    s = settings if settings is not None else _session_settings(cfg)
    try:
        conn = run_async(ssh.open_ssh_url(s, url), s.connect_timeout + s.ensure_timeout + 5)
    except TimeoutError as exc:
        raise EndpointError(f"cannot open {url}: {exc}") from exc
    return AsyncLink(conn)


def connect(cfg: Config, url: str, *, role: str, settings: SessionSettings | None = None,
            timeout: float | None = None) -> Link:
    """`dial()`, then prove it is a broker for our palace. Raises ShimError (PalaceMismatch included)."""
    link = dial(cfg, url, settings=settings, timeout=timeout)
    handshake.prove(link, cfg, role, None if timeout is None else max(timeout, 2.0))
    return link


def _session_settings(cfg: Config) -> SessionSettings:
    from mp_ssh_bridge.settings import load_session

    try:
        return load_session(palace=cfg.palace_flag)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ShimError(BROKER_UNREACHABLE, f"invalid settings: {exc}") from exc

