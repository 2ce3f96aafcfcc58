"""`mp-bridge migrate`: bring what an older bridge wrote to the wrong files into the ones a plain engine opens.

Why this exists: before it became a true drop-in (commit 71fa2a2), the bridge always ran its engine as
`mempalace-mcp --palace <state dir>/palace` (`~/.mempalace/palace` unless MEMPALACE_PATH, the palace
variables or `<state dir>/config.json` said otherwise). A plain mempalace 3.11 engine without `--palace`
does not read two things that came of it:

- knowledge-graph facts in `<palace>/knowledge_graph.sqlite3`: with `--palace` mempalace keeps the
  graph inside the palace, without it in `~/.mempalace/knowledge_graph.sqlite3`;
- drawers (diary entries are drawers too) in a palace other than the one mempalace resolves now:
  `~/.mempalace/palace` when the user's memory is elsewhere (MEMPALACE_CONFIG_DIR, a config file), and
  the commonest case, the XDG palace (`~/.config/mempalace/palace`) a fresh 3.11 user filled before
  the bridge: the bridge's first write created `~/.mempalace/palace/chroma.sqlite3`, which mempalace
  takes for a legacy install, so since then every engine opens `~/.mempalace/palace` instead.

The target is always `settings.memory`, the files a plain engine opens with this environment: a
migration moves data, never which files mempalace opens. With `--palace` (or a palace variable) the
old bridge used the same palace, so only the knowledge graph can be stranded, and without a flag only.

`find_stranded` names them, read-only and bounded (doctor calls it through `stranded_checks`; in a
container it is skipped: the files live on the host, and chroma must not be opened across a bind
mount). `migrate` prints the plan (a dry run) or, with apply: no broker or degraded session may run
for any memory involved (their broker.lock is held for the whole run, so none starts) and no plain
mempalace writer (mempalace's own palace lock, held by the engine's interpreter); the target files are
copied into a timestamped backup directory; knowledge graphs are merged with sqlite (entities by id,
triples by id and by fact), drawers by mempalace's own code in the ENGINE's interpreter (records with
their ids, documents, metadata and embeddings; ids already there are skipped); everything is
verified; then each source is moved into the backup directory, so a second run finds nothing.
A failed run can be run again: what was merged is skipped, and a source is moved only once verified.
Stdlib only at import.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mp_ssh_bridge import liveness, palace, samepath, state

if TYPE_CHECKING:
    import argparse

    from mp_ssh_bridge.settings import Settings

CHROMA = "chroma.sqlite3"
KG = palace.KG_NAME
SIDE_FILES = ("-wal", "-shm", "-journal")  # a sqlite file's companions: they move with it
READ_SECONDS = 5.0  # bound on one read-only count (doctor pays it)
OPEN_TIMEOUT = 2.0  # sqlite busy timeout of a read-only open
WRITE_TIMEOUT = 10.0  # sqlite busy timeout of the merge's write transaction
LOCK_WAIT = 90.0  # the engine's interpreter: start, import mempalace, take the palace locks
COPY_WAIT_BASE, COPY_WAIT_PER_RECORD = 120.0, 0.05  # bound on the drawer copy
BACKUP_DIR = "mp-bridge-migrate"  # under ~/.mempalace: one timestamped directory per --apply
OLD_BRIDGE = "an older bridge, which always ran the engine with --palace"
MARK = "MPB-MIGRATE "  # the engine script's protocol lines on stdout (mempalace may print other things)


def _n(count: int, word: str) -> str:
    """`1 fact`, `2 facts`, `2 entities`."""
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


class MigrateError(Exception):
    """What stops a migration, in one line for a person."""


@dataclass(frozen=True)
class Stranded:
    """Memories in files a plain engine with this environment does not read, and where they belong."""

    what: str  # "drawers" | "knowledge graph"
    source: str
    target: str
    why: str
    collections: dict[str, int] = field(default_factory=dict)  # drawers: records per chroma collection
    diary: int = 0  # drawers: of which diary entries
    triples: int = 0
    entities: int = 0
    problem: str | None = None  # the source exists but could not be read

    @property
    def drawers(self) -> int:
        return sum(self.collections.values())

    def counts(self) -> str:
        if self.problem:
            return f"unreadable ({self.problem})"
        if self.what == "drawers":
            extra = [f"{n} in {name}" for name, n in sorted(self.collections.items()) if len(self.collections) > 1]
            diary = [_n(self.diary, "diary entry")] if self.diary else []
            inner = ", ".join(diary + extra)
            return _n(self.drawers, "drawer") + (f" ({inner})" if inner else "")
        return f"{_n(self.triples, 'fact')}, {_n(self.entities, 'entity')}"

    def describe(self) -> str:
        return f"{self.what}: {self.counts()} in {self.source}, which a plain mempalace-mcp does not read ({self.why})"

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "source": self.source, "target": self.target, "why": self.why,
                "collections": dict(self.collections), "diary": self.diary, "triples": self.triples,
                "entities": self.entities, "problem": self.problem}


# --------------------------------------------------------------------------- finding them (read-only)
def _home() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def _real(path: str) -> str:
    return samepath.canonical(path)  # macOS: one spelling whatever the case, normalization or /private


def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def old_bridge_palace(settings: Settings, home: str) -> str:
    """The palace a bridge before the drop-in release gave its engine as --palace (its `default_palace`)."""
    if settings.palace is not None:
        return str(settings.palace)
    env = os.environ.get("MEMPALACE_PALACE_PATH") or os.environ.get("MEMPALACE_PALACE")
    if env:
        return _expand(env)
    root = str(settings.mempalace_path) if settings.mempalace_path else os.path.join(home, ".mempalace")
    configured = palace._configured_palace(root)  # the same config.json reader the engine's rules use
    return _expand(configured) if configured else os.path.join(root, "palace")


def _xdg_palace(home: str) -> str | None:
    """The palace a plain 3.11 engine used before `~/.mempalace` looked like a legacy install (None when an
    explicit MEMPALACE_CONFIG_DIR means the config dir never depended on it)."""
    if (os.environ.get("MEMPALACE_CONFIG_DIR") or "").strip():
        return None
    xdg = os.path.expanduser((os.environ.get("XDG_CONFIG_HOME") or "").strip())  # as palace.config_dir, minus legacy
    config = os.path.join(xdg, "mempalace") if xdg and os.path.isabs(xdg) else os.path.join(home, ".config", "mempalace")
    configured = palace._configured_palace(config)
    return _expand(configured) if configured else os.path.join(config, "palace")


def _drawer_candidates(settings: Settings, memory: palace.Memory, home: str) -> list[tuple[str, str]]:
    """(palace, why) the user's drawers may be in besides the target; only for a default palace (no flag,
    no palace variable: then the old bridge used the same one, and other palaces are not this memory's)."""
    if memory.palace_flag or any(os.environ.get(name) for name in palace.PALACE_ENV):
        return []
    legacy = os.path.join(home, ".mempalace")
    now = f"a plain mempalace-mcp with this environment opens {memory.palace}"
    out = [(old_bridge_palace(settings, home), f"written by {OLD_BRIDGE}; {now}")]
    xdg = _xdg_palace(home)
    if xdg is not None and _real(memory.config_dir) == _real(legacy):
        out.append((xdg, f"mempalace 3.11 opens it only while {legacy} is no legacy install, and it is one now "
                         f"({_legacy_marker(legacy)}), so it opens {memory.palace}"))
    return out


def _legacy_marker(legacy: str) -> str:
    """Why mempalace takes `legacy` for a legacy install (palace._has_legacy_install's markers)."""
    for name in palace.LEGACY_MARKERS:
        if os.path.isfile(os.path.join(legacy, name)):
            return f"it has {name}"
    return f"palace/{CHROMA} exists, created by an older bridge"


def _kg_candidates(settings: Settings, memory: palace.Memory, home: str,
                   palaces: list[str]) -> list[tuple[str, str]]:
    if memory.palace_flag:
        return []
    why = f"written by {OLD_BRIDGE}; without --palace mempalace reads {memory.kg}"
    seen = [old_bridge_palace(settings, home), memory.palace, *palaces]
    return [(os.path.join(p, KG), why) for p in seen]


def _uri(path: str, mode: str) -> str:
    from urllib.parse import quote

    return f"file:{quote(os.path.abspath(path), safe='/')}?mode={mode}"


@contextmanager
def _reader(db: str, seconds: float = READ_SECONDS) -> Iterator[sqlite3.Connection]:
    """A read-only connection whose statements give up after `seconds` (never writes, never waits long)."""
    conn = sqlite3.connect(_uri(db, "ro"), uri=True, timeout=OPEN_TIMEOUT)
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
    try:
        yield conn
    finally:
        conn.close()


DRAWER_COUNT = """
SELECT c.name, COUNT(e.id) FROM collections c
JOIN segments s ON s.collection = c.id AND s.scope = 'METADATA'
LEFT JOIN embeddings e ON e.segment_id = s.id GROUP BY c.name
"""
DIARY_COUNT = """
SELECT COUNT(*) FROM embeddings e JOIN segments s ON e.segment_id = s.id AND s.scope = 'METADATA'
JOIN embedding_metadata m ON m.id = e.id WHERE m.key = 'room' AND m.string_value = 'diary'
"""


def count_drawers(palace_dir: str) -> tuple[dict[str, int], int]:
    """({collection: records}, diary entries) of a chroma palace, read-only. Raises sqlite3.Error."""
    with _reader(os.path.join(palace_dir, CHROMA)) as conn:
        collections = {str(name): int(n) for name, n in conn.execute(DRAWER_COUNT)}
        diary = int(conn.execute(DIARY_COUNT).fetchone()[0])
    return collections, diary


def count_kg(path: str) -> tuple[int, int]:
    """(triples, entities) of a knowledge graph, read-only. Raises sqlite3.Error."""
    with _reader(path) as conn:
        row = conn.execute("SELECT (SELECT COUNT(*) FROM triples), (SELECT COUNT(*) FROM entities)").fetchone()
    return int(row[0]), int(row[1])


def _unique(pairs: list[tuple[str, str]], exclude: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen = {_real(exclude)}
    for path, why in pairs:
        if _real(path) not in seen:
            seen.add(_real(path))
            out.append((path, why))
    return out


def find_stranded(settings: Settings) -> list[Stranded]:
    """Drawers and knowledge-graph facts in files a plain engine with these settings does not open.

    Read-only (sqlite `mode=ro`, bounded) and cheap enough for doctor. An unreadable source is listed
    with `problem` set rather than raised. Never call it in a container on bind-mounted files.
    """
    home = _home()
    memory = settings.memory
    found: list[Stranded] = []
    drawer_sources = _unique(_drawer_candidates(settings, memory, home), memory.palace)
    for path, why in drawer_sources:
        if not os.path.isfile(os.path.join(path, CHROMA)):
            continue
        try:
            collections, diary = count_drawers(path)
        except sqlite3.Error as exc:
            found.append(Stranded("drawers", path, memory.palace, why, problem=str(exc)))
            continue
        if sum(collections.values()):
            found.append(Stranded("drawers", path, memory.palace, why, {k: v for k, v in collections.items() if v},
                                  diary))
    for path, why in _unique(_kg_candidates(settings, memory, home, [p for p, _ in drawer_sources]), memory.kg):
        if not os.path.isfile(path):
            continue
        try:
            triples, entities = count_kg(path)
        except sqlite3.Error as exc:
            found.append(Stranded("knowledge graph", path, memory.kg, why, problem=str(exc)))
            continue
        if triples or entities:
            found.append(Stranded("knowledge graph", path, memory.kg, why, triples=triples, entities=entities))
    return found


# --------------------------------------------------------------------------- doctor's hook
CHECK_TITLE = "stranded memories"


def stranded_checks(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(level, title, detail, fix) for doctor: one warning per stranded source, or one ok line."""
    if settings.resolved_role() == "container":
        return [("ok", CHECK_TITLE, "not checked in a container (the palace files live on the host and are not "
                 "opened through a bind mount)", "")]
    try:
        found = find_stranded(settings)
    except (OSError, ValueError) as exc:
        return [("warn", CHECK_TITLE, f"could not look: {exc}", "")]
    if not found:
        return [("ok", CHECK_TITLE, "none: no drawers or knowledge-graph facts an older bridge wrote outside the "
                 "files above", "")]
    fix = "mp-bridge migrate (shows the plan), then mp-bridge migrate --apply (backs up, merges, verifies)"
    return [("warn", CHECK_TITLE, f"{s.describe()}; they belong in {s.target}", fix) for s in found]


# --------------------------------------------------------------------------- the plan
def _print_plan(found: list[Stranded], memory: palace.Memory, out: IO[str]) -> None:
    print(f"memory: palace {memory.palace}, knowledge graph {memory.kg} (what a plain mempalace-mcp opens with "
          "this environment)", file=out)
    if not found:
        print("nothing to migrate: no drawers or knowledge-graph facts an older bridge wrote are outside these files",
              file=out)
        return
    for i, s in enumerate(found, 1):
        print(f"{i}. {s.what}: {s.counts()}\n   in   {s.source}\n   into {s.target}\n   why: {s.why}", file=out)
        if s.what == "drawers":
            extra = _side_files(s.source)
            if extra:
                print(f"   not merged (kept in the backup): {', '.join(extra)}", file=out)
    if any(s.what == "knowledge graph" for s in found):
        print("note: an agent that still runs with --palace reads the graph inside the palace; run every agent "
              "with --palace or none (a migrated graph is moved away from the palace)", file=out)


def _side_files(palace_dir: str) -> list[str]:
    """What a source palace holds besides chroma's files and a knowledge graph (moved, not merged)."""
    try:
        names = sorted(os.listdir(palace_dir))
    except OSError:
        return []
    chroma = {CHROMA, "mempalace_embedder.json", ".blob_seq_ids_migrated", ".collection_type_fixed"}
    out = []
    for name in names:
        full = os.path.join(palace_dir, name)
        if name in chroma or name.startswith((CHROMA, KG)) or name == "locks":
            continue
        if os.path.isdir(full) and os.path.isfile(os.path.join(full, "header.bin")):
            continue  # a chroma vector segment
        out.append(name)
    return out


# --------------------------------------------------------------------------- no writer may run
def _stop_hint(settings: Settings, paths: state.StatePaths, is_target: bool) -> str:
    if is_target:
        return "mp-bridge stop" + (f" --palace {shlex.quote(str(settings.palace))}" if settings.palace else "")
    return f"MEMPALACE_PATH={shlex.quote(str(paths.root))} mp-bridge stop"


def _state_dirs(settings: Settings, found: list[Stranded], home: str) -> list[tuple[state.StatePaths, str, bool]]:
    """(state directory, whose, is the target's) of every memory whose broker could write the files involved."""
    memory = settings.memory
    out = [(settings.paths, f"this memory (palace {memory.palace})", True)]
    for s in found:
        pal = s.source if s.what == "drawers" else os.path.dirname(s.source)
        root = palace.state_dir_for(palace.Memory(pal, "", "", False), None, home)
        out.append((state.StatePaths(Path(root)), f"palace {pal}", False))
    old = str(settings.mempalace_path) if settings.mempalace_path else os.path.join(home, ".mempalace")
    out.append((state.StatePaths(Path(old)), f"an older bridge's palace {old_bridge_palace(settings, home)}", False))
    unique: list[tuple[state.StatePaths, str, bool]] = []
    for paths, whose, is_target in out:
        if all(p.root != paths.root for p, _, _ in unique):
            unique.append((paths, whose, is_target))
    return unique


@contextmanager
def _no_brokers(settings: Settings, found: list[Stranded]) -> Iterator[None]:
    """Hold broker.lock of every memory involved (so no broker runs or starts); refuse if one is taken."""
    from mp_ssh_bridge.election import open_lock, try_lock

    fds: list[int] = []
    try:
        for paths, whose, is_target in _state_dirs(settings, found, _home()):
            if not paths.root.is_dir():
                if not is_target:
                    continue
                try:
                    state.ensure_private_dir(paths.root)
                except (state.UnsafeDirectory, OSError) as exc:
                    raise MigrateError(f"cannot use state directory {paths.root}: {exc}") from exc
            fd = open_lock(paths)
            fds.append(fd)
            if not try_lock(fd):
                record = state.read_broker_json(paths.json) or {}
                pid = f" (pid {record.get('pid')})" if record.get("pid") else ""
                raise MigrateError(f"a broker{pid} is running for {whose} (state directory {paths.root}); no writer may "
                                   f"run during a migration: stop it with `{_stop_hint(settings, paths, is_target)}`, "
                                   "then run this again; nothing was changed")
            other = liveness.live_degraded_writer(paths, settings.heartbeat_stale_after)
            if other is not None:
                raise MigrateError(f"{liveness.describe_degraded(other, paths)}; close that session first; nothing was "
                                   "changed")
            owner = liveness.live_foreign_owner(paths, settings.heartbeat_stale_after)
            if owner is not None:
                raise MigrateError(f"{liveness.describe_owner(*owner, paths, settings.heartbeat_stale_after)}; nothing "
                                   "was changed")
        yield
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- the engine's interpreter
# Run in the engine's interpreter: mempalace's own code opens the palaces (backend, embedder identity,
# locks). Protocol: one JSON request as argv[1]; lines on stdout prefixed with MARK; reads "go" on stdin
# before copying, then holds mempalace's palace locks until stdin closes.
ENGINE_SCRIPT = r"""
import json, sys
MARK = "MPB-MIGRATE "
def say(**kw):
    sys.stdout.write(MARK + json.dumps(kw) + "\n")
    sys.stdout.flush()
req = json.loads(sys.argv[1])
try:
    from contextlib import ExitStack
    from mempalace.palace import MineAlreadyRunning, get_collection, mine_palace_lock
except Exception as exc:
    say(error=f"cannot import mempalace's palace API: {type(exc).__name__}: {exc}")
    sys.exit(3)

def identity(col):
    try:
        ident = col.get_stored_embedder_identity()
    except Exception:
        return None
    return (getattr(ident, "model_name", None) or None, getattr(ident, "dimension", 0) or 0) if ident else None

def copy(src, dst, name):
    s = get_collection(src, name, create=False, read_only=True, _skip_identity_check=True, _skip_name_check=True)
    ids = list(s.get(include=[])["ids"])
    d = get_collection(dst, name, create=True, _skip_name_check=True)
    a, b = identity(s), identity(d)
    if a and b and ((a[0] and b[0] and a[0] != b[0]) or (a[1] and b[1] and a[1] != b[1])):
        raise RuntimeError(f"{src} embeds {name} with {a}, {dst} with {b}: copying vectors would break search")
    copied = 0
    for i in range(0, len(ids), 256):
        chunk = ids[i:i + 256]
        have = set(d.get(ids=chunk, include=[])["ids"])
        want = [x for x in chunk if x not in have]
        if not want:
            continue
        r = s.get(ids=want, include=["documents", "metadatas", "embeddings"])
        d.add(ids=list(r["ids"]), documents=list(r["documents"]),
              metadatas=[m or None for m in r["metadatas"]],
              embeddings=[[float(v) for v in e] for e in r["embeddings"]])
        copied += len(r["ids"])
    present = sum(len(d.get(ids=ids[i:i + 256], include=[])["ids"]) for i in range(0, len(ids), 256))
    return {"source": src, "target": dst, "collection": name, "records": len(ids), "copied": copied,
            "present": present}

with ExitStack() as stack:
    for path in req["lock"]:
        try:
            stack.enter_context(mine_palace_lock(path))
        except MineAlreadyRunning as exc:
            say(error=f"a mempalace writer (a plain mempalace-mcp, or `mempalace mine`) holds {path}: {exc}; "
                      "close it first; nothing was changed")
            sys.exit(4)
    say(locked=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)
    results = []
    try:
        for job in req["copy"]:
            for name in job["collections"]:
                results.append(copy(job["source"], job["target"], name))
    except Exception as exc:
        say(error=f"copying drawers failed: {type(exc).__name__}: {exc}")
        sys.exit(5)
    say(copied=results)
    sys.stdin.read()
"""


class _Engine:
    """The engine's interpreter running ENGINE_SCRIPT: holds mempalace's palace locks, copies drawers."""

    def __init__(self, python: str, request: dict[str, Any]) -> None:
        import tempfile

        self.err = tempfile.TemporaryFile()
        self.lines: queue.Queue[str | None] = queue.Queue()
        try:
            self.proc = subprocess.Popen([python, "-c", ENGINE_SCRIPT, json.dumps(request)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.err, cwd="/", text=True)
        except OSError as exc:
            raise MigrateError(f"cannot run the engine's interpreter {python}: {exc.strerror or exc}") from exc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.lines.put(line[len(MARK):])
        self.lines.put(None)

    def expect(self, key: str, seconds: float, what: str) -> Any:
        """The value of the next message carrying `key`; MigrateError on an error, EOF or the bound."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise MigrateError(f"the engine's interpreter did not {what} within {seconds:.0f} s") from None
            if line is None:
                raise MigrateError(f"the engine's interpreter exited before it could {what}: {self._stderr()}")
            message = json.loads(line)
            if "error" in message:
                raise MigrateError(str(message["error"]))
            if key in message:
                return message[key]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def _stderr(self) -> str:
        self.err.seek(0)
        lines = self.err.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else f"exit status {self.proc.poll()}, no message"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        """Release the palace locks (stdin closes) and wait for it, bounded."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.err.close()


def _engine_python(settings: Settings, memory: palace.Memory) -> str:
    """The engine's interpreter, once the engine's own code agrees on the target files."""
    from mp_ssh_bridge.enginecmd import EngineNotFound, resolve

    try:
        argv = resolve(settings.engine_argv)
        theirs, _ = palace.engine_resolve(argv, str(settings.palace) if settings.palace else None, dict(os.environ))
    except (EngineNotFound, ValueError, palace.EngineResolveError) as exc:
        raise MigrateError(f"cannot ask the engine which files it opens: {exc}") from exc
    if theirs != memory:
        raise MigrateError(f"the engine would open other files than the bridge resolved ({theirs} vs {memory}): a "
                           "mempalace other than 3.11? nothing was changed")
    python = palace.interpreter_of(argv[0]) or (argv[0] if "python" in os.path.basename(argv[0]) else None)
    if python is None:
        raise MigrateError(f"{argv[0]} is not a Python console script: cannot run mempalace's own code")
    return python


# --------------------------------------------------------------------------- backup, merge, move
def _backup_dir(home: str) -> Path:
    root = Path(home) / ".mempalace" / BACKUP_DIR
    state.ensure_private_dir(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 100):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    raise MigrateError(f"cannot create a backup directory under {root}")


def _copy_ignoring_specials(src: str, names: list[str]) -> set[str]:
    """copytree's ignore: sockets, pipes and devices are not palace data."""
    skip = set()
    for name in names:
        try:
            mode = os.lstat(os.path.join(src, name)).st_mode
        except OSError:
            continue
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            skip.add(name)
    return skip


def backup_sqlite(db: str, dest: str) -> None:
    """A consistent single-file copy of a sqlite database (its WAL included), by sqlite's backup API."""
    src = sqlite3.connect(_uri(db, "ro"), uri=True, timeout=WRITE_TIMEOUT)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _backup_targets(found: list[Stranded], backup: Path, out: IO[str]) -> list[dict[str, str]]:
    """Copy every target file the merge will write into `backup/target`; what was copied (or did not exist)."""
    done: list[dict[str, str]] = []
    (backup / "target").mkdir(mode=0o700)
    for target, kind in sorted({(s.target, s.what) for s in found}):
        dest = backup / "target" / os.path.basename(target)
        if not os.path.exists(target):
            done.append({"path": target, "backup": "", "kind": kind, "note": "did not exist; the migration creates it"})
            continue
        if kind == "drawers":
            shutil.copytree(target, dest, symlinks=True, ignore=_copy_ignoring_specials)
        else:
            backup_sqlite(target, str(dest))
        done.append({"path": target, "backup": str(dest), "kind": kind, "note": ""})
        print(f"backed up {target} -> {dest}", file=out)
    return done


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [str(row[1]) for row in conn.execute(f"PRAGMA {schema}.table_info({table})")]


SAME_FACT = ("m.subject = t.subject AND m.predicate = t.predicate AND m.object = t.object "
             "AND m.valid_from IS t.valid_from AND m.valid_to IS t.valid_to")


def merge_kg(source: str, target: str) -> dict[str, int]:
    """Merge knowledge graph `source` into `target` (created as a copy when absent); verified.

    Entities by id (the target's wins), triples by id and by fact (same subject, predicate, object
    and validity: mempalace's triple ids carry a timestamp, so one fact added twice has two ids).
    Returns counts; raises MigrateError when a source row is not in the target afterwards.
    """
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        backup_sqlite(source, target)
        triples, entities = count_kg(source)
        return {"triples": triples, "entities": entities, "new_triples": triples, "new_entities": entities}
    conn = sqlite3.connect(_uri(target, "rw"), uri=True, timeout=WRITE_TIMEOUT, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS src", (_uri(source, "ro"),))
        for table in ("entities", "triples"):
            if not _columns(conn, "src", table) or not _columns(conn, "main", table):
                raise MigrateError(f"{source if not _columns(conn, 'src', table) else target} has no {table} table: "
                                   "not a mempalace knowledge graph; nothing was merged")
        ent = [c for c in _columns(conn, "src", "entities") if c in _columns(conn, "main", "entities")]
        tri = [c for c in _columns(conn, "src", "triples") if c in _columns(conn, "main", "triples")]
        conn.execute("BEGIN IMMEDIATE")
        new_e = conn.execute(f"INSERT OR IGNORE INTO main.entities ({', '.join(ent)}) "
                             f"SELECT {', '.join(ent)} FROM src.entities").rowcount
        new_t = conn.execute(f"INSERT OR IGNORE INTO main.triples ({', '.join(tri)}) "
                             f"SELECT {', '.join('t.' + c for c in tri)} FROM src.triples t "
                             f"WHERE NOT EXISTS (SELECT 1 FROM main.triples m WHERE {SAME_FACT})").rowcount
        missing_e = conn.execute("SELECT COUNT(*) FROM src.entities e WHERE NOT EXISTS "
                                 "(SELECT 1 FROM main.entities m WHERE m.id = e.id)").fetchone()[0]
        missing_t = conn.execute(f"SELECT COUNT(*) FROM src.triples t WHERE NOT EXISTS "
                                 f"(SELECT 1 FROM main.triples m WHERE {SAME_FACT})").fetchone()[0]
        if missing_e or missing_t:
            conn.execute("ROLLBACK")
            raise MigrateError(f"merging {source} into {target} left {missing_t} facts and {missing_e} entities out "
                               "(an id already used for something else?); rolled back, nothing was moved")
        conn.execute("COMMIT")
        triples, entities = (conn.execute(f"SELECT COUNT(*) FROM src.{t}").fetchone()[0] for t in ("triples", "entities"))
    finally:
        conn.close()
    return {"triples": triples, "entities": entities, "new_triples": new_t, "new_entities": new_e}


def _move(path: str, dest: Path) -> list[str]:
    """Move `path` (a palace directory, or a sqlite file with its -wal/-shm) to `dest`; what moved."""
    moved = []
    for suffix in ("", *(SIDE_FILES if os.path.isfile(path) else ())):
        src = path + suffix
        if os.path.lexists(src):
            shutil.move(src, str(dest) + suffix)
            moved.append(src)
    return moved


def _size(path: str) -> int:
    """Bytes in a file or a directory tree (0 when absent)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _within(path: str, folder: str) -> bool:
    return _real(path).startswith(_real(folder) + os.sep)


def _write_manifest(backup: Path, manifest: dict[str, Any]) -> None:
    (backup / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    undo = ["To undo this migration: stop every agent and broker (mp-bridge stop), then:"]
    for t in manifest.get("targets", []):
        if t["backup"] and os.path.isdir(t["backup"]):
            undo.append(f"  rm -rf {shlex.quote(t['path'])} && cp -a {shlex.quote(t['backup'])} {shlex.quote(t['path'])}")
        elif t["backup"]:
            undo.append(f"  rm -f {shlex.quote(t['path'])}-wal {shlex.quote(t['path'])}-shm && "
                        f"cp {shlex.quote(t['backup'])} {shlex.quote(t['path'])}")
        else:
            extra = "" if t["kind"] == "drawers" else f" {shlex.quote(t['path'])}-wal {shlex.quote(t['path'])}-shm"
            undo.append(f"  rm -rf {shlex.quote(t['path'])}{extra}   # it did not exist before")
    for m in manifest.get("moved", []):
        undo.append(f"  mv {shlex.quote(m['to'])} {shlex.quote(m['from'])}"
                    + ("   # and its -wal/-shm files" if m.get("sqlite") else ""))
    (backup / "README.txt").write_text("\n".join(undo) + "\n", encoding="utf-8")


def _apply(settings: Settings, memory: palace.Memory, found: list[Stranded], out: IO[str]) -> None:
    unreadable = [s for s in found if s.problem]
    if unreadable:
        raise MigrateError(f"cannot read {unreadable[0].source}: {unreadable[0].problem}; nothing was changed")
    python = _engine_python(settings, memory)
    drawers = [s for s in found if s.what == "drawers"]
    graphs = [s for s in found if s.what == "knowledge graph"]
    locks = sorted({memory.palace, *(s.source for s in drawers), *(os.path.dirname(s.source) for s in graphs)})
    request = {"lock": locks, "copy": [{"source": s.source, "target": s.target, "collections": sorted(s.collections)}
                                       for s in drawers]}
    with _no_brokers(settings, found):
        engine = _Engine(python, request)
        try:
            engine.expect("locked", LOCK_WAIT, "take mempalace's palace locks")
            backup = _backup_dir(_home())
            print(f"backup directory: {backup}", file=out)
            manifest: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "memory": memory.as_dict(),
                                        "stranded": [s.as_dict() for s in found], "targets": [], "moved": []}
            manifest["targets"] = _backup_targets(found, backup, out)
            _write_manifest(backup, manifest)
            for s in graphs:
                r = merge_kg(s.source, s.target)
                print(f"merged {_n(r['triples'], 'fact')} and {_n(r['entities'], 'entity')} from {s.source} into "
                      f"{s.target} ({r['new_triples']} and {r['new_entities']} of them new); verified", file=out)
            engine.send("go")
            records = sum(s.drawers for s in drawers)
            results = engine.expect("copied", COPY_WAIT_BASE + COPY_WAIT_PER_RECORD * records, "copy the drawers")
            _check_copies(results, out)
            _move_sources(found, backup, manifest, out)
        finally:
            engine.close()
    if settings.memory != memory:
        print(f"warning: mempalace now resolves other files ({settings.memory}); see {backup}/README.txt to undo",
              file=out)
    print(f"done: nothing stranded is left; the sources and a copy of the target files are in {backup} "
          "(README.txt there says how to undo)", file=out)


def _check_copies(results: list[dict[str, Any]], out: IO[str]) -> None:
    for r in results:
        if r["present"] != r["records"]:
            raise MigrateError(f"only {r['present']} of {r['records']} {r['collection']} records from {r['source']} "
                               f"are in {r['target']} after copying; nothing was moved, run this again")
        print(f"copied {r['copied']} of {_n(r['records'], 'record')} ({r['collection']}) from {r['source']} into "
              f"{r['target']} ({r['records'] - r['copied']} were there already); verified", file=out)


def _move_sources(found: list[Stranded], backup: Path, manifest: dict[str, Any], out: IO[str]) -> None:
    (backup / "sources").mkdir(mode=0o700)
    palaces = [s.source for s in found if s.what == "drawers"]
    for i, s in enumerate(found, 1):
        if s.what == "knowledge graph" and any(_within(s.source, p) for p in palaces):
            print(f"moved {s.source} with its palace", file=out)
            continue
        parent = os.path.basename(os.path.dirname(s.source.rstrip("/")))
        dest = backup / "sources" / f"{i}-{parent}-{os.path.basename(s.source.rstrip('/'))}"
        moved = _move(s.source, dest)
        manifest["moved"].append({"from": s.source, "to": str(dest), "sqlite": s.what == "knowledge graph"})
        _write_manifest(backup, manifest)
        print(f"moved {', '.join(moved)} -> {dest}", file=out)


# --------------------------------------------------------------------------- the command
def migrate(settings: Settings, apply: bool = False, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """The plan (dry run), or with `apply` the migration; 0 done or nothing to do, 1 refused or failed."""
    try:
        if settings.resolved_role() == "container":
            raise MigrateError("run it on the host, where the palace files live (in a container they are a bind "
                               "mount, and chroma must not be opened across it)")
        memory = settings.memory
        found = find_stranded(settings)
        _print_plan(found, memory, out)
        if not found:
            return 0
        if not apply:
            size = sum(_size(t) for t in {s.target for s in found}) / 1e6
            print("dry run: nothing was changed. `mp-bridge migrate --apply` checks that no broker or mempalace "
                  f"writer runs, copies the target files ({size:.1f} MB) to ~/.mempalace/{BACKUP_DIR}/<time>/, "
                  "merges, verifies, then moves the sources there", file=out)
            return 0
        _apply(settings, memory, found, out)
        return 0
    except MigrateError as exc:
        print(f"mp-bridge migrate: {_one_line(str(exc))}", file=err)
    except (OSError, sqlite3.Error, ValueError) as exc:  # ValueError: settings (empty MP_BRIDGE_ENGINE)
        print(f"mp-bridge migrate: failed ({type(exc).__name__}: {_one_line(str(exc))}); what was merged stays "
              "merged and is skipped by the next run, and only the sources listed as moved were moved", file=err)
    return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def cmd_migrate(args: argparse.Namespace) -> int:
    from mp_ssh_bridge.settings import config_file, load
    from mp_ssh_bridge.stopping import describe_settings_error

    try:
        settings = load(palace=getattr(args, "palace", None))
    except (ValueError, OSError, TypeError) as exc:
        hint = f"check the MP_BRIDGE_* / MEMPALACE_* environment and {config_file()}"
        print(f"mp-bridge: {describe_settings_error(exc, hint)}", file=sys.stderr)
        return 2
    return migrate(settings, apply=args.apply)


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """`mp-bridge migrate [--apply]`."""
    m = subparsers.add_parser("migrate", parents=[common], help="bring memories an older bridge wrote to the wrong "
                              "files into the ones mempalace opens (a dry run unless --apply)")
    m.add_argument("--apply", action="store_true", help="do it: stop check, backup, merge, verify, move the sources "
                   "into the backup directory")
    m.set_defaults(func=cmd_migrate)
