"""What the engine said last time, so a cold broker answers `initialize` and `tools/list` at once.

A cold start costs the first session the engine's start-up (0.6–1.2 s here, 9.5 s seen
with a slow one); opencode gives an MCP server 5 s to list its tools and drops it after.
The engine's `initialize` result and tool list depend only on the engine itself, so the
broker keeps them in `<state dir>/engine-cache.json`, keyed by what identifies the engine
before it runs (its command, its script's and its interpreter's size and mtime: an upgrade
rewrites the console script). The
cache is verified when the engine comes up; if the list differs, the sessions that got the
cached one are sent `notifications/tools/list_changed` (the broker declares
`tools.listChanged` in every `initialize` it answers).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mp_ssh_bridge import state

log = logging.getLogger("broker.coldstart")

FILE = "engine-cache.json"


def engine_key(argv: list[str] | None) -> dict[str, Any] | None:
    """What identifies the engine before it runs; None when it cannot be told (no cache then)."""
    if not argv:
        return None
    from mp_ssh_bridge.palace import interpreter_of

    files = [a for a in argv if os.path.isfile(a)]
    files.append(interpreter_of(argv[0]) or argv[0])
    try:
        stats = [os.stat(f) for f in files]
    except OSError:
        return None
    return {"command": argv, "files": [[f, st.st_size, st.st_mtime_ns] for f, st in zip(files, stats, strict=True)]}


def load(root: Path, key: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(initialize result, tools/list result) cached for exactly this engine, or None."""
    if key is None:
        return None
    try:
        data = json.loads((root / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    init, tools = data.get("initialize"), data.get("tools")
    if not isinstance(init, dict) or not isinstance(tools, dict) or not isinstance(tools.get("tools"), list):
        return None
    return init, tools


def save(root: Path, key: dict[str, Any] | None, initialize: dict[str, Any], tools: dict[str, Any]) -> None:
    if key is None:
        return
    try:
        state.write_json_atomic(root / FILE, {"key": key, "initialize": initialize, "tools": tools})
    except OSError as exc:
        log.warning("cannot keep the engine's answers for the next cold start: %s", exc)
