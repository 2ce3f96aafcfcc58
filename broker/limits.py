"""Open-file limits: the broker raises its own at start, so the engine it spawns inherits room to work.

launchd jobs and Terminal start with a soft RLIMIT_NOFILE of 256 on macOS. A broker serving a few
hundred sessions holds a socket for each, and chromadb under it (sqlite with its -wal/-shm, the HNSW
segment files, onnxruntime) opens more; at 256 they meet "Too many open files" long before anything is
wrong. Any process may raise its soft limit up to its hard limit, so the broker does it once, before
the engine starts (the engine inherits it).

The target is the hard limit, bounded by what the system allows one process and by NOFILE_CAP:
- macOS: the hard limit is often RLIM_INFINITY, but setrlimit refuses a soft limit above
  `kern.maxfilesperproc` (EINVAL; the OPEN_MAX quirk of setrlimit(2)), so the bound is
  min(hard, kern.maxfilesperproc), read once with sysctl;
- Linux: the kernel already keeps the hard limit within fs.nr_open;
- NOFILE_CAP (65536) is more than a broker needs; a soft limit in the millions (Docker's default hard
  limit, 1048576) makes programs that close every possible descriptor before exec crawl.
A soft limit already at or above the target is left alone: this never lowers one.

Every platform input (the platform name, the sysctl runner, the resource module) is a parameter, so
the macOS branch is tested on Linux.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("broker.limits")

NOFILE_CAP = 65536
SYSCTL = "/usr/sbin/sysctl"


def parse_sysctl_int(text: str | None) -> int | None:
    """`sysctl -n kern.maxfilesperproc` prints one positive number; None for anything else."""
    value = (text or "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def max_files_per_process(platform: str | None = None, run: Callable[..., Any] = subprocess.run) -> int | None:
    """What the system lets one process open (macOS: kern.maxfilesperproc), or None where no such bound applies."""
    if (platform or sys.platform) != "darwin":
        return None
    try:
        out = run([SYSCTL, "-n", "kern.maxfilesperproc"], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sysctl_int(out.stdout)


def nofile_target(soft: int, hard: int, system_max: int | None, infinity: int, cap: int = NOFILE_CAP) -> int:
    """The soft limit to ask for: min(hard, system_max, cap), never below `soft` (RLIM_INFINITY is `infinity`)."""
    if soft == infinity:
        return soft
    bounds = [cap] + [b for b in (hard, system_max) if b is not None and b != infinity and b > 0]
    return max(soft, min(bounds))


def raise_nofile(platform: str | None = None, resource_module: Any = None,
                 run: Callable[..., Any] = subprocess.run) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (see the module docstring); (the soft limit before, after)."""
    if resource_module is None:
        import resource as resource_module
    res = resource_module
    soft, hard = res.getrlimit(res.RLIMIT_NOFILE)
    if soft != res.RLIM_INFINITY and soft >= min(NOFILE_CAP, hard if hard != res.RLIM_INFINITY else NOFILE_CAP):
        return soft, soft  # already enough: no sysctl either
    target = nofile_target(soft, hard, max_files_per_process(platform, run), res.RLIM_INFINITY)
    if target == soft:
        return soft, soft
    try:
        res.setrlimit(res.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %s to %s (hard %s): %s; clients beyond it will be refused",
                    soft, target, _show(hard, res.RLIM_INFINITY), exc)
        return soft, soft
    log.info("open-file limit raised from %s to %s (hard %s); the engine inherits it",
             soft, target, _show(hard, res.RLIM_INFINITY))
    return soft, target


def _show(limit: int, infinity: int) -> str:
    return "unlimited" if limit == infinity else str(limit)
