"""`mempalace-broker`: run the broker, or `--ensure` one is running.

Usage:
  mempalace-broker                 serve in the foreground (launchd / systemd)
  mempalace-broker --service       the same, run by a service manager that restarts every non-zero exit
                                   (launchd's KeepAlive): "another broker already serves this palace"
                                   exits 0 instead of 3 (mp_ssh_bridge/service.py writes the job)
  mempalace-broker --ensure        start one if needed; print ONE JSON line; exit 0
  mempalace-broker --dial-stdio    bridge stdin/stdout to the broker socket (SSH fallback)
  mempalace-broker --stop [--force] [--timeout S]
                                   stop this host's broker if it is proven to be it (what
                                   `mp-bridge stop` runs over SSH from a container)
  mempalace-broker --container-daemon
                                   the container's daemon in local-owner mode (broker/daemon.py): the
                                   engine for every session of the container, as the palace's `local`
                                   owner; its records in /tmp/mp-bridge-<uid>/daemon-* (exec'd by
                                   `python -m mp_ssh_bridge.containerd`, which decides the mode)

Exit codes when serving: 0 a clean stop (SIGTERM, idle exit), 1 the broker failed, 2 unusable settings or
flags, 3 another broker already serves this palace (0 with --service).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from mp_ssh_bridge.protocol import ALREADY_SERVED, SETTINGS_ERROR  # exit statuses (a systemd unit names both)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mempalace-broker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensure", action="store_true", help="start a broker if none is healthy; print its endpoint as JSON")
    p.add_argument("--palace", help="palace the engine opens (default: see MP_BRIDGE_PALACE)")
    p.add_argument("--mempalace-path", dest="mempalace_path", help="state directory (default $MEMPALACE_PATH or ~/.mempalace)")
    p.add_argument("--engine", help="engine command line (default $MP_BRIDGE_ENGINE or mempalace-mcp)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP with a token (off unless given)")
    p.add_argument("--tcp-advertise", dest="tcp_advertise", metavar="HOST[:PORT]",
                   help="the TCP address the other side of a VM dials (e.g. host.docker.internal); default: the "
                   "bound address, none for 0.0.0.0 / ::")
    p.add_argument("--idle-exit-minutes", type=float, dest="idle_exit_minutes", help="exit after N idle minutes; 0 = never")
    p.add_argument("--request-timeout", type=float, dest="request_timeout", help="per-request deadline, seconds")
    p.add_argument("--stall-timeout", type=float, dest="stall_timeout", help="kill a silent engine after N seconds")
    p.add_argument("--max-line-bytes", type=int, dest="max_line_bytes", help="largest accepted message line")
    p.add_argument("--no-strip-root-combinators", dest="strip_root_combinators", action="store_const", const=False)
    p.add_argument("--log-level", dest="log_level")
    p.add_argument(
        "--timeout", type=float,
        help="--ensure: how long to wait (default ensure_timeout); --stop: wait after SIGTERM (default shutdown_grace + 5)",
    )
    p.add_argument("--stop", action="store_true", help="stop the broker, only if proven to be this host's (exit 0/1/2)")
    p.add_argument("--force", action="store_true", help="--stop: SIGKILL a hung broker and its engine, clean up")
    p.add_argument("--container-daemon", dest="container_daemon", action="store_true",
                   help="run as the container's daemon in local-owner mode (mp_ssh_bridge.containerd decides the mode)")
    p.add_argument("--service", action="store_true",
                   help="serving under a service manager that cannot treat exit 3 as success (launchd KeepAlive "
                   "SuccessfulExit=false): exit 0 when another broker already serves this palace")
    p.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dial-stdio", dest="dial_stdio", action="store_true", help="bridge stdin/stdout to the broker socket (SSH fallback)")
    p.add_argument("--socket", help="--dial-stdio: socket path (default: from broker.json)")
    p.add_argument("--status", action="store_true", help="what `mp-bridge status --json` shows, as seen on this host")
    p.add_argument("--check", action="store_true", help="scar files and sqlite quick_check of the palace, as JSON")
    p.add_argument("--logs", action="store_true", help="print the end of the broker's log (what `mp-bridge logs` shows)")
    p.add_argument("--lines", type=int, default=50, help="--logs: how many lines (default 50)")
    p.add_argument("--follow", action="store_true", help="--logs: keep printing new lines until the caller (an SSH "
                   "session) goes away")
    p.add_argument("--version", action="store_true")
    return p


def _stdin_closed() -> bool:
    """True once stdin is at EOF (an SSH channel that closed, even behind a wrapper script without `exec`)."""
    import select

    try:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0)
        return bool(ready) and os.read(sys.stdin.fileno(), 4096) == b""
    except (OSError, ValueError):
        return True


def settings_from(args: argparse.Namespace, *, serving: bool) -> Any:
    """The broker's settings from its own start: config file, its environment, these flags.

    `--ensure` is a client action run on the host (it elects), so it reads every field;
    serving reads only the broker's (`BrokerSettings`): a session's variables do not apply.
    The container daemon reads every field (it is a client of the host too: ssh_*), with its own paths
    (broker/daemon.py `DaemonSettings`).
    """
    from mp_ssh_bridge.settings import load, load_broker

    overrides: dict[str, Any] = {}
    for key in (
        "palace", "mempalace_path", "engine", "tcp", "tcp_advertise", "idle_exit_minutes", "request_timeout",
        "stall_timeout", "max_line_bytes", "strip_root_combinators", "log_level",
    ):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if getattr(args, "container_daemon", False):
        from mp_ssh_bridge_broker.daemon import load_settings

        return load_settings(**overrides)
    return load_broker(**overrides) if serving else load(**overrides)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        from mp_ssh_bridge_broker import __version__

        print(__version__)
        return 0
    if args.container_daemon and (args.ensure or args.dial_stdio or args.stop):
        print("mempalace-broker: --container-daemon serves (or, with --status, --logs, --check, looks); it does not "
              "combine with --ensure, --dial-stdio or --stop", file=sys.stderr)
        return SETTINGS_ERROR
    if args.dial_stdio:  # before settings: with --socket it needs none (fast start over SSH)
        from mp_ssh_bridge_broker.dial import main as dial_main

        return dial_main(args)
    try:
        settings = settings_from(args, serving=not (args.stop or args.ensure or args.logs or args.check or args.status))
    except ValueError as exc:  # pydantic's ValidationError, a broken config file: the user's to fix
        from mp_ssh_bridge.stopping import describe_settings_error

        print(f"mempalace-broker: {describe_settings_error(exc)}", file=sys.stderr)
        return SETTINGS_ERROR
    if args.status:
        from mp_ssh_bridge.status import snapshot

        print(json.dumps(snapshot(settings), default=str), flush=True)
        return 0
    if args.check:
        from mp_ssh_bridge import palacecheck

        print(json.dumps(palacecheck.report(settings.memory.palace, settings.memory.kg, str(settings.paths.root))),
              flush=True)
        return 0
    if args.logs:
        from mp_ssh_bridge import brokerlog

        text, where = brokerlog.tail_and_position(settings.paths.log, args.lines)
        print(text or f"(no log at {settings.paths.log})", flush=True)
        if args.follow:
            parent = os.getppid()
            gone = lambda: os.getppid() != parent or _stdin_closed()  # noqa: E731
            try:  # ends when the SSH session that runs it is gone: stdin at EOF, re-parented, or stdout closed
                for line in brokerlog.follow(settings.paths.log, stop=gone, since=where):
                    print(line, flush=True)
            except (BrokenPipeError, KeyboardInterrupt):
                return 0
        return 0
    if args.stop:
        from mp_ssh_bridge.stopping import stop_broker

        result = stop_broker(settings, force=args.force, timeout=args.timeout)
        print(result.message, file=sys.stdout if result.code == 0 else sys.stderr, flush=True)
        return result.code
    if args.ensure:
        from mp_ssh_bridge.election import EnsureError, ensure_broker

        try:
            info = ensure_broker(settings, args.timeout)
        except EnsureError as exc:
            print(f"mempalace-broker --ensure: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(info), flush=True)
        return 0
    if args.detach and os.fork() > 0:
        os._exit(0)  # the parent returns to --ensure at once; the child is reparented
    setup_logging(settings.log_level)
    from mp_ssh_bridge_broker.limits import raise_nofile

    raise_nofile()  # before the engine spawns: it inherits the limit (macOS starts jobs at 256)
    from mp_ssh_bridge_broker.lifecycle import AlreadyRunning, BrokerProcess

    try:
        if args.container_daemon:
            from mp_ssh_bridge_broker.daemon import serve

            return asyncio.run(serve(settings, args.lock_fd))
        return asyncio.run(BrokerProcess(settings, args.lock_fd).run())
    except AlreadyRunning as exc:  # not a failure: the palace is served (a service manager must not restart us)
        code = 0 if args.service else ALREADY_SERVED
        logging.getLogger("broker").warning("%s; exiting (status %d)", exc, code)
        return code
    except Exception as exc:  # noqa: BLE001 - the last word of a broker that cannot go on; logged, exit 1
        logging.getLogger("broker").error("broker failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
