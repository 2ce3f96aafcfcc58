"""Find the real engine command, never mp-shim itself.

A user may install the shim under the name `mempalace-mcp` so every agent
config keeps working unchanged. Then the first `mempalace-mcp` on PATH is the
shim, and a broker (or a container's local-owner daemon) that ran it would be talking to
itself. So a bare command name is looked up along the whole PATH, skipping
any candidate that is the shim; `MP_BRIDGE_ENGINE` can always name the real
one by absolute path. Stdlib only, and cheap: the shim's fast path finds the engine
(enginerules), so no shutil here (~2 ms of imports per agent start).
"""

from __future__ import annotations

import os
import sys

SHIM_MARKER = b"mp_ssh_bridge.shim"


class EngineNotFound(Exception):
    """No runnable engine that is not the shim (the message says what to set)."""


def is_shim(path: str, extra_argv: list[str] | None = None) -> bool:
    """Would running `path` start mp-shim (the console script, a copy, or a link to it)?"""
    real = os.path.realpath(path)
    ours = {os.path.realpath(p) for p in candidates("mp-shim", beside=[])[:1]}  # as shutil.which("mp-shim")
    if sys.argv and sys.argv[0] and os.path.basename(sys.argv[0]) in ("mp-shim", "mempalace-mcp"):
        ours.add(os.path.realpath(sys.argv[0]))
    if real in ours or any(SHIM_MARKER.decode() in arg for arg in extra_argv or ()):
        return True
    try:
        with open(real, "rb") as fh:
            return SHIM_MARKER in fh.read(4096)  # a console script names its module
    except OSError:
        return False


def candidates(exe: str, path_env: str | None = None, beside: list[str] | None = None) -> list[str]:
    """Every executable `exe` along PATH, then beside our own interpreter.

    MCP clients often spawn servers with only HOME and PATH=/usr/bin:/bin, so
    the venv (or pipx) bin directory that holds both us and mempalace-mcp is
    searched last, after whatever the user's PATH says.
    """
    if os.sep in exe:
        return [exe] if os.path.isfile(exe) and os.access(exe, os.X_OK) else []
    found = []
    folders = (path_env if path_env is not None else os.environ.get("PATH", os.defpath)).split(os.pathsep)
    folders += [os.path.dirname(sys.executable)] if beside is None else beside
    for folder in folders:
        full = os.path.join(folder or ".", exe)
        if os.path.isfile(full) and os.access(full, os.X_OK) and full not in found:
            found.append(full)
    return found


def resolve(argv: list[str], path_env: str | None = None, beside: list[str] | None = None) -> list[str]:
    """argv with argv[0] replaced by the first candidate that is the real engine."""
    exe = argv[0]
    found = candidates(exe, path_env, beside)
    for path in found:
        if not is_shim(path, argv[1:]):
            return [path, *argv[1:]]
    if found:
        raise EngineNotFound(
            f"every {exe!r} found ({', '.join(found)}) is mp-shim itself (the shim installed as mempalace-mcp?); "
            "set MP_BRIDGE_ENGINE to the real engine, e.g. /path/to/venv/bin/mempalace-mcp"
        )
    if os.sep in exe:
        raise EngineNotFound(f"the memory engine {exe} does not exist or is not executable; fix MP_BRIDGE_ENGINE")
    raise EngineNotFound(f"the memory engine {exe!r} was not found on PATH; pip install mempalace, or set "
                         "MP_BRIDGE_ENGINE to its absolute path")
