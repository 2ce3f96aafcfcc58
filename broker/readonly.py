"""Read-only sessions: the tool surface of `mempalace-mcp --read-only`, per client.

An agent configured with `mempalace-mcp --read-only` must stay read-only when
its command becomes `mp-shim --read-only`, even though it shares the broker's
one writable engine. Which tools the engine refuses in that mode is the
engine's own knowledge (a set that is neither "no readOnlyHint" nor stable
across versions), so the broker asks the engine itself: it starts the same
command once with `--read-only` on a throwaway palace and config directory
(never the real palace: one process owns that) and keeps its tools/list.
Refusals mirror the engine's: code -32003, "Server is in read-only mode".
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


async def probe_read_only_tools(argv: list[str], timeout: float) -> frozenset[str] | None:
    """Names of the tools `argv --read-only` lists, or None when the engine has no read-only mode."""
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
                msg = protocol.decode(line)
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
        "Server is in read-only mode, and the engine publishes no read-only tool surface "
        "(mempalace-mcp --read-only needs mempalace >= 3.11); every tool is disabled"
    )
    return protocol.error(msg_id, READ_ONLY_REFUSED, why, {"tool": tool})


def filter_tools(list_result: object, allowed: frozenset[str]) -> object:
    if not isinstance(list_result, dict) or not isinstance(list_result.get("tools"), list):
        return list_result
    return dict(list_result, tools=[t for t in list_result["tools"] if isinstance(t, dict) and t.get("name") in allowed])
