"""Read-only sessions: the tool surface of `mempalace-mcp --read-only`, per client.

An agent configured with `mempalace-mcp --read-only` must stay read-only when
its command becomes `mp-shim --read-only`, even though it shares the broker's
one writable engine. Which tools the engine refuses in that mode is the
engine's own knowledge (a set that is neither "no readOnlyHint" nor stable
across versions), so the broker asks the engine itself: it starts the same
command once with `--read-only` on a throwaway palace and config directory
(never the real palace: one process owns that) and keeps its tools/list.
Refusals mirror the engine's: code -32003, "Server is in read-only mode".

Where the engine cannot say, the tools are classified here. mempalace before
3.11 has no read-only mode and ignores the unknown flag (3.4.0 lists all its
tools, write tools included), and a probe can fail outright. A surface that
still lists a known write tool is not a read-only surface: the session then
gets the engine's tools that are in READ_TOOLS, the tools mempalace 3.11 keeps
in read-only mode, and nothing else (an unknown tool is never assumed safe).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile

from mp_ssh_bridge import protocol

log = logging.getLogger("broker.readonly")

READ_ONLY_REFUSED = -32003  # what mempalace itself answers in --read-only mode

# mempalace 3.11's --read-only surface (every tool it keeps; 3.4.0's read tools are among them).
READ_TOOLS = frozenset({
    "mempalace_artifact_get", "mempalace_check_duplicate", "mempalace_diary_read", "mempalace_event_list",
    "mempalace_event_wait", "mempalace_find_tunnels", "mempalace_follow_tunnels", "mempalace_get_aaak_spec",
    "mempalace_get_drawer", "mempalace_get_drawers", "mempalace_get_taxonomy", "mempalace_graph_stats",
    "mempalace_kg_query", "mempalace_kg_stats", "mempalace_kg_timeline", "mempalace_list_drawers",
    "mempalace_list_hallways", "mempalace_list_rooms", "mempalace_list_tunnels", "mempalace_list_wings",
    "mempalace_mesh_peers", "mempalace_reconnect", "mempalace_search", "mempalace_status", "mempalace_traverse",
})
# The tools mempalace 3.11 refuses in read-only mode (3.4.0's write tools are among them): one of these in a
# "--read-only" tool list means the engine ignored the flag.
WRITE_TOOLS = frozenset({
    "mempalace_add_drawer", "mempalace_artifact_put", "mempalace_checkpoint", "mempalace_create_tunnel",
    "mempalace_delete_by_source", "mempalace_delete_drawer", "mempalace_delete_drawers", "mempalace_delete_hallway",
    "mempalace_delete_tunnel", "mempalace_diary_write", "mempalace_event_ack", "mempalace_event_append",
    "mempalace_hook_settings", "mempalace_kg_add", "mempalace_kg_invalidate", "mempalace_kg_supersede",
    "mempalace_memories_filed_away", "mempalace_mine", "mempalace_patch_submit", "mempalace_sync",
    "mempalace_task_create", "mempalace_update_drawer",
})


def classify(listed: frozenset[str] | None) -> frozenset[str]:
    """The tools a read-only session may use, from what `engine --read-only` listed (None: it listed nothing)."""
    if listed is not None and not listed & WRITE_TOOLS:
        return listed  # the engine's own read-only surface
    if listed is None:
        log.warning("the engine listed no read-only tool surface; read-only sessions get the known read tools")
        return READ_TOOLS
    log.warning("the engine has no read-only mode (its --read-only list has write tools); read-only sessions get "
                "its known read tools only")
    return listed & READ_TOOLS


async def probe_read_only_tools(argv: list[str], timeout: float) -> frozenset[str]:
    """The tools a read-only session may use with this engine: its `--read-only` surface, else classify()'s."""
    return classify(await _listed_read_only(argv, timeout))


async def _listed_read_only(argv: list[str], timeout: float) -> frozenset[str] | None:
    """Names of the tools `argv --read-only` lists, or None when it lists none (exits, times out)."""
    scratch = tempfile.mkdtemp(prefix="mp-broker-ro-")
    env = dict(os.environ, MEMPALACE_HUB_FORWARD="0", MEMPALACE_CONFIG_DIR=os.path.join(scratch, "config"))
    env.pop("MEMPALACE_EAGER_WARMUP", None)
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, "--read-only", "--palace", os.path.join(scratch, "palace"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=env, limit=16 * 1024 * 1024, start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdout = proc.stdout
        init = {"protocolVersion": protocol.LATEST_PROTOCOL_VERSION, "capabilities": {},
                "clientInfo": {"name": "mempalace-broker-probe", "version": "1"}}
        proc.stdin.write(protocol.encode(protocol.request(1, "initialize", init)))
        proc.stdin.write(protocol.encode(protocol.request(2, "tools/list")))
        await proc.stdin.drain()

        async def tools_reply() -> frozenset[str] | None:
            while True:
                line = await stdout.readline()
                if not line:
                    return None  # the engine exited before listing its tools
                msg = protocol.decode(line, strict=False)
                if isinstance(msg, dict) and msg.get("id") == 2:
                    tools = (msg.get("result") or {}).get("tools") or []
                    return frozenset(t["name"] for t in tools if isinstance(t, dict) and "name" in t)

        names = await asyncio.wait_for(tools_reply(), timeout)
        log.info("read-only tool surface: %s tools", "no" if names is None else len(names))
        return names
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        log.error("could not learn the engine's read-only tool surface: %s", exc)
        return None
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def refusal(msg_id: object, tool: str | None, known: bool) -> dict:
    why = "Server is in read-only mode; this tool is disabled" if known else (
        "Server is in read-only mode, and the memory engine cannot be found to say which tools only read; "
        "every tool is disabled"
    )
    return protocol.error(msg_id, READ_ONLY_REFUSED, why, {"tool": tool})


def filter_tools(list_result: object, allowed: frozenset[str]) -> object:
    if not isinstance(list_result, dict) or not isinstance(list_result.get("tools"), list):
        return list_result
    return dict(list_result, tools=[t for t in list_result["tools"] if isinstance(t, dict) and t.get("name") in allowed])
