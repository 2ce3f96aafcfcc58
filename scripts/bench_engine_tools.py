#!/usr/bin/env python3
"""Benchmark: how a grant should hand the palace back to the engine (docs/bench-engine-tools.md).

A grant (`mp-bridge run -- mempalace mine DIR`) today stops the broker's engine, runs the command
as sole writer, and starts a FRESH engine. mempalace 3.11 has two tools that might do better:
`mempalace_reconnect` (drop cached palace state after an external write) and `mempalace_mine`
(the mine as one call on the engine). This script drives `mempalace-mcp` directly over stdio
JSON-RPC (MCP `initialize` first), per installed engine version, and measures:

  a. stop-and-start: close stdin of a warm engine -> a fresh engine answered initialize and a search;
  b. reconnect:      mempalace_reconnect on a warm engine, then a search;
  c. correctness:    engine A warm and idle, `mempalace mine DIR` (the CLI, another process), then what
                     (i) A, (ii) A after mempalace_reconnect, (iii) a fresh engine see of the mined
                     drawers -- once with A having only read, once with A having written before;
  d. mining:         mempalace_mine through the warm engine vs stop / CLI mine / fresh engine + search,
                     with one status call sent while the mine runs (the head-of-line wait).

Every engine runs with a throwaway HOME (palace in HOME/.mempalace/palace) whose .cache links to the
offline embedding model in <repo>/.test-home (scripts/provision-model.sh provisions it when missing);
the real ~/.mempalace is never touched. Standard library only.

usage: python scripts/bench_engine_tools.py [--quick] [--engine pinned|3.4.0|all] [--runs N]
                                           [--files N] [--json OUT] [--keep]
  --quick   ~1 minute: the pinned engine only (unless --engine says otherwise), 2 runs, 1 mine each way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL_HOME = REPO / ".test-home"
MODEL_FILE = MODEL_HOME / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/model.onnx"
VENVS = {"pinned": REPO / ".venv", "3.4.0": REPO / ".venv-engine-3.4.0"}
PROTOCOL_VERSION = "2025-06-18"
SEARCH_LIMIT = 50  # > files per corpus: a wing-filtered search can return every mined drawer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment
def engine_version(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin/python"), "-c",
                          "import importlib.metadata as m; print(m.version('mempalace'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


def make_home(root: Path, name: str) -> Path:
    """A throwaway HOME whose .cache is the provisioned model (nothing is downloaded)."""
    home = root / name
    home.mkdir(parents=True)
    (home / ".cache").symlink_to(MODEL_HOME / ".cache")
    return home


def engine_env(home: Path, venv: Path) -> dict[str, str]:
    """Only what the engine needs: nothing from the caller's MEMPALACE_* / MP_BRIDGE_* settings."""
    env = {
        "HOME": str(home),
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        "PYTHONUNBUFFERED": "1",
        "ANONYMIZED_TELEMETRY": "False",
        "HF_HUB_OFFLINE": "1",
        "MEMPALACE_HUB_FORWARD": "0",  # never hand a mine to some `mempalace serve` hub
    }
    return env


def palace_of(home: Path) -> Path:
    """The default palace: ~/.config/mempalace/palace for 3.11 (XDG), ~/.mempalace/palace for 3.4.0."""
    for cand in (home / ".config" / "mempalace" / "palace", home / ".mempalace" / "palace"):
        if (cand / "chroma.sqlite3").exists():
            return cand
    raise FileNotFoundError(f"no palace under {home}")


# --------------------------------------------------------------------------- the engine over stdio
class Engine:
    """One `mempalace-mcp` process, newline-delimited JSON-RPC on its stdin/stdout."""

    def __init__(self, venv: Path, home: Path, label: str) -> None:
        self.home = home
        self.log_path = home / f"engine-{label}-{time.monotonic_ns()}.log"
        logf = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([str(venv / "bin/mempalace-mcp")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=logf, env=engine_env(home, venv), cwd=str(home))
        logf.close()
        self._next = 0
        self._replies: dict[Any, tuple[float, dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = time.monotonic()
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and "id" in msg and "method" not in msg:
                with self._cond:
                    self._replies[msg["id"]] = (at, msg)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, method: str, params: Any = None, notify: bool = False) -> int | None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        rid = None
        if not notify:
            self._next += 1
            rid = msg["id"] = self._next
        if params is not None:
            msg["params"] = params
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        return rid

    def wait(self, rid: int, timeout: float = 600.0) -> tuple[float, dict[str, Any]]:
        """(arrival time, reply) of request `rid`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._replies:
                if self._eof:
                    raise RuntimeError(f"engine exited before answering {rid}; log {self.log_path}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to {rid} in {timeout}s; log {self.log_path}")
                self._cond.wait(left)
            return self._replies.pop(rid)

    def call(self, method: str, params: Any = None, timeout: float = 600.0) -> dict[str, Any]:
        rid = self.send(method, params)
        assert rid is not None
        return self.wait(rid, timeout)[1]

    def tool(self, name: str, args: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
        return tool_payload(self.call("tools/call", {"name": name, "arguments": args or {}}, timeout))

    def initialize(self) -> dict[str, Any]:
        reply = self.call("initialize", {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                         "clientInfo": {"name": "bench-engine-tools", "version": "0"}}, timeout=120)
        self.send("notifications/initialized", notify=True)
        return reply

    def close(self, timeout: float = 60.0) -> float:
        """EOF on stdin (what the broker does first), then wait; seconds until the process exited."""
        t0 = time.monotonic()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return time.monotonic() - t0


def tool_payload(reply: dict[str, Any]) -> Any:
    """The JSON (or text) of a tools/call's first text item; a JSON-RPC error as {"rpc_error": ...}."""
    if "error" in reply:
        return {"rpc_error": reply["error"]}
    for item in (reply.get("result") or {}).get("content") or []:
        if isinstance(item, dict) and "text" in item:
            try:
                return json.loads(item["text"])
            except ValueError:
                return item["text"]
    return None


# --------------------------------------------------------------------------- what an engine sees
def drawers_total(e: Engine) -> int | None:
    st = e.tool("mempalace_status")
    return st.get("total_drawers") if isinstance(st, dict) else None


def wing_count(e: Engine, wing: str) -> int | None:
    """Drawers of `wing` per mempalace_status (its `wings` map)."""
    st = e.tool("mempalace_status")
    if not isinstance(st, dict):
        return None
    return int((st.get("wings") or {}).get(wing, 0))


def search_hits(e: Engine, wing: str, query: str) -> tuple[int, str]:
    """How many results a wing-filtered vector search returns (the HNSW path), and an error if any."""
    res = e.tool("mempalace_search", {"query": query, "wing": wing, "limit": SEARCH_LIMIT})
    if not isinstance(res, dict):
        return 0, f"non-JSON answer {str(res)[:80]!r}"
    if "rpc_error" in res:
        return 0, str(res["rpc_error"].get("message"))[:120]
    err = res.get("error")
    return len(res.get("results") or []), (str(err)[:120] if err else "")


def traverse_found(e: Engine, room: str) -> bool:
    res = e.tool("mempalace_traverse", {"start_room": room, "max_hops": 1})
    return isinstance(res, list) or (isinstance(res, dict) and "error" not in res and "rpc_error" not in res)


def seen(e: Engine, wing: str, room: str, query: str) -> dict[str, Any]:
    hits, err = search_hits(e, wing, query)
    return {"status_wing": wing_count(e, wing), "search_hits": hits, "search_error": err,
            "traverse_finds_room": traverse_found(e, room)}


def on_disk(home: Path, wing: str) -> tuple[int, list[str]]:
    """Ground truth from chroma.sqlite3 (read-only): drawers of `wing` and their rooms."""
    db = palace_of(home) / "chroma.sqlite3"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in con.execute(
            "SELECT m.id FROM embedding_metadata m JOIN embeddings e ON e.id = m.id "
            "JOIN segments s ON s.id = e.segment_id JOIN collections c ON c.id = s.collection "
            "WHERE m.key = 'wing' AND m.string_value = ? AND c.name = 'mempalace_drawers'", (wing,))]
        rooms = sorted({r[0] for r in con.execute(
            f"SELECT string_value FROM embedding_metadata WHERE key = 'room' AND id IN ({','.join('?' * len(ids))})",
            ids)}) if ids else []
        return len(ids), rooms
    finally:
        con.close()


# --------------------------------------------------------------------------- corpus and seeding
TOPICS = ["harbor", "glacier", "orchard", "lantern", "quarry", "meadow", "canyon", "violin", "compass", "ember"]


def make_corpus(root: Path, name: str, n: int) -> Path:
    """`n` small text files (one drawer each) in root/name, with a mempalace.yaml naming wing and room."""
    d = root / name
    d.mkdir(parents=True)
    room = f"room{name}"
    (d / "mempalace.yaml").write_text(
        f"wing: {name}\nrooms:\n  - name: {room}\n    description: bench notes\n    keywords: [{room}, {name}]\n")
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        (d / f"note_{i:02d}.txt").write_text(
            f"{room} note {i} about the {topic}. The {name} token {name}{i:02d} marks this file.\n"
            f"It records how the {topic} looked on day {i}, what was measured there, and why the "
            f"{topic} matters for the {name} project. Nothing else is written here.\n")
    return d


def cli_mine(venv: Path, home: Path, src: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    out = subprocess.run([str(venv / "bin/mempalace"), "mine", str(src)], capture_output=True, text=True,
                         env=engine_env(home, venv), cwd=str(home), timeout=900)
    tail = (out.stderr.strip().splitlines() or [""])[-1] if out.returncode else ""
    return {"rc": out.returncode, "seconds": time.monotonic() - t0, "error": tail[-300:]}


def seed(venv: Path, home: Path) -> None:
    """A palace with a few drawers, written by an engine that then exits (releasing any lease)."""
    e = Engine(venv, home, "seed")
    e.initialize()
    for i in range(3):
        r = e.tool("mempalace_add_drawer", {"wing": "seed", "room": "seedroom",
                                            "content": f"seed drawer {i}: the palace existed before the bench."})
        if not (isinstance(r, dict) and r.get("success")):
            raise SystemExit(f"seeding failed: {r}")
    e.close()


def warm(e: Engine) -> None:
    """What a broker's engine has done before a grant: read status, searched, walked the graph."""
    e.tool("mempalace_status")
    search_hits(e, "seed", "palace existed")
    traverse_found(e, "seedroom")


def started_engine(venv: Path, home: Path, label: str) -> Engine:
    e = Engine(venv, home, label)
    e.initialize()
    return e


# --------------------------------------------------------------------------- the experiments
def stats(values: list[float]) -> dict[str, Any]:
    return {"p50": statistics.median(values), "max": max(values), "n": len(values), "all": values} if values else {}


def bench_restart(venv: Path, home: Path, e: Engine, runs: int) -> tuple[Engine, dict[str, Any]]:
    """a. close a warm engine's stdin -> fresh engine answered initialize and a first search."""
    total, exit_s, init_s, search_s = [], [], [], []
    for _ in range(runs):
        t0 = time.monotonic()
        exit_s.append(e.close())
        t1 = time.monotonic()
        e = Engine(venv, home, "restart")
        e.initialize()
        t2 = time.monotonic()
        hits, err = search_hits(e, "seed", "palace existed")
        t3 = time.monotonic()
        if err or not hits:
            raise SystemExit(f"first search after restart failed: {hits} {err}")
        total.append(t3 - t0)
        init_s.append(t2 - t1)
        search_s.append(t3 - t2)
    return e, {"total": stats(total), "exit": stats(exit_s), "start_to_initialize": stats(init_s),
               "first_search": stats(search_s)}


def bench_reconnect(e: Engine, runs: int) -> dict[str, Any]:
    """b. mempalace_reconnect on a warm engine, then a first search."""
    total, rc_s, search_s = [], [], []
    answers = []
    for _ in range(runs):
        search_hits(e, "seed", "palace existed")  # warm again
        t0 = time.monotonic()
        r = e.tool("mempalace_reconnect")
        t1 = time.monotonic()
        hits, err = search_hits(e, "seed", "palace existed")
        t2 = time.monotonic()
        answers.append(r.get("success") if isinstance(r, dict) else r)
        if err or not hits:
            raise SystemExit(f"search after reconnect failed: {hits} {err}")
        total.append(t2 - t0)
        rc_s.append(t1 - t0)
        search_s.append(t2 - t1)
    return {"total": stats(total), "reconnect_call": stats(rc_s), "first_search": stats(search_s),
            "reconnect_success": answers}


def bench_correctness(venv: Path, root: Path, files: int) -> dict[str, Any]:
    """c. an external CLI mine beside a warm idle engine A: what A, A+reconnect and a fresh engine see."""
    home = make_home(root, "correctness")
    seed(venv, home)
    out: dict[str, Any] = {}
    a = started_engine(venv, home, "A")
    try:
        warm(a)
        # c1. A has only read so far.
        wing = "extread"
        src = make_corpus(root, wing, files)
        mined = cli_mine(venv, home, src)
        disk, rooms = on_disk(home, wing)
        room = rooms[0] if rooms else f"room{wing}"
        case: dict[str, Any] = {"cli_mine": mined, "on_disk": disk, "room": room}
        case["i_engine_A_as_is"] = seen(a, wing, room, f"{wing} token")
        rc = a.tool("mempalace_reconnect")
        case["reconnect_answer"] = {k: rc.get(k) for k in ("success", "drawers", "message", "error")} \
            if isinstance(rc, dict) else rc
        case["ii_engine_A_after_reconnect"] = seen(a, wing, room, f"{wing} token")
        b = started_engine(venv, home, "B")
        case["iii_fresh_engine"] = seen(b, wing, room, f"{wing} token")
        b.close()
        out["A_read_only_before"] = case

        # c2. A has written (as a broker's engine has): then the same external mine.
        w = a.tool("mempalace_add_drawer", {"wing": "seed", "room": "seedroom", "content": "written by engine A"})
        wing = "extwrote"
        src = make_corpus(root, wing, files)
        mined = cli_mine(venv, home, src)
        disk, rooms = on_disk(home, wing)
        room = rooms[0] if rooms else f"room{wing}"
        case = {"A_write_ok": bool(isinstance(w, dict) and w.get("success")), "cli_mine": mined, "on_disk": disk,
                "room": room}
        case["i_engine_A_as_is"] = seen(a, wing, room, f"{wing} token")
        rc = a.tool("mempalace_reconnect")
        case["reconnect_answer"] = {k: rc.get(k) for k in ("success", "drawers", "message", "error")} \
            if isinstance(rc, dict) else rc
        case["ii_engine_A_after_reconnect"] = seen(a, wing, room, f"{wing} token")
        a.close()
        b = started_engine(venv, home, "B2")
        case["iii_fresh_engine"] = seen(b, wing, room, f"{wing} token")
        b.close()
        out["A_wrote_before"] = case
    finally:
        if a.proc.poll() is None:
            a.close()
    return out


def bench_mine(venv: Path, home: Path, root: Path, e: Engine, reps: int, files: int, has_tool: bool,
               tag: str) -> tuple[Engine, dict[str, Any]]:
    """d. mempalace_mine through the warm engine vs stop / CLI mine / fresh engine + first search."""
    res: dict[str, Any] = {"tool": [], "cli": []}
    for rep in range(reps):
        if has_tool:
            wing = f"tool{tag}{rep}"
            src = make_corpus(root, wing, files)
            before = wing_count(e, wing)
            t0 = time.monotonic()
            mine_id = e.send("tools/call", {"name": "mempalace_mine", "arguments": {"source": str(src)}})
            time.sleep(0.3)  # another session's call, queued behind the mine on the engine's one stdio loop
            t_status = time.monotonic()
            status_id = e.send("tools/call", {"name": "mempalace_status", "arguments": {}})
            assert mine_id is not None and status_id is not None
            t_mine, mine_reply = e.wait(mine_id)
            t_st, _ = e.wait(status_id)
            payload = tool_payload(mine_reply)
            hits, err = search_hits(e, wing, f"{wing} token")
            t_end = time.monotonic()
            rooms = on_disk(home, wing)[1]
            res["tool"].append({
                "traverse_finds_room": traverse_found(e, rooms[0]) if rooms else None,
                "seconds": t_mine - t0, "with_first_search": t_end - t0,
                "success": payload.get("success") if isinstance(payload, dict) else payload,
                "error": (payload.get("error") if isinstance(payload, dict) else None),
                "drawers": (wing_count(e, wing) or 0) - (before or 0), "search_hits": hits, "search_error": err,
                "status_sent_during_mine_waited": t_st - t_status,
            })
        wing = f"cli{tag}{rep}"
        src = make_corpus(root, wing, files)
        t0 = time.monotonic()
        stop_s = e.close()
        mined = cli_mine(venv, home, src)
        t1 = time.monotonic()
        e = started_engine(venv, home, "after-cli")
        hits, err = search_hits(e, wing, f"{wing} token")
        t2 = time.monotonic()
        res["cli"].append({"seconds": t2 - t0, "stop": stop_s, "cli_mine": mined["seconds"], "rc": mined["rc"],
                           "error": mined["error"], "fresh_engine_and_search": t2 - t1,
                           "drawers": wing_count(e, wing), "search_hits": hits, "search_error": err})
    return e, res


def run_engine(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    venv = VENVS[name]
    version = engine_version(venv)
    log(f"== {name}: mempalace {version}")
    result: dict[str, Any] = {"engine": name, "version": version}
    home = make_home(root, f"timing-{name}")
    seed(venv, home)
    e = started_engine(venv, home, "warm")
    tools = {t["name"] for t in e.call("tools/list")["result"]["tools"]}
    result["has_mine_tool"] = "mempalace_mine" in tools
    result["has_reconnect_tool"] = "mempalace_reconnect" in tools
    e.tool("mempalace_add_drawer", {"wing": "seed", "room": "seedroom", "content": "the warm engine wrote this"})
    warm(e)
    log("  a. stop-and-start")
    e, result["a_stop_and_start"] = bench_restart(venv, home, e, args.runs)
    if result["has_reconnect_tool"]:
        log("  b. reconnect")
        result["b_reconnect"] = bench_reconnect(e, max(args.runs, 3))
    log("  d. mine: tool vs CLI with stop-and-start")
    e, result["d_mine"] = bench_mine(venv, home, root, e, args.mine_reps, args.files, result["has_mine_tool"], name.replace(".", ""))
    e.close()
    log("  c. correctness after an external CLI mine")
    result["c_correctness"] = bench_correctness(venv, root / f"c-{name}", args.files)
    return result


# --------------------------------------------------------------------------- report
def fmt(s: dict[str, Any]) -> str:
    return f"{s['p50']:.2f} / {s['max']:.2f}" if s else "-"


def seq(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key]) for r in rows)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# bench_engine_tools: {os.uname().sysname} {os.uname().machine}, {os.cpu_count()} cores, "
             f"runs={args.runs}, mine reps={args.mine_reps}, files={args.files}", ""]
    lines += ["## seconds, p50 / max", "", "| engine | a. stop-and-start | exit | start->initialize | first search |"
              " b. reconnect+search | reconnect call | search after |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["a_stop_and_start"], r.get("b_reconnect") or {}
        lines.append(f"| {r['version']} | {fmt(a['total'])} | {fmt(a['exit'])} | {fmt(a['start_to_initialize'])} | "
                     f"{fmt(a['first_search'])} | {fmt(b.get('total', {}))} | {fmt(b.get('reconnect_call', {}))} | "
                     f"{fmt(b.get('first_search', {}))} |")
    lines += ["", "## d. mine (seconds; drawers stored / wing-filtered search hits)", "",
              "| engine | way | seconds (each rep) | drawers | hits | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        d = r["d_mine"]
        if d["tool"]:
            t = d["tool"]
            lines.append(f"| {r['version']} | mempalace_mine on the warm engine | "
                         f"{seq(t, 'seconds')} | {seq(t, 'drawers')} | "
                         f"{seq(t, 'search_hits')} | traverse finds the new room: {seq(t, 'traverse_finds_room')}; "
                         f"status sent 0.3 s into the mine waited "
                         f"{seq(t, 'status_sent_during_mine_waited')} s |")
        else:
            lines.append(f"| {r['version']} | mempalace_mine | - | - | - | not in this engine's tools/list |")
        c = d["cli"]
        lines.append(f"| {r['version']} | stop + CLI mine + fresh engine + search | "
                     f"{seq(c, 'seconds')} | {seq(c, 'drawers')} | {seq(c, 'search_hits')} | of which CLI mine "
                     f"{seq(c, 'cli_mine')} s, rc {seq(c, 'rc')} |")
    lines += ["", "## c. drawers seen after an external `mempalace mine` beside a warm engine A", "",
              "| engine | A before the mine | CLI mine | on disk | view | status wing count | search hits | "
              "traverse finds new room | search error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for case_name, case in r["c_correctness"].items():
            mine = case["cli_mine"]
            mine_s = f"rc {mine['rc']}" + (f": ...{mine['error'][-100:]}" if mine["rc"] else f", {mine['seconds']:.1f} s")
            for view in ("i_engine_A_as_is", "ii_engine_A_after_reconnect", "iii_fresh_engine"):
                v = case[view]
                lines.append(f"| {r['version']} | {case_name} | {mine_s} | {case['on_disk']} | {view} | "
                             f"{v['status_wing']} | {v['search_hits']} | {v['traverse_finds_room']} | "
                             f"{v['search_error'] or ''} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~1 minute: pinned engine, 2 runs, 1 mine each way")
    p.add_argument("--engine", choices=["pinned", "3.4.0", "all"], default=None)
    p.add_argument("--runs", type=int, default=None, help="repetitions of a. and b. (default 5, quick 2)")
    p.add_argument("--mine-reps", type=int, default=None, help="mines each way in d. (default 3, quick 1)")
    p.add_argument("--files", type=int, default=20, help="files per mined directory (default 20)")
    p.add_argument("--json", type=Path, help="also write every figure as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary homes (engine logs) for inspection")
    args = p.parse_args()
    args.runs = args.runs or (2 if args.quick else 5)
    args.mine_reps = args.mine_reps or (1 if args.quick else 3)
    engine = args.engine or ("pinned" if args.quick else "all")
    names = list(VENVS) if engine == "all" else [engine]
    names = [n for n in names if os.access(VENVS[n] / "bin/mempalace-mcp", os.X_OK)] or names
    if not MODEL_FILE.exists():
        subprocess.run(["bash", str(REPO / "scripts/provision-model.sh"), str(MODEL_HOME)], check=True)
    root = Path(tempfile.mkdtemp(prefix="mpb-tools-", dir="/tmp"))
    results = []
    try:
        for name in names:
            if not os.access(VENVS[name] / "bin/mempalace-mcp", os.X_OK):
                log(f"skipping {name}: {VENVS[name]}/bin/mempalace-mcp missing (scripts/setup-engine.sh {name})")
                continue
            results.append(run_engine(name, root, args))
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
