"""holders: broker.lock asked of the kernel (flock), writers told from readers, wrappers' children are ours."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from mp_ssh_bridge import holders, hostinfo, liveness, palacecheck


class Held(NamedTuple):
    proc: subprocess.Popen[str]
    pid: int  # the python process itself (behind wrappers, not proc.pid)


@contextmanager
def holding(code: str, *, wrap: int = 0) -> Iterator[Held]:
    """A python process running `code` (which opens files), then saying so and waiting on stdin; with
    `wrap`, started behind that many `sh -c` wrappers (each forks: the command is not its last)."""
    body = textwrap.dedent(code) + "\nimport os, sys\nprint('ready', os.getpid(), flush=True)\nsys.stdin.read()\n"
    argv = [sys.executable, "-c", body]
    for _ in range(wrap):
        argv = ["sh", "-c", " ".join(_quote(a) for a in argv) + "; true"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        assert words[:1] == ["ready"], words
        yield Held(proc, int(words[1]))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------- broker.lock
def test_a_lock_held_by_another_process_through_a_symlinked_state_dir(tmp_path: Path) -> None:
    (tmp_path / "real" / "state").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real_lock = tmp_path / "real" / "state" / "broker.lock"
    lock = str(tmp_path / "link" / "state" / "broker.lock")
    code = f"""
        import fcntl, os
        fd = os.open({str(real_lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    """
    with holding(code) as proc:
        held, by = holders.lock_holders(lock)
        assert held is True
        assert proc.pid in [h.pid for h in by], by
        assert holders.lock_is_held(lock) is True  # asking did not take it
    held, by = holders.lock_holders(lock)
    assert (held, by) == (False, [])


def test_a_lock_open_but_not_locked_is_free_and_its_opener_named(tmp_path: Path) -> None:
    lock = tmp_path / "broker.lock"
    lock.write_bytes(b"")
    with holding(f"fh = open({str(lock)!r}, 'r')") as proc:
        held, by = holders.lock_holders(str(lock))
    assert held is False and proc.pid in [h.pid for h in by]


def test_an_absent_lock_is_free_and_not_created(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "broker.lock"
    (tmp_path / "state").mkdir()
    assert holders.lock_holders(str(lock)) == (False, [])
    assert holders.lock_is_held(str(lock)) is False
    assert not lock.exists()


def test_a_lock_that_cannot_be_opened_cannot_be_told(tmp_path: Path) -> None:
    if os.getuid() == 0:
        pytest.skip("root opens any file")
    lock = tmp_path / "broker.lock"
    lock.write_bytes(b"")
    lock.chmod(0)
    try:
        assert holders.lock_is_held(str(lock)) is None
    finally:
        lock.chmod(0o600)


# --------------------------------------------------------------------------- writers, not readers
def _palace(tmp_path: Path) -> tuple[Path, Path]:
    import sqlite3

    palace = tmp_path / "palace"
    (palace / "seg-1").mkdir(parents=True)
    (palace / "seg-1" / "data_level0.bin").write_bytes(b"\0" * 16)
    for db in (palace / "chroma.sqlite3", tmp_path / "kg.sqlite3"):
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")  # a read-only connection then opens -wal and -shm read-write
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
    return palace, tmp_path / "kg.sqlite3"


def test_a_reader_is_no_stray_writer_but_a_read_write_opener_is(tmp_path: Path) -> None:
    palace, kg = _palace(tmp_path)
    db, seg = palace / "chroma.sqlite3", palace / "seg-1" / "data_level0.bin"
    reader = f"""
        import sqlite3
        conns = [sqlite3.connect("file:" + p + "?mode=ro", uri=True) for p in ({str(db)!r}, {str(kg)!r})]
        for c in conns:
            c.execute("SELECT count(*) FROM t").fetchall()
        fh = open({str(seg)!r}, "r")
    """
    sqlite_writer = f"""
        import sqlite3
        conn = sqlite3.connect({str(kg)!r})
        conn.execute("SELECT count(*) FROM t").fetchall()
    """
    file_writer = f"""
        fh = open({str(seg)!r}, "r+")
    """
    with holding(reader) as r, holding(sqlite_writer) as w1, holding(file_writer) as w2:
        found, _ = holders.holders(str(palace), str(kg))
        assert found is not None
        pids = {h.pid for h in found}
        assert r.pid not in pids, found
        assert {w1.pid, w2.pid} <= pids, found
        by_pid = {h.pid: h.path for h in found}
        assert by_pid[w1.pid] == os.path.realpath(kg)
        assert by_pid[w2.pid] == os.path.realpath(seg)  # one level down in the palace: an HNSW segment
        assert {h.pid for h in holders.strays(found, {os.getpid()})} & {r.pid, w1.pid, w2.pid} == set()
        assert {w1.pid, w2.pid} <= {h.pid for h in holders.strays(found, set())}


def test_a_writer_through_a_symlinked_palace_is_found_by_its_real_path(tmp_path: Path) -> None:
    palace, kg = _palace(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with holding(f"fh = open({str(palace / 'chroma.sqlite3')!r}, 'r+')") as w:
        found, _ = holders.holders(str(tmp_path / "link" / "palace"), str(tmp_path / "link" / "kg.sqlite3"))
    assert found is not None and w.pid in [h.pid for h in found]


def test_a_grandchild_of_ours_is_no_stray(tmp_path: Path) -> None:
    palace, kg = _palace(tmp_path)
    code = f"fh = open({str(palace / 'chroma.sqlite3')!r}, 'r+')"
    with holding(code, wrap=2) as held:  # outer sh -> inner sh -> python (an engine behind uvx, a wrapper)
        engine, outer = held.pid, held.proc
        assert hostinfo.parent_pid(engine) not in (outer.pid, os.getpid())  # a grandchild, not a child
        found, _ = holders.holders(str(palace), str(kg))
        assert found is not None and engine in [h.pid for h in found]
        assert engine not in [h.pid for h in holders.strays(found, {outer.pid})]
        assert engine in [h.pid for h in holders.strays(found, {2 ** 22 + 12345})]


def test_strays_look_up_a_bounded_number_of_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    parents = {100 + i: 101 + i for i in range(20)}  # 100 -> 101 -> ... -> 120
    monkeypatch.setattr(hostinfo, "parent_pid", lambda pid, platform=None: parents.get(pid))
    found = [holders.Holder(100, "engine", "/p/chroma.sqlite3")]
    assert holders.strays(found, {100}) == []
    assert holders.strays(found, {100 + holders.ANCESTOR_DEPTH}) == []
    assert holders.strays(found, {101 + holders.ANCESTOR_DEPTH}) == found
    monkeypatch.setattr(hostinfo, "parent_pid", lambda pid, platform=None: pid)  # a loop ends too
    assert holders.strays(found, {7}) == found


# --------------------------------------------------------------------------- parsers, by input
def test_parse_lsof_keeps_numeric_fds_opened_for_writing() -> None:
    out = ("p12\ncpython3\nfcwd\na \nn/p\nftxt\na \nn/usr/bin/python3\n"
           "f3\nar\nn/p/chroma.sqlite3\nf4\nau\nn/p/chroma.sqlite3-wal\nf5\nau\nn/p/chroma.sqlite3\n"
           "p13\ncmempalace\nf5\naw\nn/p/kg\n"
           "p14\ncreader\nf6\nar\nn/p/kg\nf7\nar\nn/p/seg/data_level0.bin\n"
           "p15\ncmapper\nfmem\nau\nn/p/seg/data_level0.bin\n")
    found = holders.parse_lsof(out)
    assert [(h.pid, h.command, h.path) for h in found] == [(12, "python3", "/p/chroma.sqlite3"), (13, "mempalace", "/p/kg")]
    everyone = holders.parse_lsof(out, writers=False)
    assert [(h.pid, h.path) for h in everyone] == [(12, "/p"), (13, "/p/kg"), (14, "/p/kg"), (15, "/p/seg/data_level0.bin")]
    # `-F pcn` (no f, no a) cannot tell: every named file counts
    assert [h.pid for h in holders.parse_lsof("p12\ncpython3\nn/p/chroma.sqlite3\np13\ncx\nn/p/kg\n")] == [12, 13]


def test_parse_fdinfo_writable() -> None:
    assert holders.parse_fdinfo_writable("pos:\t0\nflags:\t0100002\nmnt_id:\t29\n") is True  # O_RDWR|O_LARGEFILE
    assert holders.parse_fdinfo_writable("pos:\t0\nflags:\t02000001\n") is True  # O_WRONLY|O_CLOEXEC
    assert holders.parse_fdinfo_writable("pos:\t0\nflags:\t02100000\n") is False  # O_RDONLY
    assert holders.parse_fdinfo_writable("pos:\t0\n") is None
    assert holders.parse_fdinfo_writable(None) is None


def test_lsof_is_given_the_palace_one_level_down_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    palace, kg = _palace(tmp_path)
    files = holders._lsof_files([str(palace), str(kg), str(kg) + "-wal"])
    assert str(palace / "seg-1" / "data_level0.bin") in files and str(palace / "chroma.sqlite3") in files
    assert str(kg) in files and str(palace / "seg-1") not in files
    for i in range(30):
        (palace / "seg-1" / f"f{i}").write_bytes(b"")
    monkeypatch.setattr(holders, "LSOF_MAX_FILES", 10)
    assert len(holders._lsof_files([str(palace), str(kg)])) == 10


# --------------------------------------------------------------------------- whose pids are ours
def test_a_recorded_pid_is_ours_only_from_this_machine_and_the_same_process() -> None:
    me = {"pid": os.getpid(), **liveness.writer_identity()}
    start = hostinfo.proc_start(os.getpid())
    assert palacecheck._recorded_pid(me) == os.getpid()  # an older record without proc_start: by machine
    assert palacecheck._recorded_pid({**me, "proc_start": start}) == os.getpid()
    assert palacecheck._recorded_pid({**me, "proc_start": "someone else"}) is None  # a reused pid
    assert palacecheck._recorded_pid({**me, "host": "elsewhere.example"}) is None
    assert palacecheck._recorded_pid({**me, "boot_id": "another-boot"}) is None
    assert palacecheck._recorded_pid({"pid": os.getpid()}) is None  # names no machine
    assert palacecheck._recorded_pid({**me, "pid": True}) is None
    assert palacecheck._recorded_pid(None) is None
