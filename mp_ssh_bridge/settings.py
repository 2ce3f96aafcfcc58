"""The one settings model for broker, shim and `mp-bridge`.

Sources, lowest to highest: defaults, a TOML file in the platform's user
config dir (`MP_BRIDGE_CONFIG` names another), environment variables, then
CLI flags (passed as keyword arguments). Every default works from a bare
environment (only HOME and PATH), which is how MCP clients spawn servers.

Importing pydantic-settings costs ~90 ms and ~14 MB, so the shim's fast path
does not import this module; `fast_path_agrees()` in the tests keeps the
two in step.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mp_ssh_bridge import state

APP_NAME = "mp-ssh-bridge"


def config_file() -> Path:
    """`$MP_BRIDGE_CONFIG`, else `<user config dir>/mp-ssh-bridge/config.toml`."""
    explicit = os.environ.get("MP_BRIDGE_CONFIG")
    if explicit:
        return state.expand(explicit)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml"


class Settings(BaseSettings):
    """Settings for mp-ssh-bridge. Env names: `MP_BRIDGE_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="MP_BRIDGE_",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # --- where -------------------------------------------------------------
    mempalace_path: Path = Field(
        default=Path(state.DEFAULT_STATE_DIR),
        validation_alias=AliasChoices("MEMPALACE_PATH", "mempalace_path"),
        description="State directory shared with mempalace (env MEMPALACE_PATH): broker.lock/.sock/.json live here.",
    )
    palace: Path | None = Field(
        default=None,
        description="Palace the engine opens (--palace). Default: MEMPALACE_PALACE_PATH, then palace_path in "
        "<state dir>/config.json, then <state dir>/palace.",
    )
    broker: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MEMPALACE_BROKER", "broker"),
        description="Broker endpoint URL used verbatim (env MEMPALACE_BROKER): unix:///path, tcp://host:port, ssh://alias/path.",
    )
    broker_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MEMPALACE_BROKER_TOKEN", "broker_token"),
        description="Token for a tcp:// endpoint (env MEMPALACE_BROKER_TOKEN); default: the one in broker.json.",
    )

    # --- the engine -------------------------------------------------------
    engine: str = Field(
        default="mempalace-mcp",
        description="Command line of the real engine (shell-style quoting, never run through a shell).",
    )
    engine_eager_warmup: bool = Field(
        default=True,
        description="Set MEMPALACE_EAGER_WARMUP=1 in the engine so no client ever pays a cold embedding model.",
    )
    engine_restart_budget: int = Field(
        default=5, ge=1, description="Restarts allowed within engine_restart_window before the broker cools down."
    )
    engine_restart_window: float = Field(default=300.0, gt=0, description="Seconds over which restarts are counted.")
    engine_backoff_max: float = Field(default=10.0, gt=0, description="Longest pause between two engine starts, seconds.")
    engine_start_timeout: float = Field(
        default=60.0, gt=0, description="Seconds the engine may take to answer its first initialize."
    )
    strip_root_combinators: bool = Field(
        default=True,
        description="Remove root-level anyOf/oneOf/allOf from tools/list input schemas (mempalace 3.4.0 "
        "diary_write, upstream #1728), which some model APIs reject for the whole tools array.",
    )

    # --- time bounds --------------------------------------------------------
    request_timeout: float = Field(
        default=60.0, gt=0, description="Deadline of one request in the broker, seconds (pi's MCP timeout is 60 s)."
    )
    stall_timeout: float = Field(
        default=120.0,
        gt=0,
        description="An engine silent on its in-flight request this long is killed and restarted, seconds.",
    )
    event_wait_slice: float = Field(
        default=0.5, gt=0, description="mempalace_event_wait runs in slices this long so it never blocks others, seconds."
    )
    shutdown_grace: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long in-flight requests may finish, seconds."
    )
    idle_exit_minutes: float = Field(
        default=30.0, ge=0, description="Broker exits after this many minutes without clients; 0 = never."
    )
    heartbeat_interval: float = Field(default=5.0, gt=0, description="broker.json heartbeat period, seconds.")
    heartbeat_stale_after: float = Field(
        default=30.0, gt=0, description="A heartbeat older than this means the broker is gone, seconds."
    )
    ensure_timeout: float = Field(
        default=20.0, gt=0, description="How long --ensure (and the shim's election) waits for a broker, seconds."
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Bound on opening one connection, seconds.")

    # --- listeners ------------------------------------------------------------
    max_line_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest accepted message line, bytes."
    )
    tcp: str | None = Field(
        default=None, description="Also listen on TCP at HOST:PORT (token required). Off unless asked."
    )

    # --- the shim -------------------------------------------------------------
    mcp_timeout_ms: int = Field(
        default=60000,
        ge=0,
        validation_alias=AliasChoices("MEMPALACE_MCP_TIMEOUT_MS", "mcp_timeout_ms"),
        description="Shim per-request deadline in ms (env MEMPALACE_MCP_TIMEOUT_MS, as the pi extension); 0 = none.",
    )
    read_only: bool = Field(
        default=False,
        validation_alias=AliasChoices("MEMPALACE_MCP_READ_ONLY", "read_only"),
        description="Shim: this session gets the tool surface of `mempalace-mcp --read-only` (env "
        "MEMPALACE_MCP_READ_ONLY, as the engine; the --read-only flag sets it too).",
    )
    role: Literal["auto", "host", "container"] = Field(
        default="auto", description="host, container, or auto (container when /.dockerenv or /run/.containerenv exists)."
    )

    # --- SSH (container role) ------------------------------------------------
    ssh_host: str = Field(default="host", description="Host alias in the SSH config that reaches the broker's host.")
    ssh_config: Path | None = Field(
        default=None, description="OpenSSH config file; default ~/.ssh-local/config if it exists, else ~/.ssh/config."
    )
    remote_broker: str = Field(
        default="mempalace-broker", description="Broker command on the SSH host (absolute path if not on its PATH)."
    )
    remote_palace: str | None = Field(
        default=None, description="Palace path on the SSH host; default: whatever the host side's settings say."
    )
    keepalive_interval: float = Field(default=1.0, gt=0, description="SSH keepalive period, seconds.")
    keepalive_count_max: int = Field(default=3, ge=1, description="Missed keepalives before the SSH link is dropped.")

    log_level: str = Field(default="INFO", description="Logging level for broker and shim (stderr / log file).")

    @field_validator("mempalace_path", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return state.DEFAULT_STATE_DIR if value in ("", None) else value  # MEMPALACE_PATH="" as unset

    @field_validator("mempalace_path", "palace", "ssh_config", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else state.expand(value)

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"tcp must be HOST:PORT (PORT 0 = any free port), got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    # --- derived ----------------------------------------------------------------
    @property
    def paths(self) -> state.StatePaths:
        return state.StatePaths(self.mempalace_path)

    @property
    def palace_path(self) -> Path:
        return self.palace or state.default_palace(self.mempalace_path)

    @property
    def engine_argv(self) -> list[str]:
        argv = shlex.split(self.engine)
        if not argv:
            raise ValueError("MP_BRIDGE_ENGINE is empty")
        return argv

    @property
    def ssh_config_path(self) -> Path:
        if self.ssh_config is not None:
            return self.ssh_config
        local = state.expand("~/.ssh-local/config")
        return local if local.exists() else state.expand("~/.ssh/config")

    def resolved_role(self) -> str:
        if self.role != "auto":
            return self.role
        from mp_ssh_bridge import hostinfo

        return "container" if hostinfo.in_container() else "host"


def load(**overrides: Any) -> Settings:
    """Build settings; keyword arguments (CLI flags) win over every other source."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)
