"""One agent session: the stdio <-> broker pump behind `mp-shim`.

Data flows one way: agent stdin -> `Shim.from_client` -> the link -> the
broker, and back through `link_loop` -> `from_broker` -> stdout. One pending
table keyed by the agent's ids, one backlog for frames that wait for a
connection, cleanup of every pending request when a link is lost (answered as
"outcome unknown" — never retried; a call a stopping broker answered
"not_executed" waits for the next one) and a transparent re-initialize on the next link.

The broker owns each request's deadline (docs/PROTOCOL.md "Deadlines"): this
session's MEMPALACE_MCP_TIMEOUT_MS travels to it in the handshake and it
answers `not_executed` or `unknown` before that expires. The timer here is
only a backstop for a broker that died or hung, `SHIM_BACKSTOP_GRACE_S` later.

Threads and blocking I/O, not asyncio (whose import alone costs 45-70 ms on
every agent start): `stdin` (client -> broker), `link-N` (broker -> stdout,
one per connection), `deadlines` (backstop timers), `connect` (dialing, may
take seconds). Shared state is under one lock; stdout writes under another,
one whole frame per write.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from _heapq import heappop, heappush  # heapq's C half: its Python fallbacks are never used

from mp_ssh_bridge import endpoints
from mp_ssh_bridge.config import Config
from mp_ssh_bridge.diag import log
from mp_ssh_bridge.errors import EndpointError, NoAnswer, PalaceMismatch, ShimError
from mp_ssh_bridge.links import Link
from mp_ssh_bridge.protocol import (
    BROKER_UNREACHABLE,
    DEADLINE_EXCEEDED,
    EVENT_WAIT_TOOL,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    JSONRPC,
    LINE_TOO_LONG,
    OUTCOME_UNKNOWN,
    PARSE_ERROR,
    SHIM_BACKSTOP_GRACE_S,
    SHUTTING_DOWN,
    brief,
    check_request_shape,
    decode,
    encode,
    error,
    event_wait_timeout_ms,
    reply_head,
    reply_id,
    valid_id,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every agent start ~3 ms; annotations only
    from typing import BinaryIO

DRAIN_ON_EOF = 5.0  # after stdin closes, how long answers to pending requests may still arrive
MAX_RESENDS = 2  # a request a stopping broker did not run is sent to the next broker at most this often


def _not_run_by_a_stopping_broker(msg: dict) -> bool:
    """A reply that proves the request never ran because its broker is stopping (`mp-bridge restart`, an
    upgrade): safe to send again — not a blind retry, its outcome is known."""
    err = msg.get("error")
    if not isinstance(err, dict) or err.get("code") != SHUTTING_DOWN:
        return False
    data = err.get("data")
    return isinstance(data, dict) and data.get("outcome") == "not_executed"


def id_key(value: object) -> tuple[str, object]:
    return (type(value).__name__, value)  # 1 and "1" are different ids


def backstop_ms(cfg_timeout_ms: int, method: str, params: object) -> int | None:
    """When this session gives up on a request the broker never answered (None = never).

    The broker answers a margin BEFORE the session's timeout (`protocol.broker_deadline_s`);
    this fires SHIM_BACKSTOP_GRACE_S AFTER it, so the broker's precise answer always wins.
    """
    if cfg_timeout_ms <= 0:
        return None
    extra = event_wait_timeout_ms(method, params) or 0
    return cfg_timeout_ms + extra + int(SHIM_BACKSTOP_GRACE_S * 1000)


def fast_connect(cfg: Config) -> Link:
    """Host role, no MEMPALACE_BROKER: the socket broker.json names, proven. Raises OSError/ShimError/ValueError."""
    with open(os.path.join(cfg.state_dir, "broker.json"), encoding="utf-8") as fh:
        record = json.load(fh)
    endpoint = record.get("endpoint") if isinstance(record, dict) else None
    if not isinstance(endpoint, str) or not endpoint.startswith("unix://"):
        raise ConnectionError(f"broker.json names no unix endpoint ({endpoint!r})")
    return endpoints.connect(cfg, endpoint, role="host")


class Pending:
    __slots__ = ("msg_id", "method", "frame", "deadline", "link", "tool", "resent", "timeout_s")

    def __init__(self, msg_id: object, method: str, frame: bytes, deadline: float | None, tool: str | None,
                 timeout_s: float | None = None) -> None:
        self.msg_id = msg_id
        self.method = method
        self.frame = frame
        self.deadline = deadline  # the backstop (monotonic); re-armed when the request is sent to a new broker
        self.timeout_s = timeout_s  # the request's own timeout (the backstop minus SHIM_BACKSTOP_GRACE_S)
        self.link: Link | None = None  # None: waiting in the backlog, not sent yet
        self.tool = tool
        self.resent = 0  # times sent again after a broker said it did not run it (shutting down)


TRANSPORT_WORDS = {"ssh": "SSH", "unix": "its socket", "tcp": "TCP"}


def _handed_over(msg: dict) -> str | None:
    """The container daemon's "shutting down (handed the palace over to X)" in words for a notice, or None."""
    err = msg.get("error")
    text = err.get("message") if isinstance(err, dict) else None
    if not isinstance(text, str):
        return None
    start = text.find("handed the palace over to ")
    if start < 0:
        return None
    end = text.find("); request", start)
    return "this container's daemon " + text[start:end if end > start else None]


def handover_notice(handed: str, link: Link) -> str:
    """One line for the result after a hand-over: what happened to this session's engine, and how memory runs now."""
    over = TRANSPORT_WORDS.get(link.transport, link.transport)
    now = f"this session now reaches the broker over {over} ({link.endpoint})"
    return f"NOTE from mp-shim: {handed}; {now}."


class Shim:
    def __init__(self, cfg: Config, out_fd: int, in_file: BinaryIO) -> None:
        self.cfg = cfg
        self.out_fd = out_fd
        self.in_file = in_file
        self.lock = threading.RLock()
        self.out_lock = threading.Lock()
        self.pending: dict[tuple, Pending] = {}
        # Frames waiting for a connection, with the request they carry (None: a notification). A request
        # frame is sent only while that very Pending still holds its id: a cancelled id may be reused.
        self.backlog: list[tuple[tuple | None, bytes, Pending | None]] = []
        self.link: Link | None = None
        self.flushing: Link | None = None
        self.connecting = False
        self.connect_started = 0.0  # when the current dial began (monotonic): a backstop says how long it took
        self.last_error: ShimError | None = None
        self.init_msg: dict | None = None
        self.client_initialized = False
        self.swallow: set = set()
        self.handed_over: str | None = None  # how the last link gave the palace up (a daemon's hand-over), until a new link
        self.next_notice: str | None = None  # appended once to the next tools/call result
        self.stdin_done = False
        self.done = threading.Event()
        self._heap: list[tuple[float, int, tuple[str, object], Pending]] = []
        self._heap_cv = threading.Condition(self.lock)
        self._seq = 0
        self.generation = 0
        self._fast_failed = ""

    # ---- output -------------------------------------------------------------------------------
    def write_out(self, data: bytes) -> None:
        with self.out_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.out_fd, view)
                except BlockingIOError:
                    import select

                    select.select([], [self.out_fd], [], 1.0)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    log(40, f"cannot write to stdout ({exc}); ending the session")
                    self.done.set()
                    return
                view = view[n:]

    def reply_error(self, msg_id: object, code: int, message: str, data: object = None) -> None:
        self.write_out(encode(error(msg_id, code, message, data)))

    # ---- client -> broker ---------------------------------------------------------------------
    def stdin_loop(self) -> None:
        limit = self.cfg.max_line_bytes
        try:
            while True:
                line = self.in_file.readline(limit + 1)
                if not line:
                    break
                if not line.endswith(b"\n") and len(line) > limit:
                    while True:  # discard the rest of the oversized line
                        rest = self.in_file.readline(1 << 20)
                        if not rest or rest.endswith(b"\n"):
                            break
                    self.reply_error(None, LINE_TOO_LONG, f"message line exceeds {limit} bytes; dropped")
                    continue
                line = line.rstrip(b"\r\n")
                if line.strip():
                    self.from_client_safely(line)
        except (OSError, ValueError) as exc:  # stdin itself failed (closed, unreadable): the session ends
            log(30, f"stdin: {exc}")
        finally:
            self.on_stdin_closed()

    def from_client_safely(self, line: bytes) -> None:
        """`from_client`, and a bug in it costs one answer (-32603), never the agent's MCP server: this
        thread is the only reader of stdin, and a traceback ending it would end the session."""
        try:
            self.from_client(line)
        except Exception as exc:  # noqa: BLE001 - last resort: answer, say so in one line, keep reading
            msg_id = None
            try:
                msg_id = reply_id(decode(line))
            except Exception:  # noqa: BLE001 - the line may be what failed; then the answer has id null
                pass
            log(40, f"internal error on a message from the client (id {brief(msg_id)}): {type(exc).__name__}: "
                    f"{brief(str(exc), 200)}")
            self.reply_error(msg_id, INTERNAL_ERROR, f"internal mp-shim error ({type(exc).__name__}); outcome unknown")

    def from_client(self, line: bytes) -> None:
        """One line from the agent: a request is tracked and sent on, a bad line answered here (as the
        broker would: protocol.decode and protocol.check_request_shape are the broker's own rules)."""
        try:
            msg = decode(line)
        except ValueError as exc:
            self.reply_error(None, PARSE_ERROR, f"Parse error: {exc}")
            return
        problem = check_request_shape(msg)
        if problem is not None:
            self.reply_error(reply_id(msg), INVALID_REQUEST, f"Invalid Request: {problem}")
            return
        frame = line + b"\n"
        method = msg.get("method")
        key = None
        if isinstance(method, str) and "id" in msg:
            msg_id = msg["id"]
            params = msg.get("params")
            ms = backstop_ms(self.cfg.timeout_ms, method, params)
            tool = params.get("name") if method == "tools/call" and isinstance(params, dict) else None
            tool = tool if isinstance(tool, str) else None  # echoed in error data: never a client's deep value
            key = id_key(msg_id)
            with self.lock:
                if key in self.pending:
                    self.reply_error(msg_id, INVALID_REQUEST, f"id {brief(msg_id)} is already used by a pending request")
                    return
                pend = Pending(msg_id, method, frame, None if ms is None else time.monotonic() + ms / 1000, tool,
                               None if ms is None else ms / 1000 - SHIM_BACKSTOP_GRACE_S)
                self.pending[key] = pend
                if method == "initialize":
                    self.init_msg = msg
                if pend.deadline is not None:
                    self._seq += 1
                    heappush(self._heap, (pend.deadline, self._seq, key, pend))
                    if self._heap[0][1] == self._seq:  # the earliest now: the deadline thread waits for a later one
                        self._heap_cv.notify()
        elif isinstance(method, str):
            if method == "notifications/initialized":
                self.client_initialized = True
            elif method == "notifications/cancelled":
                params = msg.get("params")
                rid = params.get("requestId") if isinstance(params, dict) else None
                if valid_id(rid):  # anything else names no request of ours (and may not even be hashable)
                    with self.lock:
                        target = self.pending.pop(id_key(rid), None)  # no reply is expected any more
                    if target is not None and target.link is None:
                        return  # never sent: nothing to tell the broker
        self.send_or_queue(key, frame)

    def send_or_queue(self, key: tuple | None, frame: bytes) -> None:
        with self.lock:
            link = self.link
            pend = self.pending.get(key) if key is not None else None
            if link is None:
                if key is not None and pend is None:
                    return  # answered (expired) before it could even be queued
                self.backlog.append((key, frame, pend))
                start = not self.connecting
                if start:
                    self.connecting = True
            elif pend is not None:
                pend.link = link
        if link is None:
            if start:
                self.start_connect()
            return
        try:
            link.send(frame)
        except (OSError, ShimError) as exc:
            self.link_lost(link, f"send failed: {exc}")

    def on_stdin_closed(self) -> None:
        """The client closed stdin: let answers to pending requests arrive (bounded), then end."""
        self.stdin_done = True
        end = time.monotonic() + DRAIN_ON_EOF
        while time.monotonic() < end:
            with self.lock:
                if not self.pending:
                    break
            time.sleep(0.01)
        self.done.set()

    # ---- broker -> client ---------------------------------------------------------------------
    def link_loop(self, link: Link) -> None:
        reason = "the broker closed the connection"
        try:
            while True:
                frame = link.recv()
                if frame is None:
                    break
                try:
                    self.from_broker(link, frame)
                except Exception as exc:  # noqa: BLE001 - last resort: one bad frame costs that frame, not the link
                    log(40, f"internal error on a message from the broker: {type(exc).__name__}: {brief(str(exc), 200)}")
        except (OSError, ShimError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.link_lost(link, reason)

    def from_broker(self, link: Link, frame: bytes) -> None:
        head = reply_head(frame)
        if head is not None and not head.error:  # the usual answer: read no further than its id
            key = id_key(head.msg_id)
            with self.lock:
                pend = self.pending.get(key)
                plain = pend is not None and pend.link is link and self.next_notice is None and key not in self.swallow
                if plain:
                    del self.pending[key]
            if plain:
                self.write_out(frame + b"\n")
                return
        try:
            msg = decode(frame, strict=False)  # the broker passes the engine's output on as it is
        except ValueError:
            log(30, "broker sent malformed JSON; dropped")
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg:  # a notification (progress, log) or a request from the server: pass through
            self.write_out(frame + b"\n")
            return
        msg_id = msg.get("id")
        if msg_id is not None and not valid_id(msg_id):
            log(30, f"broker sent a reply with an unusable id {brief(msg_id)}; dropped")
            return
        key = id_key(msg_id)
        late: Pending | None = None
        with self.lock:
            if key in self.swallow:
                self.swallow.discard(key)
                if "error" in msg:
                    log(30, f"replayed initialize failed: {msg['error']}")
                return
            pend = self.pending.get(key)
            if pend is None or pend.link is not link:
                if msg_id is None:
                    pend = None  # an error about a frame the broker could not read: pass it on
                else:
                    log(20, f"late or unknown reply id {brief(msg_id)} dropped")
                    return
            elif _not_run_by_a_stopping_broker(msg) and pend.resent < MAX_RESENDS:
                pend.link = None  # proven not executed: the next broker (a restart) gets it, time permitting
                if self.handed_over is None:
                    self.handed_over = _handed_over(msg)  # a container daemon giving the palace to the host broker
                if not self._too_late_to_resend(pend, time.monotonic()):
                    pend.resent += 1
                    self.backlog.append((key, pend.frame, pend))  # its backstop still holds while it waits
                    log(20, f"request {brief(msg_id)} was not executed by a stopping broker; it waits for the next one")
                    return
                del self.pending[key]
                late = pend
            else:
                del self.pending[key]
            notices: list[str] = []
            if (pend is not None and pend.method == "tools/call" and isinstance(msg.get("result"), dict)
                    and isinstance(msg["result"].get("content"), list)):
                if self.next_notice is not None:
                    notices.append(self.next_notice)
                    self.next_notice = None
        if late is not None:
            self.answer_not_resent(late)
        elif notices:
            msg["result"]["content"].extend({"type": "text", "text": text} for text in notices)
            self.write_out(encode(msg))
        else:
            self.write_out(frame + b"\n")

    def link_lost(self, link: Link, reason: str) -> None:
        errors: list[Pending] = []
        with self.lock:
            if self.link is link:
                self.link = None
            elif self.flushing is link:
                self.flushing = None
            else:
                link.close()
                return
            for key, pend in list(self.pending.items()):
                if pend.link is not link:
                    continue
                if pend.method == "initialize":  # no effect on the palace: send it again on the next link
                    pend.link = None
                    self.backlog.insert(0, (key, pend.frame, pend))
                else:
                    del self.pending[key]
                    errors.append(pend)
            self.swallow.clear()
            start = bool(self.backlog) and not self.connecting and not self.stdin_done
            if start:
                self.connecting = True
        link.close()
        log(30, f"lost the connection to the broker ({link.endpoint}): {reason}")
        for pend in errors:
            self.reply_error(
                pend.msg_id,
                OUTCOME_UNKNOWN,
                f"connection to the broker was lost; outcome unknown; not retried ({reason})",
                {"outcome": "unknown", "method": pend.method, "tool": pend.tool},
            )
        if start:
            self.start_connect()

    # ---- deadlines ------------------------------------------------------------------------------
    def deadline_loop(self) -> None:
        while not self.done.is_set():
            expired: list[Pending] = []
            with self._heap_cv:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    when, _, key, due = heappop(self._heap)
                    if self.pending.get(key) is due and due.deadline == when:  # not re-armed (resent) since
                        del self.pending[key]
                        expired.append(due)
                if not expired:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._heap_cv.wait(wait if wait is None else max(0.001, wait))
                    continue
            for pend in expired:
                self.expire(pend)

    def expire(self, pend: Pending) -> None:
        """The backstop fired: the broker (which owns the deadline) has not answered at all."""
        if pend.link is None:
            with self.lock:
                reason = f" ({self.last_error})" if self.last_error else ""
                dialing = time.monotonic() - self.connect_started if self.connecting else None
            if dialing is None:
                still = ""
            else:
                still = (f"; mp-shim was still connecting to the broker, or starting it ({dialing:.1f} s so far): "
                         "check `mp-bridge logs` and `mp-bridge doctor`")
            self.reply_error(
                pend.msg_id,
                DEADLINE_EXCEEDED,
                f"no broker connection within the request's deadline (MEMPALACE_MCP_TIMEOUT_MS={self.cfg.timeout_ms})"
                f"{reason}; the request was NOT sent (safe to retry){still}",
                {"outcome": "not_executed"},
            )
            return
        wait = " plus the event_wait timeout" if pend.tool == EVENT_WAIT_TOOL else ""
        self.reply_error(
            pend.msg_id,
            DEADLINE_EXCEEDED,
            f"no answer from {pend.link.endpoint}, not even its own deadline error, within "
            f"MEMPALACE_MCP_TIMEOUT_MS={self.cfg.timeout_ms}{wait} + {SHIM_BACKSTOP_GRACE_S:g}s: the broker is "
            "hung or gone; outcome unknown; a late answer will be dropped (check `mp-bridge status`)",
            {"outcome": "unknown"},
        )
        try:  # let the broker drop it if it is still queued
            pend.link.send(
                encode({"jsonrpc": JSONRPC, "method": "notifications/cancelled",
                        "params": {"requestId": pend.msg_id, "reason": "mp-shim deadline exceeded"}})
            )
        except (OSError, ShimError):
            pass

    # ---- resending what a stopping broker did not run ---------------------------------------------
    @staticmethod
    def _too_late_to_resend(pend: Pending, now: float) -> bool:
        """Less than half its timeout left before the backstop: the next broker, which measures a fresh deadline
        from the frame's arrival, could still run it after the backstop had told the agent "outcome unknown"."""
        if pend.deadline is None or not pend.timeout_s:
            return False  # no deadline: it may wait as long as it takes
        return pend.deadline - now < pend.timeout_s / 2

    def _rearm(self, pend: Pending, key: tuple, now: float) -> None:
        """Sent to a new broker: the backstop counts from now (the old heap entry no longer matches). Under lock."""
        if pend.deadline is None or pend.timeout_s is None:
            return
        pend.deadline = now + pend.timeout_s + SHIM_BACKSTOP_GRACE_S
        self._seq += 1
        heappush(self._heap, (pend.deadline, self._seq, key, pend))
        self._heap_cv.notify()

    def answer_not_resent(self, pend: Pending) -> None:
        """A request a stopping broker did not run, with too little time left to send it to the next one."""
        left = max(0.0, (pend.deadline or 0.0) - time.monotonic() - SHIM_BACKSTOP_GRACE_S)
        log(20, f"request {brief(pend.msg_id)} was not executed by a stopping broker; too little time left to resend it")
        self.reply_error(
            pend.msg_id,
            DEADLINE_EXCEEDED,
            f"request NOT executed (the broker was restarting); only {left:.1f}s of its deadline "
            f"(MEMPALACE_MCP_TIMEOUT_MS={self.cfg.timeout_ms}) was left, too little to send it to the next broker; "
            "safe to retry",
            {"outcome": "not_executed"},
        )

    # ---- connecting -----------------------------------------------------------------------------
    def start_connect(self) -> None:
        self.connect_started = time.monotonic()
        threading.Thread(target=self.connect_worker, name="connect", daemon=True).start()

    def dial(self) -> Link:
        cfg = self.cfg
        if cfg.broker_url is None and cfg.resolved_role() == "host" and not self._fast_failed:
            try:
                return fast_connect(cfg)
            except PalaceMismatch:
                raise
            except FileNotFoundError:
                self._fast_failed = "no broker.json"
            except (OSError, ShimError, ValueError) as exc:
                self._fast_failed = f"{type(exc).__name__}: {exc}"
                log(20, f"fast path failed ({self._fast_failed}); running discovery")
        elif cfg.broker_url is None and cfg.resolved_role() == "container" and not self._fast_failed:
            from mp_ssh_bridge import daemon  # stdlib: the running daemon's socket, as broker.json names it

            try:
                return daemon.fast_connect(cfg)
            except PalaceMismatch:
                raise
            except FileNotFoundError:
                self._fast_failed = "no container daemon"
            except (OSError, ShimError, ValueError) as exc:
                if isinstance(exc, ShimError) and not isinstance(exc, (EndpointError, NoAnswer)):
                    raise  # the daemon answered: its refusal (a host key, no way to the host) is the answer
                self._fast_failed = f"{type(exc).__name__}: {exc}"
                log(20, f"container daemon not reachable ({self._fast_failed}); running discovery")
        elif cfg.broker_url is not None and cfg.broker_url.startswith(("unix://", "tcp://")):
            return endpoints.connect(cfg, cfg.broker_url, role=cfg.resolved_role())
        from mp_ssh_bridge import discovery  # the slow path: settings, election, SSH, daemon

        fast_reason, self._fast_failed = self._fast_failed, ""
        return discovery.discover(cfg, fast_failure=fast_reason)

    def connect_worker(self) -> None:
        try:
            link = self.dial()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer to the agent
            if isinstance(exc, ShimError):
                err = exc
            else:
                err = ShimError(BROKER_UNREACHABLE, f"no broker reachable: {type(exc).__name__}: {exc}")
            self.connect_failed(err)
            return
        self.adopt(link)

    def connect_failed(self, err: ShimError) -> None:
        with self.lock:
            self.connecting = False
            self.last_error = err
            waiting: list[Pending] = []
            for k, _, p in self.backlog:
                if k is not None and p is not None and self.pending.get(k) is p:  # not a cancelled request whose id was reused
                    del self.pending[k]
                    waiting.append(p)
            self.backlog.clear()
        log(40, str(err))
        for pend in waiting:
            self.reply_error(pend.msg_id, err.code, f"{err}; the request was NOT sent", {"outcome": "not_executed"})

    def adopt(self, link: Link) -> None:
        """Replay initialize if the client already did it, flush the backlog, then go live."""
        self.generation += 1
        with self.lock:
            self.flushing = link  # link_lost() recognises it while we flush
            pending_init = any(
                k is not None and p is not None and self.pending.get(k) is p and p.method == "initialize"
                for k, _, p in self.backlog
            )
            replay: list[bytes] = []
            if self.init_msg is not None and not pending_init:
                rid = f"mp-shim/replay-initialize/{self.generation}"
                self.swallow.add(id_key(rid))
                replay.append(encode(dict(self.init_msg, id=rid)))
                if self.client_initialized:
                    replay.append(encode({"jsonrpc": JSONRPC, "method": "notifications/initialized"}))
        with self.lock:
            if self.handed_over is not None:
                self.next_notice = handover_notice(self.handed_over, link)
                self.handed_over = None
        threading.Thread(target=self.link_loop, args=(link,), name=f"link-{self.generation}", daemon=True).start()
        log(20, f"connected to {link.endpoint} ({link.transport})")
        failure = ""
        try:
            for frame in replay:
                link.send(frame)
            while True:
                late: Pending | None = None
                with self.lock:
                    if self.flushing is not link:
                        break  # lost while flushing; link_lost() has answered what was sent
                    if not self.backlog:
                        self.flushing = None
                        self.link = link
                        self.connecting = False
                        self.last_error = None
                        return
                    key, frame, pend = self.backlog.pop(0)
                    if key is not None:
                        if pend is None or self.pending.get(key) is not pend:
                            continue  # expired or cancelled while waiting (its id may name a newer request)
                        if pend.resent:  # a stopping broker did not run it: a fresh deadline, if time allows
                            now = time.monotonic()
                            if self._too_late_to_resend(pend, now):
                                del self.pending[key]
                                late = pend
                            else:
                                self._rearm(pend, key, now)
                        if late is None:
                            pend.link = link
                if late is not None:
                    self.answer_not_resent(late)
                    continue
                link.send(frame)
        except (OSError, ShimError) as exc:
            failure = f"send failed: {exc}"
        self.link_lost(link, failure or "connection lost while sending")
        with self.lock:
            self.connecting = False
            restart = bool(self.backlog) and not self.stdin_done
            if restart:
                self.connecting = True
        if restart:
            self.start_connect()

    # ---- run --------------------------------------------------------------------------------------
    def run(self) -> int:
        with self.lock:
            self.connecting = True
        self.start_connect()  # connect while the client is still starting
        threading.Thread(target=self.deadline_loop, name="deadlines", daemon=True).start()
        threading.Thread(target=self.stdin_loop, name="stdin", daemon=True).start()
        try:
            while not self.done.wait(1.0):
                pass
        finally:
            with self.lock:
                link, self.link = self.link, None
                self._heap_cv.notify_all()
            if link is not None:
                link.close()
        return 0


