"""Which files a plain `mempalace-mcp` opens: the palace, the knowledge graph, the config dir.

A drop-in must open exactly what the engine it replaces would, with the same
arguments and environment; otherwise memories silently vanish (a fresh
mempalace 3.11 user keeps drawers under `~/.config/mempalace/palace`, not
`~/.mempalace/palace`; without `--palace` the knowledge graph is
`~/.mempalace/knowledge_graph.sqlite3`, with it `<palace>/knowledge_graph.sqlite3`).

Two answers, kept equal by tests/test_dropin.py:
- `resolve()`: mempalace 3.11's own rules (`mempalace/config.py`,
  `mcp_server/_guards.py: _resolve_kg_path`) in stdlib Python, cheap enough for
  the shim's start-up;
- `engine_resolve()`: the engine's answer, computed by its own code in its own
  interpreter (it may live in another environment, a uv tool, and be another
  version than anything the bridge could import). The broker asks it once at
  start and refuses to serve files other than the ones its sessions resolved.

Stdlib only.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

KG_NAME = "knowledge_graph.sqlite3"
LEGACY_MARKERS = ("config.json", "people_map.json")
PALACE_ENV = ("MEMPALACE_PALACE_PATH", "MEMPALACE_PALACE", "MEMPAL_PALACE_PATH")  # precedence, as mempalace 3.11


class Memory:
    """The files one engine opens; two sessions with equal Memory share one broker."""

    __slots__ = ("palace", "kg", "config_dir", "palace_flag")

    def __init__(self, palace: str, kg: str, config_dir: str, palace_flag: bool) -> None:
        self.palace = palace
        self.kg = kg
        self.config_dir = config_dir
        self.palace_flag = palace_flag  # the engine runs with --palace (so its KG is inside the palace)

    def as_dict(self) -> dict[str, object]:
        return {"palace": self.palace, "kg": self.kg, "config_dir": self.config_dir, "palace_flag": self.palace_flag}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Memory) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.palace, self.kg, self.config_dir, self.palace_flag))

    def __repr__(self) -> str:
        return f"Memory(palace={self.palace!r}, kg={self.kg!r}, config_dir={self.config_dir!r})"

    def key(self, home: str | None = None) -> str:
        """A short name for this palace that is the same on both sides of a home-relative bind mount.

        The palace alone: one palace has one broker whatever else differs (sessions whose knowledge
        graph or config dir differ are refused by `mismatch`, never given a second writer).
        """
        import zlib  # hashlib would cost every agent start ~7 ms; a name needs no cryptography

        base = os.path.expanduser("~") if home is None else home
        data = _home_relative(self.palace, base).encode()
        return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"  # a 64-bit name; palace.id still guards identity


def mismatch(mine: Memory, theirs: dict[str, object]) -> str | None:
    """Why a broker whose record (broker.json / broker/status) names `theirs` does not serve `mine`; None if it does.

    Only files the record names are compared (an older broker names only its palace).
    """
    problems = []
    for what, field in (("palace", "palace"), ("knowledge graph", "kg"), ("config dir", "config_dir")):
        have = theirs.get(field)
        want = getattr(mine, field)
        if isinstance(have, str) and not _same(have, want):
            problems.append(f"its {what} is {have}, this session's is {want}")
    if not problems:
        return None
    hint = (" (one uses --palace and the other not: mempalace keeps the knowledge graph inside the palace only "
            "with --palace; use it everywhere or nowhere)" if any("knowledge graph" in p for p in problems) else "")
    return "; ".join(problems) + hint


def _same(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _home_relative(path: str, home: str) -> str:
    home = home.rstrip("/")
    return "~" + path[len(home):] if path == home or path.startswith(home + "/") else path


def _has_legacy_install(legacy: str) -> bool:
    if any(os.path.isfile(os.path.join(legacy, marker)) for marker in LEGACY_MARKERS):
        return True
    return os.path.isfile(os.path.join(legacy, "palace", "chroma.sqlite3"))


def config_dir(environ: Mapping[str, str], home: str) -> str:
    """mempalace 3.11's config dir: MEMPALACE_CONFIG_DIR, a real legacy ~/.mempalace, XDG_CONFIG_HOME, ~/.config."""
    explicit = environ.get("MEMPALACE_CONFIG_DIR")
    if explicit and explicit.strip():
        return os.path.expanduser(explicit)
    legacy = os.path.join(home, ".mempalace")
    if os.path.isdir(legacy) and _has_legacy_install(legacy):
        return legacy
    xdg = environ.get("XDG_CONFIG_HOME")
    if xdg and xdg.strip():
        xdg_path = os.path.expanduser(xdg)
        if os.path.isabs(xdg_path):  # the XDG spec: a relative value is invalid, ignored
            return os.path.join(xdg_path, "mempalace")
    return os.path.join(home, ".config", "mempalace")


def _configured_palace(config: str) -> str | None:
    try:
        with open(os.path.join(config, "config.json"), "rb") as fh:
            data = json.loads(fh.read().decode("utf-8-sig"))
    except (OSError, ValueError):
        return None
    value = data.get("palace_path") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def resolve(palace_flag: str | None, environ: Mapping[str, str] = os.environ,
            home: str | None = None) -> Memory:
    """The files `mempalace-mcp [--palace FLAG]` opens with this environment (mempalace 3.11's rules)."""
    home = (environ.get("HOME") or os.path.expanduser("~")) if home is None else home
    config = config_dir(environ, home)
    if palace_flag:
        palace = os.path.abspath(palace_flag)  # as mempalace-mcp --palace: abspath, no ~ expansion
    else:
        env = next((environ[name] for name in PALACE_ENV if environ.get(name)), None)
        if env:
            palace = os.path.abspath(os.path.expanduser(env))
        else:
            palace = os.path.abspath(os.path.expanduser(_configured_palace(config) or os.path.join(config, "palace")))
    kg = os.path.join(palace, KG_NAME) if palace_flag else os.path.join(home, ".mempalace", KG_NAME)
    return Memory(palace, kg, os.path.abspath(config), bool(palace_flag))


def state_dir_for(memory: Memory, explicit: str | os.PathLike[str] | None, home: str | None = None) -> str:
    """Where the broker of `memory` keeps broker.json, .sock, .lock and palace.id.

    `MEMPALACE_PATH` (explicit) wins: one state directory, one palace, as before. Otherwise
    `~/.mempalace` for the legacy palace `~/.mempalace/palace` (pi-devbox bind-mounts exactly
    this directory, so both sides find it), and `~/.mempalace/brokers/<key>` for any other
    palace; the key is computed from the home-relative palace path, so it is the same on both
    sides of a home-relative mount. One palace, one state directory, one broker.
    """
    if explicit:
        return os.path.abspath(os.path.expanduser(os.fspath(explicit)))
    home = os.path.expanduser("~") if home is None else home
    root = os.path.join(home, ".mempalace")
    if memory.palace == os.path.join(root, "palace"):
        return root
    return os.path.join(root, "brokers", memory.key(home))


# --------------------------------------------------------------------------- the engine's own answer
# Run in the engine's interpreter: the engine's own code decides. Works with mempalace 3.4 and 3.11.
ENGINE_RESOLVER = r"""
import json, os, sys
flag = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
if flag:
    os.environ["MEMPALACE_PALACE_PATH"] = os.path.abspath(flag)  # what mempalace-mcp --palace does
from mempalace.config import MempalaceConfig
from mempalace.knowledge_graph import DEFAULT_KG_PATH
cfg = MempalaceConfig()
palace = os.path.abspath(os.path.expanduser(cfg.palace_path))
config_dir = str(getattr(cfg, "config_dir", None) or getattr(cfg, "_config_dir"))
try:
    from importlib.metadata import version
    engine_version = version("mempalace")
except Exception:  # no distribution metadata (a source checkout): the version is only informative
    engine_version = None
print(json.dumps({"palace": palace, "kg": os.path.join(palace, "knowledge_graph.sqlite3") if flag else DEFAULT_KG_PATH,
                  "config_dir": os.path.abspath(config_dir), "version": engine_version}))
"""


class EngineResolveError(Exception):
    """The engine's interpreter could not say which files it opens (the message says why)."""


def interpreter_of(script: str) -> str | None:
    """The Python a console script runs with (its `#!` line), or None when it is not a Python script."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env" and len(words) > 1:  # #!/usr/bin/env python3
        import shutil

        return shutil.which(words[1])
    return words[0] if "python" in os.path.basename(words[0]) else None


def engine_resolve(engine_argv: list[str], palace_flag: str | None, environ: dict[str, str],
                   timeout: float = 30.0) -> tuple[Memory, str | None]:
    """(the files the engine opens, its version), asked of the engine's own code. Raises EngineResolveError."""
    import subprocess

    python = interpreter_of(engine_argv[0])
    if python is None and len(engine_argv) > 1 and "python" in os.path.basename(engine_argv[0]):
        python = engine_argv[0]  # `python -m mempalace.mcp_server` style
    if python is None:
        raise EngineResolveError(f"{engine_argv[0]} is not a Python console script; cannot ask it which palace it opens")
    try:
        out = subprocess.run([python, "-c", ENGINE_RESOLVER, palace_flag or ""], env=environ, capture_output=True,
                             timeout=timeout, cwd="/", check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineResolveError(f"cannot run {python}: {exc}") from exc
    if out.returncode != 0:
        tail = out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise EngineResolveError(f"{python} could not resolve the palace (exit {out.returncode}): {tail[0][:300]}")
    try:
        data = json.loads(out.stdout.decode().strip().splitlines()[-1])
        memory = Memory(str(data["palace"]), str(data["kg"]), str(data["config_dir"]), bool(palace_flag))
    except (ValueError, KeyError, IndexError) as exc:
        raise EngineResolveError(f"{python} printed no resolution: {out.stdout[-300:]!r}") from exc
    return memory, data.get("version")
