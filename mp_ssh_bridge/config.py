"""Where every setting comes from, and the shim's cheap reader of the ones it needs.

The pydantic model in `mp_ssh_bridge.settings` is the source of truth for a
setting's type, default and validation. This module holds what both the model
and the shim's fast path must agree on, so it is written once:

- `ENV_NAMES`: the one environment variable of each field (`MP_BRIDGE_<FIELD>`
  unless listed). No second spelling: a bare `BROKER` or `READ_ONLY` in an
  agent's environment means nothing to us.
- `SCOPES`: which settings select a broker (`identity`: the palace), which
  belong to one agent session and travel with it to the broker (`session`),
  which only a client process reads (`client`), which the broker takes from
  its own start only (`broker`), and which every process reads for itself
  (`process`). A session never configures the shared broker: the election
  strips `session` and `client` variables from the broker's environment.
- `config_file_path()`: the one rule for the TOML file (also used by the model).
- `fast_config()`: the shim's reader. Importing pydantic-settings costs ~90 ms
  and ~14 MB per agent session, so the shim reads the few fields it needs here
  with the model's rules, and raises `NeedSettings` whenever it would have to
  guess; the caller then loads the model. tests/test_settings_agreement.py
  fails when a field is added on one side only, or when the two disagree.

Stdlib only.
"""

from __future__ import annotations

import os
import sys

from mp_ssh_bridge import enginerules
from mp_ssh_bridge.palace import Memory, resolve, state_dir_for

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every agent start ~3 ms; annotations only
    from collections.abc import Callable, Mapping
    from typing import Any

APP_NAME = "mp-ssh-bridge"
DEFAULT_STATE_DIR = "~/.mempalace"
DEFAULT_TIMEOUT_MS = 60000
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
MIN_MAX_LINE_BYTES = 1024
ROLES = ("auto", "host", "container")
ENGINE_CHILD_ENV = "MP_SHIM_ENGINE_CHILD"  # set in the broker's engine: a shim seeing it refuses to run

# Fields whose environment variable is not MP_BRIDGE_<FIELD> (the names pi and mempalace use).
ENV_NAMES: dict[str, str] = {
    "mempalace_path": "MEMPALACE_PATH",
    "broker": "MEMPALACE_BROKER",
    "broker_token": "MEMPALACE_BROKER_TOKEN",
    "mcp_timeout_ms": "MEMPALACE_MCP_TIMEOUT_MS",
    "read_only": "MEMPALACE_MCP_READ_ONLY",
}

SCOPES: dict[str, tuple[str, ...]] = {
    # Select the broker: sessions that agree on these share one broker.
    "identity": ("mempalace_path", "palace"),
    # One agent session's own; sent to the broker in the broker/status handshake.
    "session": ("mcp_timeout_ms", "read_only"),
    # Read by client processes (mp-shim, mp-bridge) only; never passed to a broker.
    "client": (
        "broker", "broker_token", "role", "ensure_timeout", "owner_wait", "grant_max_duration", "ssh_host", "ssh_config", "remote_broker",
        "remote_palace", "keepalive_interval", "keepalive_count_max", "uvloop",
    ),
    # The broker's, from its own start (config file, service unit, the command line that started it).
    "broker": (
        "engine", "engine_eager_warmup", "engine_restart_budget", "engine_restart_window", "engine_backoff_max",
        "engine_start_timeout", "strip_root_combinators", "request_timeout", "stall_timeout", "event_wait_slice",
        "event_wait_poll", "shutdown_grace", "idle_exit_minutes", "heartbeat_interval", "tcp", "tcp_advertise",
        "max_queued_per_client", "max_client_queued_bytes", "max_client_outbox_bytes", "max_connections",
        "max_connections_per_peer", "preauth_max_bytes", "preauth_timeout", "fd_reserve",
    ),
    # Every process reads its own value (its own connections, its own log).
    "process": ("connect_timeout", "max_line_bytes", "heartbeat_stale_after", "log_level", "lock_dir"),
}


def env_name(field: str) -> str:
    """The one environment variable that sets `field`."""
    return ENV_NAMES.get(field) or f"MP_BRIDGE_{field.upper()}"


def session_only_env_names() -> frozenset[str]:
    """Variables a session may set that must never reach a broker it starts."""
    return frozenset(env_name(f) for scope in ("session", "client") for f in SCOPES[scope])


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def daemon_dir_for(state_dir: str, uid: int | None = None) -> str:
    """The container daemon's own directory for the memory whose state directory is `state_dir`:
    `/tmp/mp-bridge-<uid>/daemon-<key>`, inside the container (never the bind-mounted state directory, whose
    broker.sock and broker.lock belong to the host's broker). Shared by the shim's fast path and
    `state.StatePaths.daemon_dir`; stdlib only (zlib, as `palace.Memory.key`)."""
    import zlib

    data = os.fsencode(os.path.realpath(state_dir))  # one key for every spelling of the directory (a symlink)
    name = f"daemon-{zlib.crc32(data):08x}{zlib.adler32(data):08x}"
    return os.path.join("/tmp", f"mp-bridge-{os.getuid() if uid is None else uid}", name)


def config_file_path(environ: Mapping[str, str] = os.environ, platform: str | None = None) -> str:
    """`$MP_BRIDGE_CONFIG`, else the user config dir's `mp-ssh-bridge/config.toml`.

    macOS: `~/Library/Application Support` whatever `XDG_CONFIG_HOME` says, so
    launchd, GUI and terminal processes read one file. Elsewhere the XDG rule.
    """
    explicit = environ.get("MP_BRIDGE_CONFIG")
    if explicit:
        return expand(explicit)
    plat = platform or sys.platform
    if plat == "darwin":
        base = expand("~/Library/Application Support")
    else:
        xdg = (environ.get("XDG_CONFIG_HOME") or "").strip()
        base = expand(xdg) if xdg else expand("~/.config")
    return os.path.join(base, APP_NAME, "config.toml")


def read_config_file(path: str) -> dict[str, Any]:
    """The TOML file's top-level table ({} when absent). Keys are field names, exactly."""
    if not os.path.exists(path):
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10: pydantic-settings brings tomli
        import tomli as tomllib
    with open(path, "rb") as fh:
        return dict(tomllib.load(fh))


class NeedSettings(Exception):
    """The cheap reader is not sure it would agree with the settings model: load the model."""


# --------------------------------------------------------------------------- value rules
# Each mirrors the model's rule for the values people write, and gives up (NeedSettings)
# on anything else, so the model both decides and reports the error.
_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise NeedSettings(f"not a string: {value!r}")
    return value


def _path(value: object) -> str:
    return expand(_str(value))


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise NeedSettings("bool where an integer is expected")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    raise NeedSettings(f"not a plain integer: {value!r}")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _str(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise NeedSettings(f"not a boolean: {value!r}")


def _plain_decimal(text: str) -> bool:
    """`12` or `1.5`: digits, at most one point between digits (no sign, exponent, spaces or `_`)."""
    whole, dot, frac = text.partition(".")
    return whole.isascii() and whole.isdigit() and (not dot or (frac.isascii() and frac.isdigit()))


def _positive_float(value: object) -> float:
    if isinstance(value, bool):
        raise NeedSettings("bool where a number is expected")
    if isinstance(value, (int, float)) or isinstance(value, str) and _plain_decimal(value):
        out = float(value)
    else:
        raise NeedSettings(f"not a plain number: {value!r}")
    if not 0 < out < float("inf"):
        raise NeedSettings("must be > 0")
    return out


def _non_negative_int(value: object) -> int:
    out = _int(value)
    if out < 0:
        raise NeedSettings("must be >= 0")
    return out


def _line_bytes(value: object) -> int:
    out = _int(value)
    if out < MIN_MAX_LINE_BYTES:
        raise NeedSettings(f"max_line_bytes below {MIN_MAX_LINE_BYTES}")
    return out


def _role(value: object) -> str:
    text = _str(value)
    if text not in ROLES:
        raise NeedSettings(f"role {value!r}")
    return text


# The fields the fast path reads, with the rule for each. Every other field of the model
# is one the shim's fast path never needs (FAST_PATH_IGNORES); the agreement test checks
# that the two sets together are exactly the model's fields.
FAST_FIELDS: dict[str, Callable[[object], object]] = {
    "mempalace_path": _path,
    "palace": _path,
    "broker": _str,
    "broker_token": _str,
    "mcp_timeout_ms": _non_negative_int,
    "read_only": _bool,
    "role": _role,
    "connect_timeout": _positive_float,
    "max_line_bytes": _line_bytes,
    "log_level": _str,
}
FAST_PATH_IGNORES = frozenset(
    f for names in SCOPES.values() for f in names if f not in FAST_FIELDS
)


class Config:
    """What one shim session needs, read cheaply (or built from the model by `settings.session_config`)."""

    def __init__(self) -> None:
        self.state_dir = expand(DEFAULT_STATE_DIR)
        self.palace_flag: str | None = None  # --palace on our command line
        self.palace: str | None = None  # the palace passed to the engine as --palace: our flag, or MP_BRIDGE_PALACE
        self.memory: Memory | None = None  # the files the engine opens (palace.resolve)
        self.broker_url: str | None = None
        self.broker_token: str | None = None
        self.timeout_ms = DEFAULT_TIMEOUT_MS
        self.read_only = False  # `--read-only` / MEMPALACE_MCP_READ_ONLY: the engine's read-only tool surface
        self.role = "auto"
        self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self.max_line_bytes = DEFAULT_MAX_LINE_BYTES
        self.log_level: str | None = None

    def resolved_role(self) -> str:
        if self.role != "auto":
            return self.role
        from mp_ssh_bridge.hostinfo import in_container  # os and sys only

        return "container" if in_container() else "host"


def raw_values(environ: Mapping[str, str], file_values: Mapping[str, Any], fields: Any) -> dict[str, object]:
    """Per field: the environment variable if set and not empty, else the file's key, else absent.

    An empty variable counts as unset (MCP client configs often write `""`). The model's
    sources use this same function, so the precedence is one rule.
    """
    out: dict[str, object] = {}
    for field in fields:
        value = environ.get(env_name(field))
        if value is not None and value != "":
            out[field] = value
        elif field in file_values:
            out[field] = file_values[field]
    return out


def engine_command(environ: Mapping[str, str], file_values: Mapping[str, Any]) -> str | None:
    """The engine command a broker started from here would run (MP_BRIDGE_ENGINE, else the file's `engine`).

    A broker-scope setting, read by a session only to know which mempalace rules resolve its files
    (enginerules): the broker it elects inherits this environment and reads the same file.
    """
    raw = raw_values(environ, file_values, ("engine",)).get("engine")
    return raw if isinstance(raw, str) else None


def fast_config(palace_flag: str | None, environ: Mapping[str, str] = os.environ) -> Config:
    """Environment (and the config file when present) read as the settings model would.

    Precedence, as in the model: CLI flag > environment > config file > default.
    Raises NeedSettings whenever it would have to guess.
    """
    path = config_file_path(environ)
    try:
        file_values = read_config_file(path)
    except (OSError, ValueError, ImportError) as exc:
        raise NeedSettings(f"config file {path}: {exc}") from exc
    values = {name: FAST_FIELDS[name](raw) for name, raw in raw_values(environ, file_values, FAST_FIELDS).items()}
    cfg = Config()
    cfg.palace_flag = palace_flag
    cfg.broker_url = str(values["broker"]) if values.get("broker") else None
    cfg.broker_token = str(values["broker_token"]) if values.get("broker_token") else None
    cfg.timeout_ms = int(values.get("mcp_timeout_ms", DEFAULT_TIMEOUT_MS))  # type: ignore[call-overload]
    cfg.read_only = bool(values.get("read_only", False))
    cfg.role = str(values.get("role", "auto"))
    cfg.connect_timeout = float(values.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))  # type: ignore[arg-type]
    cfg.max_line_bytes = int(values.get("max_line_bytes", DEFAULT_MAX_LINE_BYTES))  # type: ignore[call-overload]
    cfg.log_level = str(values["log_level"]) if "log_level" in values else None
    cfg.palace = os.path.abspath(palace_flag) if palace_flag else (str(values["palace"]) if "palace" in values else None)
    rules = enginerules.for_command(engine_command(environ, file_values), environ)
    cfg.memory = resolve(cfg.palace, environ, rules=rules)
    cfg.state_dir = state_dir_for(cfg.memory, values.get("mempalace_path"))  # type: ignore[arg-type]
    return cfg
