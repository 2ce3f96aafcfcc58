"""What the tests need that only Linux has, in one place; elsewhere the test is skipped and says why.

The broker's usual host is a Mac, and the suite must be able to run there although CI runs on
Linux only. So tests and benchmarks never read /proc and never run a Linux-only tool (runuser,
systemctl, apt-get, prlimit, scripts/install-sshd.sh) themselves: they call a function here,
which skips the test with the reason on any other OS. Processes are looked at with psutil, which
works on both. tests/test_portable.py fails when a file other than this one breaks the rule.

The macOS branches of the code are tested on Linux the other way round: by giving them their
inputs (sysctl and ps output, the platform name), never by needing a Mac.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest

LINUX = sys.platform.startswith("linux")
# Programs only Linux has (or only Debian-style systems install this way); see tests/test_portable.py.
LINUX_ONLY_TOOLS = frozenset({"runuser", "systemctl", "apt-get", "prlimit", "install-sshd.sh", "setpriv",
                              "nsenter", "unshare"})


# util-linux's runuser: run a command as another user (the permission cases of the reliability suite).
RUNUSER = shutil.which("runuser") if LINUX else None


def require_linux(what: str) -> None:
    """Skip the calling test unless this is Linux; `what` says what needs Linux."""
    if not LINUX:
        pytest.skip(f"{what} needs Linux (this is {sys.platform}); the parsers of it run everywhere")


def proc_stat_text(pid: int) -> str:
    """The raw `/proc/<pid>/stat` line, to hold the Linux parsers against the real thing."""
    require_linux("/proc/<pid>/stat")
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        return fh.read()


def pid_namespace_link() -> str:
    """`readlink /proc/self/ns/pid` (`pid:[4026531836]`), to hold the Linux parser against the real thing."""
    require_linux("/proc/self/ns/pid")
    return os.readlink("/proc/self/ns/pid")


def thread_run_seconds(pid: int) -> float | None:
    """CPU seconds of every live thread of `pid` by the scheduler's own nanosecond clock (Linux:
    `se.sum_exec_runtime` in /proc/<pid>/task/<tid>/sched), or None where that is not readable (another OS, a
    kernel without it, a process gone): the caller falls back to psutil's coarser user + system time."""
    if not LINUX:
        return None
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/sched", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue  # a thread that ended meanwhile
        for line in text.splitlines():
            if line.startswith("se.sum_exec_runtime"):
                total += float(line.split(":", 1)[1]) / 1000  # milliseconds
                break
        else:
            return None
    return total


def cpu_model() -> str:
    """The CPU's model name for a benchmark's report (Linux /proc/cpuinfo, macOS sysctl), or the machine type."""
    if LINUX:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["/usr/sbin/sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=2, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out
    return platform.processor() or platform.machine()


def other_kernel_argv(argv: list[str], private_dirs: list[str]) -> list[str]:
    """`argv` run as the container side of a VM boundary would see this machine: in its own mount
    namespace, with an empty tmpfs over each of `private_dirs` (this machine's runtime directory,
    where the host broker's socket stand-in lives: a socket that cannot be reached through the mount).
    Needs Linux and root (unshare -m); elsewhere the test is skipped."""
    require_linux("a private mount namespace (unshare -m) standing in for the container side")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("unshare -m needs root and util-linux here")
    mounts = " && ".join(f"mkdir -p '{d}' && mount -t tmpfs -o mode=0700 tmpfs '{d}'" for d in private_dirs)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"', *argv]


def container_argv(argv: list[str], runtime_dir: str, container_dir: str) -> list[str]:
    """`argv` as a process of ONE container beside this machine: like `other_kernel_argv`, but the runtime directory
    is `container_dir` (bind-mounted over it), so every process started this way sees the same container-local
    files — the container daemon's socket and lock — while none sees this machine's own runtime directory."""
    require_linux("a private mount namespace (unshare -m) standing in for the container side")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("unshare -m needs root and util-linux here")
    os.makedirs(container_dir, mode=0o700, exist_ok=True)
    # The mount point is created on this machine's file system, where the broker's own stand-in directory lives:
    # owner-only, as the broker would make it (tests/test_reliability_security.py checks it).
    mounts = f"mkdir -p -m 700 '{runtime_dir}' && mount --bind '{container_dir}' '{runtime_dir}'"
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"', *argv]
