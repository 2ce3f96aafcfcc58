#!/usr/bin/env python3
"""A SCRIPTED FAKE ENGINE, for faults and shapes the real mempalace-mcp cannot produce.

It speaks the engine's stdio framing (one JSON object per line, one request
at a time) and serves:
- tools/list from the JSON file in $FAKE_TOOLS (default: mempalace 3.4.0's real list,
  whose diary_write has a root-level anyOf),
- tools/call `fake_progress`: sends notifications/progress for the request's
  progressToken, then answers with the token it saw,
- tools/call `fake_sleep` {seconds, log}: writes `log` (if any) on stderr, sleeps, then answers,
- tools/call `fake_drop` {log}: writes `log` on stderr and answers NOTHING (mempalace 3.4.0 when
  handling a request raises; `log` empty: a drop that says nothing),
- initialize: echoes the protocolVersion.
$FAKE_START_DELAY (seconds) delays everything, like a slow engine start.
Everything else: -32601.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.environ.get("FAKE_TOOLS") or os.path.join(HERE, "data", "mempalace-3.4.0-tools.json")


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main():
    time.sleep(float(os.environ.get("FAKE_START_DELAY") or 0))  # a slow engine start (a cold virtiofs open)
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}})
            continue
        if "id" not in msg:
            continue
        mid, method, params = msg["id"], msg.get("method"), msg.get("params") or {}
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": mid, "result": {
                "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                "capabilities": {"tools": {}}, "serverInfo": {"name": "fake-engine", "version": "0.0-fake"}}})
        elif method == "tools/list":
            with open(TOOLS, encoding="utf-8") as fh:
                send({"jsonrpc": "2.0", "id": mid, "result": json.load(fh)})
        elif method == "tools/call" and params.get("name") == "fake_progress":
            token = (params.get("_meta") or {}).get("progressToken")
            for i in (1, 2):
                send({"jsonrpc": "2.0", "method": "notifications/progress",
                      "params": {"progressToken": token, "progress": i, "total": 2}})
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": json.dumps({"token": token})}]}})
        elif method == "tools/call" and params.get("name") == "fake_drop":
            print((params.get("arguments") or {}).get("log", ""), file=sys.stderr, flush=True)
        elif method == "tools/call" and params.get("name") == "fake_sleep":
            if (params.get("arguments") or {}).get("log"):
                print(params["arguments"]["log"], file=sys.stderr, flush=True)
            time.sleep(float((params.get("arguments") or {}).get("seconds", 1)))
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": "{\"slept\": true}"}]}})
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": f"Unknown method: {method}"}})


if __name__ == "__main__":
    main()
