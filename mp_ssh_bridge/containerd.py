"""The container daemon process (`python -m mp_ssh_bridge.containerd`): pick its mode once, then run it.

Started by the first session of a container (mp_ssh_bridge/daemon.py elects it and hands over the locked
broker.lock of the daemon's own directory). Two modes (docs/PROTOCOL.md "The container daemon"):

- **relay** (mp_ssh_bridge/relay.py, in this process): an SSH connection to the host works, one byte pipe per
  session to the host's broker over it. Also when SSH is *refused* (host key, authentication, no usable key): a
  host that cannot be verified proves nothing about whether its broker runs, so that is never a reason to write
  the palace from here — the relay answers each session with the refusal and tries again. Also when the host is
  unreachable but the shared broker.json names a broker that may still be alive (liveness' rule): this side must
  not own the palace beside it; the relay keeps trying.
- **local-owner**: no SSH path is configured at all (MP_BRIDGE_SSH_HOST not set on purpose and no `Host` entry
  for the alias in the SSH config), or the host is unreachable (connection refused, no route, timed out) and no
  broker can be alive. This process then becomes the container's broker (`mempalace-broker --container-daemon`,
  broker/daemon.py: exec'd with the election's lock), which owns the palace as kind `local` and hands it to the
  host's broker when asked, then exits.

The decision lives here, in the client layer (it needs asyncssh), so the broker package never imports asyncssh;
the one SSH connection made to decide is the relay's first.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_ssh_bridge import liveness
from mp_ssh_bridge.errors import ShimError
from mp_ssh_bridge.settings import Settings

Connect = Callable[[Settings], Awaitable[Any]]  # mp_ssh_bridge.ssh.connect: an SSH connection, or SSHBridgeError

RELAY, LOCAL_OWNER = "relay", "local-owner"  # LOCAL_OWNER is broker/lifecycle.py's mode name too
CONNECT_SLACK_S = 2.0  # over connect_timeout (asyncssh's own bound): a belt for what it does not cover

@dataclass
class Decision:
    """The daemon's mode, why (one line for the log), and the SSH connection the relay starts with (if any)."""

    mode: str
    why: str
    conn: Any = None
    note: str | None = None  # relay mode without a way to the host: what each session is told besides the SSH error


# --------------------------------------------------------------------------- is an SSH path configured?
def alias_in_config(path: Path, alias: str) -> str | None:
    """The `Host` pattern of the OpenSSH config at `path` that names `alias`, or None (no file, or no entry).

    A bare `*` does not count: it applies to every host and chooses none. `Match` blocks and `Include`d files
    are not followed (asyncssh reads them when it connects; this only asks whether an alias was set up)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    name = alias.lower()
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.replace("=", " ", 1).split(None, 1)
        keyword, rest = parts[0], parts[1] if len(parts) > 1 else ""
        if keyword.lower() != "host":
            continue
        try:
            patterns = shlex.split(rest, comments=True)
        except ValueError:
            patterns = rest.split()
        if any(p.startswith("!") and fnmatch.fnmatchcase(name, p[1:].lower()) for p in patterns):
            continue  # negated for this alias: the whole line does not apply
        for pattern in patterns:
            if pattern != "*" and not pattern.startswith("!") and fnmatch.fnmatchcase(name, pattern.lower()):
                return pattern
    return None


def ssh_path(settings: Settings) -> str | None:
    """Why the daemon should try SSH to the host (in words), or None when no SSH path is configured at all."""
    from mp_ssh_bridge.discovery import ssh_configured

    if ssh_configured(settings):
        return f"MP_BRIDGE_SSH_HOST={settings.ssh_host} is set"
    pattern = alias_in_config(settings.ssh_config_path, settings.ssh_host)
    if pattern is not None:
        return f"{settings.ssh_config_path} has `Host {pattern}` for the alias {settings.ssh_host}"
    return None


# --------------------------------------------------------------------------- may a broker be alive?
def live_broker(settings: Settings) -> str | None:
    """What proves that a broker may be alive (the shared broker.json, by liveness' rule), or None.

    The proof a broker's election asks for (liveness' rule) before any owner of this side's. Blocking (a record
    from another machine about to be judged gone is read again a moment later)."""
    paths = settings.paths  # broker.json of the SHARED state directory: liveness reads `paths.root`
    record, verdict = liveness.record_alive(paths, settings.heartbeat_stale_after)
    if record is None or verdict is None or not verdict.alive:
        return None
    where = liveness.describe_machine(record) if verdict.foreign else "this machine"
    return f"broker.json in {paths.root} names broker pid {record.get('pid')} ({where}), which may be alive: {verdict.why}"


# --------------------------------------------------------------------------- the decision
async def decide(
    settings: Settings, *, connect: Connect | None = None,
    broker_alive: Callable[[Settings], str | None] = live_broker,
) -> Decision:
    """Relay or local-owner (module docstring). Never local-owner after a refused SSH login or host key."""
    configured = ssh_path(settings)
    unreachable = ""
    if configured is not None:
        if connect is None:
            from mp_ssh_bridge import ssh

            connect = ssh.connect
        bound = settings.connect_timeout + CONNECT_SLACK_S
        try:
            conn = await asyncio.wait_for(connect(settings), bound)
        except (asyncio.TimeoutError, TimeoutError):
            unreachable = f"SSH to {settings.ssh_host} did not complete within {bound:g} s"
        except ShimError as exc:  # SSHBridgeError: `refuse` for a host key or login refused
            if getattr(exc, "refuse", False) or not getattr(exc, "unreachable", False):
                # sshd answered, or the set-up is broken: proof of nothing, so never local-owner mode
                how = "was refused" if getattr(exc, "refuse", False) else "failed"
                return Decision(RELAY, f"SSH to the host {how} ({exc}); that proves nothing about the host's broker, "
                                       "so never local-owner mode: sessions are told why, SSH is tried again")
            unreachable = str(exc)
        except Exception as exc:  # noqa: BLE001 - not known to mean "unreachable": the safe side (no engine here)
            return Decision(RELAY, f"SSH to the host failed in an unexpected way ({type(exc).__name__}: {exc}); not "
                                   "proof that no broker runs, so relay mode: SSH is tried again")
        else:
            return Decision(RELAY, f"connected to the host over SSH ({configured})", conn)
    # Before any engine of ours: a broker that may be alive (one from before owner.json never hands over) rules it out.
    alive = await asyncio.to_thread(broker_alive, settings)
    no_way = (f"the host is unreachable over SSH ({unreachable})" if configured is not None else
              f"no SSH path to the host is configured (MP_BRIDGE_SSH_HOST not set, no `Host {settings.ssh_host}` in "
              f"{settings.ssh_config_path})")
    if alive is not None and await asyncio.to_thread(_broker_holds_owner_json, settings):
        # A broker of the ownership protocol: it hands the palace over when it stops, and owner.json keeps the two
        # of us apart meanwhile, so the daemon may wait for the palace as its local owner.
        return Decision(LOCAL_OWNER, f"{no_way}; {alive}, and it holds the palace by owner.json: this daemon waits "
                                     "for it as the palace's local owner (one writer at a time)")
    if alive is not None:
        note = (f"{alive}, so this container will NOT start its own memory engine beside it (that would be a second "
                "writer on the palace); configure the SSH path to its host (MP_BRIDGE_SSH_HOST), or stop that broker")
        return Decision(RELAY, f"{no_way}, but {alive}: this side must not own the palace beside it; SSH is tried "
                               "again", note=note)
    return Decision(LOCAL_OWNER, f"{no_way}, and no broker can be alive (the shared broker.json names none that lives)")


def _broker_holds_owner_json(settings: Settings) -> bool:
    """owner.json's live holder is a broker: one that takes part in the ownership protocol (a bridge from before
    owner.json never writes it, and never hands the palace over)."""
    from mp_ssh_bridge import owner

    held = owner.live_holder(settings.paths, settings.heartbeat_stale_after)
    return held is not None and held.get("kind") in owner.BROKER_KINDS


def _local_owner_argv(settings: Settings, lock_fd: int) -> list[str]:
    from mp_ssh_bridge.election import BROKER_MODULE, elected_argv

    return elected_argv(BROKER_MODULE, "--container-daemon", settings, lock_fd)


def _run_loop(main: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    """Run the daemon's loop: uvloop where it is installed (Linux) and not turned off (MP_BRIDGE_UVLOOP=false):
    every relayed call passes through this loop twice, and uvloop's transports take a measurable share off each
    pass (docs/bench-container.md); asyncio's own loop otherwise."""
    import asyncio

    if use_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    """`python -m mp_ssh_bridge.containerd [--detach] [--lock-fd N] [--mempalace-path P] [--palace P]`: this
    container's daemon. Relay mode runs here (mp_ssh_bridge.relay); local-owner mode is the broker itself, in the
    container with its records in the daemon's directory (`mempalace-broker --container-daemon`, exec'd with the
    election's lock)."""
    import argparse
    import logging
    import sys

    p = argparse.ArgumentParser(prog="python -m mp_ssh_bridge.containerd", description=main.__doc__)
    p.add_argument("--detach", action="store_true")
    p.add_argument("--lock-fd", type=int, dest="lock_fd")
    p.add_argument("--mempalace-path", dest="mempalace_path")
    p.add_argument("--palace")
    args = p.parse_args(argv)
    from mp_ssh_bridge.settings import load

    if args.mempalace_path:
        os.environ["MEMPALACE_PATH"] = args.mempalace_path
    try:
        settings = load(palace=args.palace)
    except ValueError as exc:
        print(f"mp-bridge daemon: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.detach and os.fork() > 0:
        os._exit(0)  # the electing session returns at once; the daemon is reparented
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("daemon")
    paths = settings.paths.daemon_paths()

    async def run() -> int | list[str]:
        decision = await decide(settings)
        log.warning("container daemon pid %d: %s mode: %s", os.getpid(), decision.mode, decision.why)
        if decision.mode == LOCAL_OWNER:
            return _local_owner_argv(settings, args.lock_fd) if args.lock_fd is not None else ["--no-lock"]
        from mp_ssh_bridge import relay

        recheck = (lambda: live_broker(settings) is None) if decision.note else None
        return await relay.serve(settings, paths, args.lock_fd, decision.conn, note=decision.note, recheck=recheck)

    outcome = _run_loop(run(), settings.uvloop)
    if isinstance(outcome, int):
        return outcome
    if outcome == ["--no-lock"]:
        log.error("local-owner mode needs the election's lock (--lock-fd); not started")
        return 1
    os.set_inheritable(args.lock_fd, True)  # the broker keeps holding the election's flock
    os.execv(outcome[0], outcome)
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
