"""Spawn -> first `mempalace_status` result: mp-shim (warm broker) vs mempalace-mcp direct vs upstream's proxy.

One run, one throwaway HOME (`.cache` linked to the offline model in .test-home),
a palace with ~50 drawers. Each variant is spawned N times and driven by a raw
JSON-RPC client over its stdio: write initialize, wait, write
notifications/initialized + tools/call mempalace_status, time until that reply.
RSS (psutil) of the shim and of upstream's proxy is read while a session is open.
Writes docs/bench-shim.md.

    .venv/bin/python benchmarks/bench_shim.py [--runs 15] [--drawers 50]
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.platforms import cpu_model  # noqa: E402

BIN = Path(sys.executable).parent
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
STATUS = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "mempalace_status", "arguments": {}}}


def send(proc: subprocess.Popen, msg: dict) -> None:
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


def read_id(proc: subprocess.Popen, msg_id: int) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"EOF from {proc.args}")
        msg = json.loads(line)
        if msg.get("id") == msg_id:
            return msg


def rss_kb(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss // 1024


def maps_chromadb(pid: int) -> int | None:
    """1 when the process has chromadb or onnxruntime mapped, 0 when not, None where psutil cannot say (macOS)."""
    try:
        maps = psutil.Process(pid).memory_maps()
    except (AttributeError, psutil.Error):  # memory_maps: Linux, FreeBSD, Windows only
        return None
    return int(any("chromadb" in m.path or "onnxruntime" in m.path for m in maps))


def session(argv: list[str], env: dict, keep_open=None) -> tuple[float, dict]:
    """Seconds from spawn to the status reply (and the reply)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        send(proc, INIT)
        init = read_id(proc, 1)
        assert "result" in init, init
        send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        send(proc, STATUS)
        reply = read_id(proc, 2)
        elapsed = time.perf_counter() - t0
        assert "result" in reply and not reply["result"].get("isError"), reply
        if keep_open is not None:
            keep_open(proc)
        return elapsed, reply
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(name: str, argv: list[str], env: dict, runs: int) -> list[float]:
    session(argv, env)  # warm the page cache once; not counted
    times = [session(argv, env)[0] for _ in range(runs)]
    print(f"{name:<34} median {statistics.median(times) * 1000:8.1f} ms  "
          f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, n={runs})", flush=True)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--drawers", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "docs" / "bench-shim.md"))
    args = ap.parse_args()

    # Installed packages carry .pyc files; this editable checkout may not (PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(str(REPO / "mp_ssh_bridge"), quiet=1)
    compileall.compile_dir(str(REPO / "broker"), quiet=1)

    root = Path(tempfile.mkdtemp(prefix="mpb-bench-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    (home / ".cache").symlink_to(REPO / ".test-home" / ".cache")
    state_dir = home / ".mempalace"
    palace = state_dir / "palace"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_BRIDGE_", "MEMPALACE_"))}
    env.update(HOME=str(home), MEMPALACE_PATH=str(state_dir), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               MP_BRIDGE_CONFIG=str(home / "none.toml"), MP_BRIDGE_ROLE="host")
    serve = None
    broker_pid = None
    try:
        out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], env=env, capture_output=True, text=True,
                             timeout=120, check=True)
        info = json.loads(out.stdout)
        broker_pid = info["pid"]
        # fill the palace through a shim session (also warms broker + engine)
        proc = subprocess.Popen([str(BIN / "mp-shim")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
        send(proc, INIT)
        read_id(proc, 1)
        for i in range(args.drawers):
            send(proc, {"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {
                "name": "mempalace_add_drawer",
                "arguments": {"wing": "bench", "room": f"room{i % 5}",
                              "content": f"Benchmark drawer {i}: notes about topic {i * 7 % 13} and item {i}."}}})
            reply = read_id(proc, 100 + i)
            assert "result" in reply, reply
        proc.stdin.close()
        proc.wait(30)
        status = session([str(BIN / "mp-shim")], env)[1]
        print("palace:", status["result"]["content"][0]["text"][:120].replace("\n", " "), flush=True)

        rss: dict[str, int | None] = {}
        shim_t = measure("(1) mp-shim, warm broker", [str(BIN / "mp-shim")], env, args.runs)
        session([str(BIN / "mp-shim")], env, keep_open=lambda p: rss.__setitem__("shim", rss_kb(p.pid)))

        direct_env = dict(env, MEMPALACE_HUB_FORWARD="0")
        direct_argv = [str(BIN / "mempalace-mcp"), "--palace", str(palace)]
        direct_t = measure("(a) mempalace-mcp direct", direct_argv, direct_env, args.runs)
        session(direct_argv, direct_env, keep_open=lambda p: rss.__setitem__("direct", rss_kb(p.pid)))

        # `mempalace serve` needs the palace's writer lease, which the broker's engine holds: stop the broker
        os.kill(broker_pid, 15)
        deadline = time.monotonic() + 30
        while (state_dir / "broker.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        broker_pid = None
        time.sleep(1.0)
        port = free_port()
        serve = subprocess.Popen([str(BIN / "mempalace"), "serve", "--palace", str(palace), "--host", "127.0.0.1",
                                  "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(root / "serve.log", "wb"), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not glob.glob(str(state_dir / "server" / "*" / "serverinfo.json")):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mempalace serve did not start: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(1.0)
        proxy_argv = [str(BIN / "mempalace-mcp"), "--palace", str(palace)]
        proxy_t = measure("(b) mempalace-mcp -> mempalace serve", proxy_argv, env, args.runs)

        def proxy_probe(p: subprocess.Popen) -> None:
            rss["proxy"] = rss_kb(p.pid)
            rss["proxy_has_chromadb"] = maps_chromadb(p.pid)

        session(proxy_argv, env, keep_open=proxy_probe)
        # memory maps are not readable on macOS: there the RSS alone has to tell
        proxied = rss["proxy_has_chromadb"] in (0, None) and rss["proxy"] < 100_000
        print(f"proxy really forwards (no chromadb/onnxruntime mapped, RSS {rss['proxy'] / 1024:.1f} MB): {proxied}")

        m1, ma, mb = (statistics.median(t) for t in (shim_t, direct_t, proxy_t))
        ratios = {
            "shim vs (a) direct: times faster": ma / m1,
            "shim vs (b) proxy: times faster": mb / m1,
            "shim RSS / proxy RSS": rss["shim"] / rss["proxy"],
        }
        for k, v in ratios.items():
            print(f"{k:<36} {v:6.2f}")
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        cpu = cpu_model()
        import mempalace.version as mv  # noqa: F401

        md = f"""# mp-shim start-up benchmark

`benchmarks/bench_shim.py`, run {when} on {platform.node()} ({os.cpu_count()} cores, {cpu},
{platform.system()} {platform.release()}, Python {platform.python_version()}, mempalace
{getattr(mv, '__version__', '?')}). Throwaway HOME, palace with {args.drawers} drawers. Each figure is the
median of {args.runs} runs (one warm-up run not counted) of: spawn the command, write `initialize`, wait
for it, write `notifications/initialized` and `tools/call mempalace_status`, stop the clock at its reply.
Raw JSON-RPC client over the child's stdio; RSS is VmRSS read while a session is open.

| variant | spawn -> first status, median | min | max | RSS |
| --- | ---: | ---: | ---: | ---: |
| (1) `mp-shim`, warm broker | {m1 * 1000:.1f} ms | {min(shim_t) * 1000:.1f} ms | {max(shim_t) * 1000:.1f} ms | {rss['shim'] / 1024:.1f} MB |
| (a) `mempalace-mcp --palace P` direct | {ma * 1000:.1f} ms | {min(direct_t) * 1000:.1f} ms | {max(direct_t) * 1000:.1f} ms | {rss['direct'] / 1024:.1f} MB |
| (b) `mempalace-mcp --palace P` proxying to `mempalace serve` | {mb * 1000:.1f} ms | {min(proxy_t) * 1000:.1f} ms | {max(proxy_t) * 1000:.1f} ms | {rss['proxy'] / 1024:.1f} MB |

| ratio | value | target |
| --- | ---: | --- |
| (a) / (1): shim faster than direct | {ratios['shim vs (a) direct: times faster']:.1f}x | >= 10x |
| (b) / (1): shim faster than upstream's proxy | {ratios['shim vs (b) proxy: times faster']:.2f}x | >= 1 (no slower) |
| RSS shim / RSS proxy | {ratios['shim RSS / proxy RSS']:.2f} | <= 1 |

(b) really proxies: while its session was open the `mempalace-mcp` process had no chromadb/onnxruntime
mapped and {rss['proxy'] / 1024:.1f} MB RSS ({'verified' if proxied else 'NOT verified'}); it found the
server through `$HOME/.mempalace/server/<key>/serverinfo.json`. (a) ran with `MEMPALACE_HUB_FORWARD=0`
before `mempalace serve` was started; the broker was stopped before (b), since `mempalace serve` needs the
palace's writer lease that the broker's engine holds.

Notes: the shim's fast path is stdlib-only and uses threads, not asyncio (on this machine `import asyncio`
costs 45-70 ms, as much as upstream's whole proxy start). The .pyc files of this editable checkout are
compiled first (this box sets PYTHONDONTWRITEBYTECODE; installed wheels ship them). Both the shim and
upstream's proxy pay the same interpreter + site start-up (~30-50 ms here, including the editable-install
finder of this venv).
"""
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")
        return 0
    finally:
        if serve is not None:
            serve.terminate()
            try:
                serve.wait(15)
            except subprocess.TimeoutExpired:
                serve.kill()
        if broker_pid:
            try:
                os.kill(broker_pid, 15)
            except ProcessLookupError:
                pass
            time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
