"""The one engine child: spawn, initialize, route its replies, restart, stall-kill.

The engine (`mempalace-mcp`) answers strictly one request at a time in
arrival order and exits by itself after idle hours, so the broker starts it
on demand, initializes it once, restarts it with backoff and a budget, and
kills it (SIGTERM, then SIGKILL) when it stalls. Spawning costs 0.6–1 s, so
clients see it at most once per restart, never per session.

Because it answers in order, a reply to request N also proves that every older
request still unanswered never will be (an engine that drops a request whose
handling raised, as mempalace 3.4.0 does): those fail at once with EngineNoReply,
and a stderr line that hints at such a drop makes the broker send a `ping` to
get that proof within milliseconds (broker/guard.py) instead of a stall kill.
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
from mp_ssh_bridge_broker import guard
from mp_ssh_bridge_broker.tasks import Tasks

log = logging.getLogger("broker.engine")


class EngineUnavailable(Exception):
    """The engine cannot be started right now (the message says why)."""


class EngineExited(Exception):
    """The engine exited while a request was outstanding."""

    def __init__(self, returncode: int | None, stderr_tail: str) -> None:
        detail = describe_exit(returncode) if returncode is not None else "killed"
        super().__init__(f"engine exited ({detail})")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class EngineNoReply(Exception):
    """The engine answered a later request first: it dropped this one (handling it raised) and keeps running."""

    def __init__(self, logged: str) -> None:
        super().__init__("the engine dropped this request without an answer")
        self.logged = logged  # what the engine wrote on stderr since the request was sent

    @property
    def summary(self) -> str:
        """The logged line that says what failed (the last one that looks like an error), or ""."""
        lines = self.logged.splitlines()
        hinted = [line for line in lines if guard.hints_no_reply(line)]
        return (hinted or lines or [""])[-1][:300]


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
        self._stderr_times: collections.deque[tuple[float, str]] = collections.deque(maxlen=50)
        self._sent_at: dict[int, float] = {}  # engine id -> when it was written (to name what was logged since)
        self._barrier: asyncio.Task[None] | None = None  # the ping that settles older unanswered requests
        self._barrier_again = False
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

    def health(self) -> dict[str, object]:
        """For `broker/status` (and so `mp-bridge doctor`): why the last start failed, and how long restarts
        stay paused; empty when the engine came up since."""
        left = self._cooldown_until - time.monotonic()
        out: dict[str, object] = {}
        if self._last_error and self.state != "ready":
            out["last_error"] = self._last_error[-800:]
        if left > 0:
            out["cooldown_s"] = round(left, 1)
        return out

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
        self._sent_at[engine_id] = time.monotonic()
        await self.send(protocol.request(engine_id, method, params))  # written before any await: ids go in order
        return engine_id, fut

    def forget(self, engine_id: int) -> None:
        self._pending.pop(engine_id, None)
        self._sent_at.pop(engine_id, None)

    # --- requests the engine dropped (broker/guard.py) ----------------------------
    def _answered(self, engine_id: int) -> None:
        """Request `engine_id` was answered: every older one still pending was dropped (in-order engine)."""
        self._sent_at.pop(engine_id, None)
        for older in sorted(k for k in self._pending if isinstance(k, int) and k < engine_id):
            fut = self._pending.pop(older)
            logged = self._logged_since(self._sent_at.pop(older, 0.0))
            log.warning("engine dropped request %s without an answer%s", older, f" ({logged})" if logged else "")
            if not fut.done():
                fut.set_exception(EngineNoReply(logged))
                fut.exception()  # mark retrieved: a waiter that gave up must not log it

    def _logged_since(self, since: float) -> str:
        lines = [text for at, text in self._stderr_times if at >= since]
        return "\n".join(lines[-5:])[-600:]

    def _probe_dropped(self) -> None:
        """A stderr hint: ask for proof (a ping's answer) that older requests were dropped; one ping at a time."""
        if not self._pending:
            return
        if self._barrier is not None and not self._barrier.done():
            self._barrier_again = True  # a request sent after that ping may be the one: ping once more
            return
        self._barrier = self._tasks.spawn(self._barrier_ping(), name="engine-barrier")

    async def _barrier_ping(self) -> None:
        again = True
        while again and self.running():
            self._barrier_again = False
            try:
                engine_id, fut = await self.request("ping", None)
            except EngineUnavailable:
                return
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.settings.stall_timeout)
            except (asyncio.TimeoutError, EngineExited, EngineNoReply):
                self.forget(engine_id)
                return
            again = self._barrier_again

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
                    engine_id = msg.get("id")
                    fut = self._pending.pop(engine_id, None)  # type: ignore[arg-type]
                    if isinstance(engine_id, int) and fut is not None:
                        self._answered(engine_id)
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
                self._stderr_times.append((time.monotonic(), text))
                log.info("engine: %s", text)
                if guard.hints_no_reply(text):
                    self._probe_dropped()

    async def _on_exit(self, proc: asyncio.subprocess.Process) -> None:
        try:
            code = await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            code = await proc.wait()
        if self._proc is proc:
            self.state = "stopped"
            self.last_exit = describe_exit(code)
            log.warning("engine pid %s exited: %s", proc.pid, self.last_exit)
            if code != 0 and not self._stopping:
                # A crash or a stall kill: bring a warm engine back now, so the next
                # client does not pay the spawn. A clean exit (the engine's own idle
                # timeout) is left alone until someone needs it.
                self._restart_task = self._tasks.spawn(self._restart_after_crash(), name="engine-restart")
        exc = EngineExited(code, self.stderr_tail())
        pending, self._pending = self._pending, {}
        self._sent_at.clear()
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


def describe_exit(returncode: int) -> str:
    """`exit code 1`, or `signal SIGKILL (9)` for a child a signal ended (returncode -9): by name, because the
    numbers differ between the platforms (SIGUSR1 is 10 on Linux, 30 on macOS; SIGBUS 7 and 10)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    return f"signal {signal_name(-returncode)}"


def signal_name(number: int) -> str:
    """`SIGTERM (15)`; just the number for one this platform has no name for."""
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def _version() -> str:
    from mp_ssh_bridge_broker import __version__

    return __version__
