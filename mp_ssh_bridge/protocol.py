"""JSON-RPC 2.0 framing and message helpers shared by the broker and the shim.

Stdlib only: the shim's start-up path imports this module, and each extra
import there is paid by every agent session. The wire format is the one
`mempalace-mcp` speaks on stdio: one JSON object per line, UTF-8, `\\n` ended.

Both sides read a client's frame with `decode` and judge it with
`check_request_shape`, so the shim and the broker refuse exactly the same
input with the same code — and neither may raise on any input, since a
raise is a request never answered (the broker) or an MCP server gone (the
shim). Two rules there are not obvious:
- nesting is capped at MAX_NESTING: Python's parser, encoder and repr all
  recurse, and a few thousand `[` would otherwise raise RecursionError
  wherever the value goes next;
- lone surrogates (`"\\ud800"`) are accepted, as `mempalace-mcp` accepts them
  (it strips them where they would hurt); `encode` writes them back as the
  same `\\u` escapes, since they have no UTF-8 form.
"""

from __future__ import annotations

import itertools
import json
import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # asyncio costs the shim's fast path ~50 ms to import; only read_frame needs it
    import asyncio
    from typing import Any

JSONRPC = "2.0"

# Standard JSON-RPC codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Broker / shim codes (the -32000..-32099 "server error" range; mempalace
# itself uses -32001 for "Peer MCP writer active", so we stay clear of it).
OUTCOME_UNKNOWN = -32060  # the call may or may not have taken effect; not retried
DEADLINE_EXCEEDED = -32061  # no answer before the request's deadline
ENGINE_UNAVAILABLE = -32062  # the engine could not be started / is restarting
LINE_TOO_LONG = -32063  # a frame above the size cap; the connection is closed
UNAUTHORIZED = -32064  # TCP client without the right token
SHUTTING_DOWN = -32065  # the broker is stopping; the request was not executed
BROKER_UNREACHABLE = -32066  # the shim has no broker to send the request to
PALACE_MISMATCH = -32067  # the reachable broker serves another palace
LIMIT_REACHED = -32068  # a bound was hit (queue, bytes, connections); data names the setting; not executed

# `mempalace-broker` exit statuses a service manager must tell apart (broker/__main__.py exits with them,
# mp_ssh_bridge/service.py writes them into the systemd unit): restarting cannot help either.
SETTINGS_ERROR = 2  # unusable settings or flags
ALREADY_SERVED = 3  # another broker already serves this palace: success for a service (0 with --service)

# MCP protocol versions the engine is known to speak (newest last).
KNOWN_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_PROTOCOL_VERSION = KNOWN_PROTOCOL_VERSIONS[-1]

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024

# mempalace's long poll: the broker holds it between looks (broker/mux.py `_park`), the shim extends its deadline by it.
EVENT_WAIT_TOOL = "mempalace_event_wait"
EVENT_WAIT_DEFAULT_MS = 60_000
EVENT_WAIT_MAX_MS = 300_000


# Deadlines (docs/PROTOCOL.md "Deadlines"): the broker owns a request's deadline,
# because only it knows whether the request ever reached the engine.
# The shim fires only this long after the broker's deadline, as a backstop for a dead broker.
SHIM_BACKSTOP_GRACE_S = 2.0


def broker_deadline_s(timeout_ms: int, default_s: float, extra_ms: int = 0) -> float:
    """Seconds from arrival until the broker times a request out.

    `timeout_ms` is the session's own per-request timer (MEMPALACE_MCP_TIMEOUT_MS,
    sent as broker/status `timeoutMs`; 0 = the session sets none, and the
    broker's `default_s` applies). The broker answers a margin before the
    session's timer — min(1 s, 10 %), never under 0.2 s in all — so its precise
    verdict (`not_executed` vs `unknown`) reaches the agent before the session
    (or pi's extension, which enforces the same number) gives up with "outcome
    unknown". `extra_ms` is added on top: the wait a mempalace_event_wait asks for.
    """
    if timeout_ms > 0:
        session_s = timeout_ms / 1000
        base = max(0.2, session_s - min(1.0, 0.1 * session_s))
    else:
        base = default_s
    return base + max(0, extra_ms) / 1000


class LineTooLong(Exception):
    """A frame exceeded the configured size cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message line exceeds {limit} bytes")
        self.limit = limit


class FrameBuffer:
    """The one framing rule for byte streams: frames end at `\\n`, none longer than `limit`.

    Feed it what a socket or pipe gives; take whole frames out. Scans each byte
    once, so a 16 MiB reply arriving in 64 KiB pieces costs linear time. The
    asyncio server side applies the same rule through `read_frame`.
    """

    __slots__ = ("limit", "_buf", "_scanned")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        self._buf += chunk

    def next_frame(self) -> bytes | None:
        """The next whole frame without its line end, or None until more is fed; raises LineTooLong."""
        nl = self._buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(self._buf)
            if self._scanned > self.limit:
                raise LineTooLong(self.limit)
            return None
        if nl > self.limit:
            raise LineTooLong(self.limit)
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        self._scanned = 0
        return line.rstrip(b"\r")

    def rest(self) -> bytes | None:
        """At end of stream: a last frame without its newline, if any."""
        if not self._buf:
            return None
        line = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return line.rstrip(b"\r")


def encode(message: Any) -> bytes:
    """Serialize one message as a single newline-terminated frame (always valid UTF-8).

    A string holding a lone surrogate (which a client may send as `"\\ud800"`, and
    `json.loads` keeps) has no UTF-8 form: such a message is written with `\\u`
    escapes instead, so it reaches the other side exactly as the client sent it.
    """
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"


# The head of a response as Python's json.dumps writes it (mempalace-mcp's replies; the broker passes them on
# with the client's id in place): `{"jsonrpc": "2.0", "id": <int or plain string>, "result"` (or "error").
_REPLY_HEAD = re.compile(rb'\{"jsonrpc": ?"2\.0", ?"id": ?(-?(?:0|[1-9][0-9]{0,17})|"[^"\\\x00-\x1f]{0,256}"), ?"(result|error)": ?')


class ReplyHead:
    """Where a response frame's id is, read from its head alone (`reply_head`)."""

    __slots__ = ("frame", "msg_id", "start", "end", "error")

    def __init__(self, frame: bytes, msg_id: int | str, start: int, end: int, error: bool) -> None:
        self.frame = frame
        self.msg_id = msg_id
        self.start = start  # the id token is frame[start:end]
        self.end = end
        self.error = error  # an "error" response, not a "result"

    def with_id(self, msg_id: object) -> bytes:
        """The same frame with `msg_id` (a valid id) in place of its own, newline-ended: the rest byte for byte."""
        token = json.dumps(msg_id, ensure_ascii=False)
        try:
            raw = token.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: as `encode` writes it
            raw = json.dumps(msg_id).encode("ascii")
        return b"".join((self.frame[: self.start], raw, self.frame[self.end :], b"\n"))


def reply_head(frame: bytes) -> ReplyHead | None:
    """A response's id without parsing the rest (a reply can be megabytes; its head is 40 bytes), or None: then
    parse it with `decode`. Only the head Python's json.dumps writes for a `{"jsonrpc", "id", "result"|"error"}`
    dict is read here, and only a frame in UTF-8 that ends its object; anything else — another key order, an
    escaped string id, a float, a byte that is not UTF-8 — is left to `decode`."""
    m = _REPLY_HEAD.match(frame)
    if m is None or not frame.endswith(b"}"):
        return None
    try:
        frame.decode("utf-8")  # UTF-8 throughout, as `decode` insists: a C scan, far cheaper than a parse
    except UnicodeDecodeError:
        return None
    token = m.group(1)
    msg_id: int | str = token[1:-1].decode("utf-8") if token[:1] == b'"' else int(token)
    return ReplyHead(frame, msg_id, m.start(1), m.end(1), m.group(2) == b"error")


# Deeper JSON is refused as a parse error: json.loads, json.dumps and repr recurse, and Python's
# recursion limit (1000 frames, shared with whatever is already on the stack) is no place to find
# out where a value can still go. mempalace-mcp itself parses with that limit (~990 levels left);
# no MCP message needs more than a few dozen.
MAX_NESTING = 512
# A JSON string literal. Linear on valid JSON only (an unterminated string makes it retry at every later
# quote): it is applied only to a frame json.loads has accepted.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def nesting_depth(line: bytes, at_least: int = 0) -> int:
    """How deep a VALID JSON frame nests arrays and objects (brackets inside strings do not count).

    Returns early, with a value no higher than `at_least`, for a frame with at most `at_least` opening
    brackets in all (nearly every message: no scan). Otherwise the frame is reduced to its brackets
    as +1/-1 steps whose running sum is the depth: C loops only (re, translate, accumulate, max).
    """
    opening = line.count(b"[") + line.count(b"{")
    if opening <= at_least:
        return opening
    steps = _STRING.sub(b"", line).translate(_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(line: bytes, strict: bool = True) -> Any:
    """Parse one frame. Raises ValueError for every frame that is not one JSON value in UTF-8: bad JSON,
    bytes that are not UTF-8 (UnicodeDecodeError), NaN/Infinity, integers over 4300 digits, and nesting
    deeper than MAX_NESTING ("nesting too deep"). Never anything else.

    `strict=False` is for the engine's own output: mempalace-mcp is Python, whose json.dumps writes
    NaN/Infinity (a NaN distance from chroma, say), and dropping such a reply would leave its request to
    the stall timer. The nesting bound holds either way (encode and repr recurse)."""
    text = line.decode("utf-8")  # strictly UTF-8, as MCP says (json.loads would guess UTF-16/32 from the bytes)
    try:
        value = json.loads(text, parse_constant=_no_constant) if strict else json.loads(text)
    except RecursionError:  # far deeper than MAX_NESTING (json's C parser counts its own levels)
        raise ValueError(f"nesting too deep (more than {MAX_NESTING} levels of arrays/objects)") from None
    if nesting_depth(line, MAX_NESTING) > MAX_NESTING:
        raise ValueError(f"nesting too deep (more than {MAX_NESTING} levels of arrays/objects)")
    return value


def brief(value: Any, limit: int = 60) -> str:
    """A client-supplied value for a message or a log line: short, printable, and cheap whatever it is.

    repr() of the value itself could be megabytes long, or recurse; this looks at one level only. Lone
    surrogates and control characters come out escaped (repr's own rule), so a log file stays UTF-8.
    """
    if isinstance(value, str):
        text = repr(value[: limit + 1])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        text = f"<an integer of {value.bit_length()} bits>"
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, dict):
        text = f"<an object of {len(value)} members>"
    elif isinstance(value, list):
        text = f"<an array of {len(value)} items>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error(msg_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": JSONRPC, "id": msg_id, "error": err}


def result(msg_id: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": msg_id, "result": value}


def request(msg_id: Any, method: str, params: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": JSONRPC, "id": msg_id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": JSONRPC, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def event_wait_timeout_ms(method: str, params: Any) -> int | None:
    """The wait (ms) a `tools/call` of mempalace_event_wait asks for; None for any other message."""
    if method != "tools/call" or not isinstance(params, dict) or params.get("name") != EVENT_WAIT_TOOL:
        return None
    args = params.get("arguments")
    raw = args.get("timeout_ms") if isinstance(args, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != raw:  # raw != raw: NaN
        return EVENT_WAIT_DEFAULT_MS
    return int(max(0, min(raw, EVENT_WAIT_MAX_MS)))  # clamped first: int() of 1e400 (inf) would raise


def is_request(msg: dict[str, Any]) -> bool:
    return "method" in msg and "id" in msg


def is_notification(msg: dict[str, Any]) -> bool:
    return "method" in msg and "id" not in msg


def is_response(msg: dict[str, Any]) -> bool:
    return "method" not in msg and ("result" in msg or "error" in msg)


def valid_id(value: Any) -> bool:
    """A usable request id: MCP's RequestId, a string or an integer (JSON-RPC allows null and fractions; MCP
    does not). Only such a value is ever hashed, stored or echoed; anything else is answered with id null."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def reply_id(msg: Any) -> str | int | None:
    """The id to answer `msg` with: its own when usable, else null (JSON-RPC's rule when it cannot be read)."""
    value = msg.get("id") if isinstance(msg, dict) else None
    return value if valid_id(value) else None


def check_request_shape(msg: Any) -> str | None:
    """Return why `msg` is not a usable JSON-RPC message, or None when it is (answered -32600 INVALID_REQUEST).

    The rule both the shim and the broker apply to what a client sends. `jsonrpc` may be missing
    (mempalace-mcp does not require it) but not anything other than "2.0".
    """
    if isinstance(msg, list):
        return "JSON-RPC batches are not supported (MCP removed them in 2025-06-18)"
    if not isinstance(msg, dict):
        return "a message must be a JSON object"
    if "jsonrpc" in msg and msg["jsonrpc"] != JSONRPC:
        return "'jsonrpc' must be \"2.0\""
    if "method" in msg:
        if not isinstance(msg["method"], str):
            return "'method' must be a string"
        if "id" in msg and not valid_id(msg["id"]):
            return "'id' must be a string or an integer"
        if "params" in msg and not isinstance(msg["params"], (dict, list)):
            return "'params' must be an object or an array"
        return None
    if "result" in msg or "error" in msg:
        return None
    return "not a JSON-RPC request, notification or response"


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """Read one frame (without its newline). None at a clean EOF.

    The reader must have been created with a buffer `limit` of at least
    `limit`; a longer frame raises LineTooLong and leaves the stream unusable,
    so the caller should answer once and close. A final frame without its
    newline is returned as is.
    """
    import asyncio

    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        line = exc.partial
    except asyncio.LimitOverrunError as exc:
        raise LineTooLong(limit) from exc
    except ValueError as exc:  # older asyncio wraps the overrun in ValueError
        raise LineTooLong(limit) from exc
    if len(line) > limit + 1:
        raise LineTooLong(limit)
    return line.rstrip(b"\r\n")
