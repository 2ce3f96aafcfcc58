"""Which files a plain `mempalace-mcp` opens: the palace, the knowledge graph, the config dir.

A drop-in must open exactly what the engine it replaces would, with the same
arguments and environment; otherwise memories silently vanish (a fresh
mempalace 3.11 user keeps drawers under `~/.config/mempalace/palace`, not
`~/.mempalace/palace`; without `--palace` the knowledge graph is
`~/.mempalace/knowledge_graph.sqlite3`, with it `<palace>/knowledge_graph.sqlite3`).

Two answers, kept equal by tests/test_dropin.py (with every supported engine version):
- `resolve()`: mempalace's own rules (`mempalace/config.py`,
  `mcp_server/_guards.py: _resolve_kg_path`) in stdlib Python, cheap enough for
  the shim's start-up. The rules changed between versions (3.4 keeps everything
  under `~/.mempalace`; 3.11 follows XDG and reads one more variable), so they
  are a `Rules` value: `RULES_3_11` by default, or what `enginerules` learned
  from the engine actually installed;
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


class Rules:
    """How one mempalace version resolves its files (the parts that differ between versions).

    - xdg: without a legacy install the config dir is `$XDG_CONFIG_HOME/mempalace` or `~/.config/mempalace`
      (3.11); False: always `~/.mempalace` (3.4);
    - config_env: `MEMPALACE_CONFIG_DIR` names the config dir (3.11);
    - palace_env: the palace variables it reads, in PALACE_ENV's precedence (3.4 has no MEMPALACE_PALACE);
    - config_bom: its config.json may start with a UTF-8 BOM (3.11 reads it; 3.4 ignores such a file).
    """

    __slots__ = ("xdg", "config_env", "palace_env", "config_bom")

    def __init__(self, xdg: bool, config_env: bool, palace_env: tuple[str, ...], config_bom: bool) -> None:
        self.xdg = xdg
        self.config_env = config_env
        self.palace_env = tuple(name for name in PALACE_ENV if name in palace_env)
        self.config_bom = config_bom

    def as_dict(self) -> dict[str, object]:
        return {"xdg": self.xdg, "config_env": self.config_env, "palace_env": list(self.palace_env),
                "config_bom": self.config_bom}

    @classmethod
    def from_dict(cls, data: object) -> Rules | None:
        """Rules from `as_dict()` output (a cache file, the engine's answer); None when malformed."""
        if not isinstance(data, dict):
            return None
        xdg, env, names, bom = (data.get(k) for k in ("xdg", "config_env", "palace_env", "config_bom"))
        if not (isinstance(xdg, bool) and isinstance(env, bool) and isinstance(bom, bool) and isinstance(names, list)):
            return None
        return cls(xdg, env, tuple(n for n in names if isinstance(n, str)), bom)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rules) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.xdg, self.config_env, self.palace_env, self.config_bom))

    def __repr__(self) -> str:
        return f"Rules({self.as_dict()})"


RULES_3_11 = Rules(xdg=True, config_env=True, palace_env=PALACE_ENV, config_bom=True)
RULES_3_4 = Rules(xdg=False, config_env=False, palace_env=("MEMPALACE_PALACE_PATH", "MEMPAL_PALACE_PATH"),
                  config_bom=False)


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
    """One file by the file system, not by spelling (macOS: case, normalization, /var -> /private/var)."""
    if a == b:
        return True  # the fast path's case: no stat
    from mp_ssh_bridge.samepath import same_file

    return same_file(a, b)


def _home_relative(path: str, home: str) -> str:
    home = home.rstrip("/")
    return "~" + path[len(home):] if path == home or path.startswith(home + "/") else path


def _has_legacy_install(legacy: str) -> bool:
    if any(os.path.isfile(os.path.join(legacy, marker)) for marker in LEGACY_MARKERS):
        return True
    return os.path.isfile(os.path.join(legacy, "palace", "chroma.sqlite3"))


def config_dir(environ: Mapping[str, str], home: str, rules: Rules = RULES_3_11) -> str:
    """The config dir: MEMPALACE_CONFIG_DIR, a real legacy ~/.mempalace, XDG_CONFIG_HOME, ~/.config (3.11);
    always ~/.mempalace for an engine without XDG support (3.4)."""
    explicit = environ.get("MEMPALACE_CONFIG_DIR") if rules.config_env else None
    if explicit and explicit.strip():
        return os.path.expanduser(explicit)
    legacy = os.path.join(home, ".mempalace")
    if not rules.xdg or os.path.isdir(legacy) and _has_legacy_install(legacy):
        return legacy
    xdg = environ.get("XDG_CONFIG_HOME")
    if xdg and xdg.strip():
        xdg_path = os.path.expanduser(xdg)
        if os.path.isabs(xdg_path):  # the XDG spec: a relative value is invalid, ignored
            return os.path.join(xdg_path, "mempalace")
    return os.path.join(home, ".config", "mempalace")


def _configured_palace(config: str, rules: Rules = RULES_3_11) -> str | None:
    try:
        with open(os.path.join(config, "config.json"), "rb") as fh:
            data = json.loads(fh.read().decode("utf-8-sig" if rules.config_bom else "utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("palace_path") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def resolve(palace_flag: str | None, environ: Mapping[str, str] = os.environ,
            home: str | None = None, rules: Rules = RULES_3_11) -> Memory:
    """The files `mempalace-mcp [--palace FLAG]` opens with this environment, by `rules` (default mempalace 3.11's)."""
    home = (environ.get("HOME") or os.path.expanduser("~")) if home is None else home
    config = config_dir(environ, home, rules)
    if palace_flag:
        palace = os.path.abspath(palace_flag)  # as mempalace-mcp --palace: abspath, no ~ expansion
    else:
        env = next((environ[name] for name in rules.palace_env if environ.get(name)), None)
        if env:
            palace = os.path.abspath(os.path.expanduser(env))
        else:
            configured = _configured_palace(config, rules)
            palace = os.path.abspath(os.path.expanduser(configured or os.path.join(config, "palace")))
    kg = os.path.join(palace, KG_NAME) if palace_flag else os.path.join(home, ".mempalace", KG_NAME)
    return Memory(palace, kg, os.path.abspath(config), bool(palace_flag))


def state_dir_for(memory: Memory, explicit: str | os.PathLike[str] | None, home: str | None = None) -> str:
    """Where the broker of `memory` keeps broker.json, .sock, .lock and palace.id.

    `MEMPALACE_PATH` (explicit) wins: one state directory, one palace, as before. Otherwise
    `~/.mempalace` for the legacy palace `~/.mempalace/palace` (pi-devbox bind-mounts exactly
    this directory, so both sides find it), and `~/.mempalace/brokers/<key>` for any other
    palace; the key is computed from the home-relative palace path, so it is the same on both
    sides of a home-relative mount. One palace, one state directory, one broker: the key is made of
    the palace's one spelling on this machine (samepath.canonical: symlinks resolved, on macOS the
    names as on disk), so `/var/...` and `/private/var/...`, or `~/Work` and `~/work` on a Mac, find
    one broker.
    """
    if explicit:
        return os.path.abspath(os.path.expanduser(os.fspath(explicit)))
    home = os.path.expanduser("~") if home is None else home
    root = os.path.join(home, ".mempalace")
    legacy = os.path.join(root, "palace")
    if memory.palace == legacy:
        return root  # the common case, decided without touching the disk
    from mp_ssh_bridge.samepath import canonical  # ~30 us: realpath (macOS: and the names on disk)

    spelled = canonical(memory.palace)
    if spelled == canonical(legacy):
        return root
    key = Memory(spelled, memory.kg, memory.config_dir, memory.palace_flag).key(canonical(home))
    return os.path.join(root, "brokers", key)


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
