"""Tool-specific handling: schema clean-up for tools/list, long polls, which calls may write.

`mempalace_event_wait` blocks the sequential engine for up to its timeout
(default 60 s, max 300 s). Served whole it would freeze every other client
for that long. The broker holds it instead (broker/mux.py `_park`): the
engine only takes looks (`event_wait_slice`, a zero timeout by default), one
when a write through the broker may have appended the event and one every
`event_wait_poll` for events that came another way; the caller still sees
one call with the documented result.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from mp_ssh_bridge.protocol import event_wait_timeout_ms
from mp_ssh_bridge_broker.readonly import READ_TOOLS, WRITE_TOOLS

COMBINATORS = ("anyOf", "oneOf", "allOf")
__all__ = ["strip_root_combinators", "event_wait_timeout_ms", "event_wait_slice", "event_wait_timed_out", "may_write",
           "may_add_events"]


def strip_root_combinators(list_result: Any) -> Any:
    """Drop root-level anyOf/oneOf/allOf from each tool's inputSchema.

    Removing a root combinator only relaxes the schema, so every argument set
    valid before stays valid (the engine still checks what it needs).
    """
    if not isinstance(list_result, dict) or not isinstance(list_result.get("tools"), list):
        return list_result
    out = dict(list_result)
    tools = []
    for tool in list_result["tools"]:
        schema = tool.get("inputSchema") if isinstance(tool, dict) else None
        if isinstance(schema, dict) and any(k in schema for k in COMBINATORS):
            tool = dict(tool)
            tool["inputSchema"] = {k: v for k, v in schema.items() if k not in COMBINATORS}
        tools.append(tool)
    out["tools"] = tools
    return out


def event_wait_slice(params: dict[str, Any], slice_ms: int) -> dict[str, Any]:
    out = copy.deepcopy(params)
    args = out.get("arguments")
    if not isinstance(args, dict):
        args = out["arguments"] = {}
    args["timeout_ms"] = max(0, int(slice_ms))  # 0: one look at the log, no wait in the engine
    return out


# The tools that append to the coordination log (logstream). After any of them, or after a write tool unknown to
# readonly.WRITE_TOOLS (a newer engine's), a parked long poll looks again; drawer, graph and tunnel writes do not.
EVENT_WRITES = frozenset({
    "mempalace_event_append", "mempalace_event_ack", "mempalace_task_create", "mempalace_patch_submit",
    "mempalace_artifact_put", "mempalace_sync",
})


def may_add_events(method: str, params: Any) -> bool:
    """A call after which a parked `mempalace_event_wait` should look again: it may have appended its event."""
    if not may_write(method, params):
        return False
    name = params.get("name")
    return name in EVENT_WRITES or name not in WRITE_TOOLS


def may_write(method: str, params: Any) -> bool:
    """A call that may write the palace: any tool call but the known read tools (an unknown tool may write)."""
    if method != "tools/call" or not isinstance(params, dict):
        return False
    return params.get("name") not in READ_TOOLS


def event_wait_timed_out(call_result: Any) -> bool:
    """True when a tools/call result is event_wait's `{timed_out: true, events: []}`."""
    if not isinstance(call_result, dict) or call_result.get("isError"):
        return False
    structured = call_result.get("structuredContent")
    if isinstance(structured, dict) and "timed_out" in structured:
        return structured.get("timed_out") is True
    for item in call_result.get("content") or ():
        if isinstance(item, dict) and item.get("type") == "text":
            try:
                data = json.loads(item.get("text") or "")
            except ValueError:
                return False
            return isinstance(data, dict) and data.get("timed_out") is True and not data.get("events")
    return False
