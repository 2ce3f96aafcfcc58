"""CPU time of other processes, fine enough to divide by a few hundred calls.

Why: on a 2-vCPU VM the per-call latency a hop adds is mostly wake-ups, and a p50 moves by tenths of a
millisecond between runs; the CPU the hop's processes spend per call is what the bridge's own code costs, and
it hardly moves. Hardware instruction counters are not exposed on this machine (`perf stat -e instructions`:
not supported), so the count is the scheduler's: on Linux the nanosecond run time of every thread
(`tests.platforms.thread_run_seconds`); elsewhere, or where that file is missing, psutil's
user + system time (10 ms ticks on Linux: `coarse` says so).

On a VM the scheduler's clock charges a thread for its own wake-up from idle, and the more the longer it slept
(here: ~0.9 ms per wake after `time.sleep(0.2)`, ~0.06 ms after `time.sleep(0.002)`), so a process woken once
per call is charged for that too, and one that wakes on a timer spends CPU at rest: measure that rest and take
it out (bench_all does).
"""

from __future__ import annotations

import os

from tests.platforms import thread_run_seconds  # reads /proc: only tests/platforms.py does (tests/test_portable.py)


def cpu_seconds(pids: list[int]) -> tuple[dict[int, float], bool]:
    """CPU seconds so far of each pid that is alive, and whether any figure is coarse (psutil's ticks)."""
    import psutil

    out: dict[int, float] = {}
    coarse = False
    for pid in pids:
        fine = thread_run_seconds(pid)
        if fine is not None:
            out[pid] = fine
            continue
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = t.user + t.system
        coarse = True
    return out, coarse


ROLES = (  # (what the command line holds, the role's name in reports): the first match names the process
    ("mp-shim", "shim"),
    ("mp_ssh_bridge_broker", "broker"),
    ("mempalace-broker", "broker"),
    ("mp_ssh_bridge.containerd", "daemon"),
    ("floor_relay.py", "relay"),
    ("sshd", "sshd"),
    ("unshare", "stand-in"),
    ("mempalace-mcp", "proxy"),
)


def role(pid: int) -> str:
    """A process's role on a path, from its command line ("?" when it is gone)."""
    import psutil

    try:
        line = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"
    for needle, name in ROLES:
        if needle in line:
            return name
    return os.path.basename(line.split(" ", 1)[0]) or "?"
