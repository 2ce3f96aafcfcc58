"""A suite that could run on a Mac, and the macOS branches of the code run here.

CI runs on Linux only; macOS is not run in CI. Two things keep the suite from quietly depending on Linux:
- the rule (tests/platforms.py): no test, benchmark or script reads /proc or runs a Linux-only tool
  except through tests/platforms.py, which skips with a reason elsewhere. The scan below fails on a
  file that breaks it: any call given a path under /proc, or a command naming such a tool;
- every macOS branch is run here with its inputs substituted (the platform name; sysctl, ps and lsof
  output, or the real ps and lsof, which answer these questions on Linux too).
"""

from __future__ import annotations

import ast
import fcntl
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from mp_ssh_bridge import hostinfo
from tests.platforms import LINUX_ONLY_TOOLS

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "tests" / "platforms.py"
PROC = "/proc"


# --------------------------------------------------------------------------- the rule
def _literal_prefix(node: ast.AST) -> str | None:
    """The text a string argument starts with (an f-string's leading literal part), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _names_tool(text: str) -> str | None:
    for word in text.split():
        if os.path.basename(word) in LINUX_ONLY_TOOLS:
            return os.path.basename(word)
    return None


def violations(source: str) -> list[str]:
    """What in `source` reads /proc or runs a Linux-only tool: `line: why`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            items = arg.elts if isinstance(arg, (ast.List, ast.Tuple)) else [arg]
            for item in items:
                text = _literal_prefix(item)
                if text is None:
                    continue
                if text == PROC or text.startswith(PROC + "/"):
                    found.append(f"{node.lineno}: reads {text[:40]!r}")
                tool = _names_tool(text) if isinstance(item, ast.Constant) else None
                if tool:
                    found.append(f"{node.lineno}: runs {tool}")
    return found


def _scanned() -> list[Path]:
    files = [*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    return sorted(f for f in files if f not in (HELPER, Path(__file__).resolve()))  # the helper; this file's examples


def test_no_proc_reads_or_linux_tools_outside_the_helper() -> None:
    bad = [f"{f.relative_to(REPO)}:{v}" for f in _scanned() for v in violations(f.read_text())]
    assert bad == [], "read /proc and run Linux-only tools through tests/platforms.py (it skips elsewhere)"


def test_the_scan_sees_what_it_must() -> None:
    caught = violations("\n".join([
        f'open(f"{PROC}/{{pid}}/stat")',
        f'Path("{PROC}/cpuinfo").read_text()',
        f'os.listdir("{PROC}")',
        'subprocess.run(["runuser", "-u", "nobody", "true"])',
        'subprocess.run("sudo systemctl --user stop x", shell=True)',
        'subprocess.run(["bash", "scripts/install-sshd.sh"])',
    ]))
    assert len(caught) == 6, caught
    assert violations("\n".join([
        'assert unit["stop"] == "systemctl --user stop mp-bridge-broker.service"',  # an expected string
        f'"""a docstring about {PROC}/self/cgroup"""',
        'hostinfo.parse_service_manager({}, "0::/user.slice/app.slice/x.service", True)',
    ])) == []


# --------------------------------------------------------------------------- macOS branches, fed their inputs
def test_boot_id_on_macos_comes_from_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> Any:
        seen.append(argv)
        return SimpleNamespace(stdout="5A1F2E3D-0000-4000-8000-0123456789AB\n", returncode=0)

    monkeypatch.setattr(subprocess, "run", run)
    assert hostinfo._read_boot_id("darwin") == "5A1F2E3D-0000-4000-8000-0123456789AB"
    assert seen == [["/usr/sbin/sysctl", "-n", "kern.bootsessionuuid"]]

    def missing(argv: list[str], **kwargs: Any) -> Any:
        raise FileNotFoundError(argv[0])

    monkeypatch.setattr(subprocess, "run", missing)
    assert hostinfo._read_boot_id("darwin") is None


def test_process_facts_on_macos_come_from_ps() -> None:
    """The macOS branch asks `ps`, which answers the same questions on Linux: run it for real."""
    me = os.getpid()
    started = hostinfo.proc_start(me, "darwin")
    assert started and started == hostinfo.proc_start(me, "darwin") and len(started.split()) == 5
    assert hostinfo.parent_pid(me, "darwin") == os.getppid()
    assert hostinfo.is_zombie(me, "darwin") is False
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hostinfo.is_zombie(child.pid, "darwin") is True
    finally:
        child.wait()
    assert hostinfo.proc_start(child.pid, "darwin") is None, "gone: ps answers nothing"


def test_process_facts_on_macos_parse_what_ps_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"lstart": "Thu Nov  7 02:04:03 2025\n", "ppid": "    1\n", "stat": "Z+\n"}
    monkeypatch.setattr(hostinfo, "_ps", lambda pid, column: answers[column])
    assert hostinfo.proc_start(42, "darwin") == "Thu Nov 7 02:04:03 2025"
    assert hostinfo.parent_pid(42, "darwin") == 1
    assert hostinfo.is_zombie(42, "darwin")
    monkeypatch.setattr(hostinfo, "_ps", lambda pid, column: None)
    assert hostinfo.proc_start(42, "darwin") is None and hostinfo.parent_pid(42, "darwin") is None


def test_launchd_is_named_as_the_service_manager() -> None:
    found = hostinfo.parse_service_manager({"XPC_SERVICE_NAME": "com.mempalace.broker"}, None, True)
    assert found == {"kind": "launchd", "unit": "com.mempalace.broker",
                     "stop": f"launchctl bootout gui/{os.getuid()}/com.mempalace.broker",
                     "restart": f"launchctl kickstart -k gui/{os.getuid()}/com.mempalace.broker"}
    assert hostinfo.parse_service_manager({"XPC_SERVICE_NAME": "0"}, None, True) is None, "a Terminal, not a job"
    # an editor's label, inherited by a broker it started on demand (never a session leader): not a manager
    assert hostinfo.parse_service_manager({"XPC_SERVICE_NAME": "application.com.microsoft.VSCode.1234.1240"},
                                          None, False) is None


def test_holders_on_macos_come_from_lsof(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mp_ssh_bridge import holders

    palace = tmp_path / "palace"
    palace.mkdir()
    db = palace / "chroma.sqlite3"
    db.write_bytes(b"")
    outputs = {"lsof": f"p4242\ncmempalace-mcp\nf7\nau\nn{db}\n"}

    def run(argv: list[str], **kwargs: Any) -> Any:
        assert argv[:5] == ["lsof", "-n", "-P", "-F", "pcfan"] and str(db) in argv
        return SimpleNamespace(stdout=outputs["lsof"], returncode=0)

    monkeypatch.setattr(subprocess, "run", run)
    found, note = holders.holders(str(palace), str(tmp_path / "kg.sqlite3"), platform="darwin")
    assert found == [holders.Holder(4242, "mempalace-mcp", str(db))] and note == ""
    held, by = holders.lock_holders(str(db), platform="darwin")
    assert held is False and [h.pid for h in by] == [4242]  # open, not flock'ed: free (the kernel decides)
    fd = os.open(db, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held, by = holders.lock_holders(str(db), platform="darwin")
        assert held is True and [h.pid for h in by] == [4242]
    finally:
        os.close(fd)

    def no_lsof(argv: list[str], **kwargs: Any) -> Any:
        raise FileNotFoundError("lsof")

    monkeypatch.setattr(subprocess, "run", no_lsof)
    found, note = holders.holders(str(palace), str(tmp_path / "kg.sqlite3"), platform="darwin")
    assert found is None and "lsof" in note

