"""`mp-shim`: the agent's MCP stdio command, a drop-in for `mempalace-mcp`.

It accepts mempalace-mcp's arguments, reads its settings cheaply
(`config.fast_config`), keeps the real stdout for protocol only (fd 1 and
`sys.stdout` point at stderr from here on, so a stray print — ours, a
library's or a child's — cannot corrupt the stream) and runs one
`session.Shim`. With a broker already running the whole start is: this
module, the config reader, broker.json, one UNIX connect and one
`broker/status` round trip — about 30 ms, against ~780 ms for a direct engine.
The fast path imports only the standard library's cheapest modules
(tests/test_shim_fastpath.py lists what it may load).
"""

from __future__ import annotations

import os
import sys

# The C module under `signal`: the wrapper's enum conversion of every signal name costs each agent start ~0.5 ms.
from _signal import SIGTERM
from _signal import signal as on_signal

from mp_ssh_bridge import diag
from mp_ssh_bridge.config import ENGINE_CHILD_ENV, Config, NeedSettings, fast_config
from mp_ssh_bridge.diag import log

USAGE = """usage: mp-shim [--palace PATH] [--backend NAME] [--transport stdio] [--read-only] ...

MCP stdio server for MemPalace through the single-writer broker (a drop-in for
mempalace-mcp: its arguments are accepted; those that do not apply are ignored).

The same arguments and environment reach the same memory as a plain
mempalace-mcp (palace, knowledge graph, config: mempalace's own resolution).

environment: MEMPALACE_PATH (state dir; default one per memory under
~/.mempalace), MEMPALACE_BROKER (endpoint URL: unix:///path, tcp://host:port,
ssh://alias/path), MEMPALACE_BROKER_TOKEN, MEMPALACE_MCP_TIMEOUT_MS (per-request
deadline, default 60000; the broker answers just before it; 0 = the broker's
own), MP_BRIDGE_ENGINE (the real engine), MP_BRIDGE_LOG_LEVEL (stderr logging,
default WARNING)."""

_VALUE_FLAGS = ("--palace", "--backend", "--transport", "--host", "--port", "--tls-cert", "--tls-key")


def parse_args(argv: list[str]) -> dict:
    """mempalace-mcp's arguments; unknown ones are ignored with a warning (stderr)."""
    out: dict = {"palace": None, "ignored": [], "help": False, "version": False, "read_only": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            out["help"] = True
        elif arg == "--version":
            out["version"] = True
        elif arg == "--read-only":
            out["read_only"] = True
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if name == "--palace":
                out["palace"] = value or None
            else:
                out["ignored"].append(f"{name}={value}")
        else:
            out["ignored"].append(arg)
        i += 1
    return out


def load_config(palace_flag: str | None) -> Config | None:
    """The fast reader, or the settings model when it is unsure; None (logged) when the settings are invalid."""
    try:
        return fast_config(palace_flag)
    except NeedSettings as why:
        log(20, f"loading the settings model ({why})")
    from mp_ssh_bridge.settings import load_session

    try:
        return load_session(palace=palace_flag).session_config(palace_flag)
    except ValueError as exc:  # pydantic's ValidationError (and a broken config file) are ValueErrors
        log(50, f"invalid settings: {exc}")
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args["help"]:
        print(USAGE)
        return 0
    if args["version"]:
        from mp_ssh_bridge import __version__

        print(f"mp-shim {__version__}")
        return 0
    diag.set_level(os.environ.get("MP_BRIDGE_LOG_LEVEL"))  # before the settings: their own errors
    if os.environ.get(ENGINE_CHILD_ENV):
        log(50, "refusing to run: this mp-shim was started as a broker's memory engine; set MP_BRIDGE_ENGINE to "
                "the real mempalace-mcp, not to the shim")
        return 3
    for item in args["ignored"]:
        if item.startswith("--transport=") and item != "--transport=stdio":
            log(30, f"{item} ignored: mp-shim always speaks stdio")
        else:
            log(20, f"argument {item} ignored")
    # As mempalace-mcp --palace: made absolute against our cwd, `~` NOT expanded (the engine does not either).
    cfg = load_config(os.path.abspath(args["palace"]) if args["palace"] else None)
    if cfg is None:
        return 2
    cfg.read_only = cfg.read_only or args["read_only"]
    diag.set_level(cfg.log_level or "WARNING")
    # Protocol only on the real stdout: keep it privately, send fd 1 (and sys.stdout) to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    in_file = open(0, "rb", buffering=65536, closefd=False)  # noqa: SIM115
    from mp_ssh_bridge.session import Shim

    shim = Shim(cfg, out_fd, in_file)
    on_signal(SIGTERM, lambda *_: shim.done.set())
    try:
        return shim.run()
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            os.close(out_fd)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
