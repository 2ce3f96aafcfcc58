"""Facts about this host that differ between Linux and macOS, kept in one place.

The broker usually runs on macOS (no /proc), containers are Linux. Each
function takes its platform inputs as arguments so both branches are unit
tested on either OS; the zero-argument wrappers read the real machine.
"""

from __future__ import annotations

import os
import sys

# sun_path is 104 bytes on macOS/BSD, 108 on Linux, both counting the NUL.
SUN_PATH_MAX = {"darwin": 104, "linux": 108}


def max_socket_path_bytes(platform: str | None = None) -> int:
    """Longest usable AF_UNIX path in bytes (excluding the trailing NUL)."""
    plat = platform or sys.platform
    for prefix, size in SUN_PATH_MAX.items():
        if plat.startswith(prefix):
            return size - 1
    return 103  # the smaller of the two: safe everywhere else


def parse_linux_boot_id(text: str | None) -> str | None:
    value = (text or "").strip()
    return value or None


def parse_macos_boot_id(sysctl_output: str | None) -> str | None:
    """`sysctl -n kern.bootsessionuuid` prints a UUID; older systems print nothing."""
    value = (sysctl_output or "").strip()
    return value or None


def boot_id(platform: str | None = None) -> str | None:
    """An identifier that changes at every boot, or None when unknown."""
    plat = platform or sys.platform
    if plat.startswith("linux"):
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
                return parse_linux_boot_id(fh.read())
        except OSError:
            return None
    if plat == "darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["/usr/sbin/sysctl", "-n", "kern.bootsessionuuid"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_macos_boot_id(out)
    return None


def host_name() -> str:
    import socket

    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (any owner)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def in_container(exists=os.path.exists) -> bool:
    """Docker writes /.dockerenv, podman /run/.containerenv."""
    return exists("/.dockerenv") or exists("/run/.containerenv")


# --- one process's identity (for `mp-bridge stop`: signal only a proven broker) ----------------
def parse_proc_stat(text: str | None) -> list[str] | None:
    """The fields of a Linux `/proc/<pid>/stat` line after `comm`, i.e. from field 3 (state) on.

    `comm` is in parentheses and may itself hold spaces and `)`, so the split
    is at the LAST `)`. Index 0 is field 3 (state), 1 is field 4 (ppid), 19 is
    field 22 (starttime).
    """
    head, sep, tail = (text or "").rpartition(")")
    if not sep or "(" not in head:
        return None
    fields = tail.split()
    return fields or None


def parse_linux_start_time(stat_text: str | None) -> str | None:
    """Field 22 (starttime, clock ticks after boot) of `/proc/<pid>/stat`: with the boot id, unique per process."""
    fields = parse_proc_stat(stat_text)
    if fields is None or len(fields) < 20 or not fields[19].isdigit():
        return None
    return fields[19]


def parse_linux_ppid(stat_text: str | None) -> int | None:
    """Field 4 (ppid) of `/proc/<pid>/stat`."""
    fields = parse_proc_stat(stat_text)
    if fields is None or len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def parse_linux_state(stat_text: str | None) -> str | None:
    """Field 3 (state: R, S, D, T, Z, ...) of `/proc/<pid>/stat`."""
    fields = parse_proc_stat(stat_text)
    return fields[0] if fields else None


def parse_ps_lstart(output: str | None) -> str | None:
    """`ps -o lstart= -p PID` (macOS): e.g. `Thu Nov 27 12:14:03 2025`; whitespace folded, None when empty."""
    value = " ".join((output or "").split())
    return value or None


def parse_ps_int(output: str | None) -> int | None:
    """`ps -o ppid= -p PID`: one number, or None."""
    value = (output or "").strip()
    return int(value) if value.isdigit() else None


def _read_proc_stat(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _ps(pid: int, column: str) -> str | None:
    """`ps -o COLUMN= -p PID` with a 2 s bound; None when ps fails or the pid is gone."""
    import subprocess

    try:
        res = subprocess.run(
            ["ps", "-o", f"{column}=", "-p", str(pid)], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def proc_start(pid: int, platform: str | None = None) -> str | None:
    """When process `pid` started, as an opaque string (equal for the same process, different after
    pid reuse), or None when unknown. Linux: /proc starttime; macOS: `ps -o lstart=`."""
    if pid <= 0:
        return None
    plat = platform or sys.platform
    if plat.startswith("linux"):
        return parse_linux_start_time(_read_proc_stat(pid))
    if plat == "darwin":
        return parse_ps_lstart(_ps(pid, "lstart"))
    return None


def parent_pid(pid: int, platform: str | None = None) -> int | None:
    """The parent of `pid` (Linux: /proc field 4; elsewhere `ps -o ppid=`), or None when unknown."""
    if pid <= 0:
        return None
    if (platform or sys.platform).startswith("linux"):
        return parse_linux_ppid(_read_proc_stat(pid))
    return parse_ps_int(_ps(pid, "ppid"))


def is_zombie(pid: int, platform: str | None = None) -> bool:
    """True when `pid` has exited but its parent has not reaped it yet (it still 'exists')."""
    if (platform or sys.platform).startswith("linux"):
        return parse_linux_state(_read_proc_stat(pid)) == "Z"
    return (_ps(pid, "stat") or "").strip().startswith("Z")
