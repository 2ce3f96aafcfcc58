"""The one way to prove a link leads to *our* broker, before any call is forwarded.

Whatever the transport, a new link is used only after one `broker/status`
round trip: it proves a broker answers, tells it this session's own settings
(its deadline and read-only surface travel with the session), and gives the
broker's palace identity, which must be ours — a call forwarded to the broker
of another palace would write memories where nobody looks for them. TCP links
authenticate first (`authenticate`). Stdlib only: the fast path runs this.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from mp_ssh_bridge.config import Config
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import EndpointError, NoAnswer, PalaceMismatch, ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.palace import mismatch
from mp_ssh_bridge.protocol import JSONRPC, PALACE_MISMATCH, UNAUTHORIZED, encode

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every agent start ~3 ms; annotations only
    from typing import Any

_seq = itertools.count(1)


def round_trip(link: Link, msg: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    """Send one request, read until its reply; raises TimeoutError / ConnectionError."""
    link.send(encode(msg))
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer to {what} within {timeout:g}s")
        frame = link.recv(remaining)
        if frame is None:
            raise ConnectionError(f"the broker closed the connection during {what}")
        try:
            reply = json.loads(frame)
        except ValueError:
            continue
        if isinstance(reply, dict) and reply.get("id") == msg["id"]:
            return reply


def broker_status(link: Link, timeout: float, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `broker/status` round trip; its result. Raises OSError, ShimError, TimeoutError."""
    msg: dict[str, Any] = {"jsonrpc": JSONRPC, "id": f"mp-shim/status/{os.getpid()}/{next(_seq)}",
                           "method": "broker/status"}
    if params:
        msg["params"] = params
    reply = round_trip(link, msg, timeout, "broker/status")
    res = reply.get("result")
    if isinstance(res, dict):
        return res
    err = reply.get("error")
    if isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str):
        # A refusal in the broker's own words and code (a container daemon that cannot reach the host says why).
        raise (PalaceMismatch(err["message"]) if err["code"] == PALACE_MISMATCH else ShimError(err["code"], err["message"]))
    raise ConnectionError(f"broker/status failed: {err}")


def session_params(cfg: Config, link: Link) -> dict[str, Any]:
    """What travels with the session: its deadline (the broker answers before it) and read-only surface."""
    # pi's own timer is a JavaScript setTimeout: nothing above 2**31-1 ms exists; the broker refuses more.
    params: dict[str, Any] = {"timeoutMs": min(cfg.timeout_ms, 2**31 - 1), "transport": link.transport,
                              "role": cfg.resolved_role()}
    if cfg.read_only:
        params["readOnly"] = True
    return params


def authenticate(link: Link, token: str | None, url: str, timeout: float) -> None:
    """TCP's first message: `broker/auth` with the token; raises EndpointError (UNAUTHORIZED)."""
    if not token:
        raise EndpointError(
            f"{url} needs a token: set MEMPALACE_BROKER_TOKEN (the tcp_token in the broker's broker.json)",
            UNAUTHORIZED,
        )
    msg = {"jsonrpc": JSONRPC, "id": "mp-shim/auth", "method": "broker/auth", "params": {"token": token}}
    try:
        reply = round_trip(link, msg, timeout, "broker/auth")
    except (OSError, TimeoutError) as exc:
        raise EndpointError(f"{url} did not answer broker/auth: {exc}", UNAUTHORIZED) from exc
    if not isinstance(reply.get("result"), dict) or reply["result"].get("ok") is not True:
        err = reply.get("error")
        message = err.get("message") if isinstance(err, dict) else err
        raise EndpointError(
            f"{url}: the broker refused the token ({message}); set MEMPALACE_BROKER_TOKEN to the tcp_token "
            "in the broker's broker.json",
            UNAUTHORIZED,
        )


def read_palace_id(state_dir: str) -> str | None:
    try:
        with open(os.path.join(state_dir, "palace.id"), encoding="ascii") as fh:
            return fh.read().strip() or None
    except (OSError, ValueError):
        return None


def check_identity(status: dict[str, Any], cfg: Config, endpoint: str, role: str) -> None:
    """One broker per memory: its palace.id must be ours; on the host its files must be the ones we resolve."""
    broker = status.get("broker") if isinstance(status.get("broker"), dict) else {}
    assert isinstance(broker, dict)
    their_id = broker.get("palace_id")
    our_id = read_palace_id(cfg.state_dir)
    if our_id and their_id and our_id != their_id:
        raise PalaceMismatch(
            f"palace mismatch: the broker at {endpoint} serves palace {broker.get('palace')} (palace.id {their_id}), "
            f"but this session's state directory {cfg.state_dir} belongs to palace id {our_id}; one broker serves "
            "one palace — point MEMPALACE_BROKER / MEMPALACE_PATH at the right one"
        )
    daemon = broker.get("daemon") if isinstance(broker.get("daemon"), dict) else {}
    # Across a VM boundary paths differ and the palace.id decides; the container's own daemon in local-owner mode
    # runs on this side, so its files are compared as a host broker's are.
    same_side = role == "host" or (isinstance(daemon, dict) and daemon.get("mode") == "local-owner")
    if same_side and cfg.memory is not None:
        why = mismatch(cfg.memory, broker)
        if why:
            raise PalaceMismatch(
                f"palace mismatch: the broker at {endpoint} (pid {broker.get('pid')}) does not serve the memory "
                f"this session would open: {why}. One state directory ({cfg.state_dir}) serves one set of files; "
                "with MEMPALACE_PATH unset each set gets its own"
            )


def prove(link: Link, cfg: Config, role: str, timeout: float | None = None) -> dict[str, Any]:
    """`broker/status` with this session's parameters, then the palace identity; closes the link on failure.

    Raises PalaceMismatch (-32067), or ShimError (BROKER_UNREACHABLE) when it does not answer as a broker.
    """
    try:
        status = broker_status(link, cfg.connect_timeout if timeout is None else timeout, session_params(cfg, link))
        check_identity(status, cfg, link.endpoint, role)
    except ShimError:
        link.close()
        raise
    except (OSError, ValueError) as exc:  # TimeoutError and ConnectionError are OSErrors
        link.close()
        raise NoAnswer(f"{link.endpoint} does not answer as a broker: {exc}") from exc
    note = version_note(status)
    if note:
        log(30, note)
    return status


def version_note(status: dict[str, Any]) -> str | None:
    """One line when the broker runs another mp-ssh-bridge version than this session (it still works: the
    protocol between them is versioned by its methods, and both sides ignore what they do not know)."""
    from mp_ssh_bridge import __version__

    broker = status.get("broker") if isinstance(status.get("broker"), dict) else None
    theirs = broker.get("version") if broker else None
    if not isinstance(theirs, str) or theirs == __version__:
        return None
    return (f"the broker runs mp-ssh-bridge {theirs}, this session {__version__}: it works; to run one version, "
            f"upgrade the older side and run `mp-bridge restart` (no queued call is lost)")
