"""The one engine child: spawn, initialize, route its replies, restart, stall-kill.

The engine (`mempalace-mcp`) answers strictly one request at a time in
arrival order and exits by itself after idle hours, so the broker starts it
on demand, initializes it once, restarts it with backoff and a budget, and
kills it (SIGTERM, then SIGKILL) when it stalls. Spawning costs 0.6–1 s, so
clients see it at most once per restart, never per session.

Every start first holds the palace (`before_start`, the broker's ownership of
owner.json: broker/ownership.py); waiting for it is no failed start. When another
owner takes the palace over, `stop_for_handover` stops the engine without counting
it as a crash, and a later start is possible again (unlike `stop`, at shutdown).

When upstream's hub (`mempalace serve`) owns the palace, no engine is spawned at all: every start first looks
for a live hub (mp_ssh_bridge/hub.py) and, when there is one, the calls go to it over HTTP (broker/hubroute.py,
"hub mode") until it is gone; then the broker's own engine starts at once. Between its engines, and while a hub
runs, the broker holds mempalace's own writer lease itself (broker/lease.py), so no hub or plain `mempalace-mcp`
becomes the palace's writer in a gap.

Because it answers in order, a reply to request N also proves that every older
request still unanswered never will be (an engine that drops a request whose
handling raised, as mempalace 3.4.0 does): those fail at once with EngineNoReply,
and a stderr line that hints at such a drop makes the broker send a `ping` to
get that proof within milliseconds (broker/guard.py) instead of a stall kill.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, overload

from mp_ssh_bridge import config, enginecmd, hub, protocol, walrecover
from mp_ssh_bridge.settings import BrokerSettings
from mp_ssh_bridge_broker import enginerecord, guard, hubroute, lease, tools
from mp_ssh_bridge_broker.tasks import Tasks

log = logging.getLogger("broker.engine")

Reply = dict[str, Any] | protocol.ReplyHead  # an engine's reply: parsed, or passed on as written (`request`)

IDLE_HOURS_ENV = "MEMPALACE_MCP_IDLE_HOURS"  # mempalace-mcp's own idle exit (mcp_server/_guards.py)
IDLE_HOURS_DEFAULT = 8.0
IDLE_SLACK_S = 1.0  # our clock starts when a request is written, the engine's when it handles it
STOP_GRACE_S = 3.0  # after EOF on its stdin the engine gets this long to exit before SIGTERM/SIGKILL
START_GIVE_UP_WAIT_S = 15.0  # a forced hand-over waits this long (beyond the start timeout) for a start under way
HUB_CONNECT_TIMEOUT_S = 5.0  # a hub on loopback that takes no connection in this long is not reached
HUB_WATCH_S = 0.25  # hub mode: how often the hub's pid is looked at (its death starts the broker's engine at once)
HUB_GONE_WAIT_S = 3.0  # a hub whose port refuses: how long to wait for its process to end (a kill under way)


class EngineUnavailable(Exception):
    """The engine cannot be started right now (the message says why)."""


class StartAborted(EngineUnavailable):
    """A start under way was given up because the palace is no longer the broker's (`may_run`): no failed start."""


class HubGone(Exception):
    """Hub mode: the request was NOT executed (no connection) and the hub's process is gone: run it again on the
    broker's own engine (safe: nothing ran)."""


class EngineExited(Exception):
    """The engine exited while a request was outstanding."""

    def __init__(self, returncode: int | None, stderr_tail: str) -> None:
        detail = describe_exit(returncode) if returncode is not None else "killed"
        super().__init__(f"engine exited ({detail})")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class HubLeft(EngineExited):
    """Hub mode ended (or the call was given up) while a request was at the hub: its outcome is unknown."""

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, f"the call to upstream's hub was given up: {reason}")
        self.returncode = None
        self.stderr_tail = ""


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

    def __init__(
        self,
        settings: BrokerSettings,
        on_notification: Callable[[dict[str, Any]], None],
        before_start: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self._on_notification = on_notification
        # Awaited right before every spawn (first, warm, crash restart): returns once the broker owns the palace.
        self.before_start = before_start
        # Asked again during a start (before the WAL recovery, right after the spawn, after initialize): False when
        # the palace stopped being the broker's meanwhile; the start then kills what it spawned (StartAborted).
        self.may_run: Callable[[], bool] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}  # a Reply (`request`)
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
        self._not_starting = asyncio.Event()  # clear while a spawn that passed before_start is under way
        self._not_starting.set()
        self._handing_over = False  # stop_for_handover: the exit is no crash (no restart)
        self._uncharged_start = False  # the start after a hand-over is not charged to the restart budget
        self._charged_at: float | None = None  # what the start under way added to the restart budget
        self._aborting = False  # a start kills what it spawned (StartAborted): that exit is no crash
        self._ready_proc: asyncio.subprocess.Process | None = None  # the child that answered initialize
        self._last_request = time.monotonic()  # the engine's idle clock restarts with every request
        self.hub: hubroute.HubRoute | None = None  # hub mode: the calls go to upstream's hub, no child runs
        self._hub_tasks: dict[int, asyncio.Task[None]] = {}  # hub mode: the HTTP call of each engine id
        self.hub_lookup = True  # False for the container daemon's local owner (broker/lifecycle.py says why)
        self._lease: lease.Lease | None = None  # mempalace's writer lease (host broker only, as hub_lookup)
        self.lease_state = "off"  # broker | engine | lent (3.4.0: the broker lends it per write) | other | off
        self._lease_mode: str | None = None  # this engine's: "engine" (holds it for life) | "lent" (per write)

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
        if self.hub is not None:
            return self.state == "ready" and self.hub.alive()
        return self._proc is not None and self._proc.returncode is None and self.state == "ready"

    # --- start -------------------------------------------------------------------
    async def ensure_ready(self) -> None:
        """Start the engine if it is not running; raise EngineUnavailable when it cannot be."""
        if self.running():
            return
        async with self._start_lock:
            if self.running():
                return
            if self.hub is not None:
                self._leave_hub(f"the hub (pid {self.hub.hub.pid}) is gone")
            if self._stopping:
                raise EngineUnavailable("the broker is shutting down")
            now = time.monotonic()
            if now < self._cooldown_until:
                raise EngineUnavailable(describe_cooldown(self._failures, self._cooldown_until - now, self._last_error))
            while True:
                try:
                    delay = self._restart_delay()
                except EngineUnavailable as exc:
                    self._last_error = str(exc)  # the next refusal during the pause names it
                    log.error("%s", exc)
                    raise
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.before_start is not None:
                    await self.before_start()  # the palace is ours first: waiting for its owner is no failed start
                    if self._stopping:
                        raise EngineUnavailable("the broker is shutting down")
                found = await self.hub_owns()  # upstream's hub: the palace's writer (a zombie check may run ps)
                if found is not None:  # the palace's writer: route to it, never beside it
                    try:
                        await self._enter_hub(found)
                    except StartAborted as exc:  # the palace stopped being the broker's meanwhile: wait for it again
                        log.warning("hub mode not entered: %s", exc)
                        continue
                    except EngineUnavailable as exc:
                        self._failures += 1
                        self._last_error = str(exc)
                        log.error("%s", exc)
                        if self._failures >= 3:
                            self._cooldown_until = time.monotonic() + self.settings.engine_backoff_max
                        raise
                    self._failures = 0
                    return
                self._not_starting.clear()  # no await since before_start returned: a hand-over waits for this start
                try:
                    await self._start()
                    self._failures = 0
                    return
                except EngineUnavailable as exc:
                    if self.before_start is not None and (isinstance(exc, StartAborted) or not self._may_run()):
                        # The palace was handed over (or taken) while this start was under way: no failed start,
                        # no charge to the budget; the next round waits in before_start until it is ours again.
                        self._uncharge()
                        log.warning("engine start given up: %s", exc)
                        continue
                    self._failures += 1
                    self._last_error = str(exc)
                    log.error("engine start failed (%d): %s", self._failures, exc)
                    if self._failures >= 3:
                        self._cooldown_until = time.monotonic() + self.settings.engine_backoff_max
                        raise
                finally:
                    self._not_starting.set()

    def _may_run(self) -> bool:
        return self.may_run is None or self.may_run()

    def _check_may_run(self, when: str) -> None:
        if not self._may_run():
            raise StartAborted(f"the palace is no longer the broker's ({when})")

    def _uncharge(self) -> None:
        """Take the start just given up off the restart budget (the next one follows a hand-over: uncharged too)."""
        self._uncharged_start = True
        at, self._charged_at = self._charged_at, None
        if at is not None:
            try:
                self._restart_times.remove(at)
            except ValueError:
                pass

    async def _abort_start(self, proc: asyncio.subprocess.Process, when: str) -> None:
        """The palace stopped being ours during this start: kill what was spawned (no restart), raise StartAborted."""
        self._aborting = True
        try:
            if self._proc is proc and proc.returncode is None:
                await self.kill(f"the palace is no longer the broker's ({when})")
        finally:
            self._aborting = False
        if self._proc is proc:
            self.state = "stopped"
        self._drop_lease()
        raise StartAborted(f"the palace is no longer the broker's ({when}); the engine it had spawned was killed")

    def health(self) -> dict[str, object]:
        """For `broker/status` (and so `mp-bridge doctor`): why the last start failed, and how long restarts
        stay paused; empty when the engine came up since."""
        left = self._cooldown_until - time.monotonic()
        out: dict[str, object] = {}
        if self._last_error and self.state != "ready":
            out["last_error"] = self._last_error[-800:]
        if left > 0:
            out["cooldown_s"] = round(left, 1)
        if self.hub is not None:
            out["hub"] = self.hub.as_dict()
        if self._lease is not None:
            self._recheck_lease()
            out["lease"] = {"state": self.lease_state, "path": str(self._lease.path), "holder": self._lease.holder()}
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
                describe_budget(n - 1, window, self.settings.engine_backoff_max * 3, self.last_exit, self.stderr_tail())
            )
        if n == 0:
            return 0.0
        delay = min(self.settings.engine_backoff_max, 0.25 * 2 ** (n - 1))
        return max(0.0, delay - (now - self._restart_times[-1]))

    async def _start(self) -> None:
        self._charged_at = None
        self._check_may_run("before the start")
        try:
            # --palace only when the session gave one: without it the engine resolves its palace, and keeps its
            # knowledge graph, exactly as a plain mempalace-mcp would (palace.resolve).
            flag = ["--palace", str(self.settings.palace)] if self.settings.palace else []
            argv = enginecmd.resolve(self.settings.engine_argv) + flag
        except enginecmd.EngineNotFound as exc:
            self.state = "failed"
            raise EngineUnavailable(str(exc)) from None
        await self._clear_old_engine()
        self._check_may_run("before the spawn")
        self._hold_lease("before the spawn")
        env = dict(os.environ)
        env["MEMPALACE_HUB_FORWARD"] = "0"  # 3.8+ would otherwise proxy to a registered hub
        env[config.ENGINE_CHILD_ENV] = "1"  # an mp-shim started as this engine (a PATH shadow) refuses, never recurses
        # The broker's engine is the palace's one writer; read-only is per session (broker/readonly.py).
        # A read-only shim that elected this broker must not make the engine read-only for everyone.
        env.pop("MEMPALACE_MCP_READ_ONLY", None)
        if self.settings.engine_eager_warmup:
            env.setdefault("MEMPALACE_EAGER_WARMUP", "1")
        if self._uncharged_start:  # a hand-over stopped the last engine: no crash, no charge to the budget
            self._uncharged_start = False
        else:
            self._charged_at = time.monotonic()
            self._restart_times.append(self._charged_at)
        self._stderr_tail.clear()  # what THIS start says: a failure names its own output, not the last three's
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
                preexec_fn=enginerecord.pdeathsig_hook(),  # Linux: the engine dies with its broker
            )
        except OSError as exc:
            self.state = "failed"
            raise EngineUnavailable(f"cannot run engine {argv[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        if not self._may_run():  # lost while spawning: a hand-over that came meanwhile did not see this child
            await self._abort_start(proc, "right after the spawn")
        await asyncio.to_thread(self._record, proc.pid)  # macOS reads the start time with ps: off the loop
        self.started_at = time.time()
        self._readers = [
            self._tasks.spawn(self._read_stdout(proc), name="engine-stdout"),
            self._tasks.spawn(self._read_stderr(proc), name="engine-stderr"),
        ]
        hello = {
            "protocolVersion": protocol.LATEST_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mempalace-broker", "version": _version()},
        }
        reply = await self._ask("initialize", hello, "initialize")
        if "result" not in reply:
            await self.kill("initialize failed")
            raise EngineUnavailable(
                f"engine refused initialize: {reply.get('error') or 'a reply without result or error'}"
            )
        self.initialize_result = reply["result"]
        await self.send(protocol.notification("notifications/initialized"))
        await self._lease_to_engine()
        if not self._may_run():  # checked with no await before `ready`: a ready engine always started on a held palace
            await self._abort_start(proc, "after initialize")
        self.state = "ready"
        self._ready_proc = proc
        self._last_request = time.monotonic()
        log.info("engine ready: pid %s, %s", proc.pid, self.version)

    async def _ask(self, method: str, params: Any, what: str) -> dict[str, Any]:
        """One request of the start itself, bounded by the start timeout; EngineUnavailable (or StartAborted: the
        palace was handed over meanwhile) when the engine does not answer."""
        try:
            return await asyncio.wait_for(self._request_future(method, params), self.settings.engine_start_timeout)
        except asyncio.TimeoutError:
            await self.kill(f"no {what} answer in time")
            raise EngineUnavailable(
                f"engine did not answer {what} within {self.settings.engine_start_timeout:.0f}s"
            ) from None
        except EngineExited as exc:
            if not self._may_run():  # a hand-over killed it: no failed start
                raise StartAborted(
                    f"the palace is no longer the broker's; the starting engine was stopped ({exc})"
                ) from None
            self.state = "failed"
            said = exc.stderr_tail.strip()[-800:] or "(the engine wrote nothing on stderr)"
            raise EngineUnavailable(f"engine exited during start-up ({exc}): {said}") from None

    # --- never two engines on the palace (broker/enginerecord.py) --------------------
    async def _clear_old_engine(self) -> None:
        """An engine a killed broker left behind must be gone before ours starts; EngineUnavailable if it cannot be."""
        memory = self.settings.memory
        table = enginerecord.ProcessTable(
            holds_palace=lambda pid, record: enginerecord.holds_palace_files(pid, record, memory.palace, memory.kg)
        )
        try:
            done = await enginerecord.clear(self.settings.paths, table)
        except enginerecord.OldEngineLives as exc:
            self.state = "failed"
            raise EngineUnavailable(str(exc)) from None
        except OSError as exc:  # the record cannot be read or removed: no proof either way
            self.state = "failed"
            raise EngineUnavailable(
                f"cannot check {self.settings.paths.engine} for an engine still running: {exc}"
            ) from None
        if done:
            log.warning("before starting the engine: %s", done)
        self._check_may_run("before the WAL recovery")  # it writes the palace's files
        for line in await asyncio.to_thread(walrecover.recover_all, memory.palace, memory.kg):
            log.warning("before starting the engine: %s", line)

    def _record(self, pid: int) -> None:
        """Write engine.json for our new engine; a failure costs only the next broker's check, so it is logged."""
        try:
            palace = str(self.settings.palace) if self.settings.palace else None
            enginerecord.write(self.settings.paths, enginerecord.make(pid, os.getpid(), palace))
        except OSError as exc:
            log.error("cannot record the engine in %s: %s", self.settings.paths.engine, exc)

    def _unrecord(self, pid: int) -> None:
        try:
            enginerecord.remove(self.settings.paths, pid)
        except OSError as exc:
            log.error("cannot remove %s: %s", self.settings.paths.engine, exc)

    # --- I/O ---------------------------------------------------------------------
    def _request_future(self, method: str, params: Any) -> asyncio.Future[dict[str, Any]]:
        self._next_id += 1
        engine_id = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[engine_id] = fut
        fut.engine_id = engine_id  # type: ignore[attr-defined]
        self._tasks.spawn(
            self._send_quietly(protocol.request(engine_id, method, params)), name=f"engine-send-{engine_id}"
        )
        return fut

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except EngineUnavailable:
            pass  # the engine died; its exit fails the pending future with the reason

    @overload
    async def request(self, method: str, params: Any) -> tuple[int, asyncio.Future[dict[str, Any]]]: ...
    @overload
    async def request(self, method: str, params: Any, *, passthrough: bool) -> tuple[int, asyncio.Future[Reply]]: ...
    async def request(self, method: str, params: Any, *, passthrough: bool = False) -> tuple[int, asyncio.Future[Any]]:
        """Send one request; returns its engine id and a future of the reply: a dict, or with `passthrough` (the
        caller passes the reply on unchanged but for its id) the engine's own frame, unparsed, when its head
        says where the id is (`protocol.ReplyHead`)."""
        if not self.running():
            raise EngineUnavailable("engine is not running")
        self._next_id += 1
        engine_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[engine_id] = fut
        fut.passthrough = passthrough  # type: ignore[attr-defined]  # read by _read_stdout with its reply
        self._sent_at[engine_id] = self._last_request = time.monotonic()
        if self.hub is not None:
            task = asyncio.get_running_loop().create_task(
                self._hub_call(self.hub, engine_id, protocol.request(engine_id, method, params), fut),
                name=f"hub-call-{engine_id}",
            )
            self._hub_tasks[engine_id] = task
            task.add_done_callback(functools.partial(self._hub_task_done, engine_id))
            return engine_id, fut
        if self._lease_mode == "lent" and tools.may_write(method, params):
            self._lend_lease(fut)
        await self.send(protocol.request(engine_id, method, params))  # written before any await: ids go in order
        return engine_id, fut

    def forget(self, engine_id: int) -> None:
        self._pending.pop(engine_id, None)
        self._sent_at.pop(engine_id, None)
        self._drop_hub_call(engine_id, "its deadline passed")

    async def hub_owns(self) -> hub.Hub | None:
        """The writable hub that owns the palace: the one routed to, or one registered and alive (between hub
        mode's end and the next start, after a stall). A grant must never be handed the palace then."""
        route = self.hub
        if route is not None:
            return route.hub
        if not self.hub_lookup:
            return None
        found = await asyncio.to_thread(hub.live, self._palace())
        return found if found is not None and not found.read_only else None

    def _hub_task_done(self, engine_id: int, task: asyncio.Task[None]) -> None:
        if self._hub_tasks.get(engine_id) is task:
            del self._hub_tasks[engine_id]

    def _drop_hub_call(self, engine_id: int, reason: str) -> None:
        """Hub mode: stop waiting for one call's answer (its connection closes); a waiter gets HubLeft."""
        task = self._hub_tasks.pop(engine_id, None)
        fut = self._pending.pop(engine_id, None)
        self._sent_at.pop(engine_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(HubLeft(reason))
            fut.exception()
        if task is not None:
            task.cancel()

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
        if self.hub is not None:
            # The hub answers each POST on its own: nothing to tell it. A cancellation closes that call's connection
            # (the mux drops a late answer anyway), so a cancelled long poll holds no hub connection.
            params = message.get("params")
            if message.get("method") == "notifications/cancelled" and isinstance(params, dict):
                request_id = params.get("requestId")
                if isinstance(request_id, int) and not isinstance(request_id, bool):
                    self._drop_hub_call(request_id, "cancelled by its client")
            return
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
                head = protocol.reply_head(line)
                waiting = self._pending.get(head.msg_id) if head is not None else None  # type: ignore[arg-type]
                if head is not None and getattr(waiting, "passthrough", False):
                    self._resolve(head.msg_id, head)  # passed on as the engine wrote it: no parse, no re-encode
                    continue
                try:
                    msg = protocol.decode(line, strict=False)  # the engine's NaN is passed on
                except ValueError:
                    log.warning("engine wrote non-JSON: %r", line[:200])
                    continue
                if not isinstance(msg, dict):
                    continue
                if protocol.is_response(msg):
                    self._resolve(msg.get("id"), msg)
                elif protocol.is_notification(msg):
                    self._on_notification(msg)
                else:
                    log.debug("ignoring engine message %r", msg.get("method"))
        finally:
            await self._on_exit(proc)

    def _resolve(self, engine_id: Any, reply: Reply) -> None:
        fut = self._pending.pop(engine_id, None) if protocol.valid_id(engine_id) else None
        if isinstance(engine_id, int) and fut is not None:
            self._answered(engine_id)
        if fut is not None and not fut.done():
            fut.set_result(reply)
        else:
            log.debug("dropping engine reply for unknown id %r", engine_id)

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
        self._unrecord(proc.pid)  # it is gone: the next start need not wait for it
        if self._proc is proc:
            was_ready, self._ready_proc = self._ready_proc is proc, None
            idle = is_idle_exit(
                code, bool(self._pending), time.monotonic() - self._last_request, engine_idle_limit(os.environ)
            )
            self.state = "stopped"
            self.last_exit = describe_exit(code) + (" (its own idle exit)" if idle else "")
            log.warning("engine pid %s exited: %s", proc.pid, self.last_exit)
            if not self._stopping and not self._handing_over and not self._aborting:
                self._hold_lease("its engine exited")  # the palace is still ours: no hub slips in before the next
            if (
                not self._stopping
                and not self._handing_over
                and not self._aborting
                and not idle
                and (was_ready or code != 0)
            ):
                # A crash, a stall kill, a kill from outside, an exit 0 nobody asked for (mempalace-mcp exits 0
                # on SIGTERM): bring a warm engine back now, so the next client does not pay the spawn. The
                # engine's own idle exit is left alone until someone needs it.
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
        """SIGTERM, then SIGKILL after 2 s; returns once the process is gone. In hub mode: leave it (the hub is
        not ours to stop); the next call looks again."""
        if self.hub is not None:
            self._leave_hub(reason)
            return
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
        if self.hub is not None:
            self._leave_hub("broker shutting down")
        await self._cancel_restart()
        await self._stop_child("broker shutting down", graceful=True)
        await self._tasks.cancel_all()  # sends still blocked on a full pipe, a restart that slipped in
        self._drop_lease()

    async def stop_for_handover(self, reason: str, *, graceful: bool = True) -> None:
        """Stop the engine because another owner takes the palace (docs/PROTOCOL.md "Ownership"); it can be
        started again afterwards (the next start waits in `before_start` until the palace is ours again).

        `graceful`: a start under way finishes first, then EOF on stdin, then SIGTERM/SIGKILL (the caller has
        let the running call finish). Otherwise SIGTERM/SIGKILL at once: the palace was lost, another writer may
        be on it already. Either way the exit is no crash (no restart), engine.json is removed as on any exit,
        and the next start is not charged to the restart budget.
        """
        if self.hub is not None:
            self._leave_hub(reason)
        self._handing_over = True
        try:
            await self._cancel_restart()
            if graceful:
                await self._not_starting.wait()  # stopped half-way it would count as a failed start
            await self._stop_child(reason, graceful=graceful)
            if not graceful and not self._not_starting.is_set():
                # A start under way (past before_start): it gives up at its next `may_run` check and kills what
                # it spawned. Wait for that (bounded), then stop whatever child there is once more.
                bound = self.settings.engine_start_timeout + START_GIVE_UP_WAIT_S
                try:
                    await asyncio.wait_for(self._not_starting.wait(), bound)
                except asyncio.TimeoutError:
                    log.error("an engine start under way did not end within %.0f s of the hand-over", bound)
                await self._stop_child(reason, graceful=False)
        finally:
            self._handing_over = False
            self._drop_lease()  # the next owner (a grant's command, the other side) takes it
            if self._lease is not None:  # a waiting thread woken by the engine's exit lets go first
                await asyncio.to_thread(self._lease.settle, 0.5)
        self._uncharged_start = True
        log.warning("engine stopped: %s", reason)

    # --- hub mode (broker/hubroute.py) ---------------------------------------------------
    def _palace(self) -> str | None:
        try:
            return str(self.settings.memory.palace)
        except Exception:  # noqa: BLE001 - an unresolvable palace has no hub either; the start says what is wrong
            return None

    async def _enter_hub(self, found: hub.Hub) -> None:
        """Route to `found`: its initialize answer becomes ours (the mux caches it). Raises EngineUnavailable —
        and then NO engine starts: a hub that lives but does not answer still owns the palace — or StartAborted
        when the palace stopped being the broker's meanwhile."""
        palace = self._palace() or ""
        route = hubroute.HubRoute(
            found, palace, connect_timeout=HUB_CONNECT_TIMEOUT_S, max_bytes=self.settings.max_line_bytes
        )
        hello = protocol.request(
            0,
            "initialize",
            {
                "protocolVersion": protocol.LATEST_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mempalace-broker", "version": _version()},
            },
        )
        why = (
            f"upstream's hub (pid {found.pid}, {found.url}, registered in {found.record}) owns this palace, and "
            "the broker starts no engine beside it"
        )
        self._not_starting.clear()  # a hand-over waits for this, as for an engine's start
        try:
            try:
                reply = await asyncio.wait_for(route.post(hello), self.settings.engine_start_timeout)
            except asyncio.TimeoutError:
                raise EngineUnavailable(
                    f"{why}; it did not answer initialize within {self.settings.engine_start_timeout:.0f}s"
                ) from None
            except (hubroute.HubNotReached, hubroute.HubLost) as exc:
                raise EngineUnavailable(f"{why}; {exc}") from None
            if not isinstance(reply, dict) or not isinstance(reply.get("result"), dict):
                raise EngineUnavailable(f"{why}; it refused initialize: {(reply or {}).get('error') or reply!r}")
            try:
                await asyncio.wait_for(route.post(protocol.notification("notifications/initialized")), 5)
            except (asyncio.TimeoutError, hubroute.HubNotReached, hubroute.HubLost) as exc:
                log.info("notifications/initialized to the hub: %s", exc)
            if self._stopping:
                raise EngineUnavailable("the broker is shutting down")
            self._check_may_run("when routing to the hub")  # no await from here on: a hand-over sees all or nothing
            self.initialize_result = reply["result"]
            self.hub = route
            self._lease_mode = None
            self._wait_for_lease(f"the hub (pid {found.pid})")
            if self._lease is not None and not self._lease.held:
                self.lease_state = "other"  # the hub's
            self._tasks.spawn(self._watch_hub(route), name="hub-watch")
            self.starts += 1
            self.started_at = time.time()
            self.state = "ready"
            self._last_error = ""
        finally:
            self._not_starting.set()
        log.warning("hub mode: %s; calls go to it over HTTP (mempalace %s)", why, self.version)

    async def _hub_call(
        self, route: hubroute.HubRoute, engine_id: int, message: dict[str, Any], fut: asyncio.Future[dict[str, Any]]
    ) -> None:
        try:
            reply = await route.post(message)
            if reply is None:
                reply = hubroute.error_reply(
                    engine_id,
                    hubroute.HubLost(f"the hub at {route.hub.url} answered this request with no message"),
                )
        except (hubroute.HubNotReached, hubroute.HubLost) as exc:
            log.warning("hub call %s: %s", engine_id, exc)
            if isinstance(exc, hubroute.HubNotReached) and exc.no_connection and await self._hub_ends(route):
                self._sent_at.pop(engine_id, None)
                self._pending.pop(engine_id, None)
                if self.hub is route:  # no zombie keeps hub mode alive: the next start looks again (hub.live)
                    self._leave_hub(f"the hub (pid {route.hub.pid}) is gone")
                if not fut.done():
                    fut.set_exception(HubGone(str(exc)))
                    fut.exception()
                return
            reply = hubroute.error_reply(engine_id, exc)
        finally:
            self._sent_at.pop(engine_id, None)
            self._pending.pop(engine_id, None)
        if not fut.done():
            fut.set_result(reply)

    async def _watch_hub(self, route: hubroute.HubRoute) -> None:
        """While routing to `route`: once its process is gone, leave hub mode and start the broker's own engine at
        once — not at the next call — so it is the palace's writer before a plain `mempalace-mcp` that falls back
        to serving locally could be."""
        thorough = sys.platform.startswith("linux")  # a zombie check reads /proc there; on macOS it would run ps
        while self.hub is route:
            await asyncio.sleep(HUB_WATCH_S)
            if self.hub is not route or route.alive(thorough=thorough):
                continue
            self._leave_hub(f"the hub (pid {route.hub.pid}) is gone")
            if not self._stopping:
                log.warning("upstream's hub is gone: the broker starts its own engine now")
                self._restart_task = self._tasks.spawn(self._restart_after_crash(), name="engine-after-hub")
            return

    @staticmethod
    async def _hub_ends(route: hubroute.HubRoute) -> bool:
        """A hub's port refused: is its process ending (a kill, a crash under way)? Polled up to HUB_GONE_WAIT_S."""
        deadline = time.monotonic() + HUB_GONE_WAIT_S
        while await asyncio.to_thread(route.alive, True):  # on macOS a zombie check runs ps: off the loop
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _leave_hub(self, reason: str) -> None:
        """Out of hub mode: calls in flight there end with outcome unknown; the next start looks again."""
        route, self.hub = self.hub, None
        if route is None:
            return
        log.warning("hub mode ends (%s): the hub at %s", reason, route.hub.url)
        self.state = "stopped"
        self.last_exit = f"left hub mode: {reason}"
        for engine_id in list(self._hub_tasks):
            self._drop_hub_call(engine_id, f"hub mode ended: {reason}")
        for engine_id, fut in list(self._pending.items()):
            self._pending.pop(engine_id, None)
            if not fut.done():
                fut.set_exception(HubLeft(f"hub mode ended: {reason}"))
                fut.exception()

    # --- mempalace's writer lease (broker/lease.py) ----------------------------------------------------------
    def _lease_for_palace(self) -> lease.Lease | None:
        if self._lease is None and self.hub_lookup:
            palace = self._palace()
            if palace is not None:
                self._lease = lease.Lease(palace)  # under the HOME the engine inherits: its `~`
        return self._lease

    def _hold_lease(self, when: str) -> None:
        """The broker holds the lease while no engine of its does (never waits: a holder is named, not fought)."""
        held = self._lease_for_palace()
        if held is None:
            return
        self._lease_mode = None
        if held.take():
            self.lease_state = "broker"
            return
        self.lease_state = "other"
        log.warning(
            "mempalace's writer lease (%s) is held by %s (%s): the engine cannot write until it is let go",
            held.path, held.holder() or "a process mempalace did not record", when,
        )

    def _drop_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self.lease_state = "off"
            self._lease_mode = None

    async def _lease_to_engine(self) -> None:
        """The engine answered initialize: the broker lets the lease go and at once has the engine take it (a
        mempalace 3.11 engine keeps it for life), ahead of every client's call. Whatever the engine answers, what
        happened is judged from the lease itself: still free → an engine without a lease of its own (3.4.0, which
        locks around each write, or one let write without it): the broker holds it and lends it per call."""
        held = self._lease
        if held is None:
            return
        held.release()
        fut = self._request_future("tools/call", lease.PROBE)
        started = time.monotonic()
        try:  # bounded, and no failed start: mempalace checks its sqlite files before a first write (large: slow)
            reply: dict[str, Any] | None = await asyncio.wait_for(fut, self.settings.engine_start_timeout)
        except asyncio.TimeoutError:
            self.forget(getattr(fut, "engine_id", -1))
            reply = None
        except EngineExited as exc:
            if not self._may_run():
                raise StartAborted(f"the palace is no longer the broker's; the starting engine was stopped ({exc})") from None
            self.state = "failed"
            raise EngineUnavailable(f"engine exited during start-up ({exc}): {exc.stderr_tail.strip()[-800:]}") from None
        error = (reply or {}).get("error")
        log.info("writer-lease call answered in %.0f ms: %s", (time.monotonic() - started) * 1000,
                 error.get("message") if isinstance(error, dict) else "taken" if reply else "no answer yet")
        self._judge_lease()

    def _judge_lease(self) -> None:
        """Who holds the lease now that this engine had its chance: the engine (mempalace's record names its pid,
        and the lease is not free), nobody (the broker takes it and lends it per write), or someone else."""
        held = self._lease
        if held is None:
            return
        if held.take():
            self._lease_mode, self.lease_state = "lent", "lent"
            return
        pid, _ = lease.recorded_holder(held.path)
        if pid is not None and pid == self.pid:
            self._lease_mode, self.lease_state = "engine", "engine"
            self._wait_for_lease("the engine")  # its exit hands the lease straight back to the broker
            return
        self._lease_mode, self.lease_state = None, "other"
        log.warning("the engine could not take mempalace's writer lease: %s holds it; writes fail until it lets go",
                    held.holder() or "a process mempalace did not record")

    def _recheck_lease(self) -> None:
        """`other` is looked at again (at each status): the engine may have taken the lease since (3.11 tries at
        each write), or its holder may have gone."""
        if self.lease_state != "other" or self.hub is not None or not self.running() or self._lease is None:
            return
        if self._lease.lent:  # a write in flight holds it now: the lease is looked at again after it
            return
        self._judge_lease()

    def _wait_for_lease(self, holder: str) -> None:
        """Hold the lease the moment `holder` (the engine, the hub) lets it go, as it exits: before anyone else."""
        held = self._lease_for_palace()
        if held is None:
            return
        loop = asyncio.get_running_loop()

        def taken() -> None:
            if not held.held:  # let go meanwhile (a hand-over, the broker's stop)
                return
            self.lease_state = "broker"
            log.info("%s let mempalace's writer lease go: the broker holds it", holder)

        held.wait(lambda: loop.call_soon_threadsafe(taken))

    def _lend_lease(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        held = self._lease
        if held is None:
            return
        held.lend()

        def back(_: object) -> None:
            if held.give_back() or self._lease_mode != "lent":
                return
            self.lease_state = "other"
            log.warning("mempalace's writer lease was taken by %s while the engine wrote",
                        held.holder() or "a process mempalace did not record")

        fut.add_done_callback(back)

    async def _cancel_restart(self) -> None:
        """A crash-restart in progress is cancelled, so it cannot spawn a new child behind our back."""
        restart, self._restart_task = self._restart_task, None
        if restart is not None and not restart.done():
            restart.cancel()
            await asyncio.wait([restart], timeout=5)

    async def _stop_child(self, reason: str, *, graceful: bool) -> None:
        """EOF on stdin and STOP_GRACE_S (graceful), then SIGTERM/SIGKILL; returns once its readers have ended."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if graceful and proc.stdin is not None:
                proc.stdin.close()
                try:
                    await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
                except asyncio.TimeoutError:
                    await self.kill(reason)
            else:
                await self.kill(reason)
        await self._join_tasks()

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


def engine_idle_limit(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds after which mempalace-mcp exits by itself without requests (MEMPALACE_MCP_IDLE_HOURS, default 8 h,
    read as the engine reads it); None when that watchdog is off."""
    raw = environ.get(IDLE_HOURS_ENV, "")
    try:
        hours = float(raw) if raw else IDLE_HOURS_DEFAULT
    except ValueError:
        return None  # the engine reads an unparsable value as "off"
    return hours * 3600 if hours > 0 else None


def is_idle_exit(returncode: int, pending: bool, quiet_s: float, idle_limit: float | None) -> bool:
    """Was this the engine's own idle exit (stays cold), rather than a crash, a kill or an exit nobody asked for
    (restarted warm at once)? Exit 0, nothing outstanding, and no request for the engine's idle limit."""
    return returncode == 0 and not pending and idle_limit is not None and quiet_s >= idle_limit - IDLE_SLACK_S


def describe_cooldown(failures: int, left_s: float, last_error: str) -> str:
    """Why no start is tried now: every field says something true, none is left empty."""
    tried = (
        f"engine failed to start {failures} time{'s' if failures != 1 else ''} in a row"
        if failures
        else ("engine restarts are paused (the restart budget is spent)")
    )
    return f"{tried}; next try in {max(0.0, left_s):.0f}s. Last error: {last_error.strip() or 'no error recorded'}"


def describe_budget(restarts: int, window: float, pause: float, last_exit: str | None, stderr: str) -> str:
    """The restart budget is spent: how often, for how long starts pause, the last exit and the engine's last words."""
    tail = stderr.strip()[-500:] or "(the engine wrote nothing on stderr)"
    return (
        f"engine restarted {restarts} time{'s' if restarts != 1 else ''} in {window:.0f}s; pausing restarts for "
        f"{pause:.0f}s. Last exit: {last_exit or 'no exit recorded'}. stderr: {tail}"
    )


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
