"""`mp-bridge`: what a person runs to see and fix the broker (rich output).

  mp-bridge status [--json]   the broker, its engine, clients and queues
  mp-bridge doctor            check every link from settings to engine; exit 1 on a failure
  mp-bridge stop              ask the broker to stop (SIGTERM)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any


def _console() -> Any:
    from rich.console import Console

    return Console()


def cmd_status(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.settings import load
    from mp_ssh_bridge.status import snapshot

    snap = snapshot(load())
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
    from mp_ssh_bridge import state
    from mp_ssh_bridge.settings import load

    record = state.read_broker_json(load().paths.json)
    if not record or not isinstance(record.get("pid"), int):
        print("no broker is running")
        return 1
    try:
        os.kill(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        print(f"broker pid {record['pid']} is already gone")
        return 1
    print(f"sent SIGTERM to broker pid {record['pid']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mp-bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="show the broker, engine, clients")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    sub.add_parser("doctor", help="check the set-up and say what is wrong").set_defaults(func=cmd_doctor)
    sub.add_parser("stop", help="stop the broker").set_defaults(func=cmd_stop)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
