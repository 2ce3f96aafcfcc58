"""The one settings model for broker, shim and `mp-bridge` (pydantic-settings).

Sources, lowest to highest: defaults, the TOML file (`config.config_file_path()`),
environment variables (one name per field: `config.env_name()`), then CLI flags
(keyword arguments). Every default works from a bare environment (only HOME and
PATH), which is how MCP clients spawn servers.

Fields come in the scopes `mp_ssh_bridge.config.SCOPES` writes down, and the
types follow them: `BrokerSettings` (what a broker reads: identity, broker and
process fields), `SessionSettings` (what a shim or `mp-bridge` reads: identity,
session, client and process fields), and `Settings`, both at once, for the
tools that look at everything (`mp-bridge doctor`).

Importing pydantic-settings costs ~90 ms and ~14 MB, so the shim's fast path
reads its few fields with `config.fast_config()` instead; the agreement test
keeps the two equal.
"""

from __future__ import annotations

import os
import shlex
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mp_ssh_bridge import config, enginerules, state
from mp_ssh_bridge.palace import Memory, Rules, resolve, state_dir_for

APP_NAME = config.APP_NAME


def config_file() -> Path:
    """The TOML file every process reads (one rule: `config.config_file_path`)."""
    return Path(config.config_file_path())


class _Source(PydanticBaseSettingsSource):
    """Environment over the TOML file, by `config.raw_values` — the rule the fast reader uses too."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = config.config_file_path()
        try:
            self.file_values = config.read_config_file(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"config file {path}: {exc}") from exc

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raw = config.raw_values(os.environ, self.file_values, (field_name,))
        return raw.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return config.raw_values(os.environ, self.file_values, self.settings_cls.model_fields)


class _Base(BaseSettings):
    """Identity and per-process fields, and the sources every group shares."""

    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    # --- identity: which broker -------------------------------------------------------------
    mempalace_path: Path | None = Field(
        default=None,
        description="State directory (env MEMPALACE_PATH): broker.lock/.sock/.json and palace.id live here. "
        "Default: ~/.mempalace for the legacy layout, else ~/.mempalace/brokers/<key> per set of files "
        "(palace.state_dir_for).",
    )
    palace: Path | None = Field(
        default=None,
        description="Palace given to the engine as --palace (mp-shim --palace sets it too). Default: none, and the "
        "engine resolves its palace itself, as a plain mempalace-mcp would (palace.resolve).",
    )

    # --- process: each process reads its own ------------------------------------------------
    connect_timeout: float = Field(
        default=config.DEFAULT_CONNECT_TIMEOUT, gt=0,
        description="Bound on opening one connection, seconds (the broker: on a TCP client's authentication).",
    )
    max_line_bytes: int = Field(
        default=config.DEFAULT_MAX_LINE_BYTES, ge=config.MIN_MAX_LINE_BYTES, description="Largest message line, bytes."
    )
    heartbeat_stale_after: float = Field(
        default=30.0, gt=0, description="A heartbeat older than this means its writer is gone, seconds."
    )
    log_level: str = Field(default="INFO", description="Logging level (stderr / log file).")
    lock_dir: Path | None = Field(
        default=None,
        description="For tests only: where this process takes its flocks (broker.lock, owner.lock); default the "
        "state directory. Two sides of a VM boundary do not share flocks; on one kernel they would, so the "
        "ownership tests give the container side its own.",
    )

    @field_validator("mempalace_path", "palace", "lock_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else state.expand(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _Source(settings_cls))

    # --- derived (once per settings object: resolving reads the config file, the engine-rules cache and the
    # file system, and doctor or discovery would otherwise repeat it for every path they look at) -------------
    @cached_property
    def memory(self) -> Memory:
        """The files the engine opens with these settings (as a plain mempalace-mcp would, by its version's rules)."""
        return resolve(str(self.palace) if self.palace else None, rules=self.engine_rules())

    def engine_rules(self) -> Rules:
        """How the engine a broker elected from here would run resolves its files (config.engine_command)."""
        try:
            file_values = config.read_config_file(config.config_file_path())
        except (OSError, ValueError):
            file_values = {}
        return enginerules.for_command(config.engine_command(os.environ, file_values))

    @cached_property
    def state_dir(self) -> Path:
        return Path(state_dir_for(self.memory, self.mempalace_path))

    @property
    def paths(self) -> state.StatePaths:
        return state.StatePaths(self.state_dir, self.lock_dir)

    @property
    def palace_path(self) -> Path:
        return Path(self.memory.palace)


class BrokerSettings(_Base):
    """What a broker reads, from its own start only (config file, its environment, its flags)."""

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
    request_timeout: float = Field(
        default=60.0, gt=0,
        description="Deadline of a request whose session set none (MEMPALACE_MCP_TIMEOUT_MS=0), seconds.",
    )
    stall_timeout: float = Field(
        default=120.0, gt=0,
        description="An engine silent on its in-flight request this long is killed and restarted, seconds.",
    )
    event_wait_slice: float = Field(
        default=0.0, ge=0, description="How long one look of a pending mempalace_event_wait may hold the engine "
        "(0: one look at the log, no wait there; the broker holds the wait), seconds.",
    )
    event_wait_poll: float = Field(
        default=0.5, gt=0, description="How often a pending mempalace_event_wait looks for an event that did not come "
        "through this broker (a write through it makes every pending wait look at once), seconds.",
    )
    shutdown_grace: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long in-flight requests may finish, seconds."
    )
    idle_exit_minutes: float = Field(
        default=30.0, ge=0, description="Broker exits after this many minutes without clients; 0 = never."
    )
    heartbeat_interval: float = Field(default=5.0, gt=0, description="broker.json heartbeat period, seconds.")
    # --- bounds (docs/PROTOCOL.md "Bounds"): every resource one client can make the broker hold -----------
    max_queued_per_client: int = Field(
        default=256, ge=1,
        description="Requests one connection may have queued or running; more are answered -32068 at once.",
    )
    max_client_queued_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024,
        description="Bytes of request lines one connection may have queued or running; more are answered -32068.",
    )
    max_client_outbox_bytes: int = Field(
        default=32 * 1024 * 1024, ge=64 * 1024,
        description="Bytes of replies waiting for one connection to read them; over it the connection is closed "
        "(reading its requests pauses at half of it).",
    )
    max_connections: int = Field(
        default=1024, ge=1, description="Connections the broker holds at once; one more gets -32068 and is closed."
    )
    max_connections_per_peer: int = Field(
        default=256, ge=1,
        description="Connections from one peer (TCP: its address; UNIX socket: its process) held at once.",
    )
    preauth_max_bytes: int = Field(
        default=4096, ge=256, description="Bytes a TCP client may send before it has authenticated (broker/auth)."
    )
    preauth_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a TCP client has to authenticate before it is disconnected."
    )
    fd_reserve: int = Field(
        default=64, ge=8,
        description="Open files kept free for the engine (its pipes, its own start) and the log: the broker stops "
        "accepting connections this close to its open-file limit.",
    )
    tcp: str | None = Field(
        default=None, description="Also listen on TCP at HOST:PORT (token required). Off unless asked."
    )
    tcp_advertise: str | None = Field(
        default=None,
        description="The TCP address written into broker.json for the other side of a VM boundary to dial: HOST "
        "or HOST:PORT (default port: the bound one), e.g. host.docker.internal (Docker Desktop), host.orb.internal "
        "(OrbStack), host.lima.internal (Lima). Unset: the bound address, or nothing for a wildcard bind "
        "(0.0.0.0, ::), which names no host another machine can dial.",
    )

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"tcp must be HOST:PORT (PORT 0 = any free port), got {value!r}")
        return value

    @field_validator("tcp_advertise")
    @classmethod
    def _tcp_advertise(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        from mp_ssh_bridge.urls import split_host_port

        split_host_port(value)  # raises ValueError naming the expected form
        return value.strip()

    @property
    def engine_argv(self) -> list[str]:
        argv = shlex.split(self.engine)
        if not argv:
            raise ValueError("MP_BRIDGE_ENGINE is empty")
        return argv

    def engine_rules(self) -> Rules:
        """How this broker's own engine resolves its files (its --engine / MP_BRIDGE_ENGINE / file)."""
        try:
            return enginerules.for_argv(self.engine_argv)
        except ValueError:
            return super().engine_rules()


class SessionSettings(_Base):
    """What a client process reads: one agent session's settings and the ways to the broker."""

    # --- session: travel with the session to the broker -----------------------------------
    mcp_timeout_ms: int = Field(
        default=config.DEFAULT_TIMEOUT_MS, ge=0,
        description="Per-request deadline in ms (env MEMPALACE_MCP_TIMEOUT_MS, as the pi extension); the broker "
        "answers before it expires; 0 = the broker's request_timeout.",
    )
    read_only: bool = Field(
        default=False,
        description="This session gets the tool surface of `mempalace-mcp --read-only` (env "
        "MEMPALACE_MCP_READ_ONLY, as the engine; the --read-only flag sets it too).",
    )

    # --- client -----------------------------------------------------------------------------
    broker: str | None = Field(
        default=None,
        description="Broker endpoint URL used verbatim (env MEMPALACE_BROKER): unix:///path, tcp://host:port, "
        "ssh://alias/path.",
    )
    broker_token: str | None = Field(
        default=None,
        description="Token for a tcp:// endpoint (env MEMPALACE_BROKER_TOKEN); default: the one in broker.json.",
    )
    role: Literal["auto", "host", "container"] = Field(
        default="auto", description="host, container, or auto (container when /.dockerenv or /run/.containerenv exists)."
    )
    ensure_timeout: float = Field(
        default=20.0, gt=0, description="How long an election (or --ensure) waits for a broker, seconds."
    )
    owner_wait: float = Field(
        default=120.0, gt=0,
        description="How long `mp-bridge run` waits for the palace's owner to hand it over (the running call to "
        "finish, another grant to end) before it gives up and says who holds it, seconds.",
    )
    grant_max_duration: float = Field(
        default=7200.0, gt=0,
        description="Longest `mp-bridge run -- CMD` may hold the palace: then CMD is stopped (SIGTERM, then "
        "SIGKILL) and the grant released, seconds.",
    )
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
    uvloop: bool = Field(default=True, description="The container daemon's relay runs on uvloop where it is installed "
                         "(every relayed call passes its loop twice); false: asyncio's own loop.")

    @field_validator("ssh_config", mode="after")
    @classmethod
    def _expand_ssh(cls, value: Path | None) -> Path | None:
        return None if value is None else state.expand(value)

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

    def session_config(self, palace_flag: str | None = None) -> config.Config:
        """The shim's `Config` from the model (when the fast reader was not sure)."""
        cfg = config.Config()
        cfg.palace_flag = palace_flag
        cfg.broker_url = self.broker or None
        cfg.broker_token = self.broker_token or None
        cfg.timeout_ms = self.mcp_timeout_ms
        cfg.read_only = self.read_only
        cfg.role = self.role
        cfg.connect_timeout = self.connect_timeout
        cfg.max_line_bytes = self.max_line_bytes
        cfg.log_level = self.log_level if "log_level" in self.model_fields_set else None
        cfg.palace = os.path.abspath(palace_flag) if palace_flag else (str(self.palace) if self.palace else None)
        cfg.memory = resolve(cfg.palace, rules=self.engine_rules())
        cfg.state_dir = state_dir_for(cfg.memory, self.mempalace_path)
        return cfg


class Settings(BrokerSettings, SessionSettings):
    """Every field: for `mp-bridge`, which looks at both sides."""


def load(**overrides: Any) -> Settings:
    """Every field; keyword arguments (CLI flags) win over every other source."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def load_broker(**overrides: Any) -> BrokerSettings:
    return BrokerSettings(**{k: v for k, v in overrides.items() if v is not None})


def load_session(**overrides: Any) -> SessionSettings:
    return SessionSettings(**{k: v for k, v in overrides.items() if v is not None})
