"""`mp-bridge migrate`: what an older bridge stranded is found, merged, and found again by a plain engine.

Before its drop-in release the bridge always ran `mempalace-mcp --palace ~/.mempalace/palace`. The
stranded layouts are made here for real, by running the REAL engine that way in a fresh HOME:

- a fresh 3.11 user who had used a plain engine (XDG palace) and then the old bridge: the bridge's
  first write made `~/.mempalace` a legacy install, so mempalace now opens `~/.mempalace/palace` and
  the XDG palace is hidden; the bridge's facts are in `<palace>/knowledge_graph.sqlite3`, which an
  engine without --palace never reads;
- a user who only ever used the old bridge: the drawers are where mempalace looks, the facts are not;
- a user whose config dir is explicit (MEMPALACE_CONFIG_DIR): the old bridge's whole palace is stranded.

Each time: `find_stranded` names them, a dry run changes no file, `--apply` refuses while a broker holds
the memory, then backs up, merges and moves the sources; a plain engine WITHOUT --palace finds the
drawer, the fact and the diary entry; a second `--apply` finds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from mp_ssh_bridge import migrate, state
from mp_ssh_bridge.settings import load
from tests.conftest import BIN
from tests.test_dropin import _seen as seen_three
from tests.test_dropin import _write as write_three
from tests.test_shim_support import ShimProc

ENGINE = str(BIN / "mempalace-mcp")


def _engine(args: list[str], env: dict[str, str], err: Path) -> ShimProc:
    s = ShimProc(*args, env=env, stderr_path=err, command=ENGINE)
    assert "result" in s.initialize(timeout=120)
    return s


def _write(args: list[str], env: dict[str, str], tag: str, err: Path) -> None:
    """A plain engine (as the old bridge ran it, with `args`) writes a drawer, a fact and a diary entry."""
    s = _engine(args, env, err)
    try:
        write_three(s, tag)
    finally:
        s.close()


def _seen(env: dict[str, str], tags: list[str], err: Path) -> dict[str, dict[str, bool]]:
    """What a plain engine WITHOUT --palace (the user's own configuration) finds of each tag."""
    s = _engine([], env, err)
    try:
        return {tag: seen_three(s, tag) for tag in tags}
    finally:
        s.close()


ALL = {"drawer": True, "kg": True, "diary": True}


def _bridge(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mp-bridge"), "migrate", *flags], capture_output=True, text=True, timeout=180,
                          env=env, cwd="/")


def _snapshot(home: Path) -> dict[str, tuple[str, int]]:
    """Every file under HOME (not the model cache): content hash and mtime. A WAL database's `-shm` is shared
    memory in which every reader, even a read-only one, takes a read mark: only its existence counts."""
    out = {}
    for folder, dirs, files in os.walk(home):
        dirs[:] = [d for d in dirs if not (folder == str(home) and d == ".cache")]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith("-shm"):
                out[path] = ("shared memory", 0)
                continue
            out[path] = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), os.lstat(path).st_mtime_ns)
    return out


def _backup_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("backup directory: "))
    return Path(line[len("backup directory: "):])


def _tags() -> tuple[str, str]:
    return f"before{uuid.uuid4().hex[:6]}", f"bridge{uuid.uuid4().hex[:6]}"


@pytest.mark.slow
def test_a_palace_hidden_by_an_older_bridge_and_its_facts_are_merged(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.delenv("MEMPALACE_PATH")  # a real user's environment
    env = dict(os.environ)
    before, bridge = _tags()
    legacy = home / ".mempalace" / "palace"
    xdg = home / ".config" / "mempalace" / "palace"
    _write([], env, before, tmp_path / "plain.err")  # a fresh 3.11 user: the XDG palace
    _write(["--palace", str(legacy)], env, bridge, tmp_path / "old-bridge.err")  # then the old bridge
    assert load().memory.palace == str(legacy)  # the XDG palace is hidden now: the bug

    found = {(s.what, s.source): s for s in migrate.find_stranded(load())}
    assert set(found) == {("drawers", str(xdg)), ("knowledge graph", str(legacy / "knowledge_graph.sqlite3"))}
    drawers = found[("drawers", str(xdg))]
    assert (drawers.drawers, drawers.diary, drawers.target) == (2, 1, str(legacy))
    graph = found[("knowledge graph", str(legacy / "knowledge_graph.sqlite3"))]
    assert (graph.triples, graph.target) == (1, str(home / ".mempalace" / "knowledge_graph.sqlite3"))
    assert [c[0] for c in migrate.stranded_checks(load())] == ["warn", "warn"]

    snap = _snapshot(home)
    dry = _bridge(env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout and str(xdg) in dry.stdout
    assert _snapshot(home) == snap  # not one file written, not one touched

    done = _bridge(env, "--apply")
    assert done.returncode == 0, done.stderr + done.stdout
    backup = _backup_of(done.stdout)
    manifest = json.loads((backup / "manifest.json").read_text())
    assert {m["from"] for m in manifest["moved"]} == {str(xdg), str(legacy / "knowledge_graph.sqlite3")}
    assert (backup / "target" / "palace" / "chroma.sqlite3").is_file()
    assert (backup / "target" / "knowledge_graph.sqlite3").is_file()
    assert (backup / "README.txt").read_text().startswith("To undo")
    assert not xdg.exists() and not (legacy / "knowledge_graph.sqlite3").exists()

    assert _seen(env, [before, bridge], tmp_path / "seen1.err") == {before: ALL, bridge: ALL}
    again = _bridge(env, "--apply")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout, again.stderr
    assert migrate.find_stranded(load()) == []
    assert [c[0] for c in migrate.stranded_checks(load())] == ["ok"]


@pytest.mark.slow
def test_facts_written_with_palace_reach_a_user_without_it(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """Only the old bridge was ever used: its drawers are where mempalace looks, its facts are not."""
    monkeypatch.delenv("MEMPALACE_PATH")
    env = dict(os.environ)
    _, bridge = _tags()
    legacy = home / ".mempalace" / "palace"
    _write(["--palace", str(legacy)], env, bridge, tmp_path / "old-bridge.err")
    target_kg = home / ".mempalace" / "knowledge_graph.sqlite3"
    assert not target_kg.exists()
    stranded = migrate.find_stranded(load())
    assert [(s.what, s.source, s.triples) for s in stranded] == [
        ("knowledge graph", str(legacy / "knowledge_graph.sqlite3"), 1)]

    from mp_ssh_bridge.election import open_lock, try_lock

    paths = load().paths
    fd = open_lock(paths)  # what a running broker holds for this memory
    try:
        assert try_lock(fd)
        snap = _snapshot(home)
        refused = _bridge(env, "--apply")
    finally:
        os.close(fd)
    assert refused.returncode == 1
    assert "mp-bridge stop" in refused.stderr and "nothing was changed" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert _snapshot(home) == snap

    done = _bridge(env, "--apply")
    assert done.returncode == 0, done.stderr + done.stdout
    assert target_kg.is_file() and not (legacy / "knowledge_graph.sqlite3").exists()
    assert _seen(env, [bridge], tmp_path / "seen.err") == {bridge: ALL}
    assert migrate.find_stranded(load()) == []


@pytest.mark.slow
def test_the_old_bridges_palace_moves_into_an_explicit_config_dir(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """MEMPALACE_CONFIG_DIR: mempalace's palace is `<config>/palace`, the old bridge wrote ~/.mempalace/palace;
    the target does not exist yet, so the migration creates it with mempalace's own code."""
    monkeypatch.delenv("MEMPALACE_PATH")
    monkeypatch.setenv("MEMPALACE_CONFIG_DIR", str(home / "cfg"))
    env = dict(os.environ)
    _, bridge = _tags()
    legacy = home / ".mempalace" / "palace"
    _write(["--palace", str(legacy)], env, bridge, tmp_path / "old-bridge.err")
    stranded = {(s.what, s.source) for s in migrate.find_stranded(load())}
    assert stranded == {("drawers", str(legacy)), ("knowledge graph", str(legacy / "knowledge_graph.sqlite3"))}

    done = _bridge(env, "--apply")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "with its palace" in done.stdout  # the graph inside the old palace went with it, once merged
    assert not legacy.exists() and (home / "cfg" / "palace" / "chroma.sqlite3").is_file()
    assert _seen(env, [bridge], tmp_path / "seen.err") == {bridge: ALL}
    assert _bridge(env).stdout.count("nothing to migrate") == 1


# --------------------------------------------------------------------------- no engine needed
def test_one_fact_added_twice_is_merged_once(tmp_path: Path) -> None:
    from mempalace.knowledge_graph import KnowledgeGraph

    source, target = str(tmp_path / "source.sqlite3"), str(tmp_path / "target.sqlite3")
    for path, facts in ((source, [("heron", "the mount"), ("kestrel", "the tower")]), (target, [("heron", "the mount")])):
        with KnowledgeGraph(db_path=path) as kg:
            for subject, obj in facts:
                kg.add_triple(subject, "nests_at", obj)  # ids carry a timestamp: the same fact, two ids
    first = migrate.merge_kg(source, target)
    assert (first["triples"], first["new_triples"]) == (2, 1)
    assert migrate.merge_kg(source, target)["new_triples"] == 0
    assert migrate.count_kg(target) == (2, 4)


def test_a_container_neither_looks_nor_migrates(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_BRIDGE_ROLE", "container")
    checks = migrate.stranded_checks(load())
    assert [(c[0], c[1]) for c in checks] == [("ok", "stranded memories")] and "container" in checks[0][2]
    out = _bridge(dict(os.environ), "--apply")
    assert out.returncode == 1 and "on the host" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_no_broker_state_is_created_by_a_dry_run(home: Path) -> None:
    out = _bridge(dict(os.environ))
    assert out.returncode == 0 and "nothing to migrate" in out.stdout, out.stderr
    assert not state.StatePaths(home / ".mempalace").lock.exists()
