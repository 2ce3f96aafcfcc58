#!/usr/bin/env python3
"""Demo: several concurrent MCP sessions write one palace through one broker.

Everything lives under <repo>/.demo/home (HOME and MEMPALACE_PATH of every
process started here); your real ~/.mempalace is never touched.

1. `mempalace-broker --ensure` starts (or finds) the broker and prints its
   endpoint.
2. N sessions run at the same time. Each is a real MCP client (the official
   `mcp` SDK) that launches `mp-shim` as its server command, exactly like an
   agent would, and calls `mempalace_add_drawer` W times and
   `mempalace_search` once. With --raw, each session is a plain JSON-RPC
   client on the broker's UNIX socket instead (no mp-shim needed).
3. `broker/status` is asked on the socket directly, and
   `mempalace_status` gives the palace's drawer count before and after.

Exit status: 0 when every write was acknowledged and the palace grew by
exactly that many drawers; 1 otherwise; 2 when the broker cannot be started.

usage: .venv/bin/python scripts/demo.py [--raw] [--keep] [--sessions N] [--writes W]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
console = Console()


# --------------------------------------------------------------------------- env
def demo_env(home: Path) -> dict[str, str]:
    """The environment of every process the demo starts.

    HOME and MEMPALACE_PATH point into the demo directory; settings that could
    send the demo to some other broker or palace are dropped.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MEMPALACE_", "MP_BRIDGE_", "XDG_"))
    }
    env["HOME"] = str(home)
    env["MEMPALACE_PATH"] = str(home / ".mempalace")
    # the bridge's own config file: one inside the demo home (normally absent)
    env["MP_BRIDGE_CONFIG"] = str(home / ".config" / "mp-ssh-bridge" / "config.toml")
    # the broker runs `mempalace-mcp` from PATH: make it the venv's
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    # The demo palace is local: play the host side even inside a container.
    env["MP_BRIDGE_ROLE"] = "host"
    return env


# ------------------------------------------------------------------------ broker
def ensure_broker(env: dict[str, str]) -> dict[str, Any]:
    exe = VENV_BIN / "mempalace-broker"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run `make setup` (scripts/setup.sh) first")
    proc = subprocess.run(
        [str(exe), "--ensure"],
        env=env,
        cwd=env["HOME"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        console.print(f"[red]mempalace-broker --ensure failed (exit {proc.returncode})[/red]")
        if proc.stdout.strip():
            console.print(proc.stdout.strip())
        if proc.stderr.strip():
            console.print(proc.stderr.strip(), markup=False)
        raise SystemExit(2)
    try:
        info = json.loads(lines[-1])
    except json.JSONDecodeError:
        console.print(f"[red]--ensure printed no JSON:[/red] {lines[-1]!r}")
        raise SystemExit(2) from None
    if not str(info.get("endpoint", "")).startswith("unix://"):
        console.print(f"[red]unexpected endpoint:[/red] {info.get('endpoint')!r}")
        raise SystemExit(2)
    return info


def socket_path(endpoint: str) -> str:
    return endpoint[len("unix://") :]


def stop_broker(pid: int, timeout: float = 15.0) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # only when it is our own child
                return True
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# -------------------------------------------------------------- raw JSON-RPC client
class RawClient:
    """Newline-delimited JSON-RPC over the broker's UNIX socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.next_id = 1
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path, limit=64 * 1024 * 1024)
        return self

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write((json.dumps(msg) + "\n").encode())
        await self.writer.drain()

    async def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        assert self.reader is not None
        rid = self.next_id
        self.next_id += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"broker closed the connection during {method}")
            reply = json.loads(line)
            if reply.get("id") != rid or "method" in reply:
                continue  # a notification, or something not ours
            if "error" in reply:
                err = reply["error"]
                raise RuntimeError(f"{method}: error {err.get('code')}: {err.get('message')}")
            return reply.get("result")

    async def initialize(self, name: str) -> Any:
        result = await self.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": name, "version": "0"}},
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[bool, Any]:
        result = await self.request("tools/call", {"name": name, "arguments": arguments})
        return tool_payload(bool(result.get("isError")), result.get("content") or [])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass


def tool_payload(is_error: bool, content: list[Any]) -> tuple[bool, Any]:
    """(is_error, parsed JSON of the first text block or the raw text)."""
    for block in content:
        text = block.get("text") if isinstance(block, dict) else getattr(block, "text", None)
        if text is None:
            continue
        try:
            return is_error, json.loads(text)
        except json.JSONDecodeError:
            return is_error, text
    return is_error, None


# ----------------------------------------------------------------------- sessions
@dataclass
class SessionResult:
    name: str
    writes_ok: int = 0
    writes_failed: int = 0
    search_hits: int | None = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def write_args(run_id: str, session: int, n: int) -> dict[str, str]:
    return {
        "wing": "mp_ssh_bridge_demo",
        "room": f"session_{session}",
        "content": f"demo run {run_id}: session {session} note {n} — the broker serializes every write "
        f"into one mempalace-mcp, so none of them is lost.",
    }


def record_write(res: SessionResult, is_error: bool, payload: Any) -> None:
    if not is_error and isinstance(payload, dict) and payload.get("success") is True:
        res.writes_ok += 1
    else:
        res.writes_failed += 1
        detail = payload.get("error") if isinstance(payload, dict) else payload
        res.errors.append(f"add_drawer: {str(detail)[:200]}")


def record_search(res: SessionResult, is_error: bool, payload: Any) -> None:
    if not is_error and isinstance(payload, dict) and isinstance(payload.get("results"), list):
        res.search_hits = len(payload["results"])
    else:
        detail = payload.get("error") if isinstance(payload, dict) else payload
        res.errors.append(f"search: {str(detail)[:200]}")


async def mcp_session(idx: int, run_id: str, writes: int, env: dict[str, str], logdir: Path) -> SessionResult:
    """One agent-like session: the official MCP SDK launching mp-shim over stdio."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    res = SessionResult(name=f"mcp-{idx}")
    t0 = time.monotonic()
    params = StdioServerParameters(command=str(VENV_BIN / "mp-shim"), args=[], env=env, cwd=env["HOME"])
    with open(logdir / f"shim-{idx}.log", "w") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    for n in range(writes):
                        try:
                            r = await session.call_tool("mempalace_add_drawer", write_args(run_id, idx, n))
                            is_err, payload = tool_payload(r.is_error, list(r.content))
                            record_write(res, is_err, payload)
                        except Exception as exc:  # noqa: BLE001 - the demo reports it
                            res.writes_failed += 1
                            res.errors.append(f"add_drawer: {type(exc).__name__}: {exc}")
                    try:
                        r = await session.call_tool("mempalace_search", {"query": f"demo run {run_id} session {idx}"})
                        is_err, payload = tool_payload(r.is_error, list(r.content))
                        record_search(res, is_err, payload)
                    except Exception as exc:  # noqa: BLE001
                        res.errors.append(f"search: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001 - ExceptionGroup from anyio, spawn errors
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            res.errors.append(f"session: {type(exc).__name__}: {exc}")
    res.writes_failed = writes - res.writes_ok
    res.seconds = time.monotonic() - t0
    return res


async def raw_session(idx: int, run_id: str, writes: int, sock: str) -> SessionResult:
    res = SessionResult(name=f"raw-{idx}")
    t0 = time.monotonic()
    client = RawClient(sock)
    try:
        await client.connect()
        await client.initialize(f"mp-ssh-bridge-demo-{idx}")
        for n in range(writes):
            try:
                is_err, payload = await client.call_tool("mempalace_add_drawer", write_args(run_id, idx, n))
                record_write(res, is_err, payload)
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"add_drawer: {type(exc).__name__}: {exc}")
        try:
            is_err, payload = await client.call_tool("mempalace_search", {"query": f"demo run {run_id} session {idx}"})
            record_search(res, is_err, payload)
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"search: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"session: {type(exc).__name__}: {exc}")
    finally:
        await client.close()
    res.writes_failed = writes - res.writes_ok
    res.seconds = time.monotonic() - t0
    return res


# ------------------------------------------------------------------ broker probes
async def broker_status(sock: str) -> dict[str, Any]:
    client = await RawClient(sock).connect()
    try:
        return await client.request("broker/status", timeout=30)
    finally:
        await client.close()


async def total_drawers(sock: str) -> int | None:
    """mempalace_status through the broker; 0 for a palace not created yet."""
    client = await RawClient(sock).connect()
    try:
        await client.initialize("mp-ssh-bridge-demo-status")
        _, payload = await client.call_tool("mempalace_status", {})
    finally:
        await client.close()
    if isinstance(payload, dict):
        if isinstance(payload.get("total_drawers"), int):
            return payload["total_drawers"]
        if "missing" in str(payload.get("error", "")).lower():
            return 0
    return None


async def watch_clients(sock: str, stop: asyncio.Event, peak: list[int]) -> None:
    """Poll broker/status while the sessions run, to see them all connected at once."""
    while not stop.is_set():
        try:
            st = await broker_status(sock)
            # the watcher's own connection is one of the clients
            peak[0] = max(peak[0], len(st.get("clients") or []) - 1)
        except Exception:  # noqa: BLE001 - best effort
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


# ----------------------------------------------------------------------- report
def show(results: list[SessionResult], mode: str, status: dict[str, Any] | None, before: int | None,
         after: int | None, peak: int, elapsed: float) -> None:
    t = Table(title=f"{len(results)} concurrent sessions ({mode})")
    t.add_column("session")
    t.add_column("writes acknowledged", justify="right")
    t.add_column("failed", justify="right")
    t.add_column("search hits", justify="right")
    t.add_column("seconds", justify="right")
    for r in results:
        t.add_row(
            r.name,
            str(r.writes_ok),
            f"[red]{r.writes_failed}[/red]" if r.writes_failed else "0",
            "-" if r.search_hits is None else str(r.search_hits),
            f"{r.seconds:.2f}",
        )
    t.add_row(
        "[bold]total[/bold]",
        f"[bold]{sum(r.writes_ok for r in results)}[/bold]",
        str(sum(r.writes_failed for r in results)),
        str(sum(r.search_hits or 0 for r in results)),
        f"{elapsed:.2f}",
    )
    console.print(t)

    b = Table(title="broker", show_header=False)
    b.add_column("what")
    b.add_column("value")
    if status:
        broker = status.get("broker") or {}
        engine = status.get("engine") or {}
        totals = status.get("totals") or {}
        b.add_row("broker pid", str(broker.get("pid")))
        b.add_row("palace", str(broker.get("palace")))
        b.add_row("engine pid (the one mempalace-mcp)", str(engine.get("pid")))
        b.add_row("engine state / restarts", f"{engine.get('state')} / {engine.get('restarts')}")
        b.add_row("clients seen at once (peak)", str(peak))
        b.add_row("clients now (incl. this query)", str(len(status.get("clients") or [])))
        b.add_row(
            "totals",
            ", ".join(f"{k} {v}" for k, v in totals.items()) if totals else "-",
        )
    else:
        b.add_row("broker/status", "[red]unavailable[/red]")
    b.add_row("drawers before -> after", f"{before} -> {after}")
    console.print(b)


# ------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    (home / ".mempalace").mkdir(parents=True, exist_ok=True)
    logdir = home.parent / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    env = demo_env(home)
    model = home / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/model.onnx"
    if not model.exists():
        console.print(f"[yellow]warning:[/yellow] no embedding model at {model}; run scripts/setup.sh first")
    mode = "raw socket clients" if args.raw else "MCP SDK -> mp-shim"
    if not args.raw and not (VENV_BIN / "mp-shim").exists():
        console.print(f"[red]{VENV_BIN / 'mp-shim'} not found[/red]: run `make setup`, or try --raw")
        return 2

    console.print(f"[bold]mempalace-broker --ensure[/bold]  (HOME={home})")
    info = ensure_broker(env)
    console.print(json.dumps(info), soft_wrap=True, highlight=False)
    sock = socket_path(info["endpoint"])
    pid = int(info["pid"])

    rc = 1
    try:
        before = await total_drawers(sock)
        run_id = uuid.uuid4().hex[:8]
        stop = asyncio.Event()
        peak = [0]
        watcher = asyncio.create_task(watch_clients(sock, stop, peak))
        t0 = time.monotonic()
        if args.raw:
            coros = [raw_session(i, run_id, args.writes, sock) for i in range(1, args.sessions + 1)]
        else:
            coros = [mcp_session(i, run_id, args.writes, env, logdir) for i in range(1, args.sessions + 1)]
        results = list(await asyncio.gather(*coros))
        elapsed = time.monotonic() - t0
        stop.set()
        await watcher

        try:
            status = await broker_status(sock)
        except Exception as exc:  # noqa: BLE001
            console.print(f"[red]broker/status failed:[/red] {exc}")
            status = None
        after = await total_drawers(sock)
        show(results, mode, status, before, after, peak[0], elapsed)

        for r in results:
            for e in r.errors:
                console.print(f"[red]{r.name}:[/red] {e}", markup=True, highlight=False)
        acked = sum(r.writes_ok for r in results)
        expected = args.sessions * args.writes
        failed = sum(r.writes_failed for r in results)
        grew = None if before is None or after is None else after - before
        if failed:
            console.print(f"[red bold]FAIL[/red bold]: {failed} of {expected} writes failed")
            if not args.raw:
                console.print(f"  shim logs: {logdir}/shim-*.log")
        elif grew is not None and grew != acked:
            console.print(f"[red bold]FAIL[/red bold]: {acked} writes acknowledged but the palace grew by {grew}")
        else:
            console.print(
                f"[green bold]OK[/green bold]: {acked} of {expected} writes acknowledged"
                + (f", palace grew by {grew}" if grew is not None else "")
                + f", one engine (pid {status.get('engine', {}).get('pid') if status else '?'})"
            )
            rc = 0
    finally:
        if args.keep:
            console.print(f"broker left running: pid {pid}, {info['endpoint']}  (kill {pid} to stop it)")
        elif stop_broker(pid):
            console.print(f"broker (pid {pid}) stopped")
        else:
            console.print(f"[yellow]broker (pid {pid}) did not exit after SIGTERM[/yellow]")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", action="store_true", help="raw JSON-RPC socket clients instead of mp-shim")
    ap.add_argument("--keep", action="store_true", help="leave the broker running afterwards")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions (default 4)")
    ap.add_argument("--writes", type=int, default=5, help="mempalace_add_drawer calls per session (default 5)")
    ap.add_argument("--home", default=str(REPO / ".demo" / "home"), help="HOME for every process (default .demo/home)")
    args = ap.parse_args()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
