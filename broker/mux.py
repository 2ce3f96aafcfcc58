"""Client sessions multiplexed onto the one engine.

Every client may use any JSON-RPC ids (each agent starts at 1), so ids are
kept per session and the engine sees the broker's own; progress tokens are
rewritten the same way. `initialize` is answered from a cache per protocol
version (spawning an engine per session costs ~0.6 s; a cached answer costs
nothing). Cancellation follows the MCP spec: a queued request is dropped
with no reply, a running one has its late reply dropped. Deadlines and
engine failures become JSON-RPC errors that say whether the request ran:
"not executed", or "outcome unknown" — and nothing is ever retried. The
broker owns each request's deadline (only it knows whether the request
reached the engine); a session tells it its own timer with broker/status
`timeoutMs`, and the broker answers just before that timer fires.

Each job runs under the dispatch gate (`gate`), so a hand-over of the palace
(broker/ownership.py) takes it between two jobs: the running call finishes,
the queued ones stay queued (and meet their deadlines naming the owner).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mp_ssh_bridge import enginecmd, protocol
from mp_ssh_bridge.settings import BrokerSettings
from mp_ssh_bridge_broker import guard, readonly, startup, tools
from mp_ssh_bridge_broker.bounds import Bounds, PendingJobs, limit_error, over_queue_limit
from mp_ssh_bridge_broker.engine import (
    Engine,
    EngineExited,
    EngineNoReply,
    EngineUnavailable,
    HubGone,
    HubLeft,
    Reply,
)
from mp_ssh_bridge_broker.queue import FairQueue
from mp_ssh_bridge_broker.tasks import Tasks, within

if TYPE_CHECKING:
    from mp_ssh_bridge_broker.ownership import Ownership

log = logging.getLogger("broker.mux")

DEFAULT_OUTBOX_MAX_BYTES = 32 * 1024 * 1024  # the max_client_outbox_bytes default (broker/bounds.py)
TOTALS = ("requests", "responses", "errors", "cancelled", "timeouts", "outcome_unknown", "engine_requests")
INIT_CACHE_MAX = 16  # initialize answers kept, one per protocolVersion asked for (a client picks the key)
LOOK_WHEN_BUSY_S = 0.05  # a parked long poll's periodic look finds the engine busy: it tries again this much later
HUB_LONG_POLLS_MAX = 32  # hub mode: long polls the hub holds at once beside the queue (more wait their turn in it)
TIMEOUT_MS_MAX = 2**31 - 1  # JavaScript's setTimeout ceiling (pi's extension); a larger timeoutMs is refused


def _id_key(value: Any) -> tuple[str, Any]:
    """The pending-table key of a request id; only ever called with a protocol.valid_id (hashable) one."""
    return (type(value).__name__, value)  # 1 and "1" are different ids


def job_deadline_s(timeout_ms: int, request_timeout: float, event_wait_ms: int | None) -> float:
    """Seconds from arrival until a job times out in the broker.

    The session's own timer (`timeoutMs`, > 0) wins, answered a little early
    (protocol.broker_deadline_s) so our `not_executed`/`unknown` verdict beats
    the session's blind "outcome unknown"; without one, the broker's
    request_timeout. A mempalace_event_wait also gets the wait it asked for.
    """
    return protocol.broker_deadline_s(timeout_ms, request_timeout, event_wait_ms or 0)


def valid_timeout_ms(value: Any) -> bool:
    """broker/status `timeoutMs`: a JSON integer 0..TIMEOUT_MS_MAX (true/false and 1.5 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TIMEOUT_MS_MAX


def describe_client(info: Any) -> str:
    """An agent's `clientInfo` as one short, printable string ("" when it sent none)."""
    if not isinstance(info, dict):
        return ""
    name, version = info.get("name"), info.get("version")
    text = " ".join(str(v) for v in (name, version) if isinstance(v, (str, int, float)))
    return "".join(ch for ch in text if ch.isprintable())[:80]


def announce_list_changed(result: dict[str, Any]) -> dict[str, Any]:
    """An initialize result that declares what the broker itself sends: `tools.listChanged` (cold-start
    cache) and `logging` (start-up notices, broker/startup.py)."""
    out = copy.deepcopy(result)
    caps = out.setdefault("capabilities", {})
    if isinstance(caps, dict):
        tools_cap = caps.get("tools")
        caps["tools"] = dict(tools_cap if isinstance(tools_cap, dict) else {}, listChanged=True)
        if not isinstance(caps.get("logging"), dict):
            caps["logging"] = {}
    return out


class ClientSession:
    """One connected client: its outbox, its pending requests, its counters.

    The outbox is bounded (`outbox_max`, the max_client_outbox_bytes setting): past half of it the
    server stops reading this client's requests (`backlogged`); past all of it the client is not
    reading its replies, and it is cut off at once (`abort`): what waits for it is dropped, not flushed.
    """

    _ids = 0

    def __init__(
        self, peer: str, writer: asyncio.StreamWriter | None = None, outbox_max: int = DEFAULT_OUTBOX_MAX_BYTES
    ) -> None:
        ClientSession._ids += 1
        self.id = ClientSession._ids
        self.peer = peer
        self.connected_at = time.time()
        self.pending: PendingJobs[Job] = PendingJobs()  # also counts the bytes of their request lines
        self.line_bytes = 0  # size of the request line being handled (set by the server)
        self.requests = 0
        self.authenticated = True
        self.read_only = False  # the tool surface of `mempalace-mcp --read-only` (broker/status readOnly)
        self.timeout_ms = 0  # the session's own per-request timer (broker/status timeoutMs); 0 = none
        self.client_info = ""  # the agent's clientInfo "name version", from its initialize
        self.transport = "unix" if peer.startswith("unix") else peer.split(" ", 1)[0]  # the shim says (broker/status)
        self.role = ""  # host / container, as the shim declared it
        self.probe = False  # mp-bridge's or the election's look at the status: not listed as a client
        self.log_level: str | None = None  # from its logging/setLevel; None: it asked for nothing
        self.closed = False
        self._half_close = False
        self.outbox_max = outbox_max
        self._writer = writer
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.outbox_bytes = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._writing = False
        self._writer_task: asyncio.Task[None] | None = None
        if writer is not None:
            self._writer_task = asyncio.create_task(self._write_loop(), name=f"client-{self.id}-writer")

    def send(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.send_frame(protocol.encode(message))

    def send_frame(self, data: bytes) -> None:
        """One whole frame (newline included). Nothing waiting before it and the socket taking bytes: written
        at once, in this step (most replies: no task switch); otherwise queued for the writer task, in order."""
        if self.closed:
            return
        writer = self._writer
        unsent = writer.transport.get_write_buffer_size() if writer is not None else 0  # written, not yet taken
        if self.outbox_bytes + unsent + len(data) > self.outbox_max:
            log.warning(
                "client %s is not reading its replies (%d bytes waiting, max_client_outbox_bytes %d); disconnecting it",
                self.id,
                self.outbox_bytes + unsent,
                self.outbox_max,
            )
            self.abort()
            return
        if (
            writer is not None
            and not unsent
            and self._outbox.empty()
            and not self._writing
            and not writer.transport.is_closing()
        ):
            writer.write(data)
            return
        self.outbox_bytes += len(data)
        if self.backlogged():
            self._drained.clear()
        self._outbox.put_nowait(data)

    def backlogged(self) -> bool:
        """Over half the outbox cap: read no more of this client's requests until it reads its replies."""
        return self.outbox_bytes > self.outbox_max // 2

    async def wait_drained(self, timeout: float) -> bool:
        """Until the outbox is back under half its cap (True), the session closed (True), or `timeout` (False)."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self, half: bool = False) -> None:
        """Flush what is queued, then close (the writer task closes the socket; `half`: only our sending side,
        the caller closes the rest once it has drained what the peer still sends)."""
        if not self.closed:
            self.closed = True
            self._half_close = half
            self._outbox.put_nowait(None)

    def abort(self) -> None:
        """Close now, dropping every reply still queued (a client that does not read gets none of them)."""
        self.closed = True
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self.outbox_bytes = 0
        self._drained.set()
        if self._writer is not None:
            self._writer.transport.abort()  # the read side sees EOF at once; the server then detaches us
        if self._writer_task is not None:
            self._writer_task.cancel()

    async def _write_loop(self) -> None:
        writer = self._writer
        assert writer is not None
        try:
            while True:
                data = await self._outbox.get()
                if data is None:
                    break
                self.outbox_bytes -= len(data)
                if not self.backlogged():
                    self._drained.set()
                self._writing = True  # until drained: a frame sent meanwhile queues behind this one
                writer.write(data)
                await writer.drain()
                self._writing = False
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._drained.set()
            try:
                if self._half_close and writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            except Exception:  # noqa: BLE001 - closing a broken transport
                pass

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """Let the writer flush (bounded by `timeout`), then make sure its task has ended."""
        task = self._writer_task
        if task is None:
            return
        await asyncio.wait([task], timeout=timeout)  # never raises for the task's own outcome (abort cancels it)
        if not task.done():  # a client that stopped reading
            task.cancel()
            await asyncio.wait([task], timeout=1.0)


@dataclass(eq=False)
class Job:
    """One client request on its way through the queue to the engine."""

    owner: ClientSession
    client_id: Any
    method: str
    params: Any
    deadline: float
    created: float = field(default_factory=time.monotonic)
    kind: str = "call"  # "call" | "initialize" | "event_wait"
    hub_retried: bool = False  # hub mode: sent once more after the hub died before it took the request
    event_wait_until: float | None = None
    progress_token: str | None = None
    state: str = "queued"  # queued -> running -> done; event_wait: queued -> running -> parked -> queued ... done
    replied: bool = False
    engine_id: int | None = None
    started: float | None = None  # when the engine got it (the last look, for event_wait)
    timer: asyncio.TimerHandle | None = None
    slices: int = 0  # event_wait: the looks it took (each one engine call)
    look: asyncio.TimerHandle | None = None  # event_wait, parked: its next periodic look (or the final one)
    looked: float = 0.0  # event_wait: when its last look was queued
    last_look: dict[str, Any] | None = None  # event_wait: the engine's last "timed out" answer (its own shape)

    @property
    def tool(self) -> str | None:
        if self.method == "tools/call" and isinstance(self.params, dict):
            name = self.params.get("name")
            return name if isinstance(name, str) else None
        return None


class Mux:
    """Routes client messages into the fair queue and engine replies back."""

    def __init__(self, settings: BrokerSettings, engine: Engine | None = None, bounds: Bounds | None = None) -> None:
        self.settings = settings
        self.bounds = bounds or Bounds.from_settings(settings)  # per-connection queue bounds (_enqueue)
        self.engine = engine or Engine(settings, self._on_engine_notification)
        self.queue: FairQueue[Job] = FairQueue()
        self.sessions: dict[int, ClientSession] = {}
        self.in_flight: Job | None = None
        self.beside: set[Job] = set()  # hub mode: long polls running at the hub beside the queue (_run_beside)
        self.parked: set[Job] = set()  # own engine: long polls between two looks, held by the broker (_park)
        self.init_cache: dict[str, dict[str, Any]] = {}
        # The engine's tools/list result (broker/coldstart.py): from disk until the engine confirms it.
        self.tools_cache: dict[str, Any] | None = None
        self.tools_confirmed = False
        self._given_cached_tools: set[int] = set()  # sessions that got an unconfirmed list
        self._cache_generation = -1
        self._progress: dict[str, tuple[ClientSession, Any]] = {}
        self._next_token = 0
        self.totals: collections.Counter[str] = collections.Counter()
        self.idle_since = time.monotonic()
        self.accepting = True
        self._tasks = Tasks("mux")  # dispatcher, read-only probe, forwarded cancels; cancelled at shutdown
        self._dispatcher: asyncio.Task[None] | None = None
        self._dispatching: Job | None = None  # taken from the queue, in _run (maybe still waiting for the engine)
        self.status_extra: dict[str, Any] = {}
        # Held by the dispatch loop around each job's run; a hand-over of the palace takes it between jobs (FIFO).
        self.gate = asyncio.Lock()
        self.ownership: Ownership | None = None  # set by the broker's lifecycle (None: no ownership, unit tests)
        self._read_only_probe: asyncio.Task[frozenset[str] | None] | None = None
        # Sessions whose requests wait for a loading engine hear how it goes (MCP log notices).
        self.startup = startup.StartupNotices(self.engine, lambda: list(self.sessions.values()))

    def attach_ownership(self, ownership: Ownership) -> None:
        """The broker's ownership of the palace: in broker/status, and named by waiting requests' notices/errors."""
        self.ownership = ownership
        self.startup.held_by = ownership.blocked_by

    # --- sessions ------------------------------------------------------------------
    def attach(self, session: ClientSession) -> None:
        self.sessions[session.id] = session
        log.info("client %s connected (%s); %d clients", session.id, session.peer, len(self.sessions))

    def detach(self, session: ClientSession) -> None:
        """A client left: drop its queued work, orphan its running request."""
        if self.sessions.pop(session.id, None) is None:
            return
        for job in self.queue.drop_owner(session):
            self._finish(job)
        for job in list(session.pending.values()):
            job.replied = True  # a late reply has nowhere to go
            if job.state != "running":
                self._finish(job)
        session.pending.clear()
        session.close()
        if not self.sessions:
            self.idle_since = time.monotonic()
        log.info("client %s disconnected; %d clients", session.id, len(self.sessions))

    # --- inbound ---------------------------------------------------------------------
    def handle(self, session: ClientSession, msg: Any) -> None:
        """One parsed message from a client (shape not yet checked). Never raises: whatever a client sends
        is answered on its own connection (a notification gets nothing), and the connection goes on."""
        try:
            self._handle(session, msg)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one answer, never the connection
            msg_id = protocol.reply_id(msg)
            log.error(
                "internal error handling a message from client %s (id %s): %s: %s",
                session.id,
                protocol.brief(msg_id),
                type(exc).__name__,
                protocol.brief(str(exc), 200),
                exc_info=exc,
            )
            if msg_id is not None or not protocol.is_notification(msg if isinstance(msg, dict) else {}):
                self._error(session, msg_id, protocol.INTERNAL_ERROR, "internal broker error; outcome unknown")

    def _handle(self, session: ClientSession, msg: Any) -> None:
        problem = protocol.check_request_shape(msg)
        if problem is not None:
            self._error(session, protocol.reply_id(msg), protocol.INVALID_REQUEST, f"Invalid Request: {problem}")
            return
        if protocol.is_response(msg):
            log.debug("client %s sent a response; the engine never asks, dropping it", session.id)
            return
        method = msg["method"]
        params = msg.get("params")
        if protocol.is_notification(msg):
            if method == "notifications/cancelled":
                self._cancel(session, params)
            # notifications/initialized and the rest: the engine ignores them, so do we.
            return
        msg_id = msg["id"]
        if not method.startswith("broker/"):  # the bridge's own methods are not the agent's requests
            session.requests += 1
            self.totals["requests"] += 1
        if method == "initialize" and isinstance(params, dict):
            session.client_info = describe_client(params.get("clientInfo"))
        if method == "ping":
            session.send(protocol.result(msg_id, {}))
        elif method == "broker/status":
            self._status_request(session, msg_id, params)
        elif method == "broker/auth":
            session.send(protocol.result(msg_id, {"ok": True}))
        elif method.startswith("broker/"):
            self._error(
                session, msg_id, protocol.METHOD_NOT_FOUND, f"Unknown broker method: {protocol.brief(method, 80)}"
            )
        elif method.startswith("notifications/"):  # every engine drops it unanswered: its sender would wait forever
            self._error(
                session,
                msg_id,
                protocol.METHOD_NOT_FOUND,
                f"Method not found: {protocol.brief(method, 80)} is a notification; send it without an id",
            )
        elif method == "logging/setLevel":  # the broker's own log notices (the engine implements no logging)
            self._set_log_level(session, msg_id, params)
        elif not self.accepting:
            self.totals["errors"] += 1  # outcome not_executed: mp-shim sends it again to the next broker
            session.send(
                protocol.error(
                    msg_id,
                    protocol.SHUTTING_DOWN,
                    "broker is shutting down; request not executed",
                    {"outcome": "not_executed"},
                )
            )
        elif _id_key(msg_id) in session.pending:
            self._error(
                session,
                msg_id,
                protocol.INVALID_REQUEST,
                f"id {protocol.brief(msg_id)} is already used by a pending request",
            )
        elif method == "initialize" and self._cached_initialize(params) is not None:
            session.send(protocol.result(msg_id, self._cached_initialize(params)))
        elif method == "tools/list" and self._early_tools(session) is not None:
            session.send(protocol.result(msg_id, self._early_tools(session)))
        elif guard.invalid_params(method, params) is not None:  # what an older engine would never answer
            self._error(session, msg_id, protocol.INVALID_PARAMS, str(guard.invalid_params(method, params)))
        else:
            self._enqueue(session, msg_id, method, guard.envelope_params(params))

    def _status_request(self, session: ClientSession, msg_id: Any, params: Any) -> None:
        """broker/status: the status, and the session's declarations (readOnly, timeoutMs, transport, role, probe)."""
        if isinstance(params, dict):
            if params.get("probe") is True:
                session.probe = True  # mp-bridge / the election looking: not a client in the status
            for key in ("transport", "role"):
                if isinstance(params.get(key), str):
                    setattr(session, key, params[key][:32])
            if params.get("readOnly") is True:
                session.read_only = True  # sticky: a session never widens its own surface
                self._start_read_only_probe()
            if "timeoutMs" in params:
                value = params["timeoutMs"]
                if not valid_timeout_ms(value):
                    self._error(
                        session,
                        msg_id,
                        protocol.INVALID_PARAMS,
                        f"Invalid params: timeoutMs must be an integer from 0 (no deadline) to {TIMEOUT_MS_MAX} "
                        f"milliseconds, got {protocol.brief(value)}",
                    )
                    return
                session.timeout_ms = value
        session.send(protocol.result(msg_id, self.status()))

    def _set_log_level(self, session: ClientSession, msg_id: Any, params: Any) -> None:
        """logging/setLevel: the lowest level of the broker's notices this session hears (kept per session)."""
        level = params.get("level") if isinstance(params, dict) else None
        if not startup.valid_level(level):
            self._error(
                session,
                msg_id,
                protocol.INVALID_PARAMS,
                f"Invalid params: level must be one of {', '.join(startup.LEVELS)}, got {protocol.brief(level, 40)}",
            )
            return
        session.log_level = level
        session.send(protocol.result(msg_id, {}))

    def _cached_initialize(self, params: Any) -> dict[str, Any] | None:
        version = params.get("protocolVersion") if isinstance(params, dict) else None
        if not isinstance(version, str):
            version = protocol.LATEST_PROTOCOL_VERSION
        cached = self.init_cache.get(version)
        return announce_list_changed(cached) if cached is not None else None

    # --- cold start (broker/coldstart.py) ---------------------------------------------
    def seed(self, initialize: dict[str, Any], tools_list: dict[str, Any]) -> None:
        """The engine's answers from its last run: initialize and tools/list are served before it is up."""
        for version in protocol.KNOWN_PROTOCOL_VERSIONS:  # the engine echoes a version it knows
            self.init_cache.setdefault(version, dict(copy.deepcopy(initialize), protocolVersion=version))
        self.tools_cache = copy.deepcopy(tools_list)
        self.tools_confirmed = False

    def _early_tools(self, session: ClientSession) -> dict[str, Any] | None:
        """The cached tool list while the engine is not ready (a read-only session waits for its own surface)."""
        if self.tools_cache is None or self.engine.state == "ready" or session.read_only:
            return None
        if not self.tools_confirmed:
            self._given_cached_tools.add(session.id)
        res = copy.deepcopy(self.tools_cache)
        return tools.strip_root_combinators(res) if self.settings.strip_root_combinators else res

    def confirm_tools(self, fresh: dict[str, Any]) -> bool:
        """The engine's own tools/list, once it is up; tells sessions given another list. True when it changed."""
        changed = self.tools_cache is not None and fresh != self.tools_cache
        self.tools_cache, self.tools_confirmed = copy.deepcopy(fresh), True
        told, self._given_cached_tools = self._given_cached_tools, set()
        if changed:
            for sid in told:
                if sid in self.sessions:
                    self.sessions[sid].send(protocol.notification("notifications/tools/list_changed"))
        return changed

    def _enqueue(self, session: ClientSession, msg_id: Any, method: str, params: Any) -> None:
        size = session.line_bytes
        over = over_queue_limit(self.bounds, len(session.pending), session.pending.queued_bytes, size)
        if over is not None:  # answered at once; the connection stays usable
            self.totals["errors"] += 1
            what = (
                f"this connection already has {len(session.pending)} requests queued or running"
                if over[0] == "max_queued_per_client"
                else f"this connection's queued requests already hold {session.pending.queued_bytes} bytes"
            )
            session.send(limit_error(msg_id, *over, what))
            return
        now = time.monotonic()
        wait_ms = tools.event_wait_timeout_ms(method, params)
        deadline = now + job_deadline_s(session.timeout_ms, self.settings.request_timeout, wait_ms)
        job = Job(session, msg_id, method, params, deadline=deadline)
        if method == "initialize":
            job.kind = "initialize"
        if wait_ms:
            job.kind = "event_wait"
            job.event_wait_until = now + wait_ms / 1000
            job.looked = now
        self._rewrite_progress_token(job)
        session.pending.add(_id_key(msg_id), job, size)
        loop = asyncio.get_running_loop()
        job.timer = loop.call_at(loop.time() + (job.deadline - now), self._expire, job)
        self.queue.put(job)
        self.startup.waiting(session)  # a loading engine: tell the session its request waits, and how long

    def _rewrite_progress_token(self, job: Job) -> None:
        params = job.params
        meta = params.get("_meta") if isinstance(params, dict) else None
        if not isinstance(meta, dict) or "progressToken" not in meta:
            return
        self._next_token += 1
        token = f"mpb-{self._next_token}"
        self._progress[token] = (job.owner, meta["progressToken"])
        job.progress_token = token
        job.params = dict(params, _meta=dict(meta, progressToken=token))

    def _cancel(self, session: ClientSession, params: Any) -> None:
        """notifications/cancelled. A requestId that is no valid id names no request of ours: ignored, like an
        unknown one (a notification gets no reply; an object or array could not even be looked up)."""
        request_id = params.get("requestId") if isinstance(params, dict) else None
        if not protocol.valid_id(request_id):
            return
        job = session.pending.get(_id_key(request_id))
        if job is None:
            return  # unknown or already answered: the spec says ignore
        self.totals["cancelled"] += 1
        job.replied = True  # per spec, no reply to a cancelled request
        self._unpend(job)
        if job.state in ("queued", "parked"):
            self.queue.remove(job)
            self._finish(job)
        elif job.state == "running" and job.engine_id is not None:
            self._tasks.spawn(self._forward_cancel(job.engine_id), name=f"forward-cancel-{job.engine_id}")

    async def _forward_cancel(self, engine_id: int) -> None:
        try:
            await self.engine.send(
                protocol.notification("notifications/cancelled", {"requestId": engine_id, "reason": "client cancelled"})
            )
        except EngineUnavailable:
            pass

    def _expire(self, job: Job) -> None:
        """The job's deadline: say exactly whether it ran, and why it did not finish in time."""
        if job.state == "done" or job.replied:
            return
        waited = time.monotonic() - job.created
        self.totals["timeouts"] += 1
        limit = self._deadline_source(job.owner)
        if job.kind == "event_wait" and job.last_look is not None and job.state != "running" and (
            job.event_wait_until is None or time.monotonic() >= job.event_wait_until
        ):  # its wait is over and its looks found nothing: the engine's own "timed out", not an error
            self._unpark(job)
            self.queue.remove(job)
            self._reply(job, dict(job.last_look, id=job.client_id, jsonrpc=protocol.JSONRPC))
            self._finish(job)
            return
        if job.state in ("queued", "parked"):
            self._unpark(job)
            self.queue.remove(job)
            others = len(self.queue)
            loading = self.startup.deadline_error(waited, limit, others, engine_busy=self.in_flight is not None)
            if loading is not None:  # it waited for the palace's owner or the engine to come up, not behind other work
                self._reply_error(job, protocol.DEADLINE_EXCEEDED, *loading)
                self._finish(job)
                return
            why, busy_with = self._why_not_run(job)
            self._reply_error(
                job,
                protocol.DEADLINE_EXCEEDED,
                f"request NOT executed: it reached its deadline ({limit}) after waiting {waited:.1f}s for the "
                f"engine, with {others} other request(s) still queued; {why}. It is safe to retry",
                {"outcome": "not_executed", "waited_s": round(waited, 3), "queued": others, "busy_with": busy_with},
            )
            self._finish(job)
        else:
            self._reply_error(
                job,
                protocol.DEADLINE_EXCEEDED,
                f"request timed out after {waited:.1f}s ({limit}); the engine is still running it, so its outcome "
                "is unknown (not retried)",
                {"outcome": "unknown", "waited_s": round(waited, 3)},
            )

    def _deadline_source(self, session: ClientSession) -> str:
        if session.timeout_ms > 0:
            return f"this session's timeout of {session.timeout_ms} ms, answered just before it"
        return f"the broker's request_timeout of {self.settings.request_timeout:g}s"

    def _why_not_run(self, job: Job) -> tuple[str, str | None]:
        """What held a queued job back: the running request, or an engine that was not ready."""
        flight = self.in_flight
        if flight is not None:
            what = f"tool {flight.tool}" if flight.tool else flight.method
            whose = "this session's own earlier request" if flight.owner is job.owner else "another session"
            running = time.monotonic() - (flight.started or flight.created)
            return f"the engine was busy with {what} for {whose} ({running:.1f}s so far)", what
        if not self.engine.running():
            return f"the engine was not ready (state: {self.engine.state})", None
        return "the engine was busy with other requests", None

    # --- engine side -------------------------------------------------------------------
    def start(self) -> None:
        self._dispatcher = self._tasks.spawn(self._dispatch_loop(), name="dispatcher")

    async def _dispatch_loop(self) -> None:
        while True:
            job = await self.queue.get()
            if job.state != "queued":
                continue
            if job.kind == "event_wait" and self.engine.hub is not None and len(self.beside) < HUB_LONG_POLLS_MAX:
                # Hub mode: the hub runs long polls concurrently (lock-free), so one is not a turn of the queue:
                # it goes to the hub whole, beside the queue, and the next job is dispatched at once.
                self.beside.add(job)
                self._tasks.spawn(self._run_beside(job), name=f"long-poll-{job.client_id}")
                continue
            self._dispatching = job  # kept if cancelled: shutdown answers it when it never reached the engine
            try:
                async with self.gate:  # a hand-over of the palace waits for this job, then holds the next one
                    await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad job must not stop the broker
                log.exception("internal error while serving %s", job.method)
                self._reply_error(job, protocol.INTERNAL_ERROR, "internal broker error; outcome unknown")
                self._finish(job)
            self._dispatching = None

    async def _run(self, job: Job) -> None:
        try:
            await self.engine.ensure_ready()
        except EngineUnavailable as exc:
            failure = self.startup.unavailable_error(exc)  # kept: later notices and deadlines name it too
            if job.state == "queued":
                self._reply_error(job, protocol.ENGINE_UNAVAILABLE, *failure)
                self._finish(job)
            return
        self._refresh_init_cache()
        if job.state != "queued":  # expired or cancelled while the engine started
            return
        allowed: frozenset[str] | None = None
        if job.owner.read_only and job.method in ("tools/list", "tools/call"):
            allowed = await self._read_only_tools()
            if job.state != "queued":
                return
            if job.method == "tools/call" and (allowed is None or job.tool not in allowed):
                self._reply(job, readonly.refusal(job.client_id, job.tool, allowed is not None))
                self._finish(job)
                return
        if job.kind == "initialize":
            cached = self._cached_initialize(job.params)
            if cached is not None:
                self._reply(job, protocol.result(job.client_id, cached))
                self._finish(job)
                return
        params = job.params
        if job.kind == "event_wait":  # one look: at most event_wait_slice (default 0: the engine does not wait)
            assert job.event_wait_until is not None
            remaining_ms = (job.event_wait_until - time.monotonic()) * 1000
            params = tools.event_wait_slice(job.params, int(min(self.settings.event_wait_slice * 1000, remaining_ms)))
            job.slices += 1
        job.state = "running"
        self.in_flight = job
        started = job.started = time.monotonic()
        try:
            # A tool call's reply is passed on as the engine wrote it (the id swapped in): `_complete`
            job.engine_id, fut = await self.engine.request(
                job.method, params, passthrough=job.kind == "call" and job.method == "tools/call"
            )
            self.totals["engine_requests"] += 1
            reply = await within(fut, self.settings.stall_timeout)
        except EngineUnavailable as exc:
            self._reply_error(
                job, protocol.OUTCOME_UNKNOWN, f"engine failed while receiving the request ({exc}); outcome unknown"
            )
            self._finish(job)
            return
        except asyncio.TimeoutError:
            stalled = time.monotonic() - started
            if job.engine_id is not None:
                self.engine.forget(job.engine_id)
            via = self.engine.hub
            await self.engine.kill(f"no answer for {stalled:.0f}s")
            self.totals["outcome_unknown"] += 1
            what = (
                f"the memory engine stalled ({stalled:.0f}s without an answer) and was restarted"
                if via is None
                else f"upstream's hub (pid {via.hub.pid}, {via.hub.url}) gave no answer for {stalled:.0f}s; the "
                "broker looks for it again on the next call"
            )
            self._reply_error(
                job,
                protocol.OUTCOME_UNKNOWN,
                f"{what}; this request's outcome is unknown and it was NOT retried",
                {"outcome": "unknown"},
            )
            self._finish(job)
            return
        except EngineNoReply as exc:  # it answered a later request: this one was dropped, the engine lives on
            self.totals["outcome_unknown"] += 1
            said = f" (it logged: {exc.summary})" if exc.summary else ""
            self._reply_error(
                job,
                protocol.OUTCOME_UNKNOWN,
                f"the memory engine failed on this request and sent no answer{said}; whether it took effect is "
                "unknown and it was NOT retried. The engine keeps serving the other requests",
                {"outcome": "unknown", "engine_log": exc.logged},
            )
            self._finish(job)
            return
        except HubGone as exc:  # not executed, and the hub is gone: once more, on the broker's own engine
            self.in_flight = None
            if job.replied:  # cancelled, or answered by its deadline meanwhile: it ran nowhere, and stays so
                self._finish(job)
                return
            if job.hub_retried:
                self._reply_error(
                    job, protocol.ENGINE_UNAVAILABLE, f"{exc}; request NOT executed", {"outcome": "not_executed"}
                )
                self._finish(job)
                return
            log.warning(
                "upstream's hub is gone before this request reached it (%s): it runs on the broker's own engine", exc
            )
            job.hub_retried, job.state = True, "queued"
            await self._run(job)
            return
        except EngineExited as exc:
            self.totals["outcome_unknown"] += 1
            what = (
                str(exc)
                if isinstance(exc, HubLeft)
                else f"the memory engine exited during this request ({exc}) and is being restarted"
            )
            self._reply_error(
                job,
                protocol.OUTCOME_UNKNOWN,
                f"{what}; the request's outcome is unknown and it was NOT retried",
                {"outcome": "unknown", "stderr": exc.stderr_tail[-500:]},
            )
            self._finish(job)
            return
        finally:
            self.in_flight = None
            if job.kind == "call" and self.parked and tools.may_add_events(job.method, job.params):
                self._wake_parked()  # it may have appended an event a parked long poll waits for: they look now
        self._complete(job, reply, allowed)

    async def _run_beside(self, job: Job) -> None:
        """One long poll in hub mode, its whole wait in one call to the hub (not in slices of the queue)."""
        try:
            assert job.event_wait_until is not None
            remaining = max(0.001, job.event_wait_until - time.monotonic())
            params = tools.event_wait_slice(job.params, int(remaining * 1000))
            job.state, job.started = "running", time.monotonic()
            job.slices += 1
            try:
                job.engine_id, fut = await self.engine.request(job.method, params)
                self.totals["engine_requests"] += 1
                reply = await within(fut, remaining + self.settings.stall_timeout)
            except EngineUnavailable as exc:
                self._reply_error(
                    job,
                    protocol.ENGINE_UNAVAILABLE,
                    f"the hub is not reachable ({exc}); request NOT executed",
                    {"outcome": "not_executed"},
                )
                self._finish(job)
                return
            except asyncio.TimeoutError:
                if job.engine_id is not None:
                    self.engine.forget(job.engine_id)
                self.totals["outcome_unknown"] += 1
                self._reply_error(
                    job,
                    protocol.OUTCOME_UNKNOWN,
                    f"upstream's hub gave no answer to this wait within "
                    f"{remaining + self.settings.stall_timeout:.0f}s; outcome unknown, NOT retried",
                    {"outcome": "unknown"},
                )
                self._finish(job)
                return
            except HubGone:  # it reached no hub, and the hub is gone: back in the queue, for the broker's engine
                if job.replied:
                    self._finish(job)
                else:
                    job.state = "queued"
                    self.queue.put(job)
                return
            except (EngineExited, EngineNoReply) as exc:
                self.totals["outcome_unknown"] += 1
                self._reply_error(
                    job,
                    protocol.OUTCOME_UNKNOWN,
                    f"the hub call ended without an answer ({exc}); outcome unknown, NOT retried",
                    {"outcome": "unknown"},
                )
                self._finish(job)
                return
            self._complete(job, reply)
        except Exception:  # noqa: BLE001 - one bad job must not stop the broker
            log.exception("internal error while serving a long poll")
            self._reply_error(job, protocol.INTERNAL_ERROR, "internal broker error; outcome unknown")
            self._finish(job)
        finally:
            self.beside.discard(job)

    def _start_read_only_probe(self) -> asyncio.Task[frozenset[str] | None]:
        """Learn the engine's own --read-only tool surface, once, when the first read-only client shows up."""
        if self._read_only_probe is None:

            async def probe() -> frozenset[str] | None:
                try:
                    argv = enginecmd.resolve(self.settings.engine_argv)
                except enginecmd.EngineNotFound:
                    return None
                return await readonly.probe_read_only_tools(argv, self.settings.engine_start_timeout)

            self._read_only_probe = self._tasks.spawn(probe(), name="read-only-probe")
        return self._read_only_probe

    async def _read_only_tools(self) -> frozenset[str] | None:
        return await asyncio.shield(self._start_read_only_probe())

    def _complete(self, job: Job, answer: Reply, allowed: frozenset[str] | None = None) -> None:
        if job.replied:
            self._finish(job)  # cancelled or timed out meanwhile: the late reply is dropped
            return
        if not isinstance(answer, protocol.ReplyHead):
            reply = answer
        else:  # a tool call's: nothing in it to change but the id
            frame = answer.with_id(job.client_id)
            if len(frame) <= self.settings.max_line_bytes:  # a longer id could push it over a line's limit
                self._reply(job, frame, answer.error)
                self._finish(job)
                return
            try:
                reply = protocol.decode(answer.frame, strict=False)  # re-encoded compactly below, as before
            except ValueError as exc:
                self._reply_error(job, protocol.OUTCOME_UNKNOWN, f"the engine's answer could not be read ({exc}); "
                                  "outcome unknown", {"outcome": "unknown"})
                self._finish(job)
                return
        res = reply.get("result")
        if (
            job.kind == "event_wait"
            and tools.event_wait_timed_out(res)
            and job.event_wait_until is not None
            and job.event_wait_until - time.monotonic() > 0.005
        ):
            job.last_look = reply
            self._park(job)  # held here, not at the engine, until an event may have come
            return
        if job.kind == "initialize" and isinstance(res, dict):
            version = (job.params or {}).get("protocolVersion") if isinstance(job.params, dict) else None
            if isinstance(version, str) and (version in self.init_cache or len(self.init_cache) < INIT_CACHE_MAX):
                self.init_cache[version] = copy.deepcopy(res)  # bounded: a client picks the key
            reply = dict(reply, result=announce_list_changed(res))
        if job.method == "tools/list" and res is not None:
            if self.settings.strip_root_combinators:
                res = tools.strip_root_combinators(res)
            if job.owner.read_only:
                res = readonly.filter_tools(res, allowed or frozenset())
            reply = dict(reply, result=res)
        out = dict(reply)
        out["id"] = job.client_id
        out["jsonrpc"] = protocol.JSONRPC
        self._reply(job, out)
        self._finish(job)

    # --- long polls held by the broker ------------------------------------------------------------
    def _park(self, job: Job) -> None:
        """A long poll found nothing: the broker holds it (the engine is free for everyone else) until a write
        through this broker may have appended its event (`_wake_parked`), its next periodic look for an event
        that came another way (`event_wait_poll`), or its own end (a last look gives the engine's own answer)."""
        assert job.event_wait_until is not None
        job.state = "parked"
        self.parked.add(job)
        now = time.monotonic()
        at = min(job.event_wait_until, now + self.settings.event_wait_poll)
        loop = asyncio.get_running_loop()
        job.look = loop.call_at(loop.time() + (at - now), self._look, job, False)

    def _unpark(self, job: Job) -> None:
        self.parked.discard(job)
        if job.look is not None:
            job.look.cancel()
            job.look = None

    def _look(self, job: Job, woken: bool) -> None:
        """Queue a parked long poll's next look. A periodic one waits while the engine serves others (up to one
        more period); one woken by a write, or the last one, does not."""
        if job.state != "parked":
            return
        self._unpark(job)
        now = time.monotonic()
        busy = self.in_flight is not None or len(self.queue) > 0
        due = job.event_wait_until is None or now >= job.event_wait_until
        if busy and not woken and not due and now - job.looked < 2 * self.settings.event_wait_poll:
            self.parked.add(job)
            loop = asyncio.get_running_loop()
            job.look = loop.call_at(loop.time() + LOOK_WHEN_BUSY_S, self._look, job, False)
            return
        job.state, job.looked = "queued", now
        self.queue.put(job)

    def _wake_parked(self) -> None:
        for job in list(self.parked):
            self._look(job, True)

    def _refresh_init_cache(self) -> None:
        if self._cache_generation == self.engine.starts:
            return
        self._cache_generation = self.engine.starts
        self.startup.ready()  # once per engine start: the sessions told it was loading hear it is up
        self.init_cache.clear()
        result = self.engine.initialize_result
        if result is not None:
            self.init_cache[protocol.LATEST_PROTOCOL_VERSION] = copy.deepcopy(result)
            version = result.get("protocolVersion")
            if isinstance(version, str):
                self.init_cache[version] = copy.deepcopy(result)

    def _on_engine_notification(self, msg: dict[str, Any]) -> None:
        raw = msg.get("params")
        params: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if msg.get("method") == "notifications/progress":
            token = params.get("progressToken")
            route = self._progress.get(token) if isinstance(token, str) else None
            if route is not None:
                session, original = route
                session.send(dict(msg, params=dict(params, progressToken=original)))
            return
        job = self.in_flight
        if job is not None and not job.replied and self._hears(job.owner, msg):
            job.owner.send(msg)  # e.g. a log message emitted while serving this client

    @staticmethod
    def _hears(session: ClientSession, msg: dict[str, Any]) -> bool:
        """A log message is passed on at or above the level the session set (logging/setLevel)."""
        params = msg.get("params")
        if msg.get("method") != "notifications/message" or not isinstance(params, dict):
            return True
        return startup.level_allows(session.log_level, str(params.get("level")))

    # --- replies -------------------------------------------------------------------------
    def _reply(self, job: Job, message: dict[str, Any] | bytes, failed: bool = False) -> None:
        """Answer `job` once: a message, or a whole frame (the engine's own, the client's id in it) that `failed`
        or not."""
        if job.replied:
            return
        job.replied = True
        self._unpend(job)
        if isinstance(message, bytes):
            self.totals["errors" if failed else "responses"] += 1
            job.owner.send_frame(message)
            return
        self.totals["errors" if "error" in message else "responses"] += 1
        job.owner.send(message)

    def _reply_error(self, job: Job, code: int, message: str, data: Any = None) -> None:
        self._reply(job, protocol.error(job.client_id, code, message, data))

    def _error(self, session: ClientSession, msg_id: Any, code: int, message: str) -> None:
        self.totals["errors"] += 1
        session.send(protocol.error(msg_id, code, message))

    def _finish(self, job: Job) -> None:
        job.state = "done"
        self._unpark(job)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.progress_token is not None:
            self._progress.pop(job.progress_token, None)
        self._unpend(job)

    @staticmethod
    def _unpend(job: Job) -> None:
        key = _id_key(job.client_id)
        if job.owner.pending.get(key) is job:  # the id may already name a newer request
            del job.owner.pending[key]

    # --- shutdown --------------------------------------------------------------------------
    async def shutdown(self, grace: float, reason: str = "") -> None:
        """Refuse new work, fail queued work, let the running request finish within `grace`.

        Ends with nothing of ours left running: the engine's tasks (Engine.stop),
        the sessions' writers, and every task this Mux spawned.
        """
        self.accepting = False
        why = f" ({reason})" if reason else ""

        def not_executed(job: Job) -> None:  # mp-shim sends it again to the next broker
            self._reply_error(
                job,
                protocol.SHUTTING_DOWN,
                f"broker is shutting down{why}; request NOT executed",
                {"outcome": "not_executed"},
            )
            self._finish(job)

        for job in self.queue.jobs():
            self.queue.remove(job)
            not_executed(job)
        for job in list(self.parked):  # long polls between two looks: the next broker serves them (mp-shim resends)
            not_executed(job)
        deadline = time.monotonic() + grace
        while self.in_flight is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        flight = self.in_flight  # read before the dispatcher is cancelled (its `finally` clears it)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        taken, self._dispatching = self._dispatching, None
        if taken is not None and taken.state == "queued":  # taken, but still waiting for the engine (or the probe)
            not_executed(taken)
        for job in self.queue.jobs():  # queued meanwhile (a long poll's next look): never sent again either
            self.queue.remove(job)
            not_executed(job)
        for job in list(self.parked):  # parked during the grace period
            not_executed(job)
        for job in list(self.beside):  # hub mode's long polls: they only read, but say it as for any running call
            self._reply_error(
                job,
                protocol.OUTCOME_UNKNOWN,
                "broker shut down during this request; outcome unknown",
                {"outcome": "unknown"},
            )
            self._finish(job)
        if flight is not None and flight.state != "done":
            self._reply_error(
                flight,
                protocol.OUTCOME_UNKNOWN,
                "broker shut down during this request; outcome unknown",
                {"outcome": "unknown"},
            )
            self._finish(flight)
        self.startup.close()
        await self.engine.stop()
        for session in list(self.sessions.values()):
            session.close()
        for session in list(self.sessions.values()):
            await session.wait_closed(1.0)
        await self._tasks.cancel_all()

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.time()
        mono = time.monotonic()
        flight = self.in_flight
        engine = self.engine
        return {
            "broker": dict(self.status_extra),
            "engine": {
                "pid": engine.pid,
                "version": engine.version,
                "state": engine.state,
                "uptime_s": round(now - engine.started_at, 3) if engine.started_at and engine.pid else None,
                "restarts": engine.restarts,
                "starts": engine.starts,
                "last_exit": engine.last_exit,
                **engine.health(),
            },
            "clients": [
                {
                    "id": s.id,
                    "peer": s.peer,
                    "client": s.client_info,
                    "transport": s.transport,
                    "role": s.role,
                    "connected_s": round(now - s.connected_at, 3),
                    "queued": self.queue.depth(s),
                    "in_flight": flight is not None and flight.owner is s,
                    "requests": s.requests,
                    "read_only": s.read_only,
                    "timeout_ms": s.timeout_ms,
                }
                for s in self.sessions.values()
                if not s.probe
            ],
            "queue_depth": len(self.queue),
            "long_polls_beside": len(self.beside),
            "long_polls_parked": len(self.parked),
            "in_flight": None
            if flight is None
            else {
                "client": flight.owner.id,
                "method": flight.method,
                "tool": flight.tool,
                "running_s": round(mono - flight.created, 3),
            },
            "totals": {k: self.totals.get(k, 0) for k in TOTALS},
            "ownership": self.ownership.status() if self.ownership is not None else None,
        }
