"""The floor of the bridge's shape: two processes that only move bytes, no JSON, no bookkeeping.

The bridge puts two processes between an agent and its engine (mp-shim on the agent's stdio, the broker on a
UNIX socket in front of the engine's stdio). Whatever they do, each costs at least what a process that only
moves bytes costs: a wake-up and a copy per message each way. This is that process, in both roles, so a
benchmark can run the real engine behind two of them and measure the floor beside the bridge:

  floor_relay.py serve SOCKET -- ENGINE ARGV...   # the broker's place: one connection <-> the engine's stdio
  floor_relay.py connect SOCKET                   # the shim's place: stdin/stdout <-> the socket

One select() loop, os.read/os.write, nothing else: the least a Python process can do per message. Ends when
either side closes.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys


def pump(pairs: dict[int, int]) -> None:
    """Copy bytes from each key fd to its value fd until one reaches EOF."""
    while True:
        ready, _, _ = select.select(list(pairs), [], [])
        for src in ready:
            data = os.read(src, 1 << 20)
            if not data:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(pairs[src], view) :]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "connect":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(argv[1])
        pump({0: sock.fileno(), sock.fileno(): 1})
        return 0
    if len(argv) >= 4 and argv[0] == "serve" and argv[2] == "--":
        engine = subprocess.Popen(argv[3:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # before the socket exists
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(argv[1])
        listener.listen(1)
        assert engine.stdin is not None and engine.stdout is not None
        try:
            conn, _ = listener.accept()
            pump({conn.fileno(): engine.stdin.fileno(), engine.stdout.fileno(): conn.fileno()})
        finally:
            engine.stdin.close()
            engine.wait(10)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
