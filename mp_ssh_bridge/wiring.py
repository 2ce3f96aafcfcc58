"""`mp-bridge install|uninstall pi|claude-code|opencode [--project] [--dry-run]`: wire an agent to mp-shim.

Why: the bridge only helps when every agent runs `mp-shim` instead of `mempalace-mcp`; one config left
behind is a second writer on the palace. Copying JSON by hand into three clients' files, each in its
own format and place, is where that goes wrong; this does it, shows it, and can take it back.

Which file (user scope by default; `--project`: the project's file in the current directory):

| client | user scope | --project | servers under |
| --- | --- | --- | --- |
| claude-code | `~/.claude.json` (its user scope: the top-level `mcpServers`) | `.mcp.json` | `mcpServers` |
| opencode | `$XDG_CONFIG_HOME/opencode/opencode.json` or `opencode.jsonc` (`~/.config/...`) | `opencode.json[c]` | `mcp` |
| pi | pi-mcp-adapter's own `mcp.json`: `$PI_CODING_AGENT_DIR/mcp.json`, default `~/.pi/agent/mcp.json` | `.pi/mcp.json` | `mcpServers` |

(pi-mcp-adapter's README: `<Pi agent dir>/mcp.json` is "Pi global override", `.pi/mcp.json` "Pi project
override"; it also reads `~/.config/mcp/mcp.json`, `~/.agents/mcp.json` and `.mcp.json`, which other tools
share, so those are only looked at: install names any that still runs mempalace-mcp. The same goes for
Claude Code's per-project servers in `~/.claude.json` `projects` and the other scope's file.)

What changes: every server entry whose command runs the engine (`mempalace-mcp`, by name or path, or
`python -m mempalace.mcp_server` / `mempalace.mcp_proxy`, directly or through uvx / uv / pipx) gets `mp-shim`
as its command, with the arguments that followed the engine and everything else kept (env, enabled, ...);
when the engine was anything but the bare `mempalace-mcp` (a venv's path, `uvx --from mempalace==3.11
mempalace-mcp`, `python -m mempalace.mcp_server`), that command goes into the entry's environment as
MP_BRIDGE_ENGINE (shell-quoted; opencode `environment`, else `env`) unless it already sets one, so the
broker runs that very engine; the output says which engine will run. An engine behind another wrapper
(`env X=1 mempalace-mcp`, `docker run ...`, a shell string `sh -c "exec mempalace-mcp"`) is refused, since
replacing it would drop the wrapper: a person decides. With no such entry one named `mempalace` is added (refused if
that name runs something else). An entry that already runs mp-shim means nothing to do: a second install
changes nothing. The shim is written as the absolute path of the
`mp-shim` next to this Python (the console script of this installation; agents often start servers
with a PATH that lacks a venv), else the bare name; `--shim` names another.

Timeouts, so a cold start fits (a broker's very first start measured 3-7 s; later cold starts answer
`initialize` and `tools/list` at once from the broker's cache):
- opencode: `timeout` (ms to connect and list tools; opencode's default is 5000) is set to 30000 unless
  the entry already has a larger one.
- pi: `requestTimeoutMs` (per request; default the MCP SDK's 60000, the same as the session's deadline
  MEMPALACE_MCP_TIMEOUT_MS, so pi's timer would race the broker's precise verdict) is set to that deadline
  (the entry's env, default 60000) + the default `mempalace_event_wait` (60000) + 10000 ms, unless larger:
  the broker always answers first. MEMPALACE_MCP_TIMEOUT_MS itself is not written (its default applies;
  an env value in the entry is kept and counted); there is no MEMPALACE_MCP_INIT_TIMEOUT_MS to set.
- claude-code: nothing. Its start-up timeout is `MCP_TIMEOUT`, read from Claude Code's own environment,
  not per server (an entry's `env` goes to the server), and its default leaves room for a cold start.

How the file is changed: by splicing text (mp_ssh_bridge/jsonc.py), never by re-serialising it. Only the
text of the entry (or the member added) changes; comments, trailing commas, key order and the layout of
everything else stay byte for byte. A replaced entry is rewritten whole, so comments INSIDE it are gone
while installed (uninstall puts its original text back). Before writing, the new text is parsed again
and must equal the old value with exactly this change, else nothing is written; a file that is not
valid JSON (JSONC for opencode) is refused untouched. The diff is printed; `--dry-run` stops there.
The file is replaced atomically with its mode kept (through a symlink: the file it points to), and not
at all if it changed while this ran (Claude Code rewrites `~/.claude.json` as it goes).

Backup: before the first change, `<file>.mp-bridge.bak`: the file as it was before mp-bridge ever
changed it, never overwritten. A later changing install whose file differs from it adds
`<file>.mp-bridge.<YYYYmmdd-HHMMSS>.bak`. Uninstall leaves backups in place for a manual restore.

Record: `$XDG_STATE_HOME/mp-ssh-bridge/wiring.json` (default `~/.local/state/...`), one record per file
(keyed by its real path): what was added or replaced (key path, the value before with its exact text,
the value written, the splice) and a hash of the file right after. Nothing is left beside the file in a
project but the backup; the record file goes once nothing is left to undo. Uninstall: a file unchanged since install gets its splices undone, byte for
byte. A file edited since gets each entry back (its old text) or removed (and the `mcpServers` / `mcp`
object with it when install created it and it holds nothing else), keeping the other edits; a file
install created is removed when what is left is, but for whitespace, the skeleton install wrote (a comment
added to it keeps it). The record is written before the file; if the file cannot be written the record
is taken back. An entry already back as it was (or already
removed) is nothing to undo; an entry changed otherwise since install is refused with a message, and
nothing is written. Installing an entry again (the user had put the engine back) replaces its record:
uninstall then returns to the state just before the latest install.

Exit status: 0 done or nothing to do, 1 refused (what and why on stderr). Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import difflib
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from mp_ssh_bridge import jsonc, state
from mp_ssh_bridge.config import DEFAULT_TIMEOUT_MS as SESSION_DEADLINE_MS  # MEMPALACE_MCP_TIMEOUT_MS's default
from mp_ssh_bridge.protocol import EVENT_WAIT_DEFAULT_MS as EVENT_WAIT_MS  # mempalace_event_wait's default wait

CLIENTS = ("pi", "claude-code", "opencode")
ENTRY_NAME = "mempalace"
ENGINE_NAMES = {"mempalace-mcp"}
ENGINE_MODULES = {"mempalace.mcp_server", "mempalace.mcp_proxy"}
SHIM_NAME = "mp-shim"
LAUNCHERS = {"uvx", "uv", "pipx"}  # `uvx --from mempalace mempalace-mcp ARGS` becomes `mp-shim ARGS`
OPENCODE_TIMEOUT_MS = 30_000
PI_MARGIN_MS = 10_000
OPENCODE_SCHEMA = "https://opencode.ai/config.json"
MANIFEST_VERSION = 1


class WiringError(Exception):
    """What stops an install or uninstall, in one message for a person; nothing was written."""


# --------------------------------------------------------------------------- where
@dataclass(frozen=True)
class Target:
    """One client's config file in one scope, and where in it the servers live."""

    client: str
    scope: str  # "user" | "project"
    path: Path
    container: tuple[str, ...]
    jsonc: bool  # opencode reads JSONC; Claude Code and pi-mcp-adapter read strict JSON
    skeleton: dict[str, Any] = field(default_factory=dict)  # a new file's other members

    @property
    def label(self) -> str:
        return f"{self.client} ({self.scope})"


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or os.path.expanduser("~"))


def _xdg(environ: Mapping[str, str], name: str, default: str) -> Path:
    """An XDG base directory; a relative value is ignored, as the XDG spec says."""
    value = os.path.expanduser((environ.get(name) or "").strip())
    return Path(value) if value and os.path.isabs(value) else _home(environ) / default


def pi_agent_dir(environ: Mapping[str, str]) -> Path:
    value = (environ.get("PI_CODING_AGENT_DIR") or "").strip()
    return Path(os.path.expanduser(value)) if value else _home(environ) / ".pi" / "agent"


def _opencode_file(folder: Path) -> Path:
    """`opencode.json` or `opencode.jsonc` in `folder`: the one that exists; with both, the one that names
    mempalace (else opencode.json); with neither, opencode.json (to be created)."""
    found = [folder / name for name in ("opencode.json", "opencode.jsonc") if (folder / name).exists()]
    if len(found) == 2:
        for path in found:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = path.read_text(encoding="utf-8")
                if "mempalace" in text or SHIM_NAME in text:
                    return path
    return found[0] if found else folder / "opencode.json"


def target(client: str, project: bool, cwd: Path, environ: Mapping[str, str] = os.environ) -> Target:
    scope = "project" if project else "user"
    if client == "claude-code":
        path = cwd / ".mcp.json" if project else _home(environ) / ".claude.json"
        return Target(client, scope, path, ("mcpServers",), jsonc=False)
    if client == "opencode":
        folder = cwd if project else _xdg(environ, "XDG_CONFIG_HOME", ".config") / "opencode"
        return Target(client, scope, _opencode_file(folder), ("mcp",), jsonc=True,
                      skeleton={"$schema": OPENCODE_SCHEMA})
    if client == "pi":
        path = cwd / ".pi" / "mcp.json" if project else pi_agent_dir(environ) / "mcp.json"
        return Target(client, scope, path, ("mcpServers",), jsonc=False)
    raise WiringError(f"unknown client {client!r}: one of {', '.join(CLIENTS)}")


def manifest_path(environ: Mapping[str, str] = os.environ) -> Path:
    return _xdg(environ, "XDG_STATE_HOME", ".local/state") / "mp-ssh-bridge" / "wiring.json"


def default_shim() -> str:
    """The mp-shim of this installation (next to this Python, not resolved: a venv's scripts live beside its
    python link), else the bare name for PATH to find."""
    here = Path(os.path.abspath(sys.executable)).parent
    for name in (SHIM_NAME, SHIM_NAME + ".exe"):
        candidate = here / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return SHIM_NAME


# --------------------------------------------------------------------------- what an entry runs
def command_words(client: str, entry: Any) -> list[str] | None:
    """An entry's command line as words, or None when it is not a local command."""
    if not isinstance(entry, dict):
        return None
    command = entry.get("command")
    if client == "opencode":
        if isinstance(command, list) and command and all(isinstance(w, str) for w in command):
            return list(command)
        return None
    if not isinstance(command, str) or not command:
        return None
    words = [command]
    if " " in command and not os.path.exists(command):
        with contextlib.suppress(ValueError):
            words = shlex.split(command)
    args = entry.get("args")
    if isinstance(args, list) and all(isinstance(w, str) for w in args):
        words += args
    return words


def _base(word: str) -> str:
    name = os.path.basename(word.replace("\\", "/"))
    for ext in (".exe", ".cmd", ".bat"):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def engine_split(words: list[str] | None) -> tuple[list[str], list[str]] | None:
    """(the engine's own command, the arguments after it) when `words` runs mempalace-mcp: directly, as
    `python -m mempalace.mcp_server` (or `.mcp_proxy`), or through uvx / uv / pipx; else None."""
    if not words or runs_shim(words):
        return None
    first = _base(words[0])
    launched = first in LAUNCHERS
    for i, word in enumerate(words):
        if _base(word) in ENGINE_NAMES and (i == 0 or launched):
            return list(words[:i + 1]), list(words[i + 1:])
        if (first.startswith("python") or launched) and word == "-m" and words[i + 1:i + 2] and (
                words[i + 1] in ENGINE_MODULES):
            return list(words[:i + 2]), list(words[i + 2:])
    return None


def engine_args(words: list[str] | None) -> list[str] | None:
    """The arguments after the engine when `words` runs mempalace-mcp (see `engine_split`), else None."""
    split = engine_split(words)
    return None if split is None else split[1]


def engine_command(words: list[str] | None) -> str | None:
    """The engine `words` runs, as a command line for MP_BRIDGE_ENGINE (shell-quoted: settings split it with
    shlex), when it is anything but the bare `mempalace-mcp` the broker would find by itself; else None."""
    split = engine_split(words)
    if split is None or split[0] == ["mempalace-mcp"]:
        return None
    return shlex.join(split[0])


def _names_engine(word: str) -> bool:
    return not word.startswith("-") and (_base(word) in ENGINE_NAMES or word in ENGINE_MODULES)


def _inner_words(word: str) -> list[str] | None:
    """The words of a shell string (`sh -c "exec mempalace-mcp --palace /p"`), None when it does not split."""
    lexer = shlex.shlex(word, posix=True, punctuation_chars=True)  # `mempalace-mcp;` and `a&&b` split too
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:
        return None


def engine_wrapped(words: list[str] | None) -> bool:
    """`words` names the engine in a way `engine_args` does not take apart (`env X=1 mempalace-mcp`,
    `docker run ... mempalace-mcp`, a shell string `sh -c "exec mempalace-mcp"`): replacing it would drop
    what wraps it, so a person has to."""
    if not words or runs_shim(words) or engine_args(words) is not None:
        return False
    for word in words:
        if _names_engine(word):
            return True
        inner = _inner_words(word)
        if inner is None:  # unbalanced quoting: any mention of the engine counts
            if any(name in word for name in (*ENGINE_NAMES, *ENGINE_MODULES)):
                return True
        elif any(_names_engine(w) for w in inner):
            return True
    return False


def runs_shim(words: list[str] | None) -> bool:
    return bool(words) and any(_base(w) == SHIM_NAME for w in words or [])


def pi_request_timeout(entry: dict[str, Any] | None) -> int:
    env = (entry or {}).get("env")
    deadline = SESSION_DEADLINE_MS
    if isinstance(env, dict):
        with contextlib.suppress(TypeError, ValueError):
            deadline = int(str(env.get("MEMPALACE_MCP_TIMEOUT_MS", "")).strip()) or SESSION_DEADLINE_MS
    return max(deadline, 1) + EVENT_WAIT_MS + PI_MARGIN_MS


def _at_least(entry: dict[str, Any], key: str, value: int) -> None:
    old = entry.get(key)
    if not (isinstance(old, int) and not isinstance(old, bool) and old >= value):
        entry[key] = value


def env_key(client: str) -> str:
    """Where an entry keeps its server's environment: opencode `environment`, Claude Code and pi `env`."""
    return "environment" if client == "opencode" else "env"


def entry_engine(client: str, entry: Any) -> str | None:
    """The MP_BRIDGE_ENGINE an entry's own environment already sets, if any."""
    env = entry.get(env_key(client)) if isinstance(entry, dict) else None
    value = env.get("MP_BRIDGE_ENGINE") if isinstance(env, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def shim_entry(client: str, old: dict[str, Any] | None, args: list[str], shim: str,
               engine: str | None = None) -> dict[str, Any]:
    """The entry that runs `shim args`: `old` with its command replaced (the rest kept), or a new one.
    `engine` (the command the old entry ran, when not the bare `mempalace-mcp`) goes into the entry's
    environment as MP_BRIDGE_ENGINE unless that already names one: the broker then runs that very engine."""
    if client == "opencode":
        entry = dict(old) if old else {"type": "local", "command": [], "enabled": True}
        entry["command"] = [shim, *args]
        _at_least(entry, "timeout", OPENCODE_TIMEOUT_MS)
    else:
        entry = dict(old) if old else ({"type": "stdio"} if client == "claude-code" else {})
        entry["command"] = shim
        entry["args"] = list(args)
        if client == "claude-code" and not old:
            entry["env"] = {}
    if engine is not None and entry_engine(client, entry) is None:
        key = env_key(client)
        env = entry.get(key)
        if env is not None and not isinstance(env, dict):
            raise WiringError(f"the entry's {key!r} is not an object, so MP_BRIDGE_ENGINE={engine} cannot be kept "
                              "in it; fix it by hand; nothing changed")
        entry[key] = {**(env or {}), "MP_BRIDGE_ENGINE": engine}
    if client == "pi":
        _at_least(entry, "requestTimeoutMs", pi_request_timeout(entry))
    return entry


def engine_note(client: str, entry: dict[str, Any], engine: str | None) -> str:
    """Which engine the broker will run for `entry`, for the output."""
    named = entry_engine(client, entry)
    if named is None:
        return "engine: mempalace-mcp as the broker finds it (PATH, or MP_BRIDGE_ENGINE where the broker starts)"
    if engine is not None and named == engine:
        return f"engine kept: {engine} (MP_BRIDGE_ENGINE in the entry's {env_key(client)})"
    return f"engine: {named} (the entry's own MP_BRIDGE_ENGINE)"


def _with_palace(args: list[str], palace: str | None) -> list[str]:
    if not palace:
        return args
    palace = os.path.abspath(os.path.expanduser(palace))
    for i, word in enumerate(args):
        named = args[i + 1] if word == "--palace" and i + 1 < len(args) else (
            word.split("=", 1)[1] if word.startswith("--palace=") else None)
        if named is not None:
            if os.path.abspath(os.path.expanduser(named)) != palace:
                raise WiringError(f"the entry already names --palace {named}, not {palace}: change one of them by hand")
            return args
    return [*args, "--palace", palace]


# --------------------------------------------------------------------------- values at key paths
def _get(value: Any, path: list[str]) -> Any:
    for key in path:
        value = value[key]
    return value


def _set(value: Any, path: list[str], new: Any) -> Any:
    value = copy.deepcopy(value)
    _get(value, path[:-1])[path[-1]] = copy.deepcopy(new)
    return value


def _delete(value: Any, path: list[str]) -> Any:
    value = copy.deepcopy(value)
    del _get(value, path[:-1])[path[-1]]
    return value


def _member(root: jsonc.Node, path: list[str]) -> tuple[jsonc.Node, jsonc.Member] | None:
    """The object holding the last key of `path`, and that member; None when missing. A key spelled twice
    on the way is refused: which one a client keeps is its own business."""
    parent = jsonc.find(root, path[:-1])
    if parent is None or parent.kind != "object":
        return None
    for depth in range(len(path)):
        node = jsonc.find(root, path[:depth])
        if node is not None and node.count(path[depth]) > 1:
            raise WiringError(f"the key {'.'.join(path[:depth + 1])} appears twice; make it one by hand")
    member = parent.get(path[-1])
    return (parent, member) if member else None


def _show(path: list[str]) -> str:
    return ".".join(json.dumps(p) if not p.replace("-", "").replace("_", "").isalnum() else p for p in path)


# --------------------------------------------------------------------------- changes
@dataclass
class Change:
    """One member install added or whose value it replaced, and the splice that did it."""

    action: str  # "replace" | "add" | "create"
    path: list[str]  # the member changed: an entry, or the container install created with the entry in it
    before: Any  # the value replaced (action "replace"), else None
    written: Any
    entry: list[str]  # the server entry's own path
    written_entry: Any
    offset: int = 0
    old: str = ""
    new: str = ""
    anchor: int = 0
    sha_after: str = ""  # the file's hash right after this change: while it holds, undoing is `edit.revert`

    @property
    def edit(self) -> jsonc.Edit:
        return jsonc.Edit(self.offset, self.old, self.new, self.anchor)


def _parse(text: str, t: Target) -> jsonc.Node:
    try:
        root = jsonc.parse(text, jsonc=t.jsonc)
    except jsonc.JsoncError as exc:
        raise WiringError(f"{t.path} is not valid {'JSONC' if t.jsonc else 'JSON'} ({exc}); nothing changed") from None
    if root.kind != "object":
        raise WiringError(f"{t.path} does not hold a JSON object; nothing changed")
    return root


def _checked(text: str, edit: jsonc.Edit, expected: Any, t: Target) -> str | None:
    """`text` with `edit` applied if the result parses (in the file's dialect; strict JSON also by the json
    module) to exactly `expected`, else None: a splice that would break the file or change anything else
    is never written."""
    try:
        new = edit.apply(text)
        value = jsonc.loads(new, jsonc=t.jsonc)
        if not t.jsonc:
            json.loads(new.lstrip("\ufeff"))
    except ValueError:
        return None
    return new if jsonc.canonical(value) == jsonc.canonical(expected) else None


def plan_install(text: str, t: Target, shim: str, palace: str | None) -> tuple[str, list[Change], list[str]]:
    """The new text, the changes that make it, and what was done (or why nothing), for an existing file."""
    root = _parse(text, t)
    style = jsonc.style_of(text, root)
    container = list(t.container)
    found = _member(root, container)
    if found is None:
        entry = shim_entry(t.client, None, _with_palace([], palace), shim)
        written = {ENTRY_NAME: entry}
        edit = jsonc.insert_member(text, root, container[-1], written, style)
        new = _checked(text, edit, _set(root.to_python(), container, written), t)
        if new is None:
            raise WiringError(f"could not add {_show(container)} to {t.path} cleanly; nothing changed")
        change = Change("add", container, None, written, [*container, ENTRY_NAME], entry,
                        edit.offset, edit.old, edit.new, edit.anchor, _sha(new))
        return new, [change], [f"added server {ENTRY_NAME!r} ({_show(container)} was not there); "
                                    f"{engine_note(t.client, entry, None)}"]
    if found[1].value.kind != "object":
        raise WiringError(f"{_show(container)} in {t.path} is not an object; nothing changed")
    servers = found[1].value.to_python()
    for name, e in servers.items():
        if engine_wrapped(command_words(t.client, e)):
            raise WiringError(f"{t.path}: server {name!r} runs mempalace-mcp through "
                              f"{(command_words(t.client, e) or ['?'])[0]!r} (a wrapper or shell command that "
                              "replacing it would drop; adding another server beside it would make two writers); "
                              "make it run mp-shim by hand; nothing changed")
    engines = [name for name, e in servers.items() if engine_args(command_words(t.client, e)) is not None]
    if not engines:
        shims = [name for name, e in servers.items() if runs_shim(command_words(t.client, e))]
        if shims:
            return text, [], [f"already runs mp-shim (server {shims[0]!r}): nothing to change"]
        if ENTRY_NAME in servers:
            raise WiringError(f"{t.path} has a server named {ENTRY_NAME!r} that runs something else "
                              f"({json.dumps(servers[ENTRY_NAME])[:120]}); rename or remove it first; nothing changed")
        entry = shim_entry(t.client, None, _with_palace([], palace), shim)
        path = [*container, ENTRY_NAME]
        edit = jsonc.insert_member(text, found[1].value, ENTRY_NAME, entry, style)
        new = _checked(text, edit, _set(root.to_python(), path, entry), t)
        if new is None:
            raise WiringError(f"could not add server {ENTRY_NAME!r} to {t.path} cleanly; nothing changed")
        change = Change("add", path, None, entry, path, entry, edit.offset, edit.old, edit.new, edit.anchor, _sha(new))
        return new, [change], [f"added server {ENTRY_NAME!r}; {engine_note(t.client, entry, None)}"]
    changes: list[Change] = []
    done: list[str] = []
    for name in engines:  # one splice at a time, each on the text the previous one left
        root = _parse(text, t)
        path = [*container, name]
        located = _member(root, path)
        assert located is not None
        old_entry = located[1].value.to_python()
        words = command_words(t.client, old_entry)
        args = engine_args(words) or []
        engine = engine_command(words)
        entry = shim_entry(t.client, old_entry, _with_palace(args, palace), shim, engine)
        edit = jsonc.replace_value(text, located[1], entry, style)
        new = _checked(text, edit, _set(root.to_python(), path, entry), t)
        if new is None:
            raise WiringError(f"could not replace server {name!r} in {t.path} cleanly; nothing changed")
        changes.append(Change("replace", path, old_entry, entry, path, entry, edit.offset, edit.old, edit.new, 0,
                              _sha(new)))
        done.append(f"server {name!r} ran mempalace-mcp{f' as {engine}' if engine else ''}; now runs {shim}; "
                    f"{engine_note(t.client, entry, engine)}")
        text = new
    return text, changes, done


def _render_file(value: dict[str, Any]) -> str:
    return jsonc.render(value, jsonc.Style()) + "\n"


def _bare(text: str) -> str:
    """`text` without its whitespace (and BOM), to compare layouts that differ only in spacing."""
    return "".join(text.lstrip("\ufeff").split())


def _undo(text: str, change: Change, t: Target) -> str:
    """`text` without `change`, keeping every other edit made since; WiringError if the entry was changed."""
    root = _parse(text, t)
    value = root.to_python()
    entry = _member(root, change.entry)
    if change.action == "replace" and entry is not None and (
            jsonc.canonical(entry[1].value.to_python()) == jsonc.canonical(change.before)):
        return text  # already back as it was: nothing to undo
    if change.action != "replace" and entry is None:  # already removed; an empty container install made goes too
        container = _member(root, change.path) if change.path != change.entry else None
        if container is not None and container[1].value.kind == "object" and not container[1].value.members:
            new = _checked(text, jsonc.remove_member(text, container[0], change.path[-1]), _delete(value, change.path), t)
            return text if new is None else new
        return text
    located = _member(root, change.path)
    if located is not None and jsonc.canonical(located[1].value.to_python()) == jsonc.canonical(change.written):
        parent, member = located
        if change.action == "replace":
            expected = _set(value, change.path, change.before)
            candidates = [jsonc.Edit(member.value.start, text[member.value.start:member.value.end], change.old),
                          jsonc.replace_value(text, member, change.before, jsonc.style_of(text, root))]
        else:
            expected = _delete(value, change.path)
            candidates = [jsonc.remove_member(text, parent, change.path[-1])]
            if change.action == "add":  # the very text install inserted, if it is still there as it was
                start = member.key_start - change.anchor
                if start >= 0 and text[start:start + len(change.new)] == change.new:
                    candidates.insert(0, jsonc.Edit(start, change.new, change.old))
        for edit in candidates:
            new = _checked(text, edit, expected, t)
            if new is not None:
                return new
        raise WiringError(f"could not undo {_show(change.path)} in {t.path} cleanly; nothing changed")
    if change.entry != change.path:  # install created the container; the user put more servers in it since
        located = _member(root, change.entry)
        if located is not None and jsonc.canonical(located[1].value.to_python()) == jsonc.canonical(change.written_entry):
            new = _checked(text, jsonc.remove_member(text, located[0], change.entry[-1]), _delete(value, change.entry), t)
            if new is not None:
                return new
            raise WiringError(f"could not remove {_show(change.entry)} from {t.path} cleanly; nothing changed")
    raise WiringError(f"{t.path}: {_show(change.entry)} was changed since install (install wrote "
                      f"{json.dumps(change.written_entry)}); "
                      "not undone, nothing changed: edit it by hand (the backup holds the file before install)")


# --------------------------------------------------------------------------- files
def _read(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WiringError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WiringError(f"{path} is not UTF-8 text; nothing changed") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str, mode: int | None) -> None:
    """`text` in place of `path` (state.write_text_atomic), keeping the old file's mode (a new file: the umask's);
    through a symlink, the file it points to is replaced."""
    text.encode("utf-8")  # before anything is made: a text that cannot be written changes nothing
    path = Path(os.path.realpath(path))
    if mode is None:
        mode = path.stat().st_mode if path.exists() else 0o666 & ~_umask()
    state.write_text_atomic(path, text, mode & 0o777)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _backup(path: Path, text: str, mode: int) -> Path | None:
    """`<file>.mp-bridge.bak` the first time (never overwritten); a timestamped one when that holds other text."""
    first = path.with_name(path.name + ".mp-bridge.bak")
    if first.exists():
        if _read(first) == text:
            return first
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        first = path.with_name(f"{path.name}.mp-bridge.{stamp}.bak")
        if first.exists() and _read(first) == text:
            return first
    fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o777)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))
    return first


def _load_manifest(path: Path) -> dict[str, Any]:
    text = _read(path)
    if text is None:
        return {"version": MANIFEST_VERSION, "files": {}}
    try:
        data = json.loads(text)
    except ValueError:
        raise WiringError(f"the install record {path} is not valid JSON: fix or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise WiringError(f"the install record {path} is not one mp-bridge wrote: fix or remove it")
    return data


def _save_manifest(path: Path, data: dict[str, Any]) -> None:
    if not data["files"]:  # nothing left to undo: no trace
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, json.dumps(data, indent=1, ensure_ascii=True) + "\n", 0o600)


def _diff(old: str | None, new: str | None, path: Path) -> str:
    def lines(text: str | None) -> list[str]:
        out = (text or "").splitlines(keepends=True)
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n\\ No newline at end of file\n"
        return out

    return "".join(difflib.unified_diff(lines(old), lines(new), "/dev/null" if old is None else str(path),
                                        "/dev/null" if new is None else str(path)))


def _missing_dirs(folder: Path) -> list[Path]:
    out = []
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out


# --------------------------------------------------------------------------- elsewhere
def _other_sources(t: Target, cwd: Path, environ: Mapping[str, str]) -> list[tuple[Path, list[list[str]], str]]:
    """Other files this client reads servers from: (file, container paths, how they are changed)."""
    home = _home(environ)
    if t.client == "claude-code":
        return [(home / ".claude.json", [["mcpServers"], ["projects", "*", "mcpServers"]],
                 "mp-bridge install claude-code, or `claude mcp` for a project's own servers"),
                (cwd / ".mcp.json", [["mcpServers"]], "mp-bridge install claude-code --project")]
    if t.client == "opencode":
        folder = _xdg(environ, "XDG_CONFIG_HOME", ".config") / "opencode"
        return [(p, [["mcp"]], "mp-bridge install opencode" + (" --project" if p.parent == cwd else ""))
                for p in (folder / "opencode.json", folder / "opencode.jsonc", cwd / "opencode.json",
                          cwd / "opencode.jsonc")]
    shared = "edit it by hand (a file other tools read too)"
    return [(home / ".config" / "mcp" / "mcp.json", [["mcpServers"]], shared),
            (home / ".agents" / "mcp.json", [["mcpServers"]], shared),
            (home / ".agents" / "mcp" / "mcp.json", [["mcpServers"]], shared),
            (pi_agent_dir(environ) / "mcp.json", [["mcpServers"]], "mp-bridge install pi"),
            (cwd / ".mcp.json", [["mcpServers"]], shared),
            (cwd / ".pi" / "mcp.json", [["mcpServers"]], "mp-bridge install pi --project")]


def _containers(value: Any, pattern: list[str], prefix: list[str]) -> list[tuple[list[str], Any]]:
    if not pattern:
        return [(prefix, value)]
    if not isinstance(value, dict):
        return []
    head, rest = pattern[0], pattern[1:]
    keys = list(value) if head == "*" else [head] if head in value else []
    return [found for k in keys for found in _containers(value[k], rest, [*prefix, k])]


def engines_elsewhere(t: Target, cwd: Path, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Servers that still run mempalace-mcp in the other files this client reads: one note each."""
    notes = []
    this = os.path.realpath(t.path)
    for path, patterns, how in _other_sources(t, cwd, environ):
        try:
            text = path.read_text(encoding="utf-8")
            value = jsonc.loads(text, jsonc=True)
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        for pattern in patterns:
            for where, servers in _containers(value, pattern, []):
                if os.path.realpath(path) == this and where == list(t.container) or not isinstance(servers, dict):
                    continue
                for name, entry in servers.items():
                    words = command_words(t.client, entry)
                    if engine_args(words) is not None or engine_wrapped(words):
                        notes.append(f"note: {path} {_show([*where, name])} still runs mempalace-mcp beside the "
                                     f"broker when {t.client} loads it: {how}")
    return notes


# --------------------------------------------------------------------------- commands
def install(t: Target, shim: str, palace: str | None = None, dry_run: bool = False, out: IO[str] = sys.stdout,
            cwd: Path | None = None, environ: Mapping[str, str] = os.environ) -> int:
    real = Path(os.path.realpath(t.path))
    text = _read(real)
    if text is None:
        entry = shim_entry(t.client, None, _with_palace([], palace), shim)
        written = {ENTRY_NAME: entry}
        new = _render_file({**t.skeleton, t.container[0]: written})
        changes = [Change("create", list(t.container), None, written, [*t.container, ENTRY_NAME], entry, 0, "", new, 0,
                          _sha(new))]
        done = [f"created it with server {ENTRY_NAME!r}; {engine_note(t.client, entry, None)}"]
    else:
        new, changes, done = plan_install(text, t, shim, palace)
    notes = engines_elsewhere(t, cwd or Path.cwd(), environ)
    if not changes:
        print(f"{t.label}: {t.path} {done[0]}", file=out)
        for note in notes:
            print(note, file=out)
        return 0
    out.write(_diff(text, new, t.path))
    if dry_run:
        print(f"{t.label}: {t.path}: would be changed: {'; '.join(done)} (--dry-run: nothing written)", file=out)
        for note in notes:
            print(note, file=out)
        return 0
    try:
        new.encode("utf-8")
    except UnicodeEncodeError:
        raise WiringError(f"{t.path}: the new text would hold a lone surrogate (a \\ud800-style escape in a value "
                          "install rewrites), which cannot be written as UTF-8; fix it by hand; nothing changed") from None
    record_path = manifest_path(environ)
    manifest = _load_manifest(record_path)  # before writing anything: a bad record stops us here
    previous = copy.deepcopy(manifest)
    created_dirs = _missing_dirs(real.parent)
    backup: Path | None = None
    mode: int | None = None
    if text is not None:
        if _read(real) != text:
            raise WiringError(f"{t.path} changed while this ran; nothing changed, run it again")
        mode = real.stat().st_mode
        backup = _backup(real, text, mode)
    record = manifest["files"].get(str(real))
    if record is None or text is None:  # new, or the file was deleted since: what the old record undid is gone
        record = {"client": t.client, "scope": t.scope, "path": str(t.path), "created": text is None,
                  "created_dirs": [str(d) for d in created_dirs], "backup": str(backup) if backup else None,
                  "changes": []}
        manifest["files"][str(real)] = record
    superseded = [c.entry for c in changes]  # an entry installed again: undo goes back to just before this install
    record["changes"] = [c for c in record["changes"] if c.get("entry") not in superseded]
    record["changes"].extend(asdict(c) for c in changes)
    if record.get("created") and not any(c.get("action") == "create" for c in record["changes"]):
        # The file install made is no longer what the record undoes (its entry was put back by hand and
        # installed again): uninstall goes back to that file, it does not delete it.
        record["created"] = False
        record["created_dirs"] = []
    if backup and not record.get("backup"):
        record["backup"] = str(backup)
    record["installed_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    _save_manifest(record_path, manifest)  # the record first: a change that cannot be recorded is not made
    try:
        if text is None:
            real.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(real, new, mode)
    except BaseException:
        for folder in created_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
        with contextlib.suppress(OSError, ValueError):
            _save_manifest(record_path, previous)
        raise
    print(f"{t.label}: {t.path}: {'; '.join(done)}", file=out)
    if backup:
        print(f"backup: {backup}", file=out)
    print(f"recorded in {record_path} (mp-bridge uninstall {t.client}{' --project' if t.scope == 'project' else ''} "
          "undoes it)", file=out)
    for note in notes:
        print(note, file=out)
    return 0


def uninstall(t: Target, dry_run: bool = False, out: IO[str] = sys.stdout,
              environ: Mapping[str, str] = os.environ) -> int:
    real = Path(os.path.realpath(t.path))
    record_path = manifest_path(environ)
    manifest = _load_manifest(record_path)
    record = manifest["files"].get(str(real))
    if record is None:
        print(f"{t.label}: {t.path}: nothing to undo (no record in {record_path} that mp-bridge install changed it)",
              file=out)
        return 0
    try:
        changes = [Change(**c) for c in record["changes"]]
    except (TypeError, KeyError):
        raise WiringError(f"the record of {t.path} in {record_path} is not one mp-bridge wrote: fix or remove it") from None
    text = _read(real)
    if text is None:
        print(f"{t.label}: {t.path} is gone; the record of its install is dropped", file=out)
        if not dry_run:
            del manifest["files"][str(real)]
            _save_manifest(record_path, manifest)
        return 0
    new: str | None = text
    pending = list(changes)
    while pending and new is not None and _sha(new) == pending[-1].sha_after:  # untouched since: byte for byte
        change = pending.pop()
        new = None if change.action == "create" else change.edit.revert(new)
    for change in reversed(pending):  # edited since: entry by entry, keeping the other edits
        assert new is not None
        new = _undo(new, change, t)
    if pending and record.get("created"):
        assert new is not None
        skeletons = {_bare(_render_file({**t.skeleton, t.container[0]: {}})), _bare(_render_file(t.skeleton))}
        if _bare(new) in skeletons:  # install made the file and nothing else (not even a comment) was put in it
            new = None
    if new == text:
        print(f"{t.label}: {t.path}: nothing to undo (already as before install); the record of it is dropped",
              file=out)
        if not dry_run:
            del manifest["files"][str(real)]
            _save_manifest(record_path, manifest)
        return 0
    out.write(_diff(text, new, t.path))
    if dry_run:
        print(f"{t.label}: {t.path}: would be restored (--dry-run: nothing written)", file=out)
        return 0
    if _read(real) != text:
        raise WiringError(f"{t.path} changed while this ran; nothing changed, run it again")
    if new is None:
        real.unlink()
        for folder in record.get("created_dirs", []):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
        what = "removed (install had created it)"
    else:
        _write_atomic(real, new, real.stat().st_mode)
        what = "restored"
    del manifest["files"][str(real)]
    _save_manifest(record_path, manifest)
    print(f"{t.label}: {t.path}: {what}" + (f"; the backup stays: {record['backup']}" if record.get("backup") else ""),
          file=out)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    try:
        t = target(args.client, args.project, Path.cwd())
        return install(t, args.shim or default_shim(), getattr(args, "palace", None), args.dry_run)
    except (WiringError, OSError) as exc:
        print(f"mp-bridge install: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # UnicodeError among them: text that cannot be written; nothing was left half done
        print(f"mp-bridge install: cannot write the change ({exc}); nothing changed", file=sys.stderr)
        return 1


def cmd_uninstall(args: argparse.Namespace) -> int:
    try:
        return uninstall(target(args.client, args.project, Path.cwd()), args.dry_run)
    except (WiringError, OSError) as exc:
        print(f"mp-bridge uninstall: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # UnicodeError among them
        print(f"mp-bridge uninstall: cannot write the change ({exc}); nothing changed", file=sys.stderr)
        return 1


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """`mp-bridge install|uninstall pi|claude-code|opencode [--project] [--dry-run]`."""
    i = subparsers.add_parser("install", parents=[common], help="point an agent's MCP config at mp-shim (replaces "
                              "mempalace-mcp or adds 'mempalace'); shows the diff, backs up, records what it did")
    i.add_argument("client", choices=CLIENTS)
    i.add_argument("--project", action="store_true", help="the project's file in this directory (.mcp.json, "
                   "opencode.json[c], .pi/mcp.json) instead of the user's")
    i.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    i.add_argument("--shim", help="the command to write (default: the mp-shim next to this Python, else `mp-shim`)")
    i.set_defaults(func=cmd_install)
    u = subparsers.add_parser("uninstall", help="undo what `mp-bridge install` changed in that file, keeping edits "
                              "made since (refuses when the entry itself was changed)")
    u.add_argument("client", choices=CLIENTS)
    u.add_argument("--project", action="store_true", help="the project's file in this directory")
    u.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    u.set_defaults(func=cmd_uninstall)
