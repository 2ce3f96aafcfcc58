"""The container daemon in local-owner mode (`mempalace-broker --container-daemon`): the container's broker.

Why: a container session with no SSH path used to run its own engine as the palace's `local` owner, so the
second session of the same container got no memory. Now the first session of a container elects the container's
daemon (mp_ssh_bridge/daemon.py), which decides its mode (mp_ssh_bridge/containerd.py). With no way to the host's
broker and no broker alive, it execs this: the normal broker (broker/lifecycle.py: mux, engine, bounds, status,
idle exit) holding the palace as kind `local` (broker/ownership.py). owner.json's live holder, or a waiting
request that outranks `local`, is waited for by Ownership's acquire (each request's own deadline answers it
meanwhile). When the host's broker (or a grant) asks for the palace, the running call finishes, the engine stops,
owner.json is released and the daemon exits; queued calls are answered "not executed" (shutting down), so the
sessions' shims resend them after reconnecting — to a newly elected daemon, which then relays if SSH works, or
waits for the palace.

Its records live in a directory of the container's own, `/tmp/mp-bridge-<uid>/daemon-<key>`: `DaemonSettings`
is the full `Settings` whose `paths` are `StatePaths.daemon_paths()` — the one place the override is made, so
every part of the broker (lifecycle, engine, engine record, ownership) uses them. owner.json, owner.requests/ and
palace.id stay in the shared state directory, where the host's broker and every other claimer look.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mp_ssh_bridge import state
from mp_ssh_bridge.settings import Settings
from mp_ssh_bridge_broker import lifecycle

log = logging.getLogger("broker.daemon")

LOCAL_OWNER = lifecycle.LOCAL_OWNER


class DaemonSettings(Settings):
    """Every field (the daemon is a broker and a client of the host), with the container daemon's paths."""

    @property
    def paths(self) -> state.StatePaths:
        return super().paths.daemon_paths()


def load_settings(**overrides: Any) -> DaemonSettings:
    """As `settings.load`: keyword arguments (the command line's flags) win over every other source."""
    return DaemonSettings(**{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- the process
async def serve(settings: DaemonSettings, lock_fd: int | None = None) -> int:
    """The container's broker in local-owner mode (mp_ssh_bridge/containerd.py decided it): hold the daemon's
    broker.lock (adopting the elector's `lock_fd`) and serve as the palace's `local` owner.

    :raises lifecycle.AlreadyRunning: another daemon holds the lock.
    """
    paths = settings.paths
    state.ensure_private_dir(paths.own)
    fd = lifecycle.acquire_lock(paths, lock_fd)  # before anything else: one daemon per container and memory
    log.warning("container daemon %s: local-owner mode", os.getpid())
    return await lifecycle.BrokerProcess(settings, fd, container_daemon=True).run()
