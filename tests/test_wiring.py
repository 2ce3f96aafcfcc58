"""`mp-bridge install|uninstall` (mp_ssh_bridge/wiring.py) on real-looking client configs, and the JSONC splicer.

The commands run as a person runs them (`python -m mp_ssh_bridge.cli`, HOME a temporary directory, the
current directory a project), on the sample files in tests/data/wiring/: opencode's JSONC with comments,
trailing commas and other servers, a `~/.claude.json` with its other state and per-project servers, a
Claude Code project `.mcp.json` running `python -m mempalace.mcp_server`, and a pi-mcp-adapter `mcp.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mp_ssh_bridge import jsonc, wiring

DATA = Path(__file__).resolve().parent / "data" / "wiring"
SHIM = "/opt/mp/bin/mp-shim"


@dataclass(frozen=True)
class Case:
    client: str
    sample: str
    place: str  # "~/..." under HOME, else relative to the project directory
    project: bool
    entry: str  # the server name that ends up running mp-shim
    edit: tuple[str, str]  # a user's edit elsewhere in the installed file: old text -> new text

    @property
    def id(self) -> str:
        return f"{self.client}-{self.sample}{'-project' if self.project else ''}"


CASES = [
    Case("opencode", "opencode.jsonc", "~/.config/opencode/opencode.jsonc", False, "memory",
         ('"theme": "opencode",', '"theme": "tokyonight", // changed after install')),
    Case("opencode", "opencode-plain.json", "~/.config/opencode/opencode.json", False, "mempalace",
         ('"leader": "ctrl+x"', '"leader": "ctrl+a"')),
    Case("opencode", "opencode.jsonc", "opencode.jsonc", True, "memory",
         ('"instructions": ["AGENTS.md", "docs/style.md"],', '"instructions": ["AGENTS.md"],')),
    Case("claude-code", "claude.json", "~/.claude.json", False, "mempalace",
         ('"numStartups": 212,', '"numStartups": 213,')),
    Case("claude-code", "claude-project.mcp.json", ".mcp.json", True, "mempalace",
         ('"url": "https://mcp.sentry.dev/mcp"', '"url": "https://mcp.sentry.dev/mcp/v2"')),
    Case("pi", "pi-mcp.json", "~/.pi/agent/mcp.json", False, "mempalace",
         ('"idleTimeout": 10,', '"idleTimeout": 30,')),
    Case("pi", "pi-mcp.json", ".pi/mcp.json", True, "mempalace",
         ('"lifecycle": "lazy"', '"lifecycle": "eager"')),
]


@dataclass
class World:
    home: Path
    project: Path

    def path(self, place: str) -> Path:
        return self.home / place[2:] if place.startswith("~/") else self.project / place

    def put(self, case: Case) -> tuple[Path, bytes]:
        path = self.path(case.place)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (DATA / case.sample).read_bytes()
        path.write_bytes(data)
        return path, data

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k != "PI_CODING_AGENT_DIR"}
        env["HOME"] = str(self.home)
        return subprocess.run([sys.executable, "-m", "mp_ssh_bridge.cli", *args], cwd=self.project, env=env,
                              capture_output=True, text=True, timeout=60)

    def install(self, case: Case, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("install", case.client, *(["--project"] if case.project else []), "--shim", SHIM, *extra)

    def uninstall(self, case: Case, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("uninstall", case.client, *(["--project"] if case.project else []), *extra)

    @property
    def manifest(self) -> Path:
        return self.home / ".local" / "state" / "mp-ssh-bridge" / "wiring.json"

    def backups(self, path: Path) -> list[Path]:
        return sorted(path.parent.glob(path.name + ".mp-bridge*.bak"))


@pytest.fixture
def world(tmp_path: Path) -> World:
    (tmp_path / "home").mkdir()
    (tmp_path / "project").mkdir()
    return World(tmp_path / "home", tmp_path / "project")


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _servers(case: Case, text: str) -> dict[str, object]:
    value = jsonc.loads(text, jsonc=case.client == "opencode")
    return value["mcp" if case.client == "opencode" else "mcpServers"]


def _runs_shim(case: Case, entry: object) -> bool:
    assert isinstance(entry, dict)
    command = entry["command"]
    return (command[0] if isinstance(command, list) else command) == SHIM


# --------------------------------------------------------------------------- every client, every scope
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_install_then_uninstall_gives_back_the_original_bytes(world: World, case: Case) -> None:
    path, original = world.put(case)
    out = _ok(world.install(case)).stdout
    installed = path.read_text()
    assert f"--- {path}" in out and "+" in out  # the diff is shown
    assert _runs_shim(case, _servers(case, installed)[case.entry])
    assert not any(wiring.engine_args(wiring.command_words(case.client, e)) is not None
                   for e in _servers(case, installed).values())
    assert world.backups(path) == [path.with_name(path.name + ".mp-bridge.bak")]
    assert world.backups(path)[0].read_bytes() == original
    assert str(path.resolve()) in json.loads(world.manifest.read_text())["files"]
    _ok(world.uninstall(case))
    assert path.read_bytes() == original
    assert not world.manifest.exists()  # nothing left to undo, no record left behind
    assert world.backups(path)[0].read_bytes() == original  # the backup stays


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_user_edit_elsewhere_survives_uninstall(world: World, case: Case) -> None:
    path, original = world.put(case)
    _ok(world.install(case))
    old, new = case.edit
    installed = path.read_text()
    assert installed.count(old) == 1
    path.write_text(installed.replace(old, new))
    out = _ok(world.uninstall(case)).stdout
    assert "restored" in out
    assert path.read_text() == original.decode().replace(old, new)  # the edit kept, everything else as before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_install_twice_changes_nothing_the_second_time(world: World, case: Case) -> None:
    path, _ = world.put(case)
    _ok(world.install(case))
    once = path.read_bytes()
    record = world.manifest.read_text()
    out = _ok(world.install(case)).stdout
    assert "nothing to change" in out and "---" not in out
    assert path.read_bytes() == once
    assert world.manifest.read_text() == record
    assert len(world.backups(path)) == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dry_run_writes_nothing(world: World, case: Case) -> None:
    path, original = world.put(case)
    out = _ok(world.install(case, "--dry-run")).stdout
    assert f"+++ {path}" in out and SHIM in out and "nothing written" in out
    assert path.read_bytes() == original
    assert world.backups(path) == [] and not world.manifest.exists()
    _ok(world.install(case))
    installed = path.read_bytes()
    out = _ok(world.uninstall(case, "--dry-run")).stdout
    assert f"--- {path}" in out and "nothing written" in out
    assert path.read_bytes() == installed and world.manifest.exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_broken_file_is_refused_untouched(world: World, case: Case) -> None:
    path, original = world.put(case)
    broken = original.replace(b"{", b"{ \"half\": ", 1) if case.client == "opencode" else original.replace(
        b"{", b"{ // a comment JSON.parse refuses\n", 1)
    path.write_bytes(broken)
    proc = world.install(case)
    assert proc.returncode == 1
    assert "not valid" in proc.stderr and "nothing changed" in proc.stderr
    assert path.read_bytes() == broken
    assert world.backups(path) == [] and not world.manifest.exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_uninstall_refuses_when_the_entry_itself_was_changed(world: World, case: Case) -> None:
    path, _ = world.put(case)
    _ok(world.install(case))
    changed = path.read_text().replace(f'"{SHIM}"', '"/usr/local/bin/mp-shim"')
    path.write_text(changed)
    proc = world.uninstall(case)
    assert proc.returncode == 1
    assert "was changed since install" in proc.stderr and case.entry in proc.stderr
    assert path.read_text() == changed
    assert world.manifest.exists()  # still recorded: fixed by hand, it can be undone later


# --------------------------------------------------------------------------- scopes and files
@pytest.mark.parametrize("client, user_place, project_place", [
    ("opencode", "~/.config/opencode/opencode.jsonc", "opencode.jsonc"),
    ("claude-code", "~/.claude.json", ".mcp.json"),
    ("pi", "~/.pi/agent/mcp.json", ".pi/mcp.json"),
])
def test_project_uses_the_project_file_only(world: World, client: str, user_place: str, project_place: str) -> None:
    sample = {"opencode": "opencode.jsonc", "claude-code": "claude-project.mcp.json", "pi": "pi-mcp.json"}[client]
    user, user_bytes = world.put(Case(client, sample, user_place, False, "", ("", "")))
    project, project_bytes = world.put(Case(client, sample, project_place, True, "", ("", "")))
    _ok(world.run("install", client, "--project", "--shim", SHIM))
    assert user.read_bytes() == user_bytes
    assert project.read_bytes() != project_bytes and SHIM in project.read_text()
    assert world.backups(user) == []
    _ok(world.run("uninstall", client))  # the user scope: never installed there
    assert user.read_bytes() == user_bytes and SHIM in project.read_text()
    _ok(world.run("uninstall", client, "--project"))
    assert project.read_bytes() == project_bytes


def test_a_missing_file_is_created_and_uninstall_removes_it(world: World) -> None:
    out = _ok(world.run("install", "pi", "--project", "--shim", SHIM)).stdout
    created = world.project / ".pi" / "mcp.json"
    assert "--- /dev/null" in out
    assert json.loads(created.read_text()) == {"mcpServers": {"mempalace": {
        "command": SHIM, "args": [], "requestTimeoutMs": 130000}}}
    assert world.backups(created) == []  # nothing to back up
    _ok(world.run("uninstall", "pi", "--project"))
    assert not created.exists() and not (world.project / ".pi").exists()  # the folder install made, too


def test_a_created_file_others_added_to_is_kept_without_our_entry(world: World) -> None:
    _ok(world.run("install", "opencode", "--shim", SHIM))
    created = world.home / ".config" / "opencode" / "opencode.json"
    value = json.loads(created.read_text())
    assert value == {"$schema": "https://opencode.ai/config.json", "mcp": {"mempalace": {
        "type": "local", "command": [SHIM], "enabled": True, "timeout": 30000}}}
    created.write_text(created.read_text().replace('"mcp": {', '"model": "openai/gpt-5",\n  "mcp": {'))
    _ok(world.run("uninstall", "opencode"))
    assert json.loads(created.read_text()) == {"$schema": "https://opencode.ai/config.json", "model": "openai/gpt-5"}


def test_opencode_keeps_every_comment_and_trailing_comma_outside_the_entry(world: World) -> None:
    case = CASES[0]
    path, original = world.put(case)
    _ok(world.install(case))
    installed = path.read_text()
    comments = [line.strip() for line in original.decode().splitlines() if "//" in line or "/*" in line]
    inside = "// one engine per session!"  # the replaced entry's own comment: back after uninstall
    for comment in comments:
        if inside not in comment:
            assert comment in installed, comment
    assert installed.count("},\n") >= original.decode().count("},\n")
    assert jsonc.loads(installed)["mcp"]["memory"] == {
        "type": "local", "command": [SHIM, "--palace", "/home/dev/.mempalace/palace"], "enabled": True,
        "environment": {"MEMPALACE_MCP_TIMEOUT_MS": "90000"}, "timeout": 30000}
    # Only the entry's lines differ.
    before, after = original.decode().splitlines(), installed.splitlines()
    assert before[:before.index('    "memory": {')] == after[:after.index('    "memory": {')]
    assert before[-4:] == after[-4:]
    _ok(world.uninstall(case))
    assert inside in path.read_text()


def test_a_user_server_added_next_to_ours_survives_uninstall(world: World) -> None:
    case = CASES[3]  # ~/.claude.json: install appends "mempalace" after "github"
    path, original = world.put(case)
    _ok(world.install(case))
    value = json.loads(path.read_text())
    value["mcpServers"]["linear"] = {"type": "http", "url": "https://mcp.linear.app/mcp"}
    path.write_text(json.dumps(value, indent=4))  # rewritten whole by another tool: install's text is gone
    _ok(world.uninstall(case))
    expected = json.loads(original)
    expected["mcpServers"]["linear"] = {"type": "http", "url": "https://mcp.linear.app/mcp"}
    assert json.loads(path.read_text()) == expected
    assert '    "mcpServers": {\n        "github": {' in path.read_text()  # its layout kept


def test_a_container_install_created_keeps_the_servers_added_to_it(world: World) -> None:
    case = CASES[1]  # opencode.json without "mcp": install adds "mcp": {"mempalace": ...}
    path, original = world.put(case)
    _ok(world.install(case))
    text = path.read_text()
    path.write_text(text.replace('"mcp": {', '"mcp": {\n    "git": {"type": "local", "command": ["git-mcp"]},', 1))
    _ok(world.uninstall(case))
    expected = json.loads(original)
    expected["mcp"] = {"git": {"type": "local", "command": ["git-mcp"]}}
    assert jsonc.loads(path.read_text()) == expected


def test_what_install_writes_for_each_client(world: World) -> None:
    claude_project = CASES[4]
    path, _ = world.put(claude_project)
    out = _ok(world.install(claude_project, "--palace", "/home/dev/work/palace")).stdout
    assert json.loads(path.read_text())["mcpServers"]["mempalace"] == {
        "command": SHIM, "args": ["--palace", "/home/dev/work/palace"], "env": {
            "MEMPALACE_MCP_READ_ONLY": "1", "MP_BRIDGE_ENGINE": "/home/dev/.venvs/mempalace/bin/python -m mempalace.mcp_server"}}
    assert "'mempalace' ran mempalace-mcp" in out
    pi = CASES[5]
    path, _ = world.put(pi)
    _ok(world.install(pi))
    assert json.loads(path.read_text())["mcpServers"]["mempalace"] == {
        "command": SHIM, "args": [], "lifecycle": "keep-alive",
        "directTools": ["mempalace_search", "mempalace_add_drawer"], "requestTimeoutMs": 130000}
    claude = CASES[3]
    path, _ = world.put(claude)
    out = _ok(world.install(claude)).stdout
    assert json.loads(path.read_text())["mcpServers"]["mempalace"] == {
        "type": "stdio", "command": SHIM, "args": [], "env": {}}
    # The per-project server in ~/.claude.json still runs the engine: said, not touched.
    assert 'projects."/home/dev/src/notes".mcpServers.memory still runs mempalace-mcp' in out
    assert json.loads(path.read_text())["projects"]["/home/dev/src/notes"]["mcpServers"]["memory"]["command"] == (
        "mempalace-mcp")


def test_without_shim_the_installed_console_script_is_written(world: World) -> None:
    path, _ = world.put(CASES[5])
    _ok(world.run("install", "pi"))
    expected = Path(sys.executable).parent / "mp-shim"
    assert expected.exists()
    assert json.loads(path.read_text())["mcpServers"]["mempalace"]["command"] == str(expected)


def test_a_palace_that_contradicts_the_entry_is_refused(world: World) -> None:
    path, original = world.put(CASES[4])
    proc = world.install(CASES[4], "--palace", "/somewhere/else")
    assert proc.returncode == 1 and "--palace /home/dev/work/palace" in proc.stderr
    assert path.read_bytes() == original


def test_a_mempalace_name_taken_by_something_else_is_refused(world: World) -> None:
    path = world.home / ".claude.json"
    text = '{\n  "mcpServers": {\n    "mempalace": {\n      "type": "http",\n      "url": "https://x.example/mcp"\n    }\n  }\n}\n'
    path.write_text(text)
    proc = world.run("install", "claude-code", "--shim", SHIM)
    assert proc.returncode == 1 and "runs something else" in proc.stderr
    assert path.read_text() == text


def test_uninstall_without_an_install_changes_nothing(world: World) -> None:
    path, original = world.put(CASES[3])
    out = _ok(world.uninstall(CASES[3])).stdout
    assert "nothing to undo" in out and path.read_bytes() == original


def test_a_second_changing_install_keeps_the_first_backup(world: World) -> None:
    case = CASES[5]
    path, original = world.put(case)
    _ok(world.install(case))
    # The user puts the engine back by hand (the record still holds the first install), then installs again.
    path.write_text(path.read_text().replace(f'"command": "{SHIM}"', '"command": "mempalace-mcp"'))
    reverted = path.read_bytes()
    _ok(world.install(case))
    backups = world.backups(path)
    assert len(backups) == 2 and path.with_name(path.name + ".mp-bridge.bak") in backups
    assert {b.read_bytes() for b in backups} == {original, reverted}
    # Uninstall goes back to just before the latest install: the user's own revert.
    _ok(world.uninstall(case))
    assert path.read_bytes() == reverted and not world.manifest.exists()


def test_an_entry_the_user_already_put_back_is_nothing_to_undo(world: World) -> None:
    case = CASES[4]
    path, original = world.put(case)
    _ok(world.install(case))
    path.write_bytes(original)  # restored by hand from the backup
    out = _ok(world.uninstall(case)).stdout
    assert "nothing to undo" in out and "---" not in out
    assert path.read_bytes() == original and not world.manifest.exists()


def test_xdg_config_home_and_pi_agent_dir_are_respected(world: World, tmp_path: Path) -> None:
    env = {"HOME": str(world.home), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PI_CODING_AGENT_DIR": str(tmp_path / "pi")}
    assert wiring.target("opencode", False, world.project, env).path == tmp_path / "xdg" / "opencode" / "opencode.json"
    assert wiring.target("pi", False, world.project, env).path == tmp_path / "pi" / "mcp.json"
    assert wiring.target("claude-code", False, world.project, env).path == world.home / ".claude.json"
    assert wiring.target("claude-code", True, world.project, env).path == world.project / ".mcp.json"
    (tmp_path / "xdg" / "opencode").mkdir(parents=True)
    (tmp_path / "xdg" / "opencode" / "opencode.jsonc").write_text("{}")
    assert wiring.target("opencode", False, world.project, env).path.name == "opencode.jsonc"


@pytest.mark.parametrize("words, rest", [
    (["mempalace-mcp"], []),
    (["/home/u/.venv/bin/mempalace-mcp", "--palace", "/p"], ["--palace", "/p"]),
    (["python3", "-m", "mempalace.mcp_server", "--read-only"], ["--read-only"]),
    (["uvx", "--from", "mempalace", "mempalace-mcp"], []),
    (["mp-shim"], None),
    (["mempalace", "mine", "."], None),
    (["npx", "-y", "mempalace-mcp-lookalike"], None),
    (["mp-shim", "--note", "replaces mempalace-mcp"], None),
    (["env", "MEMPALACE_MCP_READ_ONLY=1", "mempalace-mcp"], None),
])
def test_which_commands_run_the_engine(words: list[str], rest: list[str] | None) -> None:
    assert wiring.engine_args(words) == rest
    assert wiring.engine_wrapped(words) == (words[0] == "env")


def test_an_engine_behind_a_wrapper_is_refused_not_rewritten(world: World) -> None:
    path = world.project / ".mcp.json"
    text = '{\n  "mcpServers": {\n    "m": {"command": "env", "args": ["X=1", "mempalace-mcp"]}\n  }\n}\n'
    path.write_text(text)
    proc = world.run("install", "claude-code", "--project", "--shim", SHIM)
    assert proc.returncode == 1 and "through 'env'" in proc.stderr and "by hand" in proc.stderr
    assert path.read_text() == text


# --------------------------------------------------------------------------- the JSONC splicer
def test_the_parser_knows_strings_comments_and_trailing_commas() -> None:
    text = '{\n  "a//b": "x /* not a comment */ \\" //",  // real\n  /* block */ "n": [1, 2.5e3, true, null,],\n}'
    root = jsonc.parse(text)
    assert root.to_python() == {"a//b": 'x /* not a comment */ " //', "n": [1, 2500.0, True, None]}
    member = root.get("n")
    assert member is not None and text[member.value.start:member.value.end] == "[1, 2.5e3, true, null,]"
    with pytest.raises(jsonc.JsoncError, match="comments are not allowed"):
        jsonc.parse(text, jsonc=False)
    with pytest.raises(jsonc.JsoncError, match="trailing comma"):
        jsonc.parse('{"a": 1,}', jsonc=False)
    assert jsonc.loads('\ufeff{"a": "\\u00e9"}', jsonc=False) == {"a": "é"}


@pytest.mark.parametrize("bad", ['{"a": 1', '{"a" 1}', '{"a": 1}}', '{"a": [1 2]}', '{"a": "x', '{/* x', '',
                                 '{"a": 01}', "{'a': 1}", '{"a": "tab\there"}', "[" * 300 + "]" * 300])
def test_the_parser_refuses_what_json_refuses(bad: str) -> None:
    with pytest.raises(jsonc.JsoncError) as err:
        jsonc.parse(bad)
    assert "line 1 column" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ('{}', '{\n  "k": 1\n}'),
    ('{\n  "a": {}\n}', '{\n  "a": {},\n  "k": 1\n}'),
    ('{\n  "a": 1 // note\n}', '{\n  "a": 1, // note\n  "k": 1\n}'),
    ('{\n  "a": 1, // note\n}', '{\n  "a": 1, // note\n  "k": 1,\n}'),
    ('{"a": 1}', '{"a": 1, "k": 1}'),
    ('{ // only a comment\n}', '{ // only a comment\n  "k": 1\n}'),
    ('{\r\n    "a": 1\r\n}', '{\r\n    "a": 1,\r\n    "k": 1\r\n}'),
])
def test_insert_member_splices_one_place(text: str, expected: str) -> None:
    root = jsonc.parse(text)
    edit = jsonc.insert_member(text, root, "k", 1, jsonc.style_of(text, root))
    assert edit.apply(text) == expected
    assert edit.revert(expected) == text
    assert expected[edit.offset + edit.anchor:].startswith('"k"')


def test_insert_member_lays_out_objects_like_the_file() -> None:
    text = '{\n    "mcp": {\n        "a": {\n            "x": 1,\n        },\n    },\n}'
    root = jsonc.parse(text)
    mcp = jsonc.find(root, ["mcp"])
    assert mcp is not None
    new = jsonc.insert_member(text, mcp, "k", {"c": ["p", "q"], "e": {}}, jsonc.style_of(text, root)).apply(text)
    assert new == ('{\n    "mcp": {\n        "a": {\n            "x": 1,\n        },\n        "k": {\n'
                   '            "c": ["p", "q"],\n            "e": {},\n        },\n    },\n}')
    assert jsonc.loads(new)["mcp"]["k"] == {"c": ["p", "q"], "e": {}}


@pytest.mark.parametrize("text, key, expected", [
    ('{\n  "a": 1,\n  "k": 2\n}', "k", '{\n  "a": 1\n}'),
    ('{\n  "a": 1, // a\n  "k": 2 // k\n}', "k", '{\n  "a": 1 // a\n}'),
    ('{\n  "k": 2,\n  "a": 1\n}', "k", '{\n  "a": 1\n}'),
    ('{\n  "a": 1,\n  "k": 2,\n  "b": 3\n}', "k", '{\n  "a": 1,\n  "b": 3\n}'),
    ('{\n  "a": 1,\n  "k": 2,\n}', "k", '{\n  "a": 1,\n}'),
    ('{\n  "k": 2\n}', "k", '{}'),
    ('{"a": 1, "k": 2}', "k", '{"a": 1}'),
])
def test_remove_member_takes_its_comma_and_line(text: str, key: str, expected: str) -> None:
    root = jsonc.parse(text)
    new = jsonc.remove_member(text, root, key).apply(text)
    assert new == expected
    assert jsonc.loads(new) == {k: v for k, v in jsonc.loads(text).items() if k != key}


def test_replace_value_keeps_the_rest_byte_for_byte() -> None:
    text = '{\n  // c1\n  "s": {\n    "x": {"command": "old"} /* c2 */\n  },\n  "t": 1\n}'
    root = jsonc.parse(text)
    member = jsonc.find(root, ["s"])
    assert member is not None
    x = member.get("x")
    assert x is not None
    edit = jsonc.replace_value(text, x, {"command": "new", "args": []}, jsonc.style_of(text, root))
    new = edit.apply(text)
    assert new == '{\n  // c1\n  "s": {\n    "x": {\n      "command": "new",\n      "args": []\n    } /* c2 */\n  },\n  "t": 1\n}'
    assert edit.revert(new) == text


def test_an_edit_refuses_text_it_does_not_expect() -> None:
    with pytest.raises(ValueError):
        jsonc.Edit(1, "abc", "x").apply("0xyz")


# --------------------------------------------------------------------------- review findings
@pytest.mark.parametrize("client, place, entry, engine, args", [
    ("pi", ".pi/mcp.json", {"command": "/home/me/venvs/mp/bin/mempalace-mcp", "args": ["--palace", "/p"]},
     "/home/me/venvs/mp/bin/mempalace-mcp", ["--palace", "/p"]),
    ("opencode", "opencode.json", {"type": "local", "command": ["uvx", "--from", "mempalace==3.11", "mempalace-mcp"]},
     "uvx --from mempalace==3.11 mempalace-mcp", []),
    ("claude-code", ".mcp.json", {"command": "/home/me/venvs/mp/bin/python", "args": ["-m", "mempalace.mcp_server"]},
     "/home/me/venvs/mp/bin/python -m mempalace.mcp_server", []),
    ("opencode", "opencode.json", {"command": ["/home/me/My venvs/bin/mempalace-mcp", "--read-only"],
                                   "environment": {"A": "1"}},
     "'/home/me/My venvs/bin/mempalace-mcp'", ["--read-only"]),
])
def test_install_keeps_which_engine_an_entry_ran(world: World, client: str, place: str, entry: dict[str, object],
                                                 engine: str, args: list[str]) -> None:
    import shlex

    path = world.project / place
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "mcp" if client == "opencode" else "mcpServers"
    original = json.dumps({key: {"mem": entry}}, indent=2) + "\n"
    path.write_text(original)
    out = _ok(world.run("install", client, "--project", "--shim", SHIM)).stdout
    installed = jsonc.loads(path.read_text())[key]["mem"]
    env = installed["environment" if client == "opencode" else "env"]
    assert env["MP_BRIDGE_ENGINE"] == engine
    assert shlex.split(engine) == wiring.engine_split(wiring.command_words(client, entry))[0]  # type: ignore[index]
    command = installed["command"]
    assert (command[1:] if client == "opencode" else installed["args"]) == args
    assert engine in out  # which engine will run is said
    _ok(world.run("uninstall", client, "--project"))
    assert path.read_text() == original


def test_install_keeps_an_engine_the_entry_already_names_and_adds_none_for_the_bare_name(world: World) -> None:
    path = world.project / ".mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "mem": {"command": "python3", "args": ["-m", "mempalace.mcp_server"], "env": {"MP_BRIDGE_ENGINE": "/x/engine"}}}}))
    out = _ok(world.run("install", "claude-code", "--project", "--shim", SHIM)).stdout
    assert json.loads(path.read_text())["mcpServers"]["mem"]["env"] == {"MP_BRIDGE_ENGINE": "/x/engine"}
    assert "/x/engine" in out
    assert wiring.engine_command(["mempalace-mcp", "--palace", "/p"]) is None


@pytest.mark.parametrize("words", [
    ["sh", "-c", "exec mempalace-mcp --palace /p"],
    ["bash", "-lc", "cd /x && python -m mempalace.mcp_server;"],
    ["sh", "-c", "exec 'mempalace-mcp"],  # does not split: a mention is enough
])
def test_an_engine_inside_a_shell_string_is_wrapped(words: list[str]) -> None:
    assert wiring.engine_args(words) is None and wiring.engine_wrapped(words)


def test_an_engine_inside_a_shell_string_is_refused_not_doubled(world: World) -> None:
    path = world.project / ".mcp.json"
    text = json.dumps({"mcpServers": {"m": {"command": "sh", "args": ["-c", "exec mempalace-mcp --palace /p"]}}})
    path.write_text(text)
    proc = world.run("install", "claude-code", "--project", "--shim", SHIM)
    assert proc.returncode == 1 and "through 'sh'" in proc.stderr and "by hand" in proc.stderr
    assert path.read_text() == text
    # ... and named when it sits in another file the client reads.
    shared = world.home / ".config" / "mcp" / "mcp.json"
    shared.parent.mkdir(parents=True)
    shared.write_text(text)
    out = _ok(world.run("install", "pi", "--shim", SHIM)).stdout
    assert f"note: {shared} mcpServers.m still runs mempalace-mcp" in out


def test_a_key_with_a_lone_surrogate_escape_is_recorded_and_undone(world: World) -> None:
    path = world.project / ".pi" / "mcp.json"
    path.parent.mkdir()
    original = '{\n  "mcpServers": {\n    "x\\ud800": {"command": "mempalace-mcp", "args": []}\n  }\n}\n'
    path.write_text(original)
    _ok(world.run("install", "pi", "--project", "--shim", SHIM))
    assert world.manifest.read_bytes().isascii()
    _ok(world.run("uninstall", "pi", "--project"))
    assert path.read_text() == original and not world.manifest.exists()


def test_a_change_that_cannot_be_written_is_refused_without_a_traceback(world: World) -> None:
    path = world.project / ".pi" / "mcp.json"
    path.parent.mkdir()
    original = '{"mcpServers": {"m": {"command": "mempalace-mcp", "env": {"A": "\\ud800"}}}}'
    path.write_text(original)
    proc = world.run("install", "pi", "--project", "--shim", SHIM)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "nothing changed" in proc.stderr
    assert path.read_text() == original and not world.manifest.exists() and world.backups(path) == []


def test_the_record_is_written_before_the_file_and_rolled_back(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    env = {"HOME": str(world.home)}
    case = CASES[5]
    path, original = world.put(case)
    t = wiring.target("pi", False, world.project, env)
    real_write = wiring._write_atomic

    def failing(what: str) -> object:
        def write(p: Path, text: str, mode: int | None) -> None:
            if what in str(p):
                raise OSError(28, "No space left on device")
            real_write(p, text, mode)
        return write

    # The record cannot be written: the file is left as it was.
    monkeypatch.setattr(wiring, "_write_atomic", failing("wiring.json"))
    with pytest.raises(OSError):
        wiring.install(t, SHIM, out=io.StringIO(), cwd=world.project, environ=env)
    assert path.read_bytes() == original and not world.manifest.exists()
    # The file cannot be written: the record made for it is taken back.
    monkeypatch.setattr(wiring, "_write_atomic", failing("mcp.json"))
    with pytest.raises(OSError):
        wiring.install(t, SHIM, out=io.StringIO(), cwd=world.project, environ=env)
    assert path.read_bytes() == original and not world.manifest.exists()


def test_crlf_jsonc_with_a_trailing_comment_keeps_its_line_endings(world: World) -> None:
    path = world.project / "opencode.jsonc"
    original = (b'{\r\n  "mcp": {\r\n    "git": {"type": "local", "command": ["git-mcp"]} // mine\r\n  }, // end\r\n'
                b'  "theme": "x" // last\r\n}\r\n')
    path.write_bytes(original)
    _ok(world.run("install", "opencode", "--project", "--shim", SHIM))
    installed = path.read_bytes()
    assert installed.replace(b"\r\n", b"").count(b"\n") == 0 and b"\r\r" not in installed
    assert jsonc.loads(installed.decode())["mcp"]["mempalace"]["command"] == [SHIM]
    _ok(world.run("uninstall", "opencode", "--project"))
    assert path.read_bytes() == original
    # The sample, in CRLF: the replaced entry carries a trailing // comment.
    sample = (DATA / "opencode.jsonc").read_bytes().replace(b"\n", b"\r\n")
    path.write_bytes(sample)
    _ok(world.run("install", "opencode", "--project", "--shim", SHIM))
    installed = path.read_bytes()
    assert installed.replace(b"\r\n", b"").count(b"\n") == 0 and b"\r\r" not in installed
    _ok(world.run("uninstall", "opencode", "--project"))
    assert path.read_bytes() == sample


def test_a_comment_ends_before_the_cr_of_crlf() -> None:
    text = '{\r\n  "a": 1 // note\r\n}'
    root = jsonc.parse(text)
    new = jsonc.insert_member(text, root, "k", 1, jsonc.style_of(text, root)).apply(text)
    assert new == '{\r\n  "a": 1, // note\r\n  "k": 1\r\n}'


def test_a_created_file_the_user_commented_is_kept(world: World) -> None:
    _ok(world.run("install", "opencode", "--shim", SHIM))
    created = world.home / ".config" / "opencode" / "opencode.json"
    created.write_text(created.read_text().replace("{\n", "{\n  // my settings go here, keep this file\n", 1))
    _ok(world.run("uninstall", "opencode"))
    assert created.exists() and "// my settings go here" in created.read_text()
    assert jsonc.loads(created.read_text()) == {"$schema": "https://opencode.ai/config.json"}


def test_a_created_file_only_reformatted_is_removed(world: World) -> None:
    _ok(world.run("install", "pi", "--project", "--shim", SHIM))
    created = world.project / ".pi" / "mcp.json"
    created.write_text(json.dumps(json.loads(created.read_text()), indent=4))
    _ok(world.run("uninstall", "pi", "--project"))
    assert not created.exists()


def test_a_file_deleted_and_made_again_by_install_gets_a_fresh_record(world: World) -> None:
    case = CASES[5]
    path, _ = world.put(case)
    _ok(world.install(case))
    path.unlink()  # the user deletes it; install makes a new one
    _ok(world.install(case))
    record = json.loads(world.manifest.read_text())["files"][str(path.resolve())]
    assert record["created"] is True and [c["action"] for c in record["changes"]] == ["create"]
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    _ok(world.uninstall(case))
    assert not path.exists() and not world.manifest.exists()


def test_a_number_past_the_digit_limit_is_a_parse_error(world: World) -> None:
    with pytest.raises(jsonc.JsoncError, match="too long"):
        jsonc.parse('{"a": ' + "1" * 5000 + "}")
    path = world.project / ".mcp.json"
    text = '{"n": ' + "1" * 5000 + ', "mcpServers": {}}'
    path.write_text(text)
    proc = world.run("install", "claude-code", "--project", "--shim", SHIM)
    assert proc.returncode == 1 and "not valid" in proc.stderr and "Traceback" not in proc.stderr
    assert path.read_text() == text


def test_defaults_come_from_their_modules() -> None:
    from mp_ssh_bridge import config, protocol

    assert wiring.SESSION_DEADLINE_MS is config.DEFAULT_TIMEOUT_MS
    assert wiring.EVENT_WAIT_MS is protocol.EVENT_WAIT_DEFAULT_MS


def test_a_relative_xdg_value_is_ignored(world: World) -> None:
    env = {"HOME": str(world.home), "XDG_CONFIG_HOME": "rel/config", "XDG_STATE_HOME": "rel/state"}
    assert wiring.target("opencode", False, world.project, env).path == (
        world.home / ".config" / "opencode" / "opencode.json")
    assert wiring.manifest_path(env) == world.home / ".local" / "state" / "mp-ssh-bridge" / "wiring.json"


def test_write_atomic_uses_a_fresh_temp_file_and_keeps_mode_and_links(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (link.name, real.name):  # the old, predictable temporary names, planted as links
        (tmp_path / f".{name}.mp-bridge-{os.getpid()}.tmp").symlink_to(victim)
    wiring._write_atomic(link, "new", real.stat().st_mode)
    assert victim.read_text() == "precious"
    assert link.is_symlink() and real.read_text() == "new" and real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir() if "mp-bridge" in p.name and p.suffix == ".tmp"
                  and not p.is_symlink()) == []
