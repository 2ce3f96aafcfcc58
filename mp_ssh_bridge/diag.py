"""The client side's one-line diagnostics on stderr (never stdout: that is the agent's protocol).

Quiet by default (WARNING); MP_BRIDGE_LOG_LEVEL changes it. The `logging`
package would cost the shim's start-up for one line now and then, so this is
a function and a threshold. Stdlib only.
"""

from __future__ import annotations

import os
import sys

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}
_threshold = 30


def log(level: int, message: str) -> None:
    """One line on stderr when `level` reaches the threshold."""
    if level >= _threshold:
        try:
            sys.stderr.write(f"mp-shim[{os.getpid()}]: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def set_level(name: str | None) -> None:
    global _threshold
    if name:
        _threshold = _LEVELS.get(name.strip().upper(), _threshold)
