"""The broker's life: lock, bind, broker.json, heartbeat, idle exit, signals.

Order matters. `broker.lock` is flock'ed first and held until exit, so at
most one broker serves a state directory (flock is coherent on one kernel;
across a VM boundary the shim asks the host to run `--ensure` instead, and
a broker.json naming a live broker on another machine — mp_ssh_bridge.liveness
— makes this one refuse before it touches the socket). The heartbeat follows
the wall clock as well, so a machine waking from sleep beats within a second.
Then the socket is bound, and only then `broker.json` is written — a
reader that finds the file can connect. The engine starts only once the broker
owns the palace (owner.json, broker/ownership.py): a session running its own
engine hands it over, a grant (`mp-bridge run`) takes it for a while; the
broker serves (and answers status) while it waits. On SIGTERM/SIGINT: stop
accepting, let the running request finish within a bound, stop the engine,
release owner.json, remove the socket and broker.json.

The container daemon in local-owner mode (broker/daemon.py) is this same broker with its own records in a
directory of the container's own (`settings.paths` is `StatePaths.daemon_paths()`: broker.lock, broker.sock,
broker.json, engine.json, broker.log, engine-cache.json there; owner.json, owner.requests/ and palace.id in the
shared state directory). It holds the palace as kind `local`, says `mode: "local-owner"` in its broker.json and
broker/status, never repairs palace.id (its broker.lock does not keep the host's broker out), and exits once it
has handed the palace over (broker/ownership.py `on_handed_over`) instead of waiting to take it back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from mp_ssh_bridge import brokerlog, enginecmd, hostinfo, liveness, palace, state
from mp_ssh_bridge.election import open_lock, try_lock
from mp_ssh_bridge.settings import BrokerSettings
from mp_ssh_bridge_broker import __version__, coldstart
from mp_ssh_bridge_broker.engine import EngineUnavailable
from mp_ssh_bridge_broker.mux import Mux
from mp_ssh_bridge_broker.ownership import Ownership
from mp_ssh_bridge_broker.server import Server

log = logging.getLogger("broker.lifecycle")


class WrongFiles(Exception):
    """The engine would open other files than the sessions of this broker resolved: never serve them."""


class AlreadyRunning(Exception):
    """Another process holds broker.lock for this state directory."""


def acquire_lock(paths: state.StatePaths, inherited_fd: int | None = None) -> int:
    """Take (or adopt, from the process that won the election) broker.lock."""
    fd = inherited_fd if inherited_fd is not None else open_lock(paths)
    if inherited_fd is not None:
        os.set_inheritable(fd, False)
    if not try_lock(fd):  # on an inherited fd this succeeds: same open file description
        os.close(fd)
        holder = state.read_broker_json(paths.json) or {}
        raise AlreadyRunning(
            f"another broker (pid {holder.get('pid', '?')}) already serves {paths.root}"
        )
    return fd


LOCAL_OWNER = "local-owner"  # the container daemon's mode when it runs the engine itself (broker.json "mode")
DAEMON_WHAT = "mp-bridge container daemon"  # its owner.json "what"


class BrokerProcess:
    """One broker run, from lock to clean exit (`container_daemon`: the container daemon's local-owner mode)."""

    def __init__(self, settings: BrokerSettings, lock_fd: int | None = None, *, container_daemon: bool = False) -> None:
        self.settings = settings
        self.paths = settings.paths
        self._inherited_lock = lock_fd
        self.container_daemon = container_daemon
        self.mux = Mux(settings)
        # Upstream's registry and a hub's loopback port are this machine's: a container's local owner cannot judge a
        # host's hub (its pid means nothing here, its 127.0.0.1 is not the host's), so only a host broker looks.
        self.mux.engine.hub_lookup = not container_daemon
        # Every engine start (warm-up, on demand, crash restart) first holds the palace (docs/PROTOCOL.md "Ownership"),
        # and gives up if the palace is lost while it is under way: Ownership sets engine.before_start and may_run.
        if container_daemon:  # the palace's `local` owner: a hand-over ends the daemon (its sessions re-elect one)
            self.ownership = Ownership(settings, self.mux.engine, self.mux.gate, kind="local", what=DAEMON_WHAT,
                                       on_handed_over=self._request_stop)
        else:
            self.ownership = Ownership(settings, self.mux.engine, self.mux.gate)
        self.mux.attach_ownership(self.ownership)
        self.server = Server(self.mux, settings.max_line_bytes)  # bounds from settings (broker/bounds.py)
        self.stop_event = asyncio.Event()
        self.socket_path: Path | None = None
        self.record: dict[str, Any] = {}
        self.exit_reason = ""
        self.beats = liveness.BeatSchedule(settings.heartbeat_interval)  # wall clock too: a Mac's sleep stops monotonic
        self._hub_beaten: object = None  # the hub route owner.json was last written with (None: own engine)

    async def run(self) -> int:
        state.ensure_private_dir(self.paths.root)
        state.ensure_private_dir(self.paths.own)  # the daemon's own directory (the state directory for a broker)
        lock_fd = acquire_lock(self.paths, self._inherited_lock)
        try:
            return await self._serve()
        finally:
            os.close(lock_fd)  # releases the flock

    async def _serve(self) -> int:
        s = self.settings
        # A live degraded-mode session (degraded.json) is no reason to refuse any more: the engine waits until the
        # palace is handed over (owner.claim counts that record as a holder, so no engine starts beside it).
        owner = liveness.live_foreign_owner(self.paths, s.heartbeat_stale_after)  # our flock cannot see it
        if owner is not None:  # never a second writer, never its socket removed (Server.start_unix)
            raise AlreadyRunning(liveness.describe_owner(*owner, self.paths, s.heartbeat_stale_after))
        memory = s.memory  # verified against the engine's own answer before the engine starts (_warm_engine)
        try:
            self.engine_argv: list[str] | None = enginecmd.resolve(s.engine_argv)
        except enginecmd.EngineNotFound:
            self.engine_argv = None  # the engine's own start reports it to every request
        # The daemon keeps its own: a container's engine is another install than the host's (another key), and
        # each would otherwise overwrite the other's cache in the shared directory.
        cached = coldstart.load(self.paths.own, coldstart.engine_key(self.engine_argv))
        if cached is not None:
            self.mux.seed(*cached)  # initialize and tools/list answered before the engine is up
            log.info("answering initialize and tools/list from the last run's engine until this one is up")
        await self._check_engine_files()  # before anything is published: a refusing broker is never "healthy"
        # A broker holds broker.lock: a damaged palace.id is replaced. The daemon's own lock keeps no host broker
        # out, so it never replaces one (it refuses, naming the file, until the host's broker repairs it).
        palace_id = state.palace_id(self.paths, repair=not self.container_daemon)
        self.socket_path = self.paths.socket()
        await self.server.start_unix(self.socket_path)
        endpoints = {"unix": f"unix://{self.socket_path}"}
        token = None
        if s.tcp:
            host, _, port = s.tcp.rpartition(":")
            token = secrets.token_urlsafe(32)
            bound_host, bound_port = await self.server.start_tcp(host.strip("[]"), int(port), token)
            from mp_ssh_bridge import urls  # IPv6 bracketed; a wildcard bind advertises only tcp_advertise

            tcp_listen = urls.host_port(bound_host, bound_port)
            advertised = urls.advertised_tcp(bound_host, bound_port, s.tcp_advertise)
            if advertised:
                endpoints["tcp"] = advertised
            else:
                log.warning("listening on tcp %s but advertising no TCP endpoint: a wildcard address names no host "
                            "another machine can dial; set MP_BRIDGE_TCP_ADVERTISE (e.g. host.docker.internal, "
                            "host.orb.internal, host.lima.internal)", tcp_listen)
        started = time.time()
        self.record = {
            "version": state.BROKER_JSON_VERSION,
            "pid": os.getpid(),
            "proc_start": hostinfo.proc_start(os.getpid()),  # `mp-bridge stop` checks it: no pid reuse
            "host": hostinfo.host_name(),
            "boot_id": hostinfo.boot_id(),
            "pid_ns": hostinfo.pid_namespace(),  # a container on the same boot is another machine for pids
            "endpoint": endpoints["unix"],
            "endpoints": endpoints,
            **memory.as_dict(),  # palace, kg, config_dir, palace_flag: the files the engine opens
            "palace_id": palace_id,
            "state_dir": str(self.paths.root),
            "engine": {"command": s.engine_argv, "pid": None, "version": None},
            "broker_version": __version__,
            "started_at": started,
            "heartbeat": started,
            "heartbeat_interval": s.heartbeat_interval,
            "manager": hostinfo.service_manager(),  # launchd / systemd: `mp-bridge stop` names their command
        }
        if self.container_daemon:
            self.record["mode"] = LOCAL_OWNER
            self.record["daemon_dir"] = str(self.paths.own)
        if token:
            self.record["tcp_token"] = token
            self.record["tcp_listen"] = tcp_listen  # what is bound; endpoints["tcp"] is what to dial (if any)
        self.mux.status_extra = {
            "pid": os.getpid(),
            "version": __version__,
            "host": self.record["host"],
            "started_at": started,
            **memory.as_dict(),
            "palace_id": palace_id,
            "state_dir": str(self.paths.root),
            "endpoints": endpoints,
        }
        if self.container_daemon:  # `mp-bridge status` in the container shows which mode its daemon is in
            self.mux.status_extra["daemon"] = {"mode": LOCAL_OWNER, "dir": str(self.paths.own)}
        self.mux.start()
        self.ownership.start()
        self._write_record()
        log.info("%s %s serving %s (id %s)%s", "container daemon" if self.container_daemon else "broker", os.getpid(),
                 memory, palace_id, f" in {LOCAL_OWNER} mode, records in {self.paths.own}" if self.container_daemon else "")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, f"signal {sig.name}")
        warm = asyncio.create_task(self._warm_engine(), name="engine-warmup")
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        try:
            await self.stop_event.wait()
        finally:
            log.info("stopping: %s", self.exit_reason)
            for task in (warm, beat):
                task.cancel()
            await self.server.close()
            await self.mux.shutdown(s.shutdown_grace, self.exit_reason)
            await self.ownership.close()  # after the engine has exited (Rule 4)
            await self.server.close_connections()
            self._remove_state()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    async def _check_engine_files(self) -> None:
        """Before the engine starts: would it open the files this broker's sessions resolved? Raises WrongFiles.

        The sessions (and this broker's state directory) are keyed by `palace.resolve`; if the engine,
        asked in its own interpreter, would open other files, serving would write memories where no
        plain mempalace-mcp looks: refuse instead.
        """
        s = self.settings
        if self.engine_argv is None:
            return
        try:
            theirs, version = await asyncio.get_running_loop().run_in_executor(
                None, palace.engine_resolve, self.engine_argv, str(s.palace) if s.palace else None, dict(os.environ)
            )
        except palace.EngineResolveError as exc:
            log.warning("cannot ask the engine which files it opens (%s); serving %s as resolved here", exc, s.memory)
            return
        why = palace.mismatch(s.memory, theirs.as_dict())
        if why:
            raise WrongFiles(
                f"the engine (mempalace {version}) would open other files than the bridge resolved: {why}. "
                "Set MEMPALACE_PALACE_PATH (or --palace) explicitly, or use the engine version the bridge supports"
            )

    def _request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.exit_reason = reason
            self.stop_event.set()

    async def _warm_engine(self) -> None:
        """Start the engine now so the first client never pays the 0.6–1 s spawn; keep its answers for next time."""
        engine = self.mux.engine
        try:
            await engine.ensure_ready()
            self.mux._refresh_init_cache()
            self._write_record()
            engine_id, fut = await engine.request("tools/list", None)
            try:
                reply = await asyncio.wait_for(fut, self.settings.engine_start_timeout)
            finally:
                engine.forget(engine_id)
        except Exception as exc:  # noqa: BLE001 - logged; requests will report it
            log.error("engine warm-up failed: %s", exc)
            if isinstance(exc, EngineUnavailable):
                self.mux.startup.failed(str(exc))  # waiting sessions' notices and deadline errors name it
            return
        listed = reply.get("result")
        if isinstance(listed, dict) and engine.initialize_result is not None:
            if self.mux.confirm_tools(listed):
                log.warning("the engine lists other tools than last time: sessions were sent tools/list_changed")
            coldstart.save(self.paths.own, coldstart.engine_key(self.engine_argv), engine.initialize_result, listed)

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(self.beats.tick)
            now = time.monotonic()
            route = self.mux.engine.hub
            # Due by the wall clock too (the first look after a sleep beats at once); entering or leaving hub mode
            # is written at once: owner.json's kind says who writes the palace (`hub` or `broker`).
            if self.beats.due() or route is not self._hub_beaten:
                self.beats.beaten()
                self._hub_beaten = route
                try:
                    self._write_record()
                except OSError as exc:
                    log.error("cannot refresh broker.json: %s", exc)
                await asyncio.to_thread(self.ownership.beat, self.mux.engine.pid)  # owner.json, while held
                try:
                    if brokerlog.rotate_if_big(self.paths.log):
                        log.info("log rotated: the previous part is %s.1", self.paths.log)
                except OSError as exc:
                    log.error("cannot rotate %s: %s", self.paths.log, exc)
            if self._idle_for(now) is not None:
                self._request_stop(f"idle for {s.idle_exit_minutes:g} min without clients")
                return

    def _idle_for(self, now: float) -> float | None:
        limit = self.settings.idle_exit_minutes * 60
        mux = self.mux
        if limit <= 0 or mux.sessions or mux.in_flight is not None or len(mux.queue):
            return None
        idle = now - mux.idle_since
        return idle if idle >= limit else None

    def _write_record(self) -> None:
        engine = self.mux.engine
        self.record["heartbeat"] = time.time()
        self.record["engine"] = dict(self.record["engine"], pid=engine.pid, version=engine.version)
        state.write_json_atomic(self.paths.json, self.record)

    def _remove_state(self) -> None:
        current = state.read_broker_json(self.paths.json)
        if current is not None and current.get("pid") == os.getpid():
            _unlink(self.paths.json)
        if self.socket_path is not None:
            _unlink(self.socket_path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
