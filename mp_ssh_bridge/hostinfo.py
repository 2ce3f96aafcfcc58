"""Facts about this host that differ between Linux and macOS, kept in one place.

The broker usually runs on macOS (no /proc), containers are Linux. Each
function takes its platform inputs as arguments so both branches are unit
tested on either OS; the zero-argument wrappers read the real machine.
"""

from __future__ import annotations

import os
import sys
from typing import Any

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


_BOOT_IDS: dict[str, str | None] = {}


def boot_id(platform: str | None = None) -> str | None:
    """An identifier that changes at every boot, or None when unknown.

    Read once per process (it cannot change while the process runs): every liveness check
    compares it, and on macOS reading it costs a `sysctl` subprocess.
    """
    plat = platform or sys.platform
    if plat not in _BOOT_IDS:
        _BOOT_IDS[plat] = _read_boot_id(plat)
    return _BOOT_IDS[plat]


def _read_boot_id(plat: str) -> str | None:
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


def parse_linux_pid_namespace(link: str | None) -> str | None:
    """`readlink /proc/self/ns/pid` is `pid:[4026531836]`: the namespace's inode number, or None."""
    value = (link or "").strip()
    if not (value.startswith("pid:[") and value.endswith("]")):
        return None
    number = value[len("pid:[") : -1]
    return number if number.isdigit() else None


_PID_NS: dict[str, str | None] = {}


def pid_namespace(platform: str | None = None) -> str | None:
    """This process's pid namespace (Linux), or None where there is none (macOS) or it cannot be read.

    A container on a native Linux host shares the host's boot id, and may share its host name,
    but a pid recorded on one side names another process (or none) on the other. Cached.
    """
    plat = platform or sys.platform
    if plat not in _PID_NS:
        link = None
        if plat.startswith("linux"):
            try:
                link = os.readlink("/proc/self/ns/pid")
            except OSError:
                link = None
        _PID_NS[plat] = parse_linux_pid_namespace(link)
    return _PID_NS[plat]


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
    """`ps -o COLUMN= -p PID` with a 2 s bound; None when ps fails or the pid is gone.

    Always in the C locale and UTC: `lstart` is printed with the locale's date format in local time, and
    a process start recorded by a broker under launchd (no LANG) must read the same to one started from
    a German terminal in another time zone, or the proof "same pid, same start" fails either way.
    """
    import os
    import subprocess

    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    try:
        res = subprocess.run(
            ["ps", "-o", f"{column}=", "-p", str(pid)], capture_output=True, text=True, timeout=2, check=False, env=env
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


SERVICE_MANAGER_ENV = ("XPC_SERVICE_NAME", "INVOCATION_ID")  # an on-demand broker must not inherit them


def parse_service_manager(environ: dict[str, str], cgroup_text: str | None, session_leader: bool) -> dict[str, str] | None:
    """Which service manager runs this process, and its stop and restart commands; None when none does.

    launchd sets XPC_SERVICE_NAME to the job's label (`0` outside a job); systemd sets INVOCATION_ID and
    puts the unit last in /proc/self/cgroup (`.../user@1000.service/app.slice/mp-bridge.service`). Both
    variables are inherited by everything an editor or a service starts, so they count only for a process
    its manager started itself: a session leader (launchd and systemd start jobs with setsid; a broker
    started on demand is detached by a double fork and never leads its session).
    """
    if not session_leader:
        return None
    label = environ.get("XPC_SERVICE_NAME", "")
    if label and label != "0":
        target = f"gui/{os.getuid()}/{label}"
        return {"kind": "launchd", "unit": label, "stop": f"launchctl bootout {target}",
                "restart": f"launchctl kickstart -k {target}"}
    if environ.get("INVOCATION_ID") and cgroup_text:
        path = cgroup_text.strip().splitlines()[-1].rsplit(":", 1)[-1]
        unit = path.rstrip("/").rsplit("/", 1)[-1]
        if unit.endswith(".service"):
            ctl = "systemctl --user" if "/user@" in path else "systemctl"
            return {"kind": "systemd", "unit": unit, "stop": f"{ctl} stop {unit}", "restart": f"{ctl} restart {unit}"}
    return None


def service_manager() -> dict[str, str] | None:
    """parse_service_manager for this process."""
    try:
        with open("/proc/self/cgroup", encoding="ascii", errors="replace") as fh:
            cgroup: str | None = fh.read()
    except OSError:
        cgroup = None
    try:
        leader = os.getsid(0) == os.getpid()
    except OSError:
        leader = False
    return parse_service_manager(dict(os.environ), cgroup, leader)


# --- durable writes ---------------------------------------------------------------------------
def sync_fd(fd: int, platform: str | None = None, fcntl_module: Any = None) -> str:
    """Flush `fd` to stable storage; which call did it ("F_FULLFSYNC" or "fsync").

    On macOS fsync() leaves the data in the drive's own cache, where a power loss can still
    drop it (an empty palace.id after a crash); F_FULLFSYNC flushes that cache too. A file
    system that refuses it (some network and FUSE mounts) gets a plain fsync.
    """
    if (platform or sys.platform) == "darwin":
        if fcntl_module is None:
            import fcntl as fcntl_module
        op = getattr(fcntl_module, "F_FULLFSYNC", None)
        if op is not None:
            try:
                fcntl_module.fcntl(fd, op)
                return "F_FULLFSYNC"
            except OSError:
                pass
    os.fsync(fd)
    return "fsync"


def sync_dir(path: str | os.PathLike[str], platform: str | None = None) -> None:
    """Make a rename or link in directory `path` durable (best effort: some file systems cannot sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        sync_fd(fd, platform)
    except OSError:
        pass
    finally:
        os.close(fd)
