"""A true drop-in, proven differentially: a plain `mempalace-mcp` and `mp-shim` side by side.

For each configuration (arguments and environment as an MCP client would pass them,
MEMPALACE_PATH unset as for a real user), the same three things are written and read
both ways with the REAL engine:

1. a plain engine writes a drawer, a knowledge-graph fact and a diary entry;
2. `mp-shim` (which elects a broker) finds all three, and writes three of its own;
3. after the broker is stopped, a plain engine finds the shim's three.

So the shim's writes land in the files a plain engine reads, and nothing written before
the switch is stranded. `palace.resolve()` (the bridge's stdlib answer, by the rules
`enginerules` learned from the engine) is also checked against the engine's own
(`palace.engine_resolve`) for every configuration.

Every supported engine version: the pinned one in all configurations, and mempalace 3.4.0
(MP_BRIDGE_ENGINE) in those its own rules give a meaning (it has no XDG config dir and no
MEMPALACE_PALACE: everything lives under ~/.mempalace; `xdg-config-home` shows the shim
ignores XDG for it too).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import enginerules, palace, state
from tests.conftest import BIN, EngineUnderTest, engine_under_test
from tests.helpers import pid_alive, wait_for
from tests.test_shim_support import ShimProc

pytestmark = [pytest.mark.slow, pytest.mark.engines]


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
    if name == "legacy-config-file-palace":  # the config file every version reads: ~/.mempalace/config.json
        (home / ".mempalace").mkdir(mode=0o700, exist_ok=True)
        (home / ".mempalace/config.json").write_text(json.dumps({"palace_path": str(home / "configured")}))
        return [], {}
    raise AssertionError(name)


CONFIGS = ["fresh-xdg", "xdg-config-home", "legacy-install", "env-palace-path", "palace-flag", "config-file-palace"]
CONFIGS_3_4 = ["fresh-xdg", "xdg-config-home", "env-palace-path", "palace-flag", "legacy-config-file-palace"]
DROPIN = [("pinned", c) for c in CONFIGS] + [("3.4.0", c) for c in CONFIGS_3_4]


def _engine_env(eng: EngineUnderTest, extra: dict[str, str]) -> dict[str, str]:
    """A user's environment with this engine: the pinned one is found on PATH, another is named."""
    env = dict(os.environ, **extra)
    if not eng.pinned:
        env["MP_BRIDGE_ENGINE"] = str(eng.path)
    return env


@pytest.mark.parametrize(("engine_name", "config"), DROPIN, ids=[f"{e}-{c}" for e, c in DROPIN])
def test_plain_engine_and_shim_see_the_same_memory(engine_name: str, config: str, home: Path,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    eng = engine_under_test(engine_name)
    plain_engine = str(eng.path)
    monkeypatch.delenv("MEMPALACE_PATH")  # a real user's environment: the bridge finds its own state directory
    args, extra = _configure(config, home)
    env = _engine_env(eng, extra)
    flag = args[1] if args else None
    ours = palace.resolve(flag, env, str(home), rules=enginerules.for_argv(eng.argv, env))
    theirs, version = palace.engine_resolve(eng.argv, flag, env)
    assert ours == theirs, f"palace.resolve disagrees with mempalace {version}: {ours} vs {theirs}"

    before, after = f"before-{uuid.uuid4().hex[:6]}", f"after-{uuid.uuid4().hex[:6]}"
    plain = _session(plain_engine, args, env, tmp_path / "plain1.err")
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
    plain = _session(plain_engine, args, env, tmp_path / "plain2.err")
    try:
        assert _seen(plain, after) == {"drawer": True, "kg": True, "diary": True}
    finally:
        plain.close()


def _resolution_cases(home: Path) -> list[tuple[str, str | None, dict[str, str], Any]]:
    """(name, --palace, environment, set-up of HOME): every rule on which versions differ, and their order."""
    def legacy_palace() -> None:
        (home / ".mempalace/palace").mkdir(parents=True, exist_ok=True)
        (home / ".mempalace/palace/chroma.sqlite3").write_bytes(b"")

    def bom_config() -> None:  # in each version's config dir: 3.11 reads a BOM, 3.4.0 ignores such a file
        for where in (home / ".mempalace", home / ".config/mempalace"):
            where.mkdir(parents=True, exist_ok=True)
            (where / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"palace_path": "/bom/p"}).encode())

    return [
        ("fresh", None, {}, None),
        ("xdg", None, {"XDG_CONFIG_HOME": str(home / "xdg")}, None),
        ("xdg-relative", None, {"XDG_CONFIG_HOME": "rel/xdg"}, None),
        ("config-dir-env", None, {"MEMPALACE_CONFIG_DIR": str(home / "cfg")}, None),
        ("short-palace-env", None, {"MEMPALACE_PALACE": "/short/p"}, None),
        ("legacy-palace-env", None, {"MEMPAL_PALACE_PATH": "/legacy/p"}, None),
        ("env-precedence", None, {"MEMPALACE_PALACE": "/short/p", "MEMPAL_PALACE_PATH": "/legacy/p"}, None),
        ("flag", str(home / "flagged"), {"MEMPALACE_PALACE_PATH": "/env/p"}, None),
        ("legacy-palace", None, {}, legacy_palace),
        ("bom-config", None, {}, bom_config),
    ]


def test_resolution_agrees_with_every_engine_in_every_case(engine: EngineUnderTest, home: Path) -> None:
    """The stdlib rules, learned per engine, against the engine's own code: cheap, so every difference is tried."""
    for name, flag, extra, prepare in _resolution_cases(home):
        for stale in (home / ".mempalace", home / ".config"):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        if prepare:
            prepare()
        env = dict(os.environ, **extra)
        ours = palace.resolve(flag, env, str(home), rules=enginerules.for_argv(engine.argv, env))
        theirs, version = palace.engine_resolve(engine.argv, flag, env)
        assert ours == theirs, f"{name}: palace.resolve disagrees with mempalace {version}: {ours} vs {theirs}"


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
