"""`mp-bridge`: what a person runs to see and fix the broker (rich output).

  mp-bridge status [--json]   the broker, its engine, clients and queues
  mp-bridge doctor            check every link from settings to engine; exit 1 on a failure
  mp-bridge stop [--force] [--timeout S]
                              stop the broker, if it is proven to be ours (see
                              mp_ssh_bridge/stopping.py); exit 0 stopped or none
                              running, 1 refused or not stopped, 2 bad settings or
                              broker.json. In the container role it runs
                              `mempalace-broker --stop` on the host over SSH.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

REMOTE_STOP_MARGIN = 30.0  # on top of the stop's own wait: SSH set-up, python start-up, probe, --force waits


def _console() -> Any:
    from rich.console import Console

    return Console()


def _load_settings() -> Any:
    """The settings, or None after printing one line saying what is wrong with them (no traceback)."""
    from mp_ssh_bridge.settings import config_file, load
    from mp_ssh_bridge.stopping import describe_settings_error

    try:
        return load()
    except (ValueError, OSError, TypeError) as exc:  # pydantic's ValidationError and TOML errors are ValueErrors
        hint = f"check the MP_BRIDGE_* / MEMPALACE_* environment and {config_file()}"
        print(f"mp-bridge: {describe_settings_error(exc, hint)}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.status import snapshot

    settings = _load_settings()
    if settings is None:
        return 2
    snap = snapshot(settings)
    if args.json:
        print(json.dumps(snap, indent=1, default=str))
        return 0 if snap["status"] else 1
    from rich.table import Table

    con = _console()
    st = snap["status"]
    if not st:
        con.print(f"[yellow]No broker answers for[/] {snap['state_dir']}" + (" (stale broker.json)" if snap["record"] else ""))
        return 1
    b, e = st["broker"], st["engine"]
    con.print(f"[bold]broker[/] pid {b['pid']} v{b['version']}  palace {b['palace']}  round trip {snap['round_trip_ms']} ms")
    con.print(f"[bold]engine[/] pid {e['pid']} mempalace {e['version']}  {e['state']}  up {e['uptime_s']} s  restarts {e['restarts']}")
    table = Table("client", "peer", "connected s", "queued", "in flight", "requests")
    for c in st["clients"]:
        table.add_row(str(c["id"]), c["peer"], f"{c['connected_s']:.0f}", str(c["queued"]), "yes" if c["in_flight"] else "", str(c["requests"]))
    con.print(table)
    con.print("totals: " + ", ".join(f"{k} {v}" for k, v in st["totals"].items()))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.doctor import run_checks
    from mp_ssh_bridge.settings import load

    try:
        settings = load()
    except Exception as exc:  # noqa: BLE001 - the first thing doctor must report
        print(f"FAIL settings: {exc}")
        return 1
    checks = run_checks(settings)
    con = _console()
    marks = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        con.print(f"{marks[c.level]} [bold]{c.title}[/]: {c.detail}")
        if c.fix and c.level != "ok":
            con.print(f"      fix: {c.fix}")
    return 1 if any(c.level == "fail" for c in checks) else 0


def cmd_stop(args: argparse.Namespace) -> int:
    settings = _load_settings()
    if settings is None:
        return 2
    if settings.resolved_role() == "container":
        return _stop_over_ssh(settings, args.force, args.timeout)
    from mp_ssh_bridge.stopping import stop_broker

    result = stop_broker(settings, force=args.force, timeout=args.timeout)
    print(result.message, file=sys.stdout if result.code == 0 else sys.stderr)
    return result.code


def _stop_over_ssh(settings: Any, force: bool, timeout: float | None) -> int:
    """Container role: run `mempalace-broker --stop` on the host (where the proof can be made); relay it."""
    import asyncio

    from mp_ssh_bridge import ssh

    words = ["--stop", *(["--force"] if force else []), *(["--timeout", f"{timeout:g}"] if timeout is not None else [])]
    bound = (settings.shutdown_grace + 5.0 if timeout is None else timeout) + REMOTE_STOP_MARGIN
    try:
        status, out, err = asyncio.run(ssh.run_on_host(settings, *words, bound=bound))
    except ssh.SSHBridgeError as exc:
        print(f"mp-bridge stop: cannot stop the host's broker over SSH (Host {settings.ssh_host}): {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mp-bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="show the broker, engine, clients")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    sub.add_parser("doctor", help="check the set-up and say what is wrong").set_defaults(func=cmd_doctor)
    st = sub.add_parser("stop", help="stop the broker (only a process proven to be it)")
    st.add_argument("--force", action="store_true", help="hung broker: SIGTERM, then SIGKILL it and its engine; clean up")
    st.add_argument(
        "--timeout", type=_positive_seconds, help="seconds to wait after SIGTERM (default shutdown_grace + 5; --force: 2)"
    )
    st.set_defaults(func=cmd_stop)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
