"""The house: three layers, arrows only downward, no import circles (lazy imports count).

client  (mp_ssh_bridge: shim, session, endpoints, discovery, ssh, cli, ...)  — what agents and people run
core    (mp_ssh_bridge: protocol, config, links, handshake, state, settings, election, ...) — shared
server  (the broker/ folder) — the host daemon

The client never imports the server (it talks to it over the socket and elects
through core's `election`); the server never imports the client or asyncssh;
core imports neither. A new module must be placed in a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_PKG = "mp_ssh_bridge_broker"  # the import name of broker/ (pyproject package-dir)

CORE = {"__init__", "protocol", "errors", "config", "diag", "urls", "links", "handshake", "state", "hostinfo", "liveness",
        "settings", "election", "enginecmd", "enginerules", "stopping", "palace", "samepath", "brokerlog", "palacecheck",
        "holders", "status", "walrecover", "owner", "hub"}
CLIENT = {"shim", "session", "endpoints", "discovery", "ssh", "relay", "connection", "cli", "doctor",
          "doctorkit", "doctor_container", "doctorfix", "migrate", "grant", "guardian", "daemon", "containerd", "service",
          "wiring", "jsonc"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in (REPO / "mp_ssh_bridge").glob("*.py"):
        out[f"mp_ssh_bridge.{f.stem}" if f.stem != "__init__" else "mp_ssh_bridge"] = f
    for f in (REPO / "broker").glob("*.py"):
        out[f"{SERVER_PKG}.{f.stem}" if f.stem != "__init__" else SERVER_PKG] = f
    return out


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (function bodies included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {d for d in _imports(f) if d in mods and d != name} for name, f in mods.items()}


def _layer(name: str) -> str:
    if name.split(".")[0] == SERVER_PKG:
        return "server"
    stem = name.split(".")[1] if "." in name else "__init__"
    if stem in CORE:
        return "core"
    if stem in CLIENT:
        return "client"
    raise AssertionError(f"{name} is in no layer: add it to tests/test_layers.py CORE or CLIENT")


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        _layer(name)


def test_arrows_only_go_down() -> None:
    allowed = {"client": {"client", "core"}, "core": {"core"}, "server": {"server", "core"}}
    bad = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
           for a, deps in _graph().items() for b in deps if _layer(b) not in allowed[_layer(a)]]
    assert bad == []


def test_no_import_circles() -> None:
    graph = _graph()
    seen: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    assert circles == []


def test_heavy_libraries_stay_in_their_rooms() -> None:
    """asyncssh only in the SSH transport; rich only in what prints for a person; the server uses neither."""
    mods = _modules()
    for name, f in mods.items():
        roots = {i.split(".")[0] for i in _imports(f)}
        if "asyncssh" in roots:
            assert name == "mp_ssh_bridge.ssh", name
        if "rich" in roots:
            assert name in ("mp_ssh_bridge.cli", "mp_ssh_bridge.doctor", "mp_ssh_bridge.status"), name
