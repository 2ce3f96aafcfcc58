"""Upstream's hub (`mempalace serve`, mempalace ≥ 3.6) as the bridge sees it: where it registers, and whether it lives.

Why: a hub is the palace's writer (it holds mempalace 3.11's writer lease from its first write), so a broker that
started its own engine beside it would either be refused every write (3.11: "Peer MCP writer active") or, with an
engine that has no lease (3.4.0), write beside it — the two-writer loss this project exists to prevent. The
broker therefore looks for a hub before every engine start and routes to it instead (broker/hubroute.py).

The registry is upstream's (`mempalace/server_registry.py`), read here with the bridge's own code — the engine may
live in another environment or be 3.4.0, which has no registry code at all, and the broker's fast path imports
nothing of mempalace:
- `<HOME>/.mempalace/server/<key>/serverinfo.json`, `<key>` the first 24 hex digits of the SHA-256 of the
  palace's canonical path (`abspath(realpath(expanduser(p)))`, case-folded where the OS folds case), under the
  HOME of the hub's process (one user: the broker's HOME);
- `{pid, host, port, scheme, read_only, capabilities, palace_path}`, trusted only while `pid` lives (a crashed hub
  leaves a stale file every reader ignores), never our own pid;
- the bearer token: that directory's `token` first, then `MEMPALACE_MCP_HTTP_TOKEN`; a loopback hub without one
  needs none.

tests/test_hub.py keeps `state_dir` and `live` equal to 3.11's own functions on the same inputs. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_ssh_bridge import hostinfo

TOKEN_ENV = "MEMPALACE_MCP_HTTP_TOKEN"
FORWARD_ENV = "MEMPALACE_HUB_FORWARD"  # "0": mempalace ≥ 3.8 engines do not proxy to a hub (the broker's own engine)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def canonical(palace: str) -> str:
    """The palace path as upstream keys it."""
    return os.path.abspath(os.path.realpath(os.path.expanduser(palace)))


def state_dir(palace: str, home: str | os.PathLike[str] | None = None) -> Path:
    """`~/.mempalace/server/<key>/`: the hub's token and serverinfo for `palace` (upstream's `server_state_dir`)."""
    key = hashlib.sha256(os.path.normcase(canonical(palace)).encode("utf-8")).hexdigest()[:24]
    return Path(home if home is not None else Path.home()) / ".mempalace" / "server" / key


@dataclass(frozen=True)
class Hub:
    """A live hub serving a palace: its process and where to POST JSON-RPC."""

    pid: int
    host: str
    port: int
    scheme: str
    read_only: bool
    palace_path: str | None
    record: Path

    @property
    def base_url(self) -> str:
        """Where a local client dials it: a wildcard bind ("all interfaces") through loopback."""
        host = "127.0.0.1" if self.host.lower() in WILDCARD_HOSTS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    @property
    def dial_host(self) -> str:
        host = "127.0.0.1" if self.host.lower() in WILDCARD_HOSTS else self.host
        return host.strip("[]")

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "url": self.url, "read_only": self.read_only, "record": str(self.record)}


def read_record(palace: str, home: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """serverinfo.json for `palace` as it is on disk (live or not), or None."""
    try:
        data = json.loads((state_dir(palace, home) / "serverinfo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def live(palace: str | None, home: str | os.PathLike[str] | None = None, *, me: int | None = None) -> Hub | None:
    """The hub registered for `palace` while its process lives (never this process `me`), else None."""
    if not palace:
        return None
    info = read_record(palace, home)
    if info is None and (state_dir(palace, home) / "serverinfo.json").exists():
        time.sleep(0.05)  # upstream writes it in place (truncate, then write): read a half-written one once more
        info = read_record(palace, home)
    if info is None:
        return None
    pid, port, host = info.get("pid"), info.get("port"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == (os.getpid() if me is None else me):
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not host or not isinstance(host, str):
        return None
    if not hostinfo.pid_alive(pid) or hostinfo.is_zombie(pid):  # a zombie hub serves nothing (upstream counts it)
        return None
    scheme = info.get("scheme") if info.get("scheme") in ("http", "https") else "http"
    palace_path = info.get("palace_path")
    return Hub(
        pid=pid,
        host=host.strip(),
        port=port,
        scheme=str(scheme),
        read_only=bool(info.get("read_only")),
        palace_path=palace_path if isinstance(palace_path, str) else None,
        record=state_dir(palace, home) / "serverinfo.json",
    )


def tokens(
    palace: str, home: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> tuple[str, ...]:
    """Bearer tokens to try, in upstream's order: the palace's token file, then MEMPALACE_MCP_HTTP_TOKEN."""
    env = os.environ if environ is None else environ
    out: list[str] = []
    try:
        out.append((state_dir(palace, home) / "token").read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        pass
    out.append(env.get(TOKEN_ENV, "").strip())
    unique: list[str] = []
    for token in out:
        if token and token not in unique:
            unique.append(token)
    return tuple(unique)
