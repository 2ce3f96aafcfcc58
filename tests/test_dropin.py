"""A true drop-in, proven differentially: a plain `mempalace-mcp` and `mp-shim` side by side.

For each configuration (arguments and environment as an MCP client would pass them,
MEMPALACE_PATH unset as for a real user), the same three things are written and read
both ways with the REAL engine:

1. a plain engine writes a drawer, a knowledge-graph fact and a diary entry;
2. `mp-shim` (which elects a broker) finds all three, and writes three of its own;
3. after the broker is stopped, a plain engine finds the shim's three.

So the shim's writes land in the files a plain engine reads, and nothing written before
the switch is stranded. `palace.resolve()` (the bridge's stdlib answer) is also checked
against the engine's own (`palace.engine_resolve`) for every configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import palace, state
from tests.conftest import BIN
from tests.helpers import pid_alive, wait_for
from tests.test_shim_support import ShimProc

ENGINE = str(BIN / "mempalace-mcp")

pytestmark = pytest.mark.slow


def _text(reply: dict[str, Any]) -> str:
    assert "result" in reply, reply
    return "\n".join(item.get("text", "") for item in reply["result"].get("content", []))


def _write(s: ShimProc, tag: str) -> None:
    assert "success" in _text(s.tool("mempalace_add_drawer", {"wing": "dropin", "room": "r",
                                                              "content": f"The {tag} heron nests by the mount."},
                                      timeout=120)).lower()
    assert "error" not in _text(s.tool("mempalace_kg_add", {"subject": f"{tag}-subject", "predicate": "nests_at",
                                                            "object": "the mount"})).lower()
    assert "error" not in _text(s.tool("mempalace_diary_write", {"agent_name": "dropin",
                                                                 "entry": f"diary of {tag}"})).lower()


def _seen(s: ShimProc, tag: str) -> dict[str, bool]:
    return {
        "drawer": f"The {tag} heron" in _text(s.tool("mempalace_search", {"query": f"{tag} heron nests", "limit": 20},
                                                     timeout=120)),
        "kg": "nests_at" in _text(s.tool("mempalace_kg_query", {"entity": f"{tag}-subject"})),
        "diary": f"diary of {tag}" in _text(s.tool("mempalace_diary_read", {"agent_name": "dropin", "last_n": 50})),
    }


def _session(command: str, args: list[str], env: dict[str, str], err: Path) -> ShimProc:
    s = ShimProc(*args, env=env, stderr_path=err, command=command)
    assert "result" in s.initialize(timeout=120)
    return s


def _stop_brokers(home: Path, env: dict[str, str]) -> None:
    """`mp-bridge stop` for every broker this HOME runs (each memory's state directory)."""
    for record_file in [home / ".mempalace/broker.json", *home.glob(".mempalace/brokers/*/broker.json")]:
        record = state.read_broker_json(record_file)
        if record:
            out = subprocess.run([str(BIN / "mp-bridge"), "stop"], capture_output=True, text=True, timeout=60,
                                 env=dict(env, MEMPALACE_PATH=str(record_file.parent)))
            assert out.returncode == 0, out.stderr + out.stdout
            pid = record["pid"]
            wait_for(lambda pid=pid: not pid_alive(pid), 30, what="broker gone")


def _configure(name: str, home: Path) -> tuple[list[str], dict[str, str]]:
    """(arguments, extra environment) of one configuration; may prepare files in HOME."""
    if name == "fresh-xdg":
        return [], {}
    if name == "xdg-config-home":
        return [], {"XDG_CONFIG_HOME": str(home / "xdg")}
    if name == "legacy-install":
        (home / ".mempalace").mkdir(mode=0o700, exist_ok=True)
        (home / ".mempalace/config.json").write_text("{}\n")  # a real legacy install (mempalace's marker)
        return [], {}
    if name == "env-palace-path":
        return [], {"MEMPALACE_PALACE_PATH": str(home / "elsewhere" / "palace")}
    if name == "palace-flag":
        return ["--palace", str(home / "flagged")], {}
    if name == "config-file-palace":
        (home / ".config/mempalace").mkdir(parents=True, exist_ok=True)
        (home / ".config/mempalace/config.json").write_text(json.dumps({"palace_path": str(home / "configured")}))
        return [], {}
    raise AssertionError(name)


CONFIGS = ["fresh-xdg", "xdg-config-home", "legacy-install", "env-palace-path", "palace-flag", "config-file-palace"]


@pytest.mark.parametrize("config", CONFIGS)
def test_plain_engine_and_shim_see_the_same_memory(config: str, home: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.delenv("MEMPALACE_PATH")  # a real user's environment: the bridge finds its own state directory
    args, extra = _configure(config, home)
    env = dict(os.environ, **extra)
    flag = args[1] if args else None
    ours = palace.resolve(flag, env, str(home))
    theirs, version = palace.engine_resolve([ENGINE], flag, env)
    assert ours == theirs, f"palace.resolve disagrees with mempalace {version}: {ours} vs {theirs}"

    before, after = f"before-{uuid.uuid4().hex[:6]}", f"after-{uuid.uuid4().hex[:6]}"
    plain = _session(ENGINE, args, env, tmp_path / "plain1.err")
    try:
        _write(plain, before)
    finally:
        plain.close()
    shim = _session(str(BIN / "mp-shim"), args, env, tmp_path / "shim.err")
    try:
        assert _seen(shim, before) == {"drawer": True, "kg": True, "diary": True}, shim.stderr()
        _write(shim, after)
    finally:
        shim.close()
    record = state.read_broker_json(Path(palace.state_dir_for(ours, None, str(home))) / "broker.json")
    assert record is not None, "the shim elected no broker where its memory's state directory is"
    assert (record["palace"], record["kg"]) == (ours.palace, ours.kg)
    _stop_brokers(home, env)
    plain = _session(ENGINE, args, env, tmp_path / "plain2.err")
    try:
        assert _seen(plain, after) == {"drawer": True, "kg": True, "diary": True}
    finally:
        plain.close()


def test_two_palaces_at_once_get_two_brokers_and_see_only_their_own(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("MEMPALACE_PATH")
    env_a = dict(os.environ, MEMPALACE_PALACE_PATH=str(home / "a" / "palace"))
    env_b = dict(os.environ, MEMPALACE_PALACE_PATH=str(home / "b" / "palace"))
    a = _session(str(BIN / "mp-shim"), [], env_a, tmp_path / "a.err")
    b = _session(str(BIN / "mp-shim"), [], env_b, tmp_path / "b.err")
    try:
        _write(a, "alpha")
        _write(b, "bravo")
        assert _seen(a, "alpha")["drawer"] and not _seen(a, "bravo")["drawer"]
        assert _seen(b, "bravo")["drawer"] and not _seen(b, "alpha")["drawer"]
    finally:
        a.close()
        b.close()
    records = [state.read_broker_json(p) for p in home.glob(".mempalace/brokers/*/broker.json")]
    palaces = sorted(r["palace"] for r in records if r)
    assert palaces == [str(home / "a" / "palace"), str(home / "b" / "palace")]
    assert len({r["pid"] for r in records if r}) == 2
    out = subprocess.run([str(BIN / "mp-bridge"), "status", "--all", "--json"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    listed = sorted(s["record"]["palace"] for s in json.loads(out.stdout) if s["status"])
    assert listed == palaces  # mp-bridge status --all: every broker this user runs
