"""One palace, many spellings (mp_ssh_bridge/samepath.py): a Mac's case, normalization and /private.

ext4 cannot show APFS's case- and normalization-insensitivity, so the macOS answers are asked with
their inputs substituted (the platform name, stat results, realpath, directory listings). Symlinks
are real here, and end to end: two spellings of one palace reach one broker, with no mismatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import palace, samepath
from tests.conftest import BIN
from tests.test_broker_fake import FAKE

NFC = unicodedata.normalize("NFC", "Café")
NFD = unicodedata.normalize("NFD", "Café")


class FakeStat:
    """`os.stat` of a case- and normalization-insensitive volume: names are looked up folded."""

    def __init__(self, *existing: str) -> None:
        self.inodes = {samepath.fold(p, "darwin"): i for i, p in enumerate(existing, start=100)}
        self.calls: list[str] = []

    def __call__(self, path: str) -> Any:
        self.calls.append(path)
        ino = self.inodes.get(samepath.fold(path, "darwin"))
        if ino is None:
            raise FileNotFoundError(path)
        return os.stat_result((0o40700, ino, 1, 1, 0, 0, 0, 0, 0, 0))


def _private(path: str) -> str:
    """macOS's realpath for paths under /var and /tmp (symlinks into /private)."""
    for link in ("/var", "/tmp"):
        if path == link or path.startswith(link + "/"):
            return "/private" + path
    return path


# --------------------------------------------------------------------------- same_file, by its inputs
def test_equal_strings_touch_nothing() -> None:
    stat = FakeStat()
    assert samepath.same_file("/a/b", "/a/b", stat=stat) and stat.calls == []


@pytest.mark.parametrize("a, b", [("/Users/me/Work/palace", "/Users/me/work/PALACE"),
                                  (f"/Users/me/{NFC}/palace", f"/Users/me/{NFD}/palace")])
def test_case_and_normalization_variants_of_an_existing_palace_are_one(a: str, b: str) -> None:
    stat = FakeStat(a)  # one directory on an APFS volume, reached by either name
    assert samepath.same_file(a, b, platform="darwin", stat=stat)
    assert not samepath.same_file(a, "/Users/me/other", platform="darwin", stat=FakeStat(a, "/Users/me/other"))


@pytest.mark.parametrize("a, b", [("/Users/me/New/palace", "/Users/me/new/palace"),
                                  (f"/Users/me/{NFC}", f"/Users/me/{NFD}"),
                                  ("/var/folders/x/palace", "/private/var/folders/x/palace")])
def test_a_palace_not_created_yet_is_compared_by_its_macos_spelling(a: str, b: str) -> None:
    missing = FakeStat()
    assert samepath.same_file(a, b, platform="darwin", stat=missing, realpath=_private)
    if not a.startswith("/var"):  # Linux: case and normalization make another name
        assert not samepath.same_file(a, b, platform="linux", stat=missing, realpath=_private)


def test_one_existing_and_one_missing_are_two() -> None:
    stat = FakeStat("/Users/me/palace")
    assert not samepath.same_file("/Users/me/palace", "/Users/me/palace2", platform="darwin", stat=stat)


def test_symlinked_spellings_are_one_by_the_file_system(tmp_path: Path) -> None:
    real = tmp_path / "real" / "palace"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert samepath.same_file(str(real), str(tmp_path / "link" / "palace"))
    assert samepath.same_file(str(tmp_path / "real" / "new"), str(tmp_path / "link" / "new"))  # neither exists yet
    assert not samepath.same_file(str(real), str(tmp_path / "real" / "other"))


def test_mismatch_takes_spellings_of_one_memory_for_one(tmp_path: Path) -> None:
    (tmp_path / "real" / "palace").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mine = palace.resolve(str(tmp_path / "link" / "palace"), {}, str(tmp_path))
    theirs = palace.resolve(str(tmp_path / "real" / "palace"), {}, str(tmp_path)).as_dict()
    assert mine.palace != theirs["palace"] and palace.mismatch(mine, theirs) is None
    other = palace.resolve(str(tmp_path / "real" / "elsewhere"), {}, str(tmp_path)).as_dict()
    assert "its palace is" in (palace.mismatch(mine, other) or "")


def test_stray_writers_are_found_through_a_symlinked_spelling(tmp_path: Path) -> None:
    from mp_ssh_bridge import holders

    (tmp_path / "real" / "palace").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with open(tmp_path / "real" / "palace" / "chroma.sqlite3", "wb"):
        found, _ = holders.holders(str(tmp_path / "link" / "palace"), str(tmp_path / "kg.sqlite3"))
    assert found is not None and os.getpid() in [h.pid for h in found]


def test_spelled_alike_is_only_a_hint_across_the_boundary() -> None:
    assert samepath.spelled_alike("/Users/me/Work", "/users/me/work")
    assert samepath.spelled_alike("/private/var/folders/p", "/var/folders/p")
    assert samepath.spelled_alike(f"/Users/me/{NFC}", f"/Users/me/{NFD}")
    assert not samepath.spelled_alike("/Users/me/a", "/Users/me/b")
    assert not samepath.spelled_alike("/private/varx/p", "/varx/p")


# --------------------------------------------------------------------------- the one spelling a key is made of
def test_disk_spelling_follows_the_directory_listing() -> None:
    tree = {"/": ["Users"], "/Users": ["me"], "/Users/me": ["Work", NFD], "/Users/me/Work": ["palace"]}

    def listdir(path: str) -> list[str]:
        if path not in tree:
            raise FileNotFoundError(path)
        return tree[path]

    assert samepath.disk_spelling("/users/ME/work/Palace", listdir) == "/Users/me/Work/palace"
    assert samepath.disk_spelling(f"/Users/me/{NFC}/new", listdir) == f"/Users/me/{NFD}/new"
    assert samepath.disk_spelling("/Users/me/Work/New/Deeper", listdir) == "/Users/me/Work/New/Deeper", "not there yet"
    assert samepath.canonical("/users/me/work/palace", platform="darwin", realpath=str, listdir=listdir) == \
        "/Users/me/Work/palace"
    assert samepath.canonical("/users/me/work", platform="linux", realpath=str, listdir=listdir) == "/users/me/work"


def test_state_dir_of_symlinked_and_macos_spellings_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "Work" / "palace").mkdir(parents=True)
    (home / NFC).mkdir()
    (tmp_path / "elsewhere").symlink_to(home / "Work")

    def state_dir(path: str) -> str:
        return palace.state_dir_for(palace.resolve(path, {}, str(home)), None, str(home))

    key = state_dir(f"{home}/Work/palace")
    assert key == f"{home}/.mempalace/brokers/" + palace.Memory(f"{home}/Work/palace", "", "", True).key(str(home)), \
        "a canonical spelling keeps the key it always had"
    assert state_dir(f"{tmp_path}/elsewhere/palace") == key
    assert state_dir(f"{home}/work/palace") != key  # Linux: another directory
    monkeypatch.setattr(samepath, "is_darwin", lambda platform=None: True)  # as on a Mac, with ext4's listings
    assert state_dir(f"{home}/work/palace") == state_dir(f"{home}/WORK/Palace") == key
    assert state_dir(f"{home}/{NFD}/palace") == state_dir(f"{home}/{NFC}/palace")
    legacy = palace.state_dir_for(palace.resolve(f"{home}/.MemPalace/palace", {}, str(home)), None, str(home))
    (home / ".mempalace" / "palace").mkdir(parents=True)
    assert palace.state_dir_for(palace.resolve(f"{home}/.MemPalace/palace", {}, str(home)), None, str(home)) == \
        f"{home}/.mempalace" != legacy, "the legacy palace by another case is the legacy palace, once it exists"


# --------------------------------------------------------------------------- end to end: one broker
def _ensure(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([str(BIN / "mempalace-broker"), "--ensure"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_symlinked_spelling_of_the_palace_reaches_one_broker(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """MEMPALACE_PATH unset: the palace's spelling picks the state directory. Both spellings, one broker."""
    monkeypatch.delenv("MEMPALACE_PATH")
    (home / "real" / "palace").mkdir(parents=True)
    (home / "link").symlink_to(home / "real")
    base = dict(os.environ, MP_BRIDGE_ENGINE=FAKE)
    first = _ensure(dict(base, MEMPALACE_PALACE_PATH=str(home / "link" / "palace")))
    second = _ensure(dict(base, MEMPALACE_PALACE_PATH=str(home / "real" / "palace")))
    assert first["started"] is True and second["started"] is False
    assert second["pid"] == first["pid"] and second["state_dir"] == first["state_dir"]
    assert second["palace_id"] == first["palace_id"]
    shim = _shim(dict(base, MEMPALACE_PALACE_PATH=str(home / "real" / "palace")))
    assert "result" in shim, shim  # no -32067: the broker's palace is this session's, spelled another way


def _shim(env: dict[str, str]) -> dict[str, Any]:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    out = subprocess.run([str(BIN / "mp-shim")], input=json.dumps(init) + "\n", env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    replies = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert replies, out.stderr
    return replies[0]

