"""The broker's part in the ownership protocol: hold owner.json (kind `broker`) while its engine may run.

Why: the broker used to start its engine whenever a request came, so a session running its own engine
in a container (degraded mode) or `mempalace mine` beside it made a second writer, or kept the broker
out altogether. Under docs/PROTOCOL.md "Ownership" the palace has one owner at a time, and it moves:

- `acquire()` runs before every engine start (Engine.before_start: the first, the warm-up, every
  crash restart). It claims `broker`, and while the palace is held keeps a `broker` request alive,
  so a `local` owner hands the palace over. It waits without a bound (each request waiting for the
  engine has its own deadline, and that deadline's error names the holder: `blocked_by`).
- While holding, a watcher looks at owner.requests/ every WATCH_S. A live request that outranks the
  broker (a grant) makes it yield: it takes the mux's dispatch gate (the running call finishes, the
  queued ones stay queued), stops the engine (EOF, then SIGTERM/SIGKILL), releases, and then waits
  to claim again — the grant's request outranks the broker, so the broker never overtakes it — and
  warm-starts a fresh engine (an engine kept across another writer would serve a stale index).
- owner.json no longer ours (another side judged this broker gone and claimed it): the broker stops
  holding at once (before any await: no engine start passes `before_start` or `may_run` from then on),
  the engine is killed — a start under way gives up and kills what it spawned, and the kill waits for
  it — then the claim is released (token-checked: a false "lost" leaves no record of ours behind to
  refuse our own claim), and the broker waits to claim again like any claimer, with a fresh engine.
- The engine asks `holding()` again during every start (Engine.may_run): an engine only becomes ready
  while the palace is the broker's.
- `beat()` from the broker's heartbeat loop (with the engine's pid and start time: a same-machine
  record stays alive while its engine runs); `close()` at exit, after the engine has stopped.

The container daemon in local-owner mode (broker/daemon.py) is the same broker holding the palace as
kind `local` (`kind`, `what`). It does not take the palace back after a hand-over (or a loss): with
`on_handed_over` set, once the engine has stopped and owner.json is released, it stays closed, keeps the
dispatch gate (so no queued call runs again: the exiting broker answers them "not executed" and the
sessions resend them after reconnecting) and calls `on_handed_over(why)`, which makes the daemon exit.
Its sessions' shims then elect a new daemon, which reaches the host's broker over SSH or waits for the
palace. The host broker's behaviour (take it back once a grant ends) is unchanged.

mp_ssh_bridge.owner does blocking file I/O (a liveness check of a record from another machine may
sleep up to 2 s), so every call goes through a thread. A thread the loop stopped waiting for (a
cancelled acquire) may still create a claim or a request: `_in_thread` undoes it once it lands, so
no record of ours outlives the wait that made it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mp_ssh_bridge import hostinfo, owner, state
from mp_ssh_bridge.settings import BrokerSettings
from mp_ssh_bridge_broker.engine import Engine, EngineUnavailable

log = logging.getLogger("broker.ownership")

KIND = "broker"  # the host's broker; the container daemon in local-owner mode claims "local" (broker/daemon.py)
WHAT = "mempalace-broker"
POLL_S = 0.15  # between two claims while the palace is held
WATCH_S = 0.2  # how often the holder looks for a request that outranks it (docs/PROTOCOL.md "Yield")
STILL_WAITING_LOG_S = 60.0  # while waiting, the log says so again this often
RECORD_FIELDS = ("kind", "pid", "host", "since", "what", "expires")
REQUEST_FIELDS = ("kind", "pid", "host", "what", "since")

T = TypeVar("T")


def who(record: dict[str, Any]) -> str:
    """A holder or a request in words (owner.describe), "someone" when nothing is known."""
    return owner.describe(record) if record else "someone"


class Ownership:
    """The broker's hold on the palace, as the engine and broker/status see it."""

    def __init__(
        self,
        settings: BrokerSettings,
        engine: Engine,
        gate: asyncio.Lock,
        *,
        kind: str = KIND,
        what: str = WHAT,
        on_handed_over: Callable[[str], None] | None = None,
    ) -> None:
        if kind not in owner.RANK:
            raise ValueError(f"unknown owner kind {kind!r}")
        self.paths = settings.paths
        self._hub_refused: Any = None  # the grant request last refused because a hub owns the palace (logged once)
        self.kind = kind  # what owner.json and owner.requests/ say this holder is (ranked: grant > broker > local)
        self.what = what
        self.me = "the broker" if kind == KIND else f"the {what}"  # in log lines
        # Set: a hand-over (or a loss) ends this holder instead of a wait to take the palace back (module docstring).
        self._on_handed_over = on_handed_over
        self.stale_after = settings.heartbeat_stale_after
        self._engine = engine
        self._gate = gate  # the mux's dispatch gate: a yield waits for the running call, and holds the next
        self._claim: owner.Claim | None = None  # held (or being given up) until released
        self._yielding = False  # the claim is being given up: no engine may start on it
        self.phase = "waiting"  # holding | waiting | yielded (yielded: gave the palace up, waits to take it back)
        self.handovers = 0
        self._blocker: dict[str, Any] | None = None  # the holder (or request ahead) the broker waits for
        self._waiting_since: float | None = None  # monotonic
        self._owner_seen: dict[str, Any] | None = None  # owner.json as last read (status)
        self._requests: list[dict[str, Any]] = []  # the live requests as last listed (status)
        self._own_request: str | None = None  # the token of this broker's latest request (not listed once holding)
        self._acquire_lock = asyncio.Lock()  # one claiming loop at a time
        self._io_lock = threading.Lock()  # a heartbeat never lands after the release (it would re-create owner.json)
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self._logged: tuple[Any, ...] | None = None
        self._logged_at = 0.0
        self._losing: owner.Claim | None = None  # a claim found lost, until released: never beaten
        self._engine_start: tuple[int, str | None] | None = None  # (engine pid, its start time) for owner.json
        # Every engine start (first, warm-up, crash restart) holds the palace first, and gives up once it is lost.
        engine.before_start = self.acquire
        engine.may_run = self.holding

    # --- facts ---------------------------------------------------------------------------
    def holding(self) -> bool:
        claim = self._claim
        return claim is not None and not claim.released and not self._yielding

    @property
    def state(self) -> str:
        """For status: `yielded` from the moment a yield is decided (its running call may still finish)."""
        if self.phase == "yielded":
            return "yielded"
        return "holding" if self.holding() else self.phase

    @property
    def waiting_for(self) -> str | None:
        """Who the broker waits for, and for how long it has held the palace (or waited for it); None while holding."""
        if self.state == "holding" or self._blocker is None:
            return None
        return who(self._blocker)

    def blocked_by(self) -> str | None:
        """Why the engine cannot run now, for waiting requests' notices and deadline errors; None while the palace is
        the broker's (or nobody is known to keep it: a first claim under way)."""
        if self.phase != "yielded" and self.holding():
            return None
        blocker = self._blocker  # while yielding: the request the palace goes to (queued calls run after it)
        if blocker is None:
            return "the broker is handing the palace over to another owner" if self.phase == "yielded" else None
        if blocker.get("request"):
            return f"the palace is being handed over to {who(blocker)}"
        return f"the palace is held by {who(blocker)}"

    def status(self) -> dict[str, Any]:
        """broker/status "ownership"."""
        claim = self._claim
        record = claim.record if self.holding() and claim is not None else self._owner_seen
        since = self._waiting_since if self.state != "holding" else None
        waited = time.monotonic() - since if since is not None else None
        return {
            "state": self.state,
            "kind": self.kind,
            "owner": {k: record.get(k) for k in RECORD_FIELDS} if record else None,
            "waiting_for": self.waiting_for,
            "waiting_s": round(waited, 1) if waited is not None else None,
            "handovers": self.handovers,
            # Once holding, its own request is gone: a listing made while it waited may still be the last one read.
            "requests": [
                {k: r.get(k) for k in REQUEST_FIELDS}
                for r in self._requests
                if not (self.holding() and r.get("token") == self._own_request)
            ],
        }

    # --- claiming --------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Return once the broker holds the palace: claim it, or keep a request alive and claim it once released.

        Unbounded (a waiting request's own deadline answers it); cancellable. EngineUnavailable once closed.
        """
        if self.holding():
            return
        async with self._acquire_lock:
            if self.holding():
                return
            self._check_open()
            if self.phase != "yielded":
                self.phase = "waiting"
            start = time.monotonic()
            self._waiting_since = self._waiting_since if self.phase == "yielded" and self._waiting_since else start
            request: owner.Request = await self._in_thread(
                lambda: owner.Request(self.paths, self.kind, what=self.what), undo=lambda r: r.withdraw()
            )
            self._own_request = request.token
            try:
                while True:
                    self._check_open()
                    try:
                        claim: owner.Claim = await self._in_thread(
                            lambda: self._claim_now(request.token), undo=lambda c: c.release()
                        )
                        break
                    except owner.Busy as exc:
                        self._busy(exc)
                    except OSError as exc:
                        self._busy(owner.Busy(None, f"cannot claim {self.paths.owner}: {exc.strerror or exc}"))
                    await self._in_thread(request.beat, undo=lambda _: request.withdraw())
                    await asyncio.sleep(POLL_S)
            finally:
                request.withdraw()  # one unlink, on the loop: it must happen even when cancelled
            self._claim, self._yielding = claim, False
            self._owner_seen = claim.record
            waited = time.monotonic() - start
            was = self._blocker
            self.phase, self._blocker, self._waiting_since, self._logged = "holding", None, None, None
        if was is not None or waited > 1.0:
            log.warning(
                "%s holds the palace (owner.json, kind %s) after waiting %.1f s%s",
                self.me,
                self.kind,
                waited,
                f" for {who(was)}" if was is not None else "",
            )
        else:
            log.info("%s holds the palace (owner.json, kind %s)", self.me, self.kind)

    def _claim_now(self, request_token: str) -> owner.Claim:
        """One claim (in a thread); refused: the live requests and owner.json are read again for status."""
        try:
            return owner.claim(
                self.paths, self.kind, self.stale_after, request_token=request_token, fields={"what": self.what}
            )
        except owner.Busy:
            self._requests = owner.live_requests(self.paths, self.stale_after)
            self._owner_seen = state.read_json_object(self.paths.owner)
            raise

    def _busy(self, exc: owner.Busy) -> None:
        mine = self._claim.token if self._claim is not None else None
        if exc.record is not None and (mine is None or exc.record.get("token") != mine):  # not our own, being given up
            self._blocker = exc.record
        key = (exc.record or {}).get("token"), (exc.record or {}).get("pid")
        now = time.monotonic()
        if key != self._logged or now - self._logged_at >= STILL_WAITING_LOG_S:
            waited = now - self._waiting_since if self._waiting_since is not None else 0.0
            log.warning("waiting for the palace (%.0f s so far): %s", waited, exc)
            self._logged, self._logged_at = key, now

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable("the broker is shutting down")

    # --- holding -----------------------------------------------------------------------------
    def start(self) -> None:
        """Watch for requests that outrank the broker, and for a claim lost (call with the loop running)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="ownership-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._look()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one failed look must not end the watch
                log.exception("ownership watch failed; looking again")

    async def _look(self) -> None:
        claim = self._claim
        if not self.holding() or claim is None:
            self._requests = await asyncio.to_thread(owner.live_requests, self.paths, self.stale_after)
            self._owner_seen = await asyncio.to_thread(state.read_json_object, self.paths.owner)
            return
        if not await asyncio.to_thread(claim.ours):
            await self._lost(claim)
            return
        # owner.wanted_by, in two steps: the list is kept for broker/status.
        self._requests = await asyncio.to_thread(owner.live_requests, self.paths, self.stale_after)
        wanted = owner.outranking(self._requests, self.kind)
        if wanted is not None and await self._refused_for_hub(wanted):
            return
        if wanted is not None and self._claim is claim and self.holding():
            await self._yield_to(claim, wanted)

    async def _refused_for_hub(self, request: dict[str, Any]) -> bool:
        """Upstream's hub owns the palace: it is not ours to stop, so the palace is not handed over (the grant's
        command would write beside the hub). The requester sees `hub` in owner.json and gives up with the reason."""
        found = await self._engine.hub_owns()
        if found is None:
            return False
        if self._hub_refused != request.get("token"):
            self._hub_refused = request.get("token")
            log.warning(
                "%s asks for the palace, but upstream's hub (pid %s) owns it: not handed over", who(request), found.pid
            )
        return True

    async def _yield_to(self, claim: owner.Claim, request: dict[str, Any]) -> None:
        """Rule 3: finish the running call, stop the engine, release; then claim again and warm-start."""
        self.phase, self._blocker, self._waiting_since = "yielded", request, time.monotonic()
        log.warning(
            "%s asks for the palace: the running call finishes, then the engine stops and the palace is handed over",
            who(request),
        )
        async with self._gate:  # between two jobs; the queued ones wait (or meet their deadlines naming the owner)
            if self._claim is not claim or not self.holding():
                return
            # The wait for the gate may have been long (the running call): does a live request still outrank us?
            self._requests = await asyncio.to_thread(owner.live_requests, self.paths, self.stale_after)
            still = owner.outranking(self._requests, self.kind)
            if self._claim is not claim or not self.holding():
                return
            if still is None:
                log.warning(
                    "%s no longer asks for the palace (it gave up): the broker keeps it, and its engine", who(request)
                )
                self.phase, self._blocker, self._waiting_since = "holding", None, None
                return
            if await self._refused_for_hub(still):  # a hub may have come (or stayed) while we waited for the gate
                self.phase, self._blocker, self._waiting_since = "holding", None, None
                return
            request = self._blocker = still
            self._yielding = True  # from here no engine start passes before_start (or may_run) on this claim
            try:
                await self._engine.stop_for_handover(f"handing the palace over to {who(request)}")
            finally:
                if self._engine.pid is not None:  # never release beside a running engine
                    log.error("the engine (pid %s) did not stop: the broker keeps the palace", self._engine.pid)
                    self._yielding, self.phase, self._blocker = False, "holding", None
            if not self._yielding:
                return
            released = await asyncio.to_thread(self._release, claim)
            self.handovers += 1
            log.warning(
                "handed the palace over to %s (engine stopped%s); %s",
                who(request),
                ", owner.json released" if released else f"; owner.json was no longer {self.me}'s",
                f"{self.me} exits"
                if self._on_handed_over is not None
                else "the broker takes it back once it is released",
            )
            if not await self._end_here(f"handed the palace over to {who(request)}"):
                await self._take_back()

    async def _lost(self, claim: owner.Claim) -> None:
        """Rule 2: owner.json names someone else (another side judged this broker gone): stop the engine at once."""
        # Not holding from this very moment, before any await: an engine start that asks now (before_start, or
        # may_run during a start under way) is refused, and the heartbeat leaves this claim alone.
        self._yielding, self._losing = True, claim
        self.phase, self._waiting_since = "waiting", time.monotonic()
        try:
            now = await asyncio.to_thread(state.read_json_object, self.paths.owner)
            self._blocker = None if owner.names(now, claim) else now  # not ourselves
            log.error(
                "%s lost the palace: owner.json now names %s (another side judged it gone); "
                "stopping the engine at once",
                self.me,
                who(now) if now else "nobody",
            )
            for _ in range(3):  # a start under way is waited for (it gives up and kills its child): then none runs
                await self._engine.stop_for_handover("the palace was taken over by another owner", graceful=False)
                if self._engine.pid is None:
                    break
            if self._engine.pid is not None:
                log.error("the engine (pid %s) survived SIGKILL after the palace was lost", self._engine.pid)
            # Token-checked: removes owner.json only if it still names this claim (a false "lost"), so no record
            # with the broker's token and live pid stays behind to refuse the broker's own claim forever.
            if await asyncio.to_thread(self._release, claim):
                log.warning("owner.json named the broker after all: released it, to claim the palace afresh")
        finally:
            if self._losing is claim:
                self._losing = None
        async with self._gate:
            if not await self._end_here(f"lost the palace to {who(now) if now else 'another owner'}"):
                await self._take_back()

    async def _end_here(self, why: str) -> bool:
        """With `on_handed_over` (the container daemon): no taking the palace back. Closed from now on (an engine
        start is refused), `on_handed_over(why)` asked to end the process, and the dispatch gate the caller holds
        kept until close() cancels this task, so no queued call reaches an engine again: the exiting daemon answers
        them "not executed" and their sessions resend them. False at once on the host broker (it takes it back)."""
        if self._on_handed_over is None:
            return False
        self._closed = True
        self.phase = "yielded"
        self._on_handed_over(why)
        await asyncio.Event().wait()  # until close() cancels the watch
        return True

    async def _take_back(self) -> None:
        """Claim again (waits while the other owner holds it) and warm-start a fresh engine (inside the gate)."""
        await self.acquire()
        try:
            await self._engine.ensure_ready()
        except EngineUnavailable as exc:
            log.error("engine start after taking the palace back failed: %s", exc)

    # --- heartbeat and release ------------------------------------------------------------------
    def beat(self, engine_pid: int | None) -> None:
        """Rewrite owner.json's heartbeat, with the engine's pid and start time (owner.holder keeps a record of
        this machine alive while that engine runs). Blocking: run it in a thread, on the broker's schedule."""
        engine_start = self._engine_proc_start(engine_pid)
        via = self._engine.hub  # hub mode: the record says so (a grant is refused at once, status names the hub)
        with self._io_lock:
            claim = self._claim
            if claim is None or claim.released or claim is self._losing:
                return
            try:
                if not claim.beat(
                    kind="hub" if via is not None else self.kind,  # the same rank: only readers tell them apart
                    engine_pid=engine_pid,
                    engine_proc_start=engine_start,
                    hub=via.hub.as_dict() if via is not None else None,
                ):
                    log.error("owner.json is no longer the broker's: the engine stops at the next look")
            except owner.BeatSkipped as exc:  # owner.lock stayed busy: the next beat writes it
                log.warning("heartbeat of %s skipped: %s", self.paths.owner, exc)
            except OSError as exc:
                log.error("cannot refresh %s: %s", self.paths.owner, exc)

    def _engine_proc_start(self, pid: int | None) -> str | None:
        """The engine's start time, read once per engine pid (on macOS it runs `ps`)."""
        if pid is None:
            return None
        known = self._engine_start
        if known is None or known[0] != pid:
            known = self._engine_start = (pid, hostinfo.proc_start(pid))
        return known[1]

    def _release(self, claim: owner.Claim) -> bool:
        with self._io_lock:
            try:
                return claim.release()
            except OSError as exc:
                log.error("cannot release %s: %s", self.paths.owner, exc)
                return False

    async def close(self) -> None:
        """At broker exit, once the engine has stopped: stop watching and claiming, release the palace."""
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher], timeout=10)
        claim, self._claim = self._claim, None
        if claim is not None and not claim.released:
            if self._engine.pid is not None:
                log.error(
                    "the engine (pid %s) still runs at exit: owner.json is left for liveness to judge", self._engine.pid
                )
                return
            if await asyncio.to_thread(self._release, claim):
                log.info("released the palace (owner.json)")

    # --- threads ------------------------------------------------------------------------------
    @staticmethod
    async def _in_thread(fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """`fn()` in a thread; cancelled while it runs, `undo(result)` once it has returned (so a claim or a
        request made for a wait that was given up is withdrawn)."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if undo is not None:

                def done(f: asyncio.Future[T]) -> None:
                    if not f.cancelled() and f.exception() is None:
                        try:
                            undo(f.result())
                        except OSError as exc:
                            log.error("cannot withdraw a claim or request of a cancelled wait: %s", exc)

                fut.add_done_callback(done)
            raise
