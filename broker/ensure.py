"""`mempalace-broker --ensure`: make sure one healthy broker serves this palace.

Idempotent and race-free: whoever wins a non-blocking flock on broker.lock
spawns the broker and hands it the locked descriptor (the lock travels with
the open file, so there is no gap in which a second process could win), the
rest wait for broker.json and a health round trip. Every wait is bounded.
The shim's election calls `ensure_broker()` in-process; over SSH the
container runs the same code on the host.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

from broker.lifecycle import open_lock, try_lock
from mp_ssh_bridge import protocol, state
from mp_ssh_bridge.settings import Settings

SETTINGS_ENV = "MP_BRIDGE_SETTINGS_JSON"


class EnsureError(Exception):
    """No healthy broker could be reached or started (the message says why)."""


def probe(endpoint: str, timeout: float) -> dict[str, Any] | None:
    """`broker/status` over a unix:// endpoint; the status, or None when it does not answer."""
    if not endpoint.startswith("unix://"):
        return None
    path = endpoint[len("unix://") :]
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(protocol.encode(protocol.request("probe", "broker/status")))
            buf = b""
            while b"\n" not in buf:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
        reply = json.loads(buf.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    res = reply.get("result") if isinstance(reply, dict) else None
    return res if isinstance(res, dict) else None


def healthy_record(settings: Settings, timeout: float = 1.0) -> dict[str, Any] | None:
    """broker.json, if the broker it names answers on its socket."""
    record = state.read_broker_json(settings.paths.json)
    if record is None or not isinstance(record.get("endpoint"), str):
        return None
    status = probe(record["endpoint"], timeout)
    if status is None or (status.get("broker") or {}).get("pid") != record.get("pid"):
        return None
    return record


def describe(record: dict[str, Any], started: bool) -> dict[str, Any]:
    return {
        "endpoint": record["endpoint"],
        "pid": record.get("pid"),
        "palace": record.get("palace"),
        "palace_id": record.get("palace_id"),
        "state_dir": record.get("state_dir"),
        "version": record.get("broker_version"),
        "started": started,
    }


def check_palace(settings: Settings, record: dict[str, Any]) -> None:
    want = str(settings.palace_path)
    have = record.get("palace")
    if have != want:
        raise EnsureError(
            f"the broker in {settings.paths.root} (pid {record.get('pid')}) serves palace {have}, "
            f"but {want} was asked for; one state directory serves one palace — set MEMPALACE_PATH "
            f"to another directory for {want}"
        )


def spawn_detached(settings: Settings, lock_fd: int) -> None:
    """Start `python -m broker --detach` holding our locked fd; returns once it forked."""
    paths = settings.paths
    env = dict(os.environ)
    env[SETTINGS_ENV] = settings.model_dump_json(include=settings.model_fields_set - {"broker_token"})
    argv = [sys.executable, "-m", "broker", "--detach", "--lock-fd", str(lock_fd)]
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(lock_fd,),
            start_new_session=True,
            cwd="/",
            env=env,
        )
    finally:
        os.close(log_fd)
    try:
        proc.wait(timeout=30)  # the --detach parent exits right after its fork
    except subprocess.TimeoutExpired:
        pass


def log_tail(settings: Settings, lines: int = 15) -> str:
    try:
        with open(settings.paths.log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def ensure_broker(settings: Settings, timeout: float | None = None) -> dict[str, Any]:
    """Return the running broker's description, starting one if needed (bounded wait)."""
    paths = settings.paths
    try:
        state.ensure_private_dir(paths.root)
    except (state.UnsafeDirectory, OSError) as exc:
        raise EnsureError(f"cannot use state directory {paths.root}: {exc}") from exc
    limit = settings.ensure_timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    spawned = False
    pause = 0.02
    while True:
        record = healthy_record(settings)
        if record is not None:
            check_palace(settings, record)
            return describe(record, spawned)
        other = state.live_degraded_writer(paths, settings.heartbeat_stale_after)
        if other is not None:
            raise EnsureError(state.describe_degraded(other, paths))
        fd = open_lock(paths)
        try:
            if try_lock(fd):
                if spawned:
                    raise EnsureError(
                        f"the broker we started exited before it was ready; see {paths.log}:\n{log_tail(settings)}"
                    )
                spawn_detached(settings, fd)
                spawned = True
        finally:
            os.close(fd)  # the broker keeps the lock through its own copy
        if time.monotonic() >= deadline:
            holder = state.read_broker_json(paths.json) or {}
            raise EnsureError(
                f"no healthy broker for {paths.root} after {limit:.0f}s"
                + (f" (broker.json names pid {holder.get('pid')} at {holder.get('endpoint')}, which does not answer)" if holder else "")
                + (f"; log {paths.log}:\n{log_tail(settings)}" if spawned else "")
            )
        time.sleep(pause + random.uniform(0, pause))
        pause = min(pause * 1.5, 0.2)
