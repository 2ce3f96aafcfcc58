"""`mp-bridge`: what a person runs to see and fix the broker (rich output).

  every command takes --palace, resolved as mp-shim resolves it (one broker per memory)
  mp-bridge status [--json] [--all]   the broker, its engine, clients and queues (--all: every broker)
  mp-bridge doctor            check every link from settings to engine; exit 1 on a failure
  mp-bridge logs [-f] [-n N] [--daemon]
                              the broker's log (host; over SSH in a container); --daemon: the container daemon's
  mp-bridge --version         the bridge's version and the engine's
  mp-bridge restart           replace the broker (after an upgrade); queued calls go to the new one
  mp-bridge doctor --fix      also repair what is safe to repair (modes, stale state, no broker)
  mp-bridge migrate [--apply] move what an older bridge wrote to other files into the memory a plain
                              engine opens (a dry run first; --apply backs up, merges, verifies)
  mp-bridge run [--timeout S] -- CMD ARGS…
                              run a writer that is not an MCP session (mempalace mine, a hook, a
                              cron job) as the palace's only writer: wait (bounded) for the owner
                              to hand the palace over, run CMD, release; exit status is CMD's (75:
                              not handed over in time; 127: CMD not found). See docs/WRITERS.md
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
import os
import sys
from typing import Any

REMOTE_STOP_MARGIN = 30.0  # on top of the stop's own wait: SSH set-up, python start-up, probe, --force waits


def _console() -> Any:
    from rich.console import Console

    return Console()


def _load_settings(args: argparse.Namespace | None = None) -> Any:
    """The settings (`--palace` as mp-shim takes it), or None after printing one line saying what is wrong."""
    from mp_ssh_bridge.settings import config_file, load
    from mp_ssh_bridge.stopping import describe_settings_error

    try:
        return load(palace=getattr(args, "palace", None))
    except (ValueError, OSError, TypeError) as exc:  # pydantic's ValidationError and TOML errors are ValueErrors
        hint = f"check the MP_BRIDGE_* / MEMPALACE_* environment and {config_file()}"
        print(f"mp-bridge: {describe_settings_error(exc, hint)}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.status import snapshot

    settings = _load_settings(args)
    if settings is None:
        return 2
    if args.all:
        return _status_all(settings, args.json)
    look = (lambda: _status_over_ssh(settings)) if settings.resolved_role() == "container" else (
        lambda: snapshot(settings))
    snap = look()
    if snap is None:
        return 1
    if args.json:
        print(json.dumps(snap, indent=1, default=str))
        return 0 if snap["status"] else 1
    con = _console()
    if not args.watch:
        con.print(_status_view(snap))
        return 0 if snap["status"] else 1
    import time

    from rich.live import Live

    try:
        with Live(_status_view(snap), console=con, refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(1.0)
                live.update(_status_view(look() or snap))
    except KeyboardInterrupt:
        return 0


def _status_over_ssh(settings: Any) -> dict[str, Any] | None:
    """Container role: this container's daemon, and the host's own view (`mempalace-broker --status` over SSH) as
    the daemon reaches it; when the daemon owns the palace itself (local-owner mode), its own broker status."""
    from mp_ssh_bridge.doctorkit import host_json
    from mp_ssh_bridge.status import daemon_view, ownership, public

    daemon = daemon_view(settings)
    if daemon.get("running") and daemon.get("mode") not in (None, "relay") and daemon.get("status"):
        snap: dict[str, Any] | None = {"state_dir": str(settings.paths.root), "record": daemon.get("record"),
                                       "status": daemon["status"], "round_trip_ms": daemon.get("round_trip_ms"),
                                       "via": "this container's daemon (the palace's local owner)"}
    else:
        snap, why = host_json(settings, "--status", bound=settings.connect_timeout + 15)
        if snap is None:
            print(f"mp-bridge: cannot read the host's broker status over SSH (Host {settings.ssh_host}): {why}",
                  file=sys.stderr)
            if not daemon.get("running"):
                return None
            snap = {"state_dir": str(settings.paths.root), "record": public(None), "status": None}
        else:
            snap["via"] = f"ssh {settings.ssh_host}"
    assert snap is not None
    snap["daemon"] = daemon
    snap.update(ownership(settings.paths, settings.heartbeat_stale_after))  # this side's view of the mount
    return snap


def _status_view(snap: dict[str, Any]) -> Any:
    """What `status` shows (and `status --watch` refreshes in place), as one rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from mp_ssh_bridge.status import describe_daemon, describe_engine, describe_ownership

    owning = [Text(line) for line in describe_daemon(snap.get("daemon")) + describe_ownership(snap)]
    st = snap["status"]
    if not st:
        stale = ""
        if snap["record"]:  # by the liveness rule: a moving heartbeat on another machine is not "stale"
            stale = (" (broker.json names a broker that may be alive: on another machine, or hung)"
                     if snap.get("may_be_alive") else " (stale broker.json)")
        return Group(Text.from_markup(f"[yellow]No broker answers for[/] {snap['state_dir']}{stale}"), *owning)
    b, e = st["broker"], st["engine"]
    table = Table("#", "agent", "via", "role", "connected s", "queued", "in flight", "requests")
    for c in st["clients"]:
        table.add_row(str(c["id"]), c.get("client") or "?", c.get("transport") or c["peer"], c.get("role") or "",
                      f"{c['connected_s']:.0f}", str(c["queued"]), "yes" if c["in_flight"] else "", str(c["requests"]))
    t = st["totals"]
    flight = st.get("in_flight")
    running = (f"running: {flight.get('tool') or flight.get('method')} for client {flight.get('client')} "
               f"({flight.get('running_s')} s)") if flight else "running: nothing"
    return Group(
        Text.from_markup(f"[bold]broker[/] pid {b['pid']} v{b['version']}  palace {b['palace']}  "
                         f"round trip {snap['round_trip_ms']} ms" + (f" (via {snap['via']})" if snap.get("via") else "")),
        Text.from_markup(describe_engine(e)),
        table,
        Text(f"{running}; queued: {st.get('queue_depth', 0)}"),
        Text(f"since start: {t.get('requests', 0)} agent requests; {t.get('responses', 0)} answered, "
             f"{t.get('errors', 0)} errors ({t.get('timeouts', 0)} deadlines, {t.get('outcome_unknown', 0)} outcome "
             f"unknown), {t.get('cancelled', 0)} cancelled; {t.get('engine_requests', 0)} reached the engine "
             "(initialize is answered from cache)"),
        *owning,
    )


def _status_all(settings: Any, as_json: bool) -> int:
    """Every broker this user runs: one per memory."""
    from mp_ssh_bridge.status import snapshot_of, state_dirs

    snaps = [snapshot_of(paths, settings.heartbeat_stale_after) for paths in state_dirs(settings)]
    if as_json:
        print(json.dumps(snaps, indent=1, default=str))
        return 0 if any(s["status"] for s in snaps) else 1
    from rich.table import Table

    con = _console()
    if not snaps:
        con.print("No broker.json in ~/.mempalace or ~/.mempalace/brokers/: no broker is running")
        return 1
    table = Table("state dir", "pid", "palace", "knowledge graph", "clients", "answers")
    for s in snaps:
        rec, st = s["record"] or {}, s["status"]
        table.add_row(s["state_dir"], str(rec.get("pid")), str(rec.get("palace")), str(rec.get("kg", "?")),
                      str(len(st["clients"])) if st else "-", f"{s['round_trip_ms']} ms" if st else "[red]no[/]")
    con.print(table)
    return 0 if any(s["status"] for s in snaps) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.doctor import Check, run_checks
    from mp_ssh_bridge.settings import load

    fixed: list[str] = []
    try:
        settings = load(palace=args.palace)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError, a broken TOML file: the first thing to report
        checks = [Check("fail", "settings", " ".join(str(exc).split()), "fix the MP_BRIDGE_* / MEMPALACE_* environment "
                        "or the config file")]
    else:
        checks = run_checks(settings)
        if args.fix:
            from mp_ssh_bridge.doctorfix import fix

            try:
                fixed = fix(settings, [(c.level, c.title) for c in checks])
            except Exception as exc:  # noqa: BLE001 - one line, never a traceback
                fixed = [f"--fix stopped: {type(exc).__name__}: {exc}"]
            checks = run_checks(settings)  # what holds now
    failed = any(c.level == "fail" for c in checks)
    if args.json:
        out: dict[str, Any] = {"ok": not failed, "checks": [
            {"name": c.title, "status": c.level, "detail": c.detail, "fix": c.fix} for c in checks]}
        if args.fix:
            out["fixed"] = fixed
        print(json.dumps(out, indent=1))
        return 1 if failed else 0
    _doctor_table(checks, fixed)
    return 1 if failed else 0


def _doctor_table(checks: list[Any], fixed: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    for line in fixed:
        con.print(f"[cyan]fixed[/] {escape(line)}")
    table = Table(show_header=True, header_style="bold", expand=True, show_lines=False)
    table.add_column("", width=4, no_wrap=True)
    table.add_column("check", max_width=18, overflow="fold")
    table.add_column("found / fix", ratio=1, overflow="fold")
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        text = escape(c.detail)
        if c.fix and c.level != "ok":
            text += f"\n[bold]fix:[/] {escape(c.fix)}"
        table.add_row(marks[c.level], escape(c.title), text)
    con.print(table)
    bad = sum(c.level == "fail" for c in checks)
    warn = sum(c.level == "warn" for c in checks)
    con.print("[green]all checks passed[/]" if not bad and not warn else f"{bad} failed, {warn} warnings")


def cmd_logs(args: argparse.Namespace) -> int:
    """The broker's log: on the host its file; in the container the host's, over SSH."""
    from mp_ssh_bridge import brokerlog

    settings = _load_settings(args)
    if settings is None:
        return 2
    daemon = getattr(args, "daemon", False)
    if settings.resolved_role() == "container" and not daemon:
        if args.follow:
            return _follow_on_host(settings, args.lines)
        return _relay_on_host(settings, ["--logs", "--lines", str(args.lines)], settings.connect_timeout + 30,
                              "read the host's broker log")
    # --daemon: this container's daemon (its mode decision, its SSH connection, its sessions; in local-owner mode
    # its engine's lines too), read here: it lives in the container.
    log = settings.paths.daemon_paths().log if daemon else settings.paths.log
    text, where = brokerlog.tail_and_position(log, args.lines)
    print(text or f"(no log at {log})", flush=True)
    if args.follow:
        try:
            for line in brokerlog.follow(log, since=where):
                print(line, flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def _follow_on_host(settings: Any, lines: int) -> int:
    """`mp-bridge logs -f` in a container: the host's log, followed over SSH until Ctrl-C."""
    import asyncio

    from mp_ssh_bridge import ssh

    try:
        return asyncio.run(ssh.stream_on_host(settings, "--logs", "--lines", str(lines), "--follow", out=sys.stdout))
    except KeyboardInterrupt:
        return 0
    except ssh.SSHBridgeError as exc:
        print(f"mp-bridge: cannot follow the host's broker log over SSH (Host {settings.ssh_host}): {exc}",
              file=sys.stderr)
        return 1


def cmd_stop(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    if settings is None:
        return 2
    from mp_ssh_bridge.stopping import stop_broker

    paths = None
    if settings.resolved_role() == "container":
        if not _local_owner_daemon(settings):
            return _stop_over_ssh(settings, args.force, args.timeout)
        paths = settings.paths.daemon_paths()  # this container owns the palace: its daemon is the broker to stop
    result = stop_broker(settings, force=args.force, timeout=args.timeout, paths=paths)
    print(result.message, file=sys.stdout if result.code == 0 else sys.stderr)
    return result.code


def cmd_restart(args: argparse.Namespace) -> int:
    """Replace the running broker (after an upgrade): stop it gracefully — its running call finishes, its queued
    calls are answered "not executed" and each mp-shim sends them to the next broker — then start a new one."""
    settings = _load_settings(args)
    if settings is None:
        return 2
    if settings.resolved_role() == "container" and _local_owner_daemon(settings):
        return _restart_local_owner_daemon(settings, args.timeout)
    if settings.resolved_role() == "container":
        code = _stop_over_ssh(settings, False, args.timeout)
        if code != 0:
            return code
        from mp_ssh_bridge import ssh

        return _relay_on_host(settings, ssh.ensure_args(settings), settings.ensure_timeout + REMOTE_STOP_MARGIN,
                              "start the host's broker")
    from mp_ssh_bridge.election import EnsureError, ensure_broker
    from mp_ssh_bridge.stopping import read_record, stop_broker

    record, _ = read_record(settings.paths.json)
    manager = (record or {}).get("manager")
    if isinstance(manager, dict) and manager.get("restart"):
        print(f"mp-bridge restart: the broker runs under {manager.get('kind')} ({manager.get('unit')}); restart it "
              f"there: {manager['restart']}", file=sys.stderr)
        return 1
    result = stop_broker(settings, timeout=args.timeout)
    if result.code != 0:
        print(f"{result.message}; not restarted", file=sys.stderr)
        return result.code
    print(result.message)
    try:
        info = ensure_broker(settings)
    except EnsureError as exc:
        print(f"mp-bridge restart: the new broker did not start: {exc}", file=sys.stderr)
        return 1
    print(f"broker pid {info.get('pid')} (mp-ssh-bridge {info.get('version')}) serves {info.get('palace')}")
    return 0


def _restart_local_owner_daemon(settings: Any, timeout: float | None) -> int:
    """Container role, local-owner mode: stop this container's daemon gracefully, then elect and start a new one
    (it decides its mode again: with a way to the host now, it relays)."""
    from mp_ssh_bridge import daemon
    from mp_ssh_bridge.errors import ShimError
    from mp_ssh_bridge.stopping import stop_broker

    result = stop_broker(settings, timeout=timeout, paths=settings.paths.daemon_paths())
    if result.code != 0:
        print(f"{result.message}; not restarted", file=sys.stderr)
        return result.code
    print(result.message)
    try:
        daemon.connect(settings.session_config(), settings).close()
    except ShimError as exc:
        print(f"mp-bridge restart: the new container daemon did not start: {exc}", file=sys.stderr)
        return 1
    record = daemon.read_record(str(settings.state_dir)) or {}
    print(f"container daemon pid {record.get('pid')} ({record.get('mode')} mode) serves this container")
    return 0


def _local_owner_daemon(settings: Any) -> bool:
    """Container role: this container's daemon runs in local-owner mode (it, not the host's broker, holds the
    palace for this container; `stop` stops it, with the same proof as a host broker's)."""
    from mp_ssh_bridge import daemon

    record = daemon.read_record(str(settings.state_dir))
    return bool(record) and record.get("mode") == "local-owner" and daemon.alive(record)  # type: ignore[union-attr]


def _stop_over_ssh(settings: Any, force: bool, timeout: float | None) -> int:
    """Container role: run `mempalace-broker --stop` on the host (where the proof can be made); relay it."""
    words = ["--stop", *(["--force"] if force else []), *(["--timeout", f"{timeout:g}"] if timeout is not None else [])]
    bound = (settings.shutdown_grace + 5.0 if timeout is None else timeout) + REMOTE_STOP_MARGIN
    return _relay_on_host(settings, words, bound, "stop the host's broker")


def _relay_on_host(settings: Any, words: list[str], bound: float, what: str) -> int:
    """Container role: `mempalace-broker WORDS` on the host over SSH; its output and exit status are ours."""
    import asyncio

    from mp_ssh_bridge import ssh

    try:
        status, out, err = asyncio.run(ssh.run_on_host(settings, *words, bound=bound))
    except ssh.SSHBridgeError as exc:
        print(f"mp-bridge: cannot {what} over SSH (Host {settings.ssh_host}): {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


def cmd_run(args: argparse.Namespace) -> int:
    """`mp-bridge run -- CMD`: CMD as the palace's one owner (a grant; mp_ssh_bridge/grant.py)."""
    from mp_ssh_bridge.grant import run

    settings = _load_settings(args)
    if settings is None:
        return 2
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return run(settings, command, args.timeout)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _version() -> int:
    """`mp-bridge --version`: this bridge, and the engine (mempalace) its broker would run."""
    from mp_ssh_bridge import __version__, palace
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    settings = _load_settings()
    engine = "engine: not checked"
    if settings is not None:
        try:
            argv = resolve(settings.engine_argv)
            _, version = palace.engine_resolve(argv, None, dict(os.environ))
            engine = f"engine: mempalace {version} ({argv[0]})"
        except (EngineNotFound, palace.EngineResolveError, ValueError) as exc:  # ValueError: MP_BRIDGE_ENGINE empty
            engine = f"engine: not found ({exc})"
    print(f"mp-ssh-bridge {__version__}; {engine}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mp-bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="the bridge's version and the engine it would run")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--version"]:
        return _version()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--palace", help="the palace, as `mp-shim --palace` takes it (default: as the engine resolves it)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", parents=[common], help="show the broker, engine, clients")
    s.add_argument("--json", action="store_true", help="for scripts; never shows secrets")
    s.add_argument("--all", action="store_true", help="every broker this user runs (one per memory)")
    s.add_argument("--watch", action="store_true", help="refresh in place every second until Ctrl-C")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("doctor", parents=[common], help="check the set-up and say what is wrong (exit 1 on a failure)")
    d.add_argument("--json", action="store_true", help='{"ok": bool, "checks": [{"name", "status", "detail", "fix"}]}')
    d.add_argument("--fix", action="store_true", help="tighten modes, reclaim stale state, start a broker; says what it did")
    d.set_defaults(func=cmd_doctor)
    lg = sub.add_parser("logs", parents=[common], help="the broker's log (the host's, over SSH, in a container)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C (in a container: the host's, over SSH)")
    lg.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    lg.add_argument("--daemon", action="store_true", help="this container's daemon's log instead (relay or local owner)")
    lg.set_defaults(func=cmd_logs)
    st = sub.add_parser("stop", parents=[common], help="stop the broker (only a process proven to be it)")
    st.add_argument("--force", action="store_true", help="hung broker: SIGTERM, then SIGKILL it and its engine; clean up")
    st.add_argument(
        "--timeout", type=_positive_seconds, help="seconds to wait after SIGTERM (default shutdown_grace + 5; --force: 2)"
    )
    st.set_defaults(func=cmd_stop)
    rs = sub.add_parser("restart", parents=[common], help="replace the running broker (after an upgrade); no queued "
                        "call is lost")
    rs.add_argument("--timeout", type=_positive_seconds, help="seconds to wait for the old broker to drain and exit")
    rs.set_defaults(func=cmd_restart)
    ru = sub.add_parser("run", parents=[common], help="run CMD as the palace's only writer (mempalace mine, a hook, "
                        "cron): wait for the owner to hand over, run, release; exit status is CMD's. A grant cannot be "
                        "suspended (^Z is ignored): CMD keeps the palace until it exits")
    ru.add_argument("--timeout", type=_positive_seconds, help="seconds to wait for the palace (default owner_wait); "
                    "then exit 75 naming who holds it")
    ru.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS…")
    ru.set_defaults(func=cmd_run)
    from mp_ssh_bridge import migrate

    migrate.add_parser(sub, common)
    from mp_ssh_bridge import wiring

    wiring.add_parser(sub, common)
    from mp_ssh_bridge import service

    service.add_parser(sub, common)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `mp-bridge status --json | head`: the reader is gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
