"""What the engine must never be sent, and how a request it silently dropped is noticed.

Every engine version reads stdin one line at a time and answers in arrival order, but
older ones do not survive every well-formed JSON-RPC message: mempalace 3.4.0, when
handling a request raises (a `tools/call` whose `name` is an object, `arguments` that are
not an object, `params` that are an array on `initialize`), logs `Server error: ...` on
stderr and answers NOTHING. A client would wait for its whole deadline, everyone else
would queue behind it, and the broker would finally kill the engine as stalled.

So, in two steps:
- before sending: the envelope rules mempalace 3.11 applies itself (`_normalize_envelope`,
  `_tool_call_members_invalid`) are applied here for every engine version: `params` that
  are not an object count as `{}`, and a `tools/call` whose `name` is not a string or whose
  `arguments` are not an object is answered with 3.11's own -32602 error, never sent;
- after sending: a request whose handling raises anyway (e.g. 3.4.0 coercing
  `"limit": 1e400`) leaves a line on stderr. Such a line is only a hint: the engine then
  gets a `ping`, and since it answers strictly in order, its answer to the ping proves that
  every older request still unanswered never will be (broker/engine.py). A false hint
  costs one ping; a dropped request becomes an error within milliseconds, without a kill.
"""

from __future__ import annotations

from typing import Any

TOOL_CALL_MEMBERS = "Invalid params: 'name' must be a string and 'arguments' an object"  # mempalace 3.11's words
_HINTS = ("error", "exception", "traceback")


def envelope_params(params: Any) -> Any:
    """The params to send: an array (by-position params, which no engine supports) counts as `{}`, as in 3.11."""
    return params if params is None or isinstance(params, dict) else {}


def invalid_params(method: str, params: Any) -> str | None:
    """Why the engine must not be sent this request (answered -32602 by the broker), or None."""
    if method != "tools/call" or not isinstance(params, dict) or "name" not in params:
        return None  # a missing name: every engine answers "'name' is required" itself
    args = params.get("arguments")
    if not isinstance(params["name"], str) or not isinstance(args, (dict, type(None))):
        return TOOL_CALL_MEMBERS
    return None


def hints_no_reply(stderr_line: str) -> bool:
    """Might this engine stderr line mean a request got no answer (3.4.0: `Server error: ...`)? Only a hint."""
    lowered = stderr_line.lower()
    return any(word in lowered for word in _HINTS)
