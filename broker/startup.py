"""While the engine loads, the sessions whose requests wait for it are told so.

A cold engine takes 1–2.5 s here (9.5 s seen on a slow disk), and a request that waits in
silence looks hung: the agent, or the person watching it, gives up or retries. MCP's
logging utility (`notifications/message`) is the standard way for a server to say what it
is doing, so the broker declares the `logging` capability and tells each session that has
a request waiting for the engine (never one that has none): one notice at once ("memory
engine starting (0.4 s so far); your request waits for it up to 59 s"), another at most
every NOTICE_EVERY_S while it still waits, and "memory engine ready after N s" once it is
up. Notices honour the level the session chose with `logging/setLevel`, which the broker
answers itself (the engine implements no logging). No task: one timer, re-armed only
while someone waits, cancelled at shutdown.

A request that reaches its deadline while the engine loads is answered with what it was
waiting for ("memory engine still starting (N s so far)"), that it was NOT executed, and
where to look; an engine that failed to start is named with its last error.

While the broker does not own the palace (broker/ownership.py: a grant or a local owner holds
it, or the broker is handing it over) the engine cannot start at all: notices say the broker
waits for the palace's owner, and a request that meets its deadline then is answered naming
the holder and how long it has held the palace ("the palace is held by `mempalace mine ~/x`
under `mp-bridge run` (pid 123 on mac, for 42 s); this request was NOT executed (safe to
retry)"), whether or not a call was still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from mp_ssh_bridge import protocol

LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")  # RFC 5424, MCP's order
LOGGER = "mempalace-broker"
NOTICE_EVERY_S = 3.0  # at most one notice per session this often while its request waits
TICK_S = 0.5  # how often the timer looks (cheap: a scan of the waiting sessions)
WHAT_TO_CHECK = "check `mp-bridge logs` (the engine's start-up output) and `mp-bridge doctor`"
NO_REASON = "no reason was recorded (the engine start failed without a message)"


class EngineView(Protocol):
    """What is read of broker/engine.py's Engine."""

    @property
    def state(self) -> str: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def pid(self) -> int | None: ...


class JobView(Protocol):
    """What is read of a queued broker/mux.py Job."""

    @property
    def state(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def deadline(self) -> float: ...


class SessionView(Protocol):
    """What is read of (and sent to) a broker/mux.py ClientSession."""

    @property
    def id(self) -> int: ...

    @property
    def log_level(self) -> str | None: ...

    @property
    def pending(self) -> Mapping[Any, JobView]: ...

    def send(self, message: dict[str, Any]) -> None: ...


def valid_level(value: Any) -> bool:
    return isinstance(value, str) and value in LEVELS


def level_allows(threshold: str | None, level: str) -> bool:
    """Whether a message of `level` reaches a session that asked for `threshold` and up (None: asked nothing)."""
    if threshold is None or threshold not in LEVELS or level not in LEVELS:
        return True
    return LEVELS.index(level) >= LEVELS.index(threshold)


def log_message(level: str, text: str) -> dict[str, Any]:
    """An MCP `notifications/message` from the broker itself."""
    return protocol.notification("notifications/message", {"level": level, "logger": LOGGER, "data": text})


def waiting_jobs(session: SessionView) -> list[JobView]:
    """The session's requests still waiting for the engine (an `initialize` is not told: the client is not set up)."""
    return [j for j in session.pending.values() if j.state == "queued" and j.kind != "initialize"]


def _your_wait(jobs: list[JobView], now: float) -> str:
    left = max(0.0, min(j.deadline for j in jobs) - now)
    what = "your request waits" if len(jobs) == 1 else f"your {len(jobs)} requests wait"
    return f"{what} for it up to {left:.0f} s more"


class StartupNotices:
    """Tells waiting sessions how the engine's start is going; words deadline errors met during it."""

    def __init__(self, engine: EngineView, sessions: Callable[[], Iterable[SessionView]]) -> None:
        self._engine = engine
        self._sessions = sessions
        self._last: dict[int, float] = {}  # session id -> when it was last told (monotonic)
        self._since: float | None = None  # when the broker first saw this start (if the engine cannot say)
        self._timer: asyncio.TimerHandle | None = None
        self.last_failure = ""  # why the last start failed; cleared when the engine is up
        # Who keeps the palace from the broker, in words ("the palace is held by ..."), or None while it is ours.
        self.held_by: Callable[[], str | None] | None = None

    def held(self) -> str | None:
        return self.held_by() if self.held_by is not None else None

    # --- the clock ----------------------------------------------------------------
    def loading(self) -> bool:
        return self._engine.state != "ready" or self.held() is not None

    def loading_for(self) -> float:
        """Seconds this start has taken: since the engine's spawn when it is known, else since the broker saw it."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        engine = self._engine
        if engine.state in ("starting", "ready") and engine.pid is not None and engine.started_at:
            return max(0.0, time.time() - engine.started_at)
        return now - self._since

    def failed(self, why: str) -> None:
        """A start failed (EngineUnavailable): named in later notices and errors (never an empty reason)."""
        self.last_failure = why.strip() or NO_REASON

    # --- notices --------------------------------------------------------------------
    def waiting(self, session: SessionView) -> None:
        """A request of `session` was queued: if the engine is not up, tell it now (unless told just now)."""
        if not self.loading():
            return
        self._notify(session, time.monotonic())
        self._arm()

    def ready(self) -> None:
        """The engine is up: tell the sessions that were told and still wait, then forget them."""
        told, self._last = self._last, {}
        took = self.loading_for()
        self._since = None
        self.last_failure = ""
        self._cancel_timer()
        for session in self._sessions():
            if session.id in told and waiting_jobs(session):
                self._send(session, "info", f"memory engine ready after {took:.1f} s; running your request now")

    def close(self) -> None:
        self._cancel_timer()
        self._last.clear()

    def _notify(self, session: SessionView, now: float) -> None:
        jobs = waiting_jobs(session)
        last = self._last.get(session.id)
        if not jobs or (last is not None and now - last < NOTICE_EVERY_S):
            return
        self._last[session.id] = now
        took = self.loading_for()
        held = self.held()
        if held is not None:
            level, text = "info", f"the broker is waiting for the palace's owner: {held}; memory comes back once it " \
                                  "is released"
        elif self._engine.state == "failed" and self.last_failure:
            level = "warning"
            text = f"memory engine failed to start ({self.last_failure}); trying again"
        elif last is None:
            level, text = "info", f"memory engine starting ({took:.1f} s so far)"
        else:
            level, text = "info", f"memory engine still starting ({took:.1f} s so far)"
        self._send(session, level, f"{text}; {_your_wait(jobs, now)}")

    @staticmethod
    def _send(session: SessionView, level: str, text: str) -> None:
        if level_allows(session.log_level, level):
            session.send(log_message(level, text))

    def _tick(self) -> None:
        self._timer = None
        if not self.loading():
            self.ready()
            return
        now = time.monotonic()
        anyone = False
        for session in self._sessions():
            if waiting_jobs(session):
                anyone = True
                self._notify(session, now)
        if anyone:
            self._arm()
        else:
            self._last.clear()  # nobody waits: a later request is told afresh

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- errors ---------------------------------------------------------------------
    def deadline_error(
        self, waited: float, limit: str, others: int, engine_busy: bool = False,
    ) -> tuple[str, dict[str, Any]] | None:
        """The -32061 message and data for a queued request that met its deadline while the palace is not the
        broker's (always), or while the engine loads (unless `engine_busy`: then it waited behind a call); else None."""
        held = self.held()
        if held is not None:
            message = (
                f"{held}; this request was NOT executed (safe to retry): it reached its deadline ({limit}) after "
                f"waiting {waited:.1f}s, with {others} other request(s) still queued. The broker takes the palace "
                "back as soon as it is released (`mp-bridge status` names the owner)"
            )
            return message, {
                "outcome": "not_executed",
                "waited_s": round(waited, 3),
                "queued": others,
                "busy_with": None,
                "engine_state": self._engine.state,
                "palace_held_by": held,
            }
        if engine_busy or not self.loading():
            return None
        took = self.loading_for()
        if self._engine.state == "failed" and self.last_failure:
            what = f"memory engine failed to start ({self.last_failure}) and is being tried again"
        else:
            what = f"memory engine still starting ({took:.1f} s so far)"
        message = (
            f"{what}: request NOT executed; it reached its deadline ({limit}) after waiting {waited:.1f}s "
            f"for the engine, with {others} other request(s) still queued. It is safe to retry; if the engine "
            f"does not come up, {WHAT_TO_CHECK}"
        )
        data = {
            "outcome": "not_executed",
            "waited_s": round(waited, 3),
            "queued": others,
            "busy_with": None,
            "engine_state": self._engine.state,
            "engine_starting_s": round(took, 3),
        }
        if self.last_failure:
            data["last_error"] = self.last_failure[-800:]
        return message, data

    def unavailable_error(self, exc: BaseException) -> tuple[str, dict[str, Any]]:
        """The -32062 message and data when the engine cannot be started: its last error, and where to look."""
        self.failed(str(exc))
        why = self.last_failure
        message = f"memory engine failed to start: {why}. Request NOT executed (safe to retry); {WHAT_TO_CHECK}"
        return message, {"outcome": "not_executed", "last_error": why[-800:]}
