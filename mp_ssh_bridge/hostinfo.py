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
