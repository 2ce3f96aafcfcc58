"""The one engine child: spawn, initialize, route its replies, restart, stall-kill.

The engine (`mempalace-mcp`) answers strictly one request at a time in
arrival order and exits by itself after idle hours, so the broker starts it
on demand, initializes it once, restarts it with backoff and a budget, and
kills it (SIGTERM, then SIGKILL) when it stalls. Spawning costs 0.6–1 s, so
clients see it at most once per restart, never per session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from mp_ssh_bridge import enginecmd, protocol
from mp_ssh_bridge.settings import BrokerSettings
from mp_ssh_bridge_broker.tasks import Tasks

log = logging.getLogger("broker.engine")


class EngineUnavailable(Exception):
    """The engine cannot be started right now (the message says why)."""


class EngineExited(Exception):
    """The engine exited while a request was outstanding."""

    def __init__(self, returncode: int | None, stderr_tail: str) -> None:
        detail = f"exit code {returncode}" if returncode is not None else "killed"
        super().__init__(f"engine exited ({detail})")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class Engine:
    """One `mempalace-mcp` child process at a time, and its request futures."""

    def __init__(self, settings: BrokerSettings, on_notification: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self._on_notification = on_notification
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._start_lock = asyncio.Lock()
        self._tasks = Tasks("engine")  # every task started here: readers, sends, restart
        self._readers: list[asyncio.Task[None]] = []  # this child's stdout/stderr readers, joined at kill/stop
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._restart_times: collections.deque[float] = collections.deque()
        self._failures = 0
        self._cooldown_until = 0.0
        self._last_error = ""
        self.initialize_result: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.starts = 0
        self.last_exit: str | None = None
        self.state = "stopped"
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None

    # --- facts for status / broker.json ------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def version(self) -> str | None:
        info = (self.initialize_result or {}).get("serverInfo") or {}
        return info.get("version")

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self.state == "ready"

    # --- start -------------------------------------------------------------------
    async def ensure_ready(self) -> None:
        """Start the engine if it is not running; raise EngineUnavailable when it cannot be."""
        if self.running():
            return
        async with self._start_lock:
            if self.running():
                return
            if self._stopping:
                raise EngineUnavailable("the broker is shutting down")
            now = time.monotonic()
            if now < self._cooldown_until:
                raise EngineUnavailable(
                    f"engine failed to start {self._failures} times; next try in "
                    f"{self._cooldown_until - now:.0f}s. Last error: {self._last_error}"
                )
            while True:
                delay = self._restart_delay()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await self._start()
                    self._failures = 0
                    return
                except EngineUnavailable as exc:
                    self._failures += 1
                    self._last_error = str(exc)
                    log.error("engine start failed (%d): %s", self._failures, exc)
                    if self._failures >= 3:
                        self._cooldown_until = time.monotonic() + self.settings.engine_backoff_max
                        raise

    def _restart_delay(self) -> float:
        """Seconds to wait before the next start; raises when the restart budget is spent.

        Backoff grows with the starts in the window: 0, 0.25 s, 0.5 s, 1 s ... capped.
        """
        now = time.monotonic()
        window = self.settings.engine_restart_window
        while self._restart_times and now - self._restart_times[0] > window:
            self._restart_times.popleft()
        n = len(self._restart_times)
        if n > self.settings.engine_restart_budget:
            self._cooldown_until = now + self.settings.engine_backoff_max * 3
            raise EngineUnavailable(
                f"engine restarted {n - 1} times in {window:.0f}s; pausing restarts for "
                f"{self.settings.engine_backoff_max * 3:.0f}s. Last exit: {self.last_exit}. "
                f"stderr: {self.stderr_tail()[-500:]}"
            )
        if n == 0:
            return 0.0
        delay = min(self.settings.engine_backoff_max, 0.25 * 2 ** (n - 1))
        return max(0.0, delay - (now - self._restart_times[-1]))

    async def _start(self) -> None:
        try:
            # --palace only when the session gave one: without it the engine resolves its palace, and keeps its
            # knowledge graph, exactly as a plain mempalace-mcp would (palace.resolve).
            flag = ["--palace", str(self.settings.palace)] if self.settings.palace else []
            argv = enginecmd.resolve(self.settings.engine_argv) + flag
        except enginecmd.EngineNotFound as exc:
            self.state = "failed"
            raise EngineUnavailable(str(exc)) from None
        env = dict(os.environ)
        env["MEMPALACE_HUB_FORWARD"] = "0"  # 3.8+ would otherwise proxy to a registered hub
        # The broker's engine is the palace's one writer; read-only is per session (broker/readonly.py).
        # A read-only shim that elected this broker must not make the engine read-only for everyone.
        env.pop("MEMPALACE_MCP_READ_ONLY", None)
        if self.settings.engine_eager_warmup:
            env.setdefault("MEMPALACE_EAGER_WARMUP", "1")
        self._restart_times.append(time.monotonic())
        self.state = "starting"
        self.starts += 1
        log.info("starting engine: %s", " ".join(argv))
        limit = self.settings.max_line_bytes + 1024
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=limit,
                start_new_session=True,  # a ^C to the broker's terminal is the broker's to handle
            )
        except OSError as exc:
            self.state = "failed"
            raise EngineUnavailable(f"cannot run engine {argv[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        self.started_at = time.time()
        self._readers = [
            self._tasks.spawn(self._read_stdout(proc), name="engine-stdout"),
            self._tasks.spawn(self._read_stderr(proc), name="engine-stderr"),
        ]
        try:
            fut = self._request_future(
                "initialize",
                {
                    "protocolVersion": protocol.LATEST_PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "mempalace-broker", "version": _version()},
                },
            )
            reply = await asyncio.wait_for(fut, self.settings.engine_start_timeout)
        except asyncio.TimeoutError:
            await self.kill("no initialize answer in time")
            raise EngineUnavailable(
                f"engine did not answer initialize within {self.settings.engine_start_timeout:.0f}s"
            ) from None
        except EngineExited as exc:
            self.state = "failed"
            raise EngineUnavailable(f"engine exited during start-up ({exc}): {exc.stderr_tail[-800:]}") from None
        if "result" not in reply:
            await self.kill("initialize failed")
            raise EngineUnavailable(f"engine refused initialize: {reply.get('error')}")
        self.initialize_result = reply["result"]
        await self.send(protocol.notification("notifications/initialized"))
        self.state = "ready"
        log.info("engine ready: pid %s, %s", proc.pid, self.version)

    # --- I/O ---------------------------------------------------------------------
    def _request_future(self, method: str, params: Any) -> asyncio.Future[dict[str, Any]]:
        self._next_id += 1
        engine_id = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[engine_id] = fut
        fut.engine_id = engine_id  # type: ignore[attr-defined]
        self._tasks.spawn(self._send_quietly(protocol.request(engine_id, method, params)), name=f"engine-send-{engine_id}")
        return fut

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except EngineUnavailable:
            pass  # the engine died; its exit fails the pending future with the reason

    async def request(self, method: str, params: Any) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Send one request; returns its engine id and a future of the raw reply."""
        if not self.running():
            raise EngineUnavailable("engine is not running")
        self._next_id += 1
        engine_id = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[engine_id] = fut
        await self.send(protocol.request(engine_id, method, params))
        return engine_id, fut

    def forget(self, engine_id: int) -> None:
        self._pending.pop(engine_id, None)

    async def send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise EngineUnavailable("engine is not running")
        try:
            proc.stdin.write(protocol.encode(message))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EngineUnavailable(f"engine stdin closed: {exc}") from exc

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                try:
                    line = await protocol.read_frame(proc.stdout, self.settings.max_line_bytes)
                except protocol.LineTooLong:
                    log.error("engine wrote a line over %d bytes; killing it", self.settings.max_line_bytes)
                    await self.kill("oversized output line")
                    break
                if line is None:
                    break
                if not line.strip():
                    continue
                try:
                    msg = protocol.decode(line)
                except ValueError:
                    log.warning("engine wrote non-JSON: %r", line[:200])
                    continue
                if not isinstance(msg, dict):
                    continue
                if protocol.is_response(msg):
                    fut = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    else:
                        log.debug("dropping engine reply for unknown id %r", msg.get("id"))
                elif protocol.is_notification(msg):
                    self._on_notification(msg)
                else:
                    log.debug("ignoring engine message %r", msg.get("method"))
        finally:
            await self._on_exit(proc)

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            text = raw.decode("utf-8", "replace").rstrip()
            if text:
                self._stderr_tail.append(text)
                log.info("engine: %s", text)

    async def _on_exit(self, proc: asyncio.subprocess.Process) -> None:
        try:
            code = await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            code = await proc.wait()
        if self._proc is proc:
            self.state = "stopped"
            self.last_exit = f"exit code {code}" if code >= 0 else f"signal {-code}"
            log.warning("engine pid %s exited: %s", proc.pid, self.last_exit)
            if code != 0 and not self._stopping:
                # A crash or a stall kill: bring a warm engine back now, so the next
                # client does not pay the spawn. A clean exit (the engine's own idle
                # timeout) is left alone until someone needs it.
                self._restart_task = self._tasks.spawn(self._restart_after_crash(), name="engine-restart")
        exc = EngineExited(code, self.stderr_tail())
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a cancelled waiter must not log it

    async def _restart_after_crash(self) -> None:
        try:
            await self.ensure_ready()
        except EngineUnavailable as exc:
            log.error("engine restart failed: %s", exc)

    # --- stop --------------------------------------------------------------------
    async def kill(self, reason: str) -> None:
        """SIGTERM, then SIGKILL after 2 s; returns once the process is gone."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        log.warning("killing engine pid %s: %s", proc.pid, reason)
        self.state = "stopping"
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            try:
                proc.send_signal(sig)
                if sig == signal.SIGTERM:
                    proc.send_signal(signal.SIGCONT)  # a SIGSTOPped engine cannot act on SIGTERM
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), wait)
                break
            except asyncio.TimeoutError:
                continue
        await self._join_tasks()

    async def stop(self) -> None:
        """Graceful stop at broker shutdown: close stdin, then escalate; leaves no task of ours behind.

        A crash-restart in progress is cancelled first, so it cannot spawn a new
        child behind our back while we wait for the old one.
        """
        self._stopping = True
        restart, self._restart_task = self._restart_task, None
        if restart is not None and not restart.done():
            restart.cancel()
            await asyncio.wait([restart], timeout=5)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except asyncio.TimeoutError:
                await self.kill("broker shutting down")
        await self._join_tasks()
        await self._tasks.cancel_all()  # sends still blocked on a full pipe, a restart that slipped in

    async def _join_tasks(self) -> None:
        """Let this child's readers drain and fail its pending futures (they end at its EOF); cancel stragglers."""
        tasks, self._readers = self._readers, []
        current = asyncio.current_task()
        for task in tasks:
            if task is current:  # kill() called from the reader itself
                continue
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                task.cancel()


def _version() -> str:
    from mp_ssh_bridge_broker import __version__

    return __version__
