"""The settings model is the one source of truth; the shim's fast reader must agree with it.

The fast reader (`config.fast_config`) exists only for start-up time. These
tests fail when a field is added to one side only, when a field has no scope,
and when the two read any spelling differently: for every field the fast path
reads, a matrix of raw values in the environment and in the TOML file; either
the fast reader gives the model's value, or it defers (NeedSettings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mp_ssh_bridge import config
from mp_ssh_bridge.settings import BrokerSettings, SessionSettings, Settings, config_file, load

SAMPLES_ENV = ["", "0", "1", "7", " 7 ", "-1", "1024", "4096", "2.5", "1e3", "abc", "true", "off", "TRUE", "yes ",
               "host", "container", "auto", "/abs/dir", "~/home/dir", "rel/dir", "unix:///s.sock", "tcp://h:1"]
SAMPLES_TOML: list[Any] = [0, 7, 4096, -1, 2.5, True, False, "7", "true", "host", "/abs", "~/x", [1], {"a": 1}]

# What the Config attribute of each fast field is called, and how the model's value maps onto it.
ATTR = {
    "mempalace_path": ("state_dir", str),
    "broker": ("broker_url", lambda v: v or None),
    "broker_token": ("broker_token", lambda v: v or None),
    "mcp_timeout_ms": ("timeout_ms", int),
    "read_only": ("read_only", bool),
    "role": ("role", str),
    "connect_timeout": ("connect_timeout", float),
    "max_line_bytes": ("max_line_bytes", int),
    "log_level": ("log_level", str),
    "palace": ("palace", str),
}


def test_every_field_has_one_scope_and_the_fast_reader_covers_its_side() -> None:
    fields = set(Settings.model_fields)
    scoped = [f for names in config.SCOPES.values() for f in names]
    assert len(scoped) == len(set(scoped)), "a field is in two scopes"
    assert set(scoped) == fields, f"unscoped: {fields - set(scoped)}; scoped but not in the model: {set(scoped) - fields}"
    assert set(config.FAST_FIELDS) | config.FAST_PATH_IGNORES == fields
    assert not set(config.FAST_FIELDS) & config.FAST_PATH_IGNORES
    assert set(ATTR) == set(config.FAST_FIELDS), "a fast field without an agreement check"


def test_the_types_follow_the_scopes() -> None:
    broker, session = set(BrokerSettings.model_fields), set(SessionSettings.model_fields)
    s = config.SCOPES
    assert broker == set(s["identity"]) | set(s["broker"]) | set(s["process"])
    assert session == set(s["identity"]) | set(s["session"]) | set(s["client"]) | set(s["process"])


def test_defaults_agree() -> None:
    fields = Settings.model_fields
    assert config.DEFAULT_TIMEOUT_MS == fields["mcp_timeout_ms"].default
    assert config.DEFAULT_CONNECT_TIMEOUT == fields["connect_timeout"].default
    assert config.DEFAULT_MAX_LINE_BYTES == fields["max_line_bytes"].default
    assert fields["mempalace_path"].default is None  # unset: one state directory per set of files (palace.state_dir_for)


def _fast_or_none(palace_flag: str | None = None) -> config.Config | None:
    try:
        return config.fast_config(palace_flag)
    except config.NeedSettings:
        return None


def _model_or_none(palace_flag: str | None = None) -> Settings | None:
    try:
        return load(palace=palace_flag)
    except ValidationError:
        return None


def _agree(field: str) -> None:
    fast, model = _fast_or_none(), _model_or_none()
    if fast is None:
        return  # deferring is always allowed: the model decides (and reports)
    assert model is not None, f"{field}: the fast reader accepted what the model rejects"
    attr, conv = ATTR[field]
    got = getattr(fast, attr)
    if field == "palace":
        assert got == (str(model.palace) if model.palace else None)
        assert fast.memory == model.memory
    elif field == "mempalace_path":
        assert got == str(model.state_dir)
    elif field == "log_level":
        assert got == (model.log_level if "log_level" in model.model_fields_set else None)
    else:
        assert got == conv(getattr(model, field)), field
    assert model.session_config().__dict__ == fast.__dict__


@pytest.mark.parametrize("field", sorted(config.FAST_FIELDS))
def test_environment_spellings_agree(field: str, home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for raw in SAMPLES_ENV:
        monkeypatch.setenv(config.env_name(field), raw)
        _agree(field)


@pytest.mark.parametrize("field", sorted(config.FAST_FIELDS))
def test_config_file_spellings_agree(field: str, home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    for raw in [*SAMPLES_TOML, *SAMPLES_ENV]:
        value = json.dumps(raw) if not isinstance(raw, (list, dict)) else ("[1]" if isinstance(raw, list) else "{a = 1}")
        if isinstance(raw, bool):
            value = "true" if raw else "false"
        (home / "mp-bridge.toml").write_text(f"{field} = {value}\n")  # MP_BRIDGE_CONFIG points here (conftest)
        _agree(field)


def test_environment_wins_over_the_file_in_both(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "mp-bridge.toml").write_text('mcp_timeout_ms = 4321\nrole = "container"\nmempalace_path = "/toml"\n')
    monkeypatch.delenv("MP_BRIDGE_ROLE")
    monkeypatch.delenv("MEMPALACE_PATH")
    monkeypatch.setenv("MEMPALACE_MCP_TIMEOUT_MS", "1234")
    fast, model = config.fast_config(None), load()
    assert fast.timeout_ms == model.mcp_timeout_ms == 1234
    assert fast.role == model.role == "container" and fast.state_dir == str(model.mempalace_path) == "/toml"
    assert load(palace="/flag").session_config("/flag").palace == config.fast_config("/flag").palace == "/flag"


@pytest.mark.parametrize("bare", ["BROKER", "BROKER_TOKEN", "MCP_TIMEOUT_MS", "READ_ONLY", "PALACE", "ROLE", "broker"])
def test_bare_names_mean_nothing(bare: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the model's second alias made an agent's bare BROKER / READ_ONLY change it, on the slow path only."""
    before_fast, before_model = config.fast_config(None).__dict__, load().model_dump()
    monkeypatch.setenv(bare, {"MCP_TIMEOUT_MS": "5", "READ_ONLY": "1", "ROLE": "container"}.get(bare, "tcp://evil:1"))
    assert config.fast_config(None).__dict__ == before_fast
    assert load().model_dump() == before_model


def test_config_file_location_is_one_rule(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config.config_file_path() == str(config_file())
    monkeypatch.delenv("MP_BRIDGE_CONFIG")
    assert config.config_file_path() == str(config_file()) == str(home / ".config/mp-ssh-bridge/config.toml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.config_file_path() == str(config_file()) == str(tmp_path / "xdg/mp-ssh-bridge/config.toml")
    mac = config.config_file_path(platform="darwin")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert mac == config.config_file_path(platform="darwin") == str(home / "Library/Application Support/mp-ssh-bridge/config.toml")


def test_a_session_never_configures_the_broker(home: Path) -> None:
    """The election hands the broker the palace's identity and an environment without any session variable."""
    from mp_ssh_bridge.election import broker_argv, broker_environment

    env = {name: "x" for name in config.session_only_env_names()}
    env.update(HOME="/h", PATH="/bin", MEMPALACE_PATH="/s", MEMPALACE_PALACE_PATH="/p", MP_BRIDGE_ENGINE="e")
    kept = broker_environment(env)
    assert kept == {"HOME": "/h", "PATH": "/bin", "MEMPALACE_PATH": "/s", "MEMPALACE_PALACE_PATH": "/p",
                    "MP_BRIDGE_ENGINE": "e"}
    assert {"MEMPALACE_MCP_TIMEOUT_MS", "MEMPALACE_MCP_READ_ONLY", "MEMPALACE_BROKER"} <= config.session_only_env_names()
    argv = broker_argv(load(palace="/pal"), 9)
    assert argv[argv.index("--palace") + 1] == "/pal" and "--mempalace-path" in argv
