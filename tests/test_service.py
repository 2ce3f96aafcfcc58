"""`mp-bridge service`: the systemd unit and launchd agent are written from the settings, with real paths.

The unit is checked by systemd itself (`systemd-analyze verify`, installed by scripts/setup-tests.sh), the plist
by plistlib and its keys; install/uninstall run as a person runs them, into a temporary HOME, for both platforms
(the manager unreachable, as in CI: `--now` must skip and say so); and "another broker already serves this
palace" is shown to be success for both managers, with a real broker in the way.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mp_ssh_bridge import election, protocol, service
from mp_ssh_bridge.settings import load
from tests.conftest import BIN, REPO, BrokerHandle

FAKE = f"{sys.executable} {Path(__file__).parent / 'fake_engine.py'}"
# No user manager reachable, whatever machine runs the tests: `systemctl --user` must never touch a real one.
NO_BUS = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus", "XDG_RUNTIME_DIR": "/nonexistent"}


def bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **NO_BUS, **(env or {}))
    return subprocess.run([str(BIN / "mp-bridge"), *args], capture_output=True, text=True, timeout=120, env=full)


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing: run scripts/setup-tests.sh (installs Debian's systemd package)")
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- the generated files
def test_the_unit_is_valid_for_systemd_and_says_what_the_issue_asks(home: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_BRIDGE_ENGINE", FAKE)  # a value with a space: carried, quoted
    settings = load()
    spec = service.spec_for(settings, "linux")
    text = service.systemd_unit(spec)
    unit = tmp_path / spec.unit
    unit.write_text(text)
    res = verify(unit)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    broken = tmp_path / "broken" / spec.unit  # the check is real: systemd does complain about a bad value
    broken.parent.mkdir()
    broken.write_text(text.replace("IOSchedulingClass=best-effort", "IOSchedulingClass=bogus"))
    assert "IO scheduling class" in verify(broken).stderr

    lines = unit_lines(text)
    exec_start = next(line for line in lines if line.startswith("ExecStart="))[len("ExecStart="):].split(" ")
    assert exec_start[0] == str(BIN / "mempalace-broker") and os.access(exec_start[0], os.X_OK)
    assert exec_start[1:] == ["--mempalace-path", str(settings.state_dir), "--idle-exit-minutes", "0"]
    for want in ("SuccessExitStatus=3", "Restart=on-failure", "RestartPreventExitStatus=2 3", "KillMode=mixed",
                 "Nice=0", "IOSchedulingClass=best-effort", "UMask=0077", "WantedBy=default.target",
                 f"StandardOutput=append:{settings.paths.log}", f"StandardError=append:{settings.paths.log}"):
        assert want in lines
    env = dict(line[len("Environment="):].strip('"').split("=", 1) for line in lines if line.startswith("Environment="))
    assert env["PATH"].split(":")[0] == str(BIN)
    assert env["MEMPALACE_PALACE_PATH"] == str(settings.palace_path)
    assert env["MP_BRIDGE_ENGINE"] == FAKE and f'"MP_BRIDGE_ENGINE={FAKE}"' in text
    assert "MP_BRIDGE_ROLE" not in env and "MEMPALACE_PATH" not in env  # a client variable; a flag instead
    assert settings.paths.log == settings.state_dir / "broker.log"  # the file `mp-bridge logs` and doctor read


def test_the_launchd_agent_is_interactive_and_never_restart_loops(home: Path) -> None:
    settings = load()
    job = plistlib.loads(service.launchd_plist(service.spec_for(settings, "macos")).encode())
    program = job["ProgramArguments"]
    assert os.path.isabs(program[0]) and os.access(program[0], os.X_OK), program
    assert program[1:] == ["--mempalace-path", str(settings.state_dir), "--idle-exit-minutes", "0", "--service"]
    assert job["Label"] == "com.mempalace.broker" and job["RunAtLoad"] is True
    assert job["ProcessType"] == "Interactive"
    assert job["KeepAlive"] == {"SuccessfulExit": False}, "only a non-zero exit restarts; --service makes 3 a 0"
    assert job["StandardOutPath"] == job["StandardErrorPath"] == str(settings.paths.log)
    assert job["Umask"] == 0o077 and job["ExitTimeOut"] >= settings.shutdown_grace
    assert job["EnvironmentVariables"]["PATH"].split(":")[0] == str(BIN)
    assert job["EnvironmentVariables"]["MEMPALACE_PALACE_PATH"] == str(settings.palace_path)
    assert job["SoftResourceLimits"]["NumberOfFiles"] >= 4096


def test_the_broker_falls_back_to_the_module_and_words_are_quoted(tmp_path: Path) -> None:
    lonely = tmp_path / "python3"  # an interpreter with no mempalace-broker beside it
    lonely.touch()
    assert service.broker_command(str(lonely)) == [str(lonely), "-m", "mp_ssh_bridge_broker"]
    assert service.broker_command(str(BIN / "python")) == [str(BIN / "mempalace-broker")]
    assert service.systemd_quote("/a b/%h$X", exec_line=True) == '"/a b/%%h$$X"'
    assert service.systemd_quote('K=say "hi"') == '"K=say \\"hi\\""'
    assert service.systemd_quote("plain") == "plain"
    with pytest.raises(ValueError, match="control character"):
        service.systemd_quote("two\nlines")


def test_configs_hold_the_generators_own_examples() -> None:
    """One source of truth: the files in configs/ are the generator's output (regenerate them with
    `python -m mp_ssh_bridge.service examples configs/`)."""
    for platform, spec in service.example_specs().items():
        shipped = (REPO / "configs" / service.EXAMPLE_FILES[platform]).read_text()
        assert shipped == service.render(spec, platform, service.EXAMPLE_BANNER), platform
    job = plistlib.loads((REPO / "configs" / "com.mempalace.broker.plist").read_bytes())
    assert job["ProgramArguments"][-1] == "--service" and job["ProcessType"] == "Interactive"


def test_a_palace_flag_gets_its_own_job_and_the_palace_as_a_flag(home: Path, tmp_path: Path) -> None:
    palace = tmp_path / "elsewhere"
    settings = load(palace=str(palace))
    spec = service.spec_for(settings, "linux")
    assert spec.key == settings.memory.key(str(home)) and spec.unit == f"mempalace-broker-{spec.key}.service"
    assert spec.label == f"com.mempalace.broker.{spec.key}"
    assert spec.argv[spec.argv.index("--palace") + 1] == str(palace)
    assert "MEMPALACE_PALACE_PATH" not in dict(spec.environment), "--palace, not the variable: the KG follows it"


# --------------------------------------------------------------------------- the manager's view (parsers)
def test_what_systemd_and_launchd_say_is_read() -> None:
    show = service.parse_systemctl_show("LoadState=loaded\nActiveState=inactive\nSubState=dead\nMainPID=0\n"
                                        "UnitFileState=enabled\nExecMainStatus=3\nExecMainCode=1\n")
    view = service.systemd_view(show)
    assert view == {"loaded": True, "enabled": "enabled", "state": "inactive (dead)", "running": False, "pid": None,
                    "last_exit": 3}
    running = service.systemd_view(service.parse_systemctl_show("LoadState=loaded\nActiveState=active\n"
                                                                "SubState=running\nMainPID=42\nExecMainStatus=0\n"))
    assert running["running"] and running["pid"] == 42 and "last_exit" not in running
    printed = ("gui/501/com.mempalace.broker = {\n\tactive count = 1\n\tstate = running\n\tpid = 777\n"
               "\tlast exit code = 0\n\tenvironment = {\n\t\tpid = 1\n\t}\n}\n")
    assert service.launchd_view(service.parse_launchctl_print(printed)) == {
        "loaded": True, "state": "running", "running": True, "pid": 777, "last_exit": 0}


def test_whose_broker_broker_json_names() -> None:
    mine = {"pid": 42, "manager": {"kind": "systemd", "unit": "mempalace-broker.service"}}
    assert service.broker_view(mine, True, "systemd", "mempalace-broker.service", 42)["service"]
    assert service.broker_view(mine, True, "systemd", "mempalace-broker.service", None)["service"]
    assert not service.broker_view(mine, True, "systemd", "mempalace-broker.service", 43)["service"]
    other = service.broker_view(mine, True, "systemd", "mempalace-broker-x.service", None)
    assert not other["service"] and "not this service" in other["how"]
    elected = service.broker_view({"pid": 7}, True, "launchd", "com.mempalace.broker", None)
    assert not elected["service"] and "on demand" in elected["how"]
    assert service.broker_view({"pid": 7}, False, "launchd", "com.mempalace.broker", None)["running"] is False
    report = {"manager_kind": "systemd", "name": "mempalace-broker.service", "file": "/f", "installed": True,
              "up_to_date": True, "state_dir": "/s", "manager": service.systemd_view(service.parse_systemctl_show(
                  "LoadState=loaded\nActiveState=inactive\nSubState=dead\nExecMainStatus=3\nExecMainCode=1\n")),
              "broker": elected}
    text = "\n".join(service.describe_status(report))
    assert "last exit 3 (another broker already served the palace" in text and "pid 7, started on demand" in text


# --------------------------------------------------------------------------- install / status / uninstall
def test_install_status_uninstall_round_trip_with_systemd(home: Path, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    env = {"XDG_CONFIG_HOME": str(xdg)}
    unit = xdg / "systemd" / "user" / "mempalace-broker.service"
    dry = bridge("service", "install", "--platform", "linux", "--dry-run", env=env)
    assert dry.returncode == 0 and f"would write {unit}" in dry.stderr and not unit.exists()
    res = bridge("service", "install", "--platform", "linux", "--now", env=env)
    assert res.returncode == 0, res.stderr
    assert f"wrote {unit} (mode 600: owner-only)" in res.stdout
    assert "not enabled: systemctl --user:" in res.stdout, "no user manager here: skipped, saying why"
    assert "systemctl --user daemon-reload && systemctl --user enable --now mempalace-broker.service" in res.stdout
    assert unit.read_text() == dry.stdout
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600, "owner-only: the job's environment is the user's"
    for d in (xdg, xdg / "systemd", xdg / "systemd" / "user"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    log = home / ".mempalace" / "broker.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600, "owner-only before systemd's append: opens it"
    status = bridge("service", "status", "--platform", "linux", env=env)
    assert status.returncode == 0, status.stderr
    assert f"service file: {unit} (installed, up to date)" in status.stdout
    assert "systemd: cannot ask it (systemctl --user:" in status.stdout
    assert f"broker: none running for {home / '.mempalace'}" in status.stdout
    (unit.parent / "default.target.wants").mkdir()
    (unit.parent / "default.target.wants" / unit.name).symlink_to(unit)  # as `systemctl enable` leaves it
    gone = bridge("service", "uninstall", "--platform", "linux", env=env)
    assert gone.returncode == 0 and f"removed {unit}" in gone.stdout and not unit.exists()
    assert not (unit.parent / "default.target.wants" / unit.name).is_symlink()
    after = bridge("service", "status", "--platform", "linux", "--json", env=env)
    assert after.returncode == 1 and json.loads(after.stdout)["installed"] is False
    again = bridge("service", "uninstall", "--platform", "linux", env=env)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_install_status_uninstall_round_trip_with_launchd(home: Path, tmp_path: Path) -> None:
    palace = str(tmp_path / "p")  # its own job name: never the label of a real agent on a Mac running this
    settings = load(palace=palace)
    label = f"com.mempalace.broker.{settings.memory.key(str(home))}"
    plist = home / "Library" / "LaunchAgents" / f"{label}.plist"
    res = bridge("service", "install", "--platform", "macos", "--palace", palace)
    assert res.returncode == 0 and f"wrote {plist}" in res.stdout, res.stderr
    assert f"launchctl bootstrap gui/{os.getuid()} {plist}" in res.stdout
    job = plistlib.loads(plist.read_bytes())
    assert job["Label"] == label and "--palace" in job["ProgramArguments"] and os.access(job["ProgramArguments"][0], os.X_OK)
    assert job["StandardErrorPath"] == str(settings.paths.log) and (home / "Library").stat().st_mode & 0o077 == 0
    status = bridge("service", "status", "--platform", "macos", "--palace", palace, "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["installed"] and report["up_to_date"] and report["name"] == label
    if sys.platform != "darwin":
        assert report["manager"]["unreachable"].startswith("launchd runs on macOS only")
    gone = bridge("service", "uninstall", "--platform", "macos", "--palace", palace)
    assert gone.returncode == 0 and f"removed {plist}" in gone.stdout and not plist.exists()


# --------------------------------------------------------------------------- "already served" is success
def test_already_served_is_success_for_both_managers(home: Path, broker_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker a session elected serves the palace; the service's broker then starts: under systemd it exits 3,
    which the unit lists in SuccessExitStatus; the launchd job's own command line exits 0."""
    monkeypatch.setenv("MP_BRIDGE_ENGINE", FAKE)
    elected: BrokerHandle = broker_factory()
    settings = load()
    for platform, want in (("linux", service.ALREADY_SERVED), ("macos", 0)):
        spec = service.spec_for(settings, platform)
        argv = service.launchd_job(spec)["ProgramArguments"] if platform == "macos" else list(spec.argv)
        run = subprocess.run(argv, env={"HOME": str(home), **dict(spec.environment)}, capture_output=True,
                             text=True, timeout=60, cwd="/")
        assert run.returncode == want, (platform, run.stderr)
        assert f"already serves {settings.state_dir}" in run.stderr and f"(status {want})" in run.stderr
    assert f"SuccessExitStatus={service.ALREADY_SERVED}" in service.systemd_unit(service.spec_for(settings, "linux"))
    assert elected.proc.poll() is None, "the elected broker keeps serving"
    status = bridge("service", "status", "--platform", "linux", "--json")
    report = json.loads(status.stdout)
    assert report["broker"] == {"running": True, "pid": elected.proc.pid, "service": False,
                                "how": "started on demand by a session, not by the service"}


# --------------------------------------------------------------------------- secrets, other people's files, errors
SECRETS = {"MEMPALACE_EMBEDDING_API_KEY": "sk-embed", "MEMPALACE_QDRANT_API_KEY": "qd-key",
           "MEMPALACE_MILVUS_TOKEN": "mv-token", "MEMPALACE_MCP_HTTP_TOKEN": "http-token",
           "MEMPAL_DB_PASSWORD": "pw", "MP_BRIDGE_SOME_SECRET": "s3"}


def test_secrets_are_never_carried_and_the_file_is_owner_only(home: Path, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "MEMPALACE_EMBEDDING_MODEL": "all-MiniLM", **SECRETS}
    carried = service.carried_environment(env)
    assert carried == {"MEMPALACE_EMBEDDING_MODEL": "all-MiniLM", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert service.withheld_secrets(env) == sorted(SECRETS)
    unit = tmp_path / "xdg" / "systemd" / "user" / "mempalace-broker.service"
    res = bridge("service", "install", "--platform", "linux", env=env)
    assert res.returncode == 0, res.stderr
    text = unit.read_text()
    assert "MEMPALACE_EMBEDDING_MODEL=all-MiniLM" in text
    for name, value in SECRETS.items():
        assert name not in text and value not in text, name
    assert f"not written into the service file (secrets): {', '.join(sorted(SECRETS))}" in res.stdout
    assert f"EnvironmentFile=` in a drop-in such as {unit}.d/secrets.conf" in res.stdout
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600
    dry = bridge("service", "install", "--platform", "linux", "--dry-run", env=env)
    assert "MEMPALACE_MILVUS_TOKEN" in dry.stderr and "mv-token" not in dry.stdout + dry.stderr
    plist_env = {**env, "HOME": str(home)}
    mac = bridge("service", "install", "--platform", "macos", "--palace", str(tmp_path / "p"), env=plist_env)
    assert mac.returncode == 0, mac.stderr
    plist = next((home / "Library" / "LaunchAgents").glob("*.plist"))
    assert stat.S_IMODE(plist.stat().st_mode) == 0o600
    assert not set(SECRETS) & set(plistlib.loads(plist.read_bytes())["EnvironmentVariables"])
    assert f"the EnvironmentVariables of {plist} by hand" in mac.stdout


def test_a_hand_written_file_is_kept_and_never_removed(home: Path, tmp_path: Path) -> None:
    """Older releases said to copy configs/mempalace-broker.service there and edit it: install keeps such a file
    as <file>.mp-bridge.bak (never over an earlier backup), uninstall refuses to remove it."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    unit = tmp_path / "xdg" / "systemd" / "user" / "mempalace-broker.service"
    backup = unit.with_name(unit.name + ".mp-bridge.bak")
    unit.parent.mkdir(parents=True)
    mine = "[Service]\nExecStart=/Users/me/bin/mempalace-broker\n"
    unit.write_text(mine)
    refused = bridge("service", "uninstall", "--platform", "linux", env=env)
    assert refused.returncode == 1 and "was not written by `mp-bridge service install`" in refused.stderr
    assert "Traceback" not in refused.stderr and unit.read_text() == mine, "neither removed nor changed"
    res = bridge("service", "install", "--platform", "linux", env=env)
    assert res.returncode == 0, res.stderr
    assert f"{unit} was not written by `mp-bridge service install`: kept as {backup}" in res.stdout
    assert backup.read_text() == mine and stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert service.MARKER in unit.read_text()
    again = bridge("service", "install", "--platform", "linux", env=env)  # its own file now: no second backup
    assert again.returncode == 0 and f"unchanged {unit}" in again.stdout and "kept as" not in again.stdout
    unit.write_text("# edited again by hand\n")
    clash = bridge("service", "install", "--platform", "linux", env=env)
    assert clash.returncode == 1 and "already holds an earlier one" in clash.stderr, clash.stderr
    assert backup.read_text() == mine and unit.read_text() == "# edited again by hand\n", "nothing overwritten"
    backup.unlink()
    unit.write_bytes(b"# \xff\xfe not UTF-8\n")  # no traceback: someone else's file, kept like any other
    latin = bridge("service", "install", "--platform", "linux", env=env)
    assert latin.returncode == 0 and "Traceback" not in latin.stderr, latin.stderr
    assert backup.read_bytes() == b"# \xff\xfe not UTF-8\n" and service.MARKER in unit.read_text()
    unit.write_bytes(b"\xff\xfe")
    odd = bridge("service", "uninstall", "--platform", "linux", env=env)
    assert odd.returncode == 1 and "not removing it" in odd.stderr and "Traceback" not in odd.stderr
    assert unit.exists()


def test_uninstall_reports_a_file_it_cannot_remove(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(service, "manager_unreachable", lambda platform: "no manager in this test")
    args = argparse.Namespace(platform="linux", palace=None, dry_run=False, now=False)
    assert service.cmd_install(args) == 0
    unit = tmp_path / "xdg" / "systemd" / "user" / "mempalace-broker.service"
    wants = unit.parent / "default.target.wants" / unit.name
    wants.parent.mkdir()
    wants.symlink_to(unit)
    real_unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:
        if self == wants:
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    capsys.readouterr()
    assert service.cmd_uninstall(args) == 1
    err = capsys.readouterr().err
    assert f"cannot remove {wants}: Permission denied" in err
    assert unit.exists() and wants.is_symlink()


def test_a_palace_with_two_dashes_is_installed_for_launchd(home: Path, tmp_path: Path) -> None:
    """`--` cannot be in an XML comment: the palace is then named only in the job itself, escaped by plistlib."""
    for flag in (False, True):
        spec = service.build_spec(broker=["/b/mempalace-broker"], state_dir="/tmp/x/state", palace="/tmp/x/mem--old",
                                  palace_flag=flag, path_dirs=["/b"], carried={}, config_dir=None, shutdown_grace=10.0,
                                  key="k" if flag else None, platform="macos")
        text = service.launchd_plist(spec)
        job = plistlib.loads(text.encode())
        where = job["ProgramArguments"] if flag else list(job["EnvironmentVariables"].values())
        assert "/tmp/x/mem--old" in where
        comment = text[text.index("<!--") + 4:text.index("-->")]
        assert "--" not in comment and service.MARKER in comment
    palace = tmp_path / "mem--old"
    res = bridge("service", "install", "--platform", "macos", "--palace", str(palace))
    assert res.returncode == 0, res.stderr
    plist = next((home / "Library" / "LaunchAgents").glob("*.plist"))
    assert str(palace) in plistlib.loads(plist.read_bytes())["ProgramArguments"]
    gone = bridge("service", "uninstall", "--platform", "macos", "--palace", str(palace))
    assert gone.returncode == 0 and not plist.exists(), gone.stderr


def test_the_exit_codes_and_the_broker_module_have_one_definition() -> None:
    """service.py names the broker's exit statuses and module; they are defined once, in core."""
    import ast

    from mp_ssh_bridge_broker import __main__ as broker_main

    assert (service.ALREADY_SERVED, service.SETTINGS_ERROR) == (protocol.ALREADY_SERVED, protocol.SETTINGS_ERROR)
    assert (broker_main.ALREADY_SERVED, broker_main.SETTINGS_ERROR) == (3, 2)
    for module in (service, broker_main):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert not assigned & {"ALREADY_SERVED", "SETTINGS_ERROR", "BROKER_MODULE"}, module.__name__
    lonely = Path("/nonexistent/python3")
    assert service.broker_command(str(lonely)) == [str(lonely), "-m", election.BROKER_MODULE]
    bad = subprocess.run([str(BIN / "mempalace-broker"), "--container-daemon", "--ensure"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == protocol.SETTINGS_ERROR, bad.stderr
