"""`mp-bridge service install|uninstall|status`: keep one broker running under the user's service manager.

Why this exists: the static unit and plist we used to ship had to be edited by hand (`/Users/me`, a guessed
`~/.local/bin`, a palace the user may not have), and a wrong path there fails silently at login. Here the
job is written from the same settings model every other command uses: the absolute broker of this very
install, the state directory and palace this user's sessions resolve, a PATH that finds the engine.

What a service-managed broker is: the broker that wins the election early. The on-demand election stays the
default and is unchanged (the first `mp-shim` of a memory starts a broker, which exits when idle); a
service's broker takes broker.lock at login like any other and never exits for lack of clients
(`--idle-exit-minutes 0`). If another broker already serves the palace (one a session elected before the
service started, or one across a VM boundary), the service's broker exits with status 3
(`ALREADY_SERVED`), which is success, not a failure to retry:

- systemd: `SuccessExitStatus=3` and `RestartPreventExitStatus=3` with `Restart=on-failure` (2, unusable
  settings, is not retried either: restarting cannot fix a config file);
- launchd cannot name a successful status: `KeepAlive {SuccessfulExit: false}` restarts every non-zero
  exit, so exit 3 would restart-loop every ThrottleInterval. The job runs `mempalace-broker --service`,
  which exits 0 instead (broker/__main__.py). A flag, not a wrapper script: nothing else to install, and
  launchd still sees a real crash as one.

With `mp-bridge stop` (mp_ssh_bridge/stopping.py): the broker records its manager in broker.json
(hostinfo.service_manager), so `stop` and `restart` refuse and name the manager's own command
(`systemctl --user stop mempalace-broker.service`, `launchctl bootout gui/<uid>/com.mempalace.broker`).
`stop --force` stops it anyway: a broker that exits on SIGTERM exits 0, which neither manager restarts
(`Restart=on-failure`, `SuccessfulExit: false`), so it stays stopped until the next login or a start by
the manager, and the next session elects an on-demand broker; a broker that had to be SIGKILLed is a
failure, and the manager starts it again.

Logs: the broker logs to stderr; the job appends stdout and stderr to `broker.log` in the state directory
(systemd `StandardOutput=append:`, launchd `StandardOutPath`), the file an on-demand broker writes and
`mp-bridge logs` and `doctor` read; the broker rotates it itself (brokerlog.rotate_if_big: its fd 2 is that
file). `UMask=0077` / `Umask` keeps it owner-only, as doctor requires.

Interactive priority: every request is an agent waiting for its answer, so launchd `ProcessType Interactive`
(Background, and no ProcessType at all, lets launchd throttle CPU and I/O, and the engine inherits it) and
systemd `Nice=0`, `IOSchedulingClass=best-effort` (never idle).

The file: owner-only (0600, which both managers read), and without secrets: a variable named *_KEY, *_TOKEN,
*_SECRET or *_PASSWORD (the engine's API keys) is never carried; install names the ones it left out. Every file
install writes says MARKER; install keeps a file at that path without it (a hand-edited copy of configs/, as
older releases said to make) as `<file>.mp-bridge.bak`, never over an earlier backup, and uninstall refuses to
stop or remove it.

The generators (`systemd_unit`, `launchd_plist`) are pure: a `Spec` in, the file's text out; `spec_for`
gathers the inputs from the settings. configs/ holds examples written by `write_examples`, and
tests/test_service.py checks that they are the generator's output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import plistlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mp_ssh_bridge.protocol import ALREADY_SERVED, SETTINGS_ERROR  # the broker's exit codes (broker/__main__.py)

if TYPE_CHECKING:
    from mp_ssh_bridge.settings import Settings

PLATFORMS = ("linux", "macos")
UNIT_STEM = "mempalace-broker"  # systemd: mempalace-broker.service
LABEL = "com.mempalace.broker"  # launchd
BROKER_SCRIPT = "mempalace-broker"
MARKER = "Written by `mp-bridge service install`"  # in every file install writes: what uninstall may remove
BACKUP_SUFFIX = ".mp-bridge.bak"  # a file install found there without MARKER (a hand-edited copy of configs/)
# never written into the service file (it may be read by more than its owner's services): the engine's secrets
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
PALACE_PIN = "MEMPALACE_PALACE_PATH"  # read first by every supported engine version (palace.PALACE_ENV)
CONFIG_PIN = "MEMPALACE_CONFIG_DIR"
SYSTEM_PATH = {"linux": ("/usr/local/bin", "/usr/bin", "/bin"),
               "macos": ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")}
NOFILE = 10240  # launchd starts jobs with 256 open files; the broker holds one per session, chromadb many more
STOP_MARGIN = 10.0  # seconds on top of shutdown_grace before the manager SIGKILLs
COMMAND_TIMEOUT = 30.0  # one systemctl / launchctl call


# --------------------------------------------------------------------------- what the job says (pure)
@dataclass(frozen=True)
class Spec:
    """Everything a service file says, for either manager (`systemd_unit`, `launchd_plist` write it)."""

    key: str | None  # None: the default memory; else the palace's key (palace.Memory.key), one job per memory
    argv: tuple[str, ...]  # the broker and its flags, absolute
    environment: tuple[tuple[str, str], ...]  # PATH first
    state_dir: str
    palace: str
    log: str  # <state_dir>/broker.log: what `mp-bridge logs` and doctor read
    stop_timeout: int  # seconds from SIGTERM to SIGKILL

    @property
    def unit(self) -> str:
        return f"{UNIT_STEM}.service" if self.key is None else f"{UNIT_STEM}-{self.key}.service"

    @property
    def label(self) -> str:
        return LABEL if self.key is None else f"{LABEL}.{self.key}"

    def name(self, platform: str) -> str:
        """What the manager calls the job (the `unit` a broker it runs records in broker.json)."""
        return self.unit if platform == "linux" else self.label


def build_spec(*, broker: list[str], state_dir: str, palace: str, palace_flag: bool, path_dirs: list[str],
               carried: dict[str, str], config_dir: str | None, shutdown_grace: float, key: str | None,
               platform: str) -> Spec:
    """The job for a broker of one memory, from explicit inputs (no file system, no environment).

    broker: how to run `mempalace-broker` (absolute); carried: the variables of the installing environment the
    broker and its engine read (`carried_environment`); config_dir: pin the engine's config dir (an engine
    that reads MEMPALACE_CONFIG_DIR), else None. The palace is pinned (`--palace` when the user gives one,
    else MEMPALACE_PALACE_PATH, which leaves the knowledge graph where a plain engine keeps it), and so is the
    state directory (`--mempalace-path`, as an election passes it): the pair stays consistent even if the
    config later names another palace, whose sessions then elect their own broker in their own state
    directory; never a second writer of one palace under two state directories.
    """
    argv = [*broker, "--mempalace-path", state_dir]
    if palace_flag:
        argv += ["--palace", palace]
    argv += ["--idle-exit-minutes", "0"]  # a service never exits for lack of clients
    env: dict[str, str] = {"PATH": os.pathsep.join(_unique([*path_dirs, *SYSTEM_PATH[platform]]))}
    env.update(carried)
    if not palace_flag:
        env[PALACE_PIN] = palace
    if config_dir is not None:
        env[CONFIG_PIN] = config_dir
    return Spec(key, tuple(argv), tuple(env.items()), state_dir, palace, os.path.join(state_dir, "broker.log"),
                math.ceil(shutdown_grace + STOP_MARGIN))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _check_text(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"a control character in {value!r} cannot be written into a service file")
    return value


def systemd_quote(word: str, *, exec_line: bool = False) -> str:
    """One word for a systemd unit: `%` doubled (specifiers), `$` doubled on an Exec line (variables),
    double-quoted with C escapes when it holds a space, a quote or a backslash."""
    out = _check_text(word).replace("%", "%%")
    if exec_line:
        out = out.replace("$", "$$")
    if out and not any(c in out for c in " \t\"'\\;"):
        return out
    return '"' + out.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_path(path: str) -> str:
    """A path as the rest of a `StandardOutput=append:` line takes it: unquoted, specifiers escaped."""
    return _check_text(path).replace("%", "%%")


def systemd_unit(spec: Spec, banner: tuple[str, ...] = ()) -> str:
    """The systemd --user unit (text), for `~/.config/systemd/user/<spec.unit>`."""
    env_lines = [f"Environment={systemd_quote(f'{k}={v}')}" for k, v in spec.environment]
    lines = [
        *(f"# {line}".rstrip() for line in banner),
        f"# {MARKER} for the palace {spec.palace}.",
        "# Re-run it (or `mp-bridge service uninstall`) instead of editing: see mp_ssh_bridge/service.py.",
        "[Unit]",
        f"Description=MemPalace broker for {_systemd_path(spec.palace)} (mp-ssh-bridge)",
        "# a broker that keeps failing is left failed after 5 starts within a minute",
        "StartLimitIntervalSec=60",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(w, exec_line=True) for w in spec.argv),
        "WorkingDirectory=/",
        *env_lines,
        f"# {ALREADY_SERVED}: another broker already serves this palace (elected on demand first): done, not failed.",
        f"# {SETTINGS_ERROR}: unusable settings; a restart cannot fix them. Anything else non-zero is restarted.",
        f"SuccessExitStatus={ALREADY_SERVED}",
        "Restart=on-failure",
        f"RestartPreventExitStatus={SETTINGS_ERROR} {ALREADY_SERVED}",
        "RestartSec=2",
        "# SIGTERM to the broker alone: it lets the running request finish (shutdown_grace), then stops its engine",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={spec.stop_timeout}",
        "# where an on-demand broker logs too: `mp-bridge logs` and `mp-bridge doctor` read it",
        f"StandardOutput=append:{_systemd_path(spec.log)}",
        f"StandardError=append:{_systemd_path(spec.log)}",
        "UMask=0077",
        "# every request is an agent waiting: normal CPU and I/O priority, never the idle class",
        "Nice=0",
        "IOSchedulingClass=best-effort",
        "IOSchedulingPriority=4",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_job(spec: Spec) -> dict[str, Any]:
    """The launchd agent as a dictionary (what `launchd_plist` serializes)."""
    return {
        "Label": spec.label,
        # --service: "already served" exits 0, which KeepAlive {SuccessfulExit: false} does not restart
        "ProgramArguments": [*spec.argv, "--service"],
        "EnvironmentVariables": dict(spec.environment),
        "WorkingDirectory": "/",
        "Umask": 0o077,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": spec.stop_timeout,
        "ProcessType": "Interactive",
        "StandardOutPath": spec.log,
        "StandardErrorPath": spec.log,
        "SoftResourceLimits": {"NumberOfFiles": NOFILE},
        "HardResourceLimits": {"NumberOfFiles": NOFILE},
    }


def launchd_plist(spec: Spec, banner: tuple[str, ...] = ()) -> str:
    """The launchd agent (XML plist text), for `~/Library/LaunchAgents/<spec.label>.plist`."""
    job = launchd_job(spec)
    for value in (*job["ProgramArguments"], *job["EnvironmentVariables"].values(), spec.log):
        _check_text(value)
    text = plistlib.dumps(job, sort_keys=False).decode("utf-8")
    # an XML comment cannot hold "--": such a palace is named only where plistlib escapes it, in the job itself
    palace = spec.palace if "--" not in spec.palace else "its arguments or environment name (not repeated here)"
    note = [
        *banner,
        f"{MARKER} for the palace {palace}.",
        "Re-run it (or `mp-bridge service uninstall`) instead of editing: see mp_ssh_bridge/service.py.",
        "KeepAlive restarts only a non-zero exit; the broker's service flag makes",
        f"\"another broker already serves this palace\" exit 0 (not {ALREADY_SERVED}), so it never restart-loops.",
        "ProcessType Interactive: Background would throttle the broker's CPU and I/O, and its engine's.",
    ]
    comment = "<!--\n" + "".join(f"  {line}\n".replace("  \n", "\n") for line in note) + "-->\n"
    if "--" in comment[4:-4]:  # only a banner could (the palace is left out above)
        raise ValueError("an XML comment cannot hold '--'")
    head, sep, rest = text.partition("<plist ")
    return head + comment + sep + rest


def render(spec: Spec, platform: str, banner: tuple[str, ...] = ()) -> str:
    return systemd_unit(spec, banner) if platform == "linux" else launchd_plist(spec, banner)


# --------------------------------------------------------------------------- where, and what to run (pure)
def service_dir(platform: str, home: str, environ: dict[str, str]) -> Path:
    """systemd: `$XDG_CONFIG_HOME/systemd/user` (default ~/.config); launchd: `~/Library/LaunchAgents`."""
    if platform == "macos":
        return Path(home, "Library", "LaunchAgents")
    xdg = (environ.get("XDG_CONFIG_HOME") or "").strip()
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".config")  # a relative one is invalid per XDG
    return Path(base, "systemd", "user")


def service_file(spec: Spec, platform: str, home: str, environ: dict[str, str]) -> Path:
    return service_dir(platform, home, environ) / (spec.unit if platform == "linux" else f"{spec.label}.plist")


def enable_commands(spec: Spec, platform: str, path: Path, uid: int) -> list[list[str]]:
    if platform == "linux":
        return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", spec.unit]]
    return [["launchctl", "bootstrap", f"gui/{uid}", str(path)]]


def disable_commands(spec: Spec, platform: str, uid: int) -> list[list[str]]:
    if platform == "linux":
        return [["systemctl", "--user", "disable", "--now", spec.unit]]
    return [["launchctl", "bootout", f"gui/{uid}/{spec.label}"]]


def shell_line(commands: list[list[str]]) -> str:
    import shlex

    return " && ".join(shlex.join(c) for c in commands)


# --------------------------------------------------------------------------- the manager's view (parsers pure)
def parse_systemctl_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B` output (`A=x` lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def parse_launchctl_print(text: str) -> dict[str, str]:
    """The top-level `key = value` lines of `launchctl print gui/<uid>/<label>` (state, pid, last exit code)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t"):
            k, sep, v = line.strip().partition(" = ")
            if sep and k not in out:
                out[k] = v.strip()
    return out


def systemd_view(show: dict[str, str]) -> dict[str, Any]:
    """What systemd says of the unit, as `status` reports it."""
    pid = int(show.get("MainPID") or 0)
    active = show.get("ActiveState", "unknown")
    view: dict[str, Any] = {"loaded": show.get("LoadState") == "loaded", "enabled": show.get("UnitFileState"),
                            "state": f"{active} ({show.get('SubState', '?')})", "running": active == "active" and pid > 0,
                            "pid": pid or None}
    status = show.get("ExecMainStatus")
    if active != "active" and status and show.get("ExecMainCode") in ("1", "exited") and status.isdigit():
        view["last_exit"] = int(status)
    return view


def launchd_view(info: dict[str, str]) -> dict[str, Any]:
    pid = info.get("pid", "")
    view: dict[str, Any] = {"loaded": True, "state": info.get("state", "unknown"),
                            "running": info.get("state") == "running" and pid.isdigit(),
                            "pid": int(pid) if pid.isdigit() else None}
    code = info.get("last exit code", "")
    if code.lstrip("-").isdigit():
        view["last_exit"] = int(code)
    return view


def broker_view(record: dict[str, Any] | None, alive: bool, kind: str, name: str,
                manager_pid: int | None) -> dict[str, Any]:
    """Whether the broker broker.json names is the service's: it records its manager (hostinfo.service_manager)
    when the manager started it itself, and the manager's main pid agrees when the manager can be asked."""
    if record is None or not alive:
        return {"running": False, "pid": (record or {}).get("pid"), "service": False}
    manager = record.get("manager")
    ours = isinstance(manager, dict) and manager.get("kind") == kind and manager.get("unit") == name
    if manager_pid is not None and record.get("pid") != manager_pid:
        ours = False
    how = ("the service's" if ours else f"run by {manager.get('kind')} ({manager.get('unit')}), not this service"
           if isinstance(manager, dict) else "started on demand by a session, not by the service")
    return {"running": True, "pid": record.get("pid"), "service": ours, "how": how}


def describe_status(report: dict[str, Any]) -> list[str]:
    """`mp-bridge service status` for a person."""
    kind, name = report["manager_kind"], report["name"]
    lines = [f"service file: {report['file']} ({'installed' if report['installed'] else 'not installed'}"
             + (", up to date" if report.get("up_to_date") else ", differs from what `mp-bridge service install` "
                "would write now: run it again" if report["installed"] else "") + ")"]
    mgr = report["manager"]
    if mgr.get("unreachable"):
        lines.append(f"{kind}: cannot ask it ({mgr['unreachable']})")
    elif not mgr.get("loaded"):
        lines.append(f"{kind}: {name} is not loaded")
    else:
        text = f"{kind}: {name} {mgr.get('state')}"
        if mgr.get("enabled"):
            text += f", {mgr['enabled']}"
        if mgr.get("pid"):
            text += f", main pid {mgr['pid']}"
        if "last_exit" in mgr:
            code = mgr["last_exit"]
            text += f", last exit {code}" + (" (another broker already served the palace: success, not restarted)"
                                             if code == ALREADY_SERVED and kind == "systemd" else "")
        lines.append(text)
    b = report["broker"]
    if b["running"]:
        lines.append(f"broker: pid {b['pid']}, {b['how']} ({report['state_dir']})")
    else:
        lines.append(f"broker: none running for {report['state_dir']} (the next session elects one"
                     + (", or the service starts one)" if report["installed"] else ")"))
    return lines


# --------------------------------------------------------------------------- inputs from this install
def is_secret(name: str) -> bool:
    """A variable never written into a service file: an API key, token, secret or password
    (MEMPALACE_EMBEDDING_API_KEY, MEMPALACE_QDRANT_API_KEY, MEMPALACE_MILVUS_TOKEN, ...)."""
    return name.upper().endswith(SECRET_SUFFIXES)


def _broker_reads(environ: dict[str, str]) -> dict[str, str]:
    from mp_ssh_bridge import palace
    from mp_ssh_bridge.election import broker_environment

    own = {"PATH", "MEMPALACE_PATH", "MP_BRIDGE_PALACE", "MP_BRIDGE_IDLE_EXIT_MINUTES", CONFIG_PIN, *palace.PALACE_ENV}
    return {k: v for k, v in sorted(broker_environment(environ).items())
            if (k.startswith(("MP_BRIDGE_", "MEMPALACE_", "MEMPAL_")) or k == "XDG_CONFIG_HOME") and k not in own}


def carried_environment(environ: dict[str, str]) -> dict[str, str]:
    """The installing environment's variables a broker and its engine read (MP_BRIDGE_*, MEMPALACE_*,
    MEMPAL_*, XDG_CONFIG_HOME), minus every session and client variable (as an election passes them), minus
    what the job sets itself, minus secrets (`is_secret`: `withheld_secrets` names them for the user)."""
    return {k: v for k, v in _broker_reads(environ).items() if not is_secret(k)}


def withheld_secrets(environ: dict[str, str]) -> list[str]:
    """The variables `carried_environment` leaves out as secrets: the user sets them by hand, owner-only."""
    return [k for k in _broker_reads(environ) if is_secret(k)]


def secrets_note(names: list[str], spec: Spec, platform: str, path: Path) -> str:
    where = (f"an owner-only (chmod 600) file named by `EnvironmentFile=` in a drop-in such as "
             f"{path.parent / (spec.unit + '.d') / 'secrets.conf'} (it survives a re-install)" if platform == "linux"
             else f"the EnvironmentVariables of {path} by hand (it is owner-only; a re-install drops them again)")
    return f"not written into the service file (secrets): {', '.join(names)}; if the broker needs them, set them in {where}"


def broker_command(executable: str) -> list[str]:
    """This install's `mempalace-broker` beside its interpreter (never resolved: a venv's python is a link),
    else `python -m mp_ssh_bridge_broker`."""
    from mp_ssh_bridge.election import BROKER_MODULE

    script = os.path.join(os.path.dirname(os.path.abspath(executable)), BROKER_SCRIPT)
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [os.path.abspath(executable), "-m", BROKER_MODULE]


def spec_for(settings: Settings, platform: str, environ: dict[str, str] | None = None,
             executable: str | None = None) -> Spec:
    """The job for the memory `settings` resolve, run by this install."""
    from mp_ssh_bridge import enginecmd

    env = dict(os.environ if environ is None else environ)
    exe = executable or sys.executable
    memory = settings.memory
    dirs = [os.path.dirname(os.path.abspath(exe))]
    try:
        dirs.append(os.path.dirname(enginecmd.resolve(settings.engine_argv, env.get("PATH"))[0]))
    except (enginecmd.EngineNotFound, ValueError):
        pass  # the broker reports it to every request; doctor names it
    home = env.get("HOME") or os.path.expanduser("~")
    dirs.append(os.path.join(home, ".local", "bin"))
    spec = build_spec(
        broker=broker_command(exe), state_dir=str(settings.state_dir), palace=memory.palace,
        palace_flag=memory.palace_flag, path_dirs=dirs, carried=carried_environment(env),
        config_dir=memory.config_dir if settings.engine_rules().config_env else None,
        shutdown_grace=settings.shutdown_grace, key=None if settings.palace is None else memory.key(home),
        platform=platform,
    )
    _check_same_memory(spec, settings, home)
    return spec


def _check_same_memory(spec: Spec, settings: Settings, home: str) -> None:
    """The job's environment must resolve the memory this user's sessions resolve (else: ValueError)."""
    from mp_ssh_bridge import palace

    flag = spec.argv[spec.argv.index("--palace") + 1] if "--palace" in spec.argv else None
    theirs = palace.resolve(flag, {**dict(spec.environment), "HOME": home}, home, settings.engine_rules())
    why = palace.mismatch(settings.memory, theirs.as_dict())
    if why:
        raise ValueError(f"the service's broker would serve other files than your sessions: {why}")


def detect_platform(name: str | None = None) -> str:
    plat = name or sys.platform
    if plat == "darwin":
        return "macos"
    if plat.startswith("linux"):
        return "linux"
    raise ValueError(f"no service manager support on {plat}: give --platform linux or --platform macos")


# --------------------------------------------------------------------------- talking to the manager
def _run(argv: list[str]) -> tuple[int, str, str]:
    """(status, stdout, stderr); 127 when the program is not there."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]} not found"
    except (OSError, subprocess.SubprocessError) as exc:
        return 126, "", str(exc)
    return res.returncode, res.stdout, res.stderr


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def manager_unreachable(platform: str) -> str | None:
    """Why this user's manager cannot be asked (no `systemctl --user` bus, as in containers and CI; no
    launchctl off a Mac), or None when it can."""
    if platform == "linux":
        code, _, err = _run(["systemctl", "--user", "show-environment"])
        return None if code == 0 else f"systemctl --user: {_first_line(err)}"
    if sys.platform != "darwin":
        return f"launchd runs on macOS only (this is {sys.platform})"
    code, _, err = _run(["launchctl", "version"])
    return None if code != 127 else _first_line(err)


def manager_view(spec: Spec, platform: str) -> dict[str, Any]:
    why = manager_unreachable(platform)
    if why is not None:
        return {"unreachable": why, "loaded": False, "running": False, "pid": None}
    if platform == "linux":
        props = ["LoadState", "ActiveState", "SubState", "MainPID", "UnitFileState", "ExecMainStatus", "ExecMainCode"]
        code, out, err = _run(["systemctl", "--user", "show", spec.unit, *(f"-p{p}" for p in props)])
        if code != 0:
            return {"unreachable": f"systemctl --user show: {_first_line(err)}", "loaded": False, "running": False,
                    "pid": None}
        return systemd_view(parse_systemctl_show(out))
    code, out, _ = _run(["launchctl", "print", f"gui/{os.getuid()}/{spec.label}"])
    if code != 0:
        return {"loaded": False, "running": False, "pid": None}
    return launchd_view(parse_launchctl_print(out))


def _run_all(commands: list[list[str]], *, tolerate: bool = False) -> bool:
    ok = True
    for argv in commands:
        code, out, err = _run(argv)
        print(f"  $ {shell_line([argv])}" + ("" if code == 0 else f"  -> exit {code}: {_first_line(err or out)}"))
        if code != 0:
            ok = False
            if not tolerate:
                break
    return ok


# --------------------------------------------------------------------------- files
def _private_dirs(path: Path) -> None:
    """Create `path` and its missing parents owner-only (0700); existing ones are left as they are."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)  # whatever the umask says


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    """Owner-only: the job's environment may say more than a config file should (systemd --user and launchd
    read their user's 0600 files)."""
    from mp_ssh_bridge.state import write_text_atomic

    _private_dirs(path.parent)
    write_text_atomic(path, text, mode)


def _ours(path: Path) -> bool | None:
    """Whether the file at `path` was written by `mp-bridge service install` (MARKER); None: there is none.
    Bytes, not text: a file in another encoding is simply not ours (OSError for one that cannot be read)."""
    if not path.exists():
        return None
    return MARKER.encode() in path.read_bytes()


def _backup(path: Path) -> Path:
    """Copy `path` to `<path>.mp-bridge.bak`, owner-only, never over an existing backup (FileExistsError)."""
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    data = path.read_bytes()
    fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return backup


def _prepare_state(settings: Settings) -> None:
    """The state directory and an owner-only broker.log before the manager first opens it (systemd's
    `append:` fails in a missing directory; launchd would create the log with its own mode)."""
    from mp_ssh_bridge import state

    state.ensure_private_dir(settings.paths.root)
    fd = os.open(settings.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)


# --------------------------------------------------------------------------- the commands
def _context(args: argparse.Namespace) -> tuple[Settings, str, Spec, Path, str] | None:
    """Settings, platform, spec, service file, home; or None after printing what is wrong."""
    from mp_ssh_bridge.settings import config_file, load
    from mp_ssh_bridge.stopping import describe_settings_error

    try:
        settings = load(palace=getattr(args, "palace", None))
    except (ValueError, OSError, TypeError) as exc:
        hint = f"check the MP_BRIDGE_* / MEMPALACE_* environment and {config_file()}"
        print(f"mp-bridge: {describe_settings_error(exc, hint)}", file=sys.stderr)
        return None
    if settings.resolved_role() == "container":
        print("mp-bridge service: this is a container: its sessions use the host's broker, so run `mp-bridge "
              "service` on the host (or set MP_BRIDGE_ROLE=host if this machine runs its own broker)", file=sys.stderr)
        return None
    try:
        platform = args.platform or detect_platform()
        spec = spec_for(settings, platform)
    except ValueError as exc:
        print(f"mp-bridge service: {exc}", file=sys.stderr)
        return None
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return settings, platform, spec, service_file(spec, platform, home, dict(os.environ)), home


def cmd_install(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if ctx is None:
        return 2
    settings, platform, spec, path, _ = ctx
    try:
        text = render(spec, platform)
    except ValueError as exc:  # a control character in a path
        print(f"mp-bridge service: {exc}", file=sys.stderr)
        return 2
    withheld = withheld_secrets(dict(os.environ))
    note = secrets_note(withheld, spec, platform, path) if withheld else None
    if args.dry_run:
        print(f"# would write {path}" + (f"\n# {note}" if note else ""), file=sys.stderr)
        sys.stdout.write(text)
        return 0
    from mp_ssh_bridge.state import UnsafeDirectory

    backup = None
    try:
        ours = _ours(path)
        if ours is False:  # someone else's (a hand-edited copy of configs/, as older releases said): keep it
            try:
                backup = _backup(path)
            except FileExistsError:
                print(f"mp-bridge service: cannot install: {path} was not written by `mp-bridge service install` "
                      f"and {path.name}{BACKUP_SUFFIX} beside it already holds an earlier one: move one of them "
                      "away, then run it again", file=sys.stderr)
                return 1
        old = path.read_bytes() if ours else None
        _prepare_state(settings)
        _write(path, text)
    except (OSError, UnsafeDirectory) as exc:
        print(f"mp-bridge service: cannot install: {exc}", file=sys.stderr)
        return 1
    if backup is not None:
        print(f"{path} was not written by `mp-bridge service install`: kept as {backup}")
    print(f"{'unchanged' if old == text.encode() else 'wrote'} {path} (mode 600: owner-only)")
    if note:
        print(note)
    print(f"  runs:  {shell_line([list(spec.argv) + (['--service'] if platform == 'macos' else [])])}")
    print(f"  palace {spec.palace}; state directory {spec.state_dir}; log {spec.log} (`mp-bridge logs`)")
    commands = enable_commands(spec, platform, path, os.getuid())
    if not args.now:
        print(f"enable it with:\n  {shell_line(commands)}")
        return 0
    why = manager_unreachable(platform)
    if why is not None:
        print(f"not enabled: {why}\nenable it where the manager runs (a login session):\n  {shell_line(commands)}")
        return 0
    before = manager_view(spec, platform)
    if platform == "macos" and before.get("loaded"):
        _run_all(disable_commands(spec, platform, os.getuid()), tolerate=True)  # bootstrap refuses a loaded job
    print("enabling:")
    if not _run_all(commands):
        return 1
    if platform == "linux" and before.get("running") and old != text.encode():
        print(f"the running broker keeps its old settings until: systemctl --user restart {spec.unit}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if ctx is None:
        return 2
    _, platform, spec, path, _ = ctx
    commands = disable_commands(spec, platform, os.getuid())
    try:
        ours = _ours(path)
    except OSError as exc:
        print(f"mp-bridge service: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if ours is False:  # someone else's job under our name: neither stopped nor removed
        print(f"mp-bridge service: {path} was not written by `mp-bridge service install` (no \"{MARKER}\" line): "
              f"not removing it, nor stopping its job; if you no longer want it: {shell_line(commands)}, then "
              "remove the file yourself", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"would run: {shell_line(commands)}\nwould remove {path}")
        return 0
    why = manager_unreachable(platform)
    if why is None:
        print("stopping and disabling:")
        _run_all(commands, tolerate=True)  # not loaded, not enabled: nothing to undo
    elif ours:
        print(f"not stopped: {why}; if it runs, stop it where the manager runs: {shell_line(commands)}")
    try:
        if platform == "linux":  # what `systemctl enable` made, when systemctl could not undo it
            wants = path.parent / "default.target.wants" / spec.unit
            if wants.is_symlink():
                wants.unlink()
                print(f"removed {wants}")
        if not path.exists():
            print(f"nothing to remove: no {path}")
            return 0
        path.unlink()
    except OSError as exc:
        print(f"mp-bridge service: cannot remove {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"removed {path}")
    if platform == "linux" and why is None:
        _run_all([["systemctl", "--user", "daemon-reload"]])
    print("sessions elect a broker on demand again")
    return 0


def status_report(settings: Settings, platform: str, spec: Spec, path: Path) -> dict[str, Any]:
    from mp_ssh_bridge import liveness, state

    installed = path.is_file()
    try:
        up_to_date = installed and path.read_text(encoding="utf-8") == render(spec, platform)
    except (OSError, ValueError):
        up_to_date = False
    manager = manager_view(spec, platform)
    record = state.read_broker_json(settings.paths.json)
    alive = record is not None and liveness.same_machine(record) and liveness.pid_gone(record) is None
    kind = "systemd" if platform == "linux" else "launchd"
    return {"platform": platform, "manager_kind": kind, "name": spec.name(platform), "file": str(path),
            "installed": installed, "up_to_date": up_to_date, "manager": manager, "state_dir": spec.state_dir,
            "log": spec.log, "broker": broker_view(record, alive, kind, spec.name(platform),
                                                   manager.get("pid") if manager.get("running") else None)}


def cmd_status(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if ctx is None:
        return 2
    settings, platform, spec, path, _ = ctx
    report = status_report(settings, platform, spec, path)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(describe_status(report)))
    return 0 if report["installed"] else 1


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """`mp-bridge service install|uninstall|status`."""
    plat = argparse.ArgumentParser(add_help=False)
    plat.add_argument("--platform", choices=PLATFORMS, help="systemd (linux) or launchd (macos); default: this machine")
    s = subparsers.add_parser("service", help="keep a broker running under systemd --user or launchd (optional: "
                              "sessions start one on demand anyway)")
    sub = s.add_subparsers(dest="service_cmd", required=True)
    i = sub.add_parser("install", parents=[common, plat], help="write the unit / agent with this install's paths")
    i.add_argument("--now", action="store_true", help="also enable and start it (skipped, saying so, when the "
                   "manager cannot be reached)")
    i.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the file; write nothing")
    i.set_defaults(func=cmd_install)
    u = sub.add_parser("uninstall", parents=[common, plat], help="stop and disable it if possible, remove the file")
    u.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would be done")
    u.set_defaults(func=cmd_uninstall)
    st = sub.add_parser("status", parents=[common, plat], help="the file, the manager's view, and whether the "
                        "running broker is the service's (exit 1: not installed)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


# --------------------------------------------------------------------------- configs/ examples
EXAMPLE_BANNER = ("EXAMPLE, generated for a user `me` (tests/test_service.py keeps it equal to the generator).",
                  "Do not copy it: `mp-bridge service install` writes this with your real paths.", "")


def example_specs() -> dict[str, Spec]:
    """The inputs of configs/mempalace-broker.service and configs/com.mempalace.broker.plist."""
    out = {}
    for platform, home in (("linux", "/home/me"), ("macos", "/Users/me")):
        venv = f"{home}/.local/share/pipx/venvs/mp-ssh-bridge/bin"
        out[platform] = build_spec(
            broker=[f"{venv}/{BROKER_SCRIPT}"], state_dir=f"{home}/.mempalace",
            palace=f"{home}/.mempalace/palace", palace_flag=False, path_dirs=[venv, f"{home}/.local/bin"], carried={},
            config_dir=f"{home}/.mempalace", shutdown_grace=10.0, key=None, platform=platform)
    return out


EXAMPLE_FILES = {"linux": "mempalace-broker.service", "macos": "com.mempalace.broker.plist"}


def write_examples(directory: Path) -> list[Path]:
    written = []
    for platform, spec in example_specs().items():
        path = directory / EXAMPLE_FILES[platform]
        path.write_text(render(spec, platform, EXAMPLE_BANNER), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # python -m mp_ssh_bridge.service examples configs/
    if sys.argv[1:2] != ["examples"] or len(sys.argv) != 3:
        sys.exit("usage: python -m mp_ssh_bridge.service examples DIRECTORY")
    for p in write_examples(Path(sys.argv[2])):
        print(f"wrote {p}")
