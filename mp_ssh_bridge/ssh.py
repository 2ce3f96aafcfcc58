"""The container path: asyncssh to the host, remote `--ensure`, the broker socket over SSH.

Only the container role (and `ssh://` endpoints) load this module: `import
asyncssh` costs ~130 ms and ~40 MB, which the host shim must never pay, so
asyncssh is imported here and nowhere else.

What `connect_container(settings)` does, every step bounded:

1. connect to `settings.ssh_host` reading the user's OpenSSH config (HostName,
   Port, User, IdentityFile, ProxyJump, UserKnownHostsFile, ...; ControlMaster
   lines are ignored by asyncssh — we hold our own connection). Host keys are
   always verified. Keepalive on, so a hung host is dropped within ~4 s.
2. fast path: when broker.json, seen through the shared mount, has a fresh
   heartbeat and names this side's palace.id, open its socket at once (one
   channel open) and skip step 3.
3. run `<remote_broker> --ensure [--palace P]` on the host (every argument
   quoted), parse its one JSON line, and check the palace identity: the host
   broker's `palace_id` against the container's own state directory's `palace.id`
   (the same file seen through the mount) — paths differ across the mount,
   identities do not.
4. open the broker socket: direct-streamlocal (`open_unix_connection`); when
   the server refuses that, a remote `mempalace-broker --dial-stdio` bridging
   its stdio to the socket; when that fails too, TCP + token if broker.json
   (visible through the shared mount) advertises a TCP listener.

Steps 2-4 are one dialer, `open_broker_channel(settings, conn)`, used over a
connection its caller holds: `connect_container` makes one connection per
session and closes it with the session; the container relay
(mp_ssh_bridge/relay.py) holds one for every session and closes only each
session's channel.

Everything a user can get wrong becomes an `SSHBridgeError` whose message
says what to fix.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import json
import logging
import os
import shlex
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from mp_ssh_bridge import protocol, samepath, state, urls
from mp_ssh_bridge.connection import Connection
from mp_ssh_bridge.errors import ShimError

if TYPE_CHECKING:
    from mp_ssh_bridge.settings import SessionSettings as Settings

log = logging.getLogger("mp_ssh_bridge.ssh")

SSHConnection = asyncssh.SSHClientConnection  # for modules that hold one without importing asyncssh themselves

# How long the stdio bridge may take to answer its first ping (python start-up
# on the host, plus the connect to the socket).
DIAL_PROBE_TIMEOUT = 10.0
_PROBE_ID = "mp-ssh-bridge-dial-probe"
_DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


class SSHBridgeError(ShimError):
    """The SSH path to the host broker failed; the message says what to do about it.

    A `ShimError`, so its JSON-RPC code (BROKER_UNREACHABLE unless something more
    precise applies, e.g. PALACE_MISMATCH) reaches the agent unchanged.
    """

    def __init__(self, message: str, code: int = protocol.BROKER_UNREACHABLE, *, refuse: bool = False,
                 unreachable: bool = False) -> None:
        super().__init__(code, message)
        self.refuse = refuse  # host key or login refused: proof of nothing, so never local-owner mode
        # Nothing answered at all (connection refused, no route, no such name, timed out): the one failure after
        # which the container daemon may own the palace itself — and only when no broker can be alive.
        self.unreachable = unreachable


class TcpFallback(SSHBridgeError):
    """Neither SSH way reached the socket, but broker.json advertises TCP + token: dial `url` instead.

    The TCP dialer is `endpoints.dial` (one opener for every caller); this only says where.
    """

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class _Target:
    """What the SSH config says about one alias (for connecting and for error messages)."""

    def __init__(self, alias: str, options: Any, config_path: Path) -> None:
        self.alias = alias
        self.options = options
        self.config_path = config_path
        cfg = options.config
        self.host: str = options.host or alias
        self.port: int = int(options.port or 22)
        self.user: str = options.username
        self.known_hosts: Any = options.known_hosts
        self.identity_files: list[str] = [str(p) for p in (cfg.get("IdentityFile") or [])]
        self.proxy_jump = cfg.get("ProxyJump")

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}" + (f" (via ProxyJump {self.proxy_jump})" if self.proxy_jump else "")

    def known_hosts_files(self) -> list[str]:
        kh = self.known_hosts
        if kh in ((), None, []):
            return [str(state.expand("~/.ssh/known_hosts"))]
        if isinstance(kh, (str, os.PathLike)):
            return [str(kh)]
        return [str(p) for p in kh]

    def key_files(self) -> list[str]:
        return self.identity_files or [str(state.expand(k)) for k in _DEFAULT_KEYS] + ["(and ssh-agent keys)"]


AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_aes_gcm(options: asyncssh.SSHClientConnectionOptions) -> asyncssh.SSHClientConnectionOptions:
    """AES-GCM ahead of asyncssh's default first cipher, unless the SSH config chose the ciphers (`Ciphers`).

    asyncssh computes chacha20-poly1305 partly in Python; AES-GCM runs in OpenSSL (AES-NI, ARMv8 crypto). Through
    the container daemon that is 0.2 ms of every call's round trip (+0.71 vs +0.51 ms over the host socket,
    measured with the relay on this project's test sshd)."""
    from asyncssh.encryption import get_default_encryption_algs

    defaults = get_default_encryption_algs()
    if list(options.encryption_algs) != defaults:
        return options  # the user's own choice (Ciphers in the SSH config)
    first = [a.encode() for a in AES_GCM if a.encode() in defaults]
    preferred = [a.decode() for a in first + [a for a in defaults if a not in first]]
    return asyncssh.SSHClientConnectionOptions(options=options, encryption_algs=preferred)


def _options(settings: Settings, alias: str, username: str | None, port: int | None) -> _Target:
    """Read the OpenSSH config for `alias` the way asyncssh.connect will (keys included)."""
    config_path = settings.ssh_config_path
    if not config_path.is_file():
        raise SSHBridgeError(
            f"SSH config {config_path} not found: write a `Host {alias}` entry there (HostName, User, "
            f"IdentityFile, UserKnownHostsFile) or point MP_BRIDGE_SSH_CONFIG at one"
        )
    kwargs: dict[str, Any] = {
        "config": [str(config_path)],
        "host": alias,
        "keepalive_interval": settings.keepalive_interval,
        "keepalive_count_max": settings.keepalive_count_max,
        "connect_timeout": settings.connect_timeout,
        "encoding": None,
    }
    if username:
        kwargs["username"] = username
    if port:
        kwargs["port"] = port
    try:
        options = _prefer_aes_gcm(asyncssh.SSHClientConnectionOptions(**kwargs))
    except FileNotFoundError as exc:
        raise SSHBridgeError(
            f"SSH config {config_path}, Host {alias}: cannot read {exc.filename or exc} "
            f"(an IdentityFile that does not exist is fatal for asyncssh, unlike OpenSSH)",
            refuse=True,  # no key to log in with (or no known_hosts to check the host by): proof of nothing
        ) from exc
    except (OSError, ValueError, asyncssh.Error) as exc:
        raise SSHBridgeError(f"SSH config {config_path}, Host {alias}: {exc}") from exc
    target = _Target(alias, options, config_path)
    if target.known_hosts is None:
        raise SSHBridgeError(
            f"SSH config {config_path}, Host {alias}: `UserKnownHostsFile none` turns off host key "
            f"verification, which mp-ssh-bridge refuses; point it at a known_hosts file holding {target.where}'s key",
            refuse=True,
        )
    return target


def target_facts(settings: Settings) -> dict[str, Any]:
    """What the user's SSH config says of `settings.ssh_host`, for `mp-bridge doctor`: where it goes, which keys
    and known_hosts files. Raises SSHBridgeError (config missing or unusable, host key checks turned off)."""
    target = _options(settings, settings.ssh_host, None, None)
    keys = target.identity_files or [str(state.expand(k)) for k in _DEFAULT_KEYS]
    return {
        "where": target.where, "user": target.user, "config": str(target.config_path),
        "keys": [k for k in keys if os.path.exists(os.path.expanduser(k))], "keys_looked_for": keys,
        "agent": bool(os.environ.get("SSH_AUTH_SOCK")),
        "known_hosts": [k for k in target.known_hosts_files() if os.path.exists(os.path.expanduser(k))],
        "known_hosts_looked_for": target.known_hosts_files(),
    }


async def connect(
    settings: Settings, host: str | None = None, *, username: str | None = None, port: int | None = None
) -> asyncssh.SSHClientConnection:
    """An SSH connection to `host` (default `settings.ssh_host`), per the user's OpenSSH config.

    Host keys are always verified; keepalive is on. Raises SSHBridgeError.
    """
    alias = host or settings.ssh_host
    loop = asyncio.get_running_loop()
    target = await loop.run_in_executor(None, _options, settings, alias, username, port)
    bound = settings.connect_timeout
    try:
        # asyncssh's connect_timeout covers TCP connect, key exchange and auth;
        # the outer wait_for is a belt for anything it does not (e.g. ProxyJump set-up).
        return await asyncio.wait_for(asyncssh.connect(alias, options=target.options), bound + 2)
    except asyncssh.HostKeyNotVerifiable as exc:
        files = ", ".join(target.known_hosts_files())
        name = f"[{target.host}]:{target.port}" if target.port != 22 else target.host
        raise SSHBridgeError(
            f"SSH host key of {target.where} could not be verified against known_hosts file(s) {files} "
            f"({exc.reason}). The key is missing or differs from the one recorded for {name}: "
            f"compare with the host's own key (on the host: `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), "
            f"then record it in {target.known_hosts_files()[0]} (`ssh -F {target.config_path} {alias} true` once "
            f"asks to), or fix UserKnownHostsFile in {target.config_path} (Host {alias})",
            refuse=True,
        ) from exc
    except asyncssh.PermissionDenied as exc:
        raise SSHBridgeError(
            f"SSH login to {target.where} as user {target.user!r} was refused ({exc.reason}); "
            f"keys offered: {', '.join(target.key_files())}. Add the public key to the host's "
            f"~/.ssh/authorized_keys, or fix User/IdentityFile in {target.config_path} (Host {alias})",
            refuse=True,
        ) from exc
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise SSHBridgeError(
            f"SSH connection to {target.where} did not complete within {bound:g}s "
            f"(MP_BRIDGE_CONNECT_TIMEOUT): the host is unreachable or hung", unreachable=True
        ) from exc
    except ConnectionRefusedError as exc:
        raise SSHBridgeError(
            f"SSH connection to {target.where} refused: no sshd listens there; check HostName/Port "
            f"for Host {alias} in {target.config_path} and that sshd runs on the host", unreachable=True
        ) from exc
    except asyncssh.DisconnectError as exc:  # sshd answered: not "unreachable"
        raise SSHBridgeError(f"SSH connection to {target.where} failed: {exc.reason}") from exc
    except OSError as exc:
        # No route, network down, a name that does not resolve: nothing answered. Anything else (a key file
        # that cannot be read, ...) is a broken set-up, which proves nothing about the host.
        nothing = isinstance(exc, socket.gaierror) or exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                                                     errno.EHOSTDOWN, errno.ENETDOWN, errno.ETIMEDOUT)
        raise SSHBridgeError(
            f"SSH connection to {target.where} failed: {exc.strerror or exc}; check HostName/Port "
            f"for Host {alias} in {target.config_path}", unreachable=nothing
        ) from exc


def remote_argv(settings: Settings, *args: str) -> str:
    """`settings.remote_broker` (shell-split) plus `args`, every word quoted for the remote shell."""
    words = shlex.split(settings.remote_broker)
    if not words:
        raise SSHBridgeError("MP_BRIDGE_REMOTE_BROKER is empty")
    return " ".join(shlex.quote(w) for w in [*words, *args])


def remote_palace_args(settings: Settings) -> list[str]:
    """Which memory on the host: `--palace MP_BRIDGE_REMOTE_PALACE`, or nothing (the host's settings decide).
    The container's own palace path is never passed: paths differ across the mount."""
    return ["--palace", settings.remote_palace] if settings.remote_palace else []


def ensure_args(settings: Settings) -> list[str]:
    return ["--ensure", *remote_palace_args(settings)]


def ensure_command(settings: Settings) -> str:
    return remote_argv(settings, *ensure_args(settings))


def parse_ensure_output(stdout: str) -> dict[str, Any]:
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    info = json.loads(lines[-1])  # shell rc files on the host may print before it
    if not isinstance(info, dict) or not isinstance(info.get("endpoint"), str):
        raise ValueError(f"not an --ensure record: {lines[-1][:200]}")
    return info


def _text(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


async def run_broker_command(
    settings: Settings, conn: asyncssh.SSHClientConnection, *args: str, bound: float
) -> tuple[int, str, str]:
    """`<remote_broker> ARGS` on the host: (exit status, stdout, stderr). Raises SSHBridgeError when it
    cannot run at all (not found, not executable, no answer within `bound`); any other exit is the caller's."""
    command = remote_argv(settings, *args)
    try:
        res = await conn.run(command, check=False, timeout=bound)
    except asyncssh.TimeoutError as exc:
        raise SSHBridgeError(f"`{command}` on the SSH host did not finish within {bound:g}s") from exc
    except (asyncssh.Error, OSError) as exc:
        raise SSHBridgeError(f"cannot run `{command}` on the SSH host: {exc}") from exc
    out, err = _text(res.stdout), _text(res.stderr)
    if res.exit_status == 127:
        raise SSHBridgeError(
            f"`{shlex.split(settings.remote_broker)[0]}` was not found on the SSH host ({err.strip()[-300:] or 'exit 127'}). "
            f"Non-interactive SSH sessions get a minimal PATH: set MP_BRIDGE_REMOTE_BROKER to the absolute path "
            f"of mempalace-broker on the host (e.g. /Users/<you>/.local/bin/mempalace-broker)"
        )
    if res.exit_status == 126:
        raise SSHBridgeError(f"`{command}` on the SSH host is not executable: {err.strip()[-300:]}")
    return (res.exit_status if isinstance(res.exit_status, int) else 1), out, err


async def run_on_host(settings: Settings, *args: str, bound: float) -> tuple[int, str, str]:
    """Connect (per the user's SSH config), run `<remote_broker> ARGS --palace ...`, close: `mp-bridge` in a
    container acts on the broker of the memory its sessions reach."""
    conn = await connect(settings)
    try:
        return await run_broker_command(settings, conn, *args, *remote_palace_args(settings), bound=bound)
    finally:
        await _Channel(conn).close()


async def stream_on_host(settings: Settings, *args: str, out: Any) -> int:
    """`mp-bridge logs -f` in a container: `<remote_broker> ARGS --palace ...` on the host, its stdout copied to
    `out` as it comes, until it ends or the caller is interrupted (Ctrl-C). Keepalive bounds a hung host.
    Raises SSHBridgeError."""
    conn = await connect(settings)
    channel = _Channel(conn)
    try:
        command = remote_argv(settings, *args, *remote_palace_args(settings))
        try:
            # no `async with`: on Ctrl-C its exit would wait, unbounded, for sshd to close a channel whose
            # command is still running; closing the connection ends the session (and the remote follow) instead
            channel.process = proc = await conn.create_process(command, encoding=None)
            decode = codecs.getincrementaldecoder("utf-8")("replace").decode  # a chunk may end mid-character
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                try:
                    out.write(decode(chunk))
                    out.flush()
                except BrokenPipeError:  # `mp-bridge logs -f | head`: the reader is gone, and so are we
                    return 0
            await asyncio.wait_for(proc.wait_closed(), settings.connect_timeout)
            status = proc.exit_status
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            raise SSHBridgeError(f"`{command}` on the SSH host failed: {exc}") from exc
        return status if isinstance(status, int) else 0
    finally:
        await channel.close()


async def remote_ensure(settings: Settings, conn: asyncssh.SSHClientConnection) -> dict[str, Any]:
    """Run `mempalace-broker --ensure` on the host; its parsed JSON line."""
    status, out, err = await run_broker_command(settings, conn, *ensure_args(settings), bound=settings.ensure_timeout + 5)
    command = ensure_command(settings)
    if status != 0:
        raise SSHBridgeError(f"`{command}` on the SSH host failed (exit {status}): {err.strip()[-800:] or out[-800:]}")
    try:
        return parse_ensure_output(out)
    except ValueError as exc:
        raise SSHBridgeError(f"`{command}` on the SSH host printed no endpoint record ({exc}): {out[-300:]!r}") from exc


def check_palace_identity(settings: Settings, info: dict[str, Any]) -> None:
    """The host broker must serve the palace this container's state dir belongs to."""
    local = state.read_palace_id(settings.paths)
    remote = info.get("palace_id")
    if local is None:
        log.warning(
            "%s has no palace.id; cannot check that the host broker (palace %s, id %s) serves the same palace",
            settings.paths.palace_id_file, info.get("palace"), remote,
        )
        return
    if remote and remote != local:
        raise SSHBridgeError(
            f"palace mismatch: this side's {settings.paths.palace_id_file} says {local}, but the host broker "
            f"serves palace {info.get('palace')} (state dir {info.get('state_dir')}) with id {remote}. "
            f"Is {settings.paths.root} really a mount of the host's {info.get('state_dir')}? "
            f"Set MP_BRIDGE_REMOTE_PALACE / the host's MEMPALACE_PATH accordingly",
            code=protocol.PALACE_MISMATCH,
        )


def _socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise SSHBridgeError(f"the host broker's endpoint {endpoint!r} is not a unix:// socket")
    return endpoint[len("unix://") :]


class _Channel:
    """Owns what must be closed with a Connection: its SSH channel (`stream`, a streamlocal channel's writer) or
    `process` (`--dial-stdio`), and the SSH connection too when `owns_conn` (one connection per session, as
    `connect_container` makes; a relay's shared connection outlives every channel on it)."""

    def __init__(
        self, conn: asyncssh.SSHClientConnection, process: Any = None, *, stream: Any = None, owns_conn: bool = True
    ) -> None:
        self.conn = conn
        self.process = process
        self.stream = stream
        self.owns_conn = owns_conn

    async def close(self) -> None:
        for part in (self.process, self.stream):
            if part is None:
                continue
            try:
                part.close()
            except Exception:  # noqa: BLE001 - a channel the peer already dropped; nothing more to close
                pass
        if not self.owns_conn:
            return
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), 3)
        except Exception:  # noqa: BLE001 - a dead or hung peer: close() was sent, waiting is best effort
            pass


async def _open_streamlocal(conn: asyncssh.SSHClientConnection, path: str, bound: float) -> tuple[Any, Any]:
    return await asyncio.wait_for(conn.open_unix_connection(path, encoding=None), bound)


async def _open_dial_stdio(settings: Settings, conn: asyncssh.SSHClientConnection, path: str) -> Any:
    """A remote `--dial-stdio` process; proven with one broker `ping` before it is handed out."""
    command = remote_argv(settings, "--dial-stdio", "--socket", path)
    process = await asyncio.wait_for(conn.create_process(command, encoding=None), settings.connect_timeout)
    try:
        process.stdin.write(protocol.encode(protocol.request(_PROBE_ID, "ping")))
        line = await asyncio.wait_for(process.stdout.readuntil(b"\n"), DIAL_PROBE_TIMEOUT)
        reply = json.loads(line)
        if not (isinstance(reply, dict) and reply.get("id") == _PROBE_ID and "result" in reply):
            raise ValueError(f"unexpected first reply {line[:200]!r}")
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, asyncssh.Error, OSError) as exc:
        err = ""
        try:  # a process that failed has exited: its stderr is complete; a hung one gets 1 s
            err = _text(await asyncio.wait_for(process.stderr.read(), 1)).strip()
        except Exception:  # noqa: BLE001 - only decorates the error below; its absence is no new error
            pass
        process.close()
        status = process.exit_status
        raise SSHBridgeError(
            f"`{command}` on the SSH host did not bridge to the broker"
            + (f" (exit {status})" if status is not None else "")
            + (f": {err[-500:]}" if err else f": {exc}")
        ) from exc
    return process


def _streamlocal_connection(
    settings: Settings, conn: asyncssh.SSHClientConnection, reader: Any, writer: Any, endpoint: str, path: str,
    info: dict[str, Any], owns_conn: bool,
) -> Connection:
    info.update(transport_detail="ssh-streamlocal", host_socket=path)
    return Connection(
        reader, writer, transport="ssh", endpoint=endpoint, max_line_bytes=settings.max_line_bytes,
        on_close=_Channel(conn, stream=writer, owns_conn=owns_conn).close, info=info,
    )


def tcp_from_broker_json(settings: Settings) -> str | None:
    record = state.read_broker_json(settings.paths.json) or {}
    endpoints = record.get("endpoints")
    tcp = endpoints.get("tcp") if isinstance(endpoints, dict) else None
    return tcp if isinstance(tcp, str) else None


async def _open_to_socket(
    settings: Settings,
    conn: asyncssh.SSHClientConnection,
    path: str,
    *,
    alias: str,
    info: dict[str, Any],
    allow_tcp: bool,
    owns_conn: bool = True,
    stdio_first: bool = False,
) -> Connection:
    """Socket at `path` on the SSH host: streamlocal, else stdio bridge, else TCP + token (when `allow_tcp`).
    `stdio_first`: this host is known to refuse streamlocal (an earlier open said so): go to the bridge at once."""
    endpoint = f"ssh://{alias}{path}"
    refusals: list[str] = []
    if not stdio_first:
        try:
            reader, writer = await _open_streamlocal(conn, path, settings.connect_timeout)
        except asyncssh.ChannelOpenError as exc:
            refusals.append(f"direct-streamlocal refused ({exc.reason})")
            log.info("SSH host refused direct-streamlocal to %s (%s); trying the stdio bridge", path, exc.reason)
        except asyncio.TimeoutError as exc:
            raise SSHBridgeError(f"opening {path} through SSH took over {settings.connect_timeout:g}s") from exc
        else:
            return _streamlocal_connection(settings, conn, reader, writer, endpoint, path, info, owns_conn)
    try:
        process = await _open_dial_stdio(settings, conn, path)
    except (SSHBridgeError, asyncssh.Error, asyncio.TimeoutError) as exc:
        refusals.append(f"stdio bridge failed ({exc})")
        log.info("stdio bridge failed: %s", exc)
    else:
        info.update(transport_detail="ssh-stdio", host_socket=path)
        return Connection(
            process.stdout, process.stdin, transport="ssh", endpoint=endpoint, max_line_bytes=settings.max_line_bytes,
            on_close=_Channel(conn, process, owns_conn=owns_conn).close, info=info,
        )
    tcp = tcp_from_broker_json(settings) if allow_tcp else None
    message = (
        f"cannot reach the broker socket {path} through SSH host {alias}: " + "; ".join(refusals)
        + ("; no TCP listener advertised in broker.json (start the broker with --tcp HOST:PORT)"
           if allow_tcp and tcp is None else "")
        + f". Allow it in the host's sshd_config (AllowStreamLocalForwarding yes) or make sure "
        f"`{remote_argv(settings, '--dial-stdio')}` works there"
    )
    if tcp is not None:
        raise TcpFallback(message, tcp)
    raise SSHBridgeError(message)


def _fresh_record(settings: Settings) -> dict[str, Any] | None:
    """broker.json as seen through the mount, if it can skip the remote --ensure:
    a fresh heartbeat, a unix endpoint, and the palace.id this side holds."""
    record = state.read_broker_json(settings.paths.json)
    if record is None or not isinstance(record.get("endpoint"), str) or not record["endpoint"].startswith("unix://"):
        return None
    age = state.heartbeat_age(record)
    if age is None or not -settings.heartbeat_stale_after < age < settings.heartbeat_stale_after:
        return None
    local = state.read_palace_id(settings.paths)
    if local is None or record.get("palace_id") != local:
        return None
    theirs = record.get("palace")
    # Paths across the VM boundary name nothing here; palace.id (above) decides. A macOS spelling of the same
    # palace (case, normalization, /private/var) still takes this fast path; any other goes through --ensure.
    if settings.remote_palace and not (isinstance(theirs, str) and samepath.spelled_alike(theirs, settings.remote_palace)):
        return None
    return record


async def connect_container(settings: Settings, *, fast: bool = True) -> Connection:
    """The container role's way to the host broker (see the module docstring): its own SSH connection, then
    `open_broker_channel` over it; closing the Connection closes both. Raises SSHBridgeError.

    With `fast` (the default), when broker.json seen through the shared mount has
    a fresh heartbeat and this side's palace.id, its socket is opened first over
    the same SSH connection, skipping the remote `--ensure` (a Python start-up on
    the host, ~0.5 s); if that channel is refused, the full path runs.
    """
    t0 = time.monotonic()
    conn = await connect(settings)
    try:
        info: dict[str, Any] = {"ssh_host": settings.ssh_host, "ssh_connect_s": round(time.monotonic() - t0, 4)}
        return await _open_broker_channel(settings, conn, fast=fast, info=info, t0=t0, owns_conn=True)
    except BaseException:
        await _Channel(conn).close()
        raise


async def open_broker_channel(
    settings: Settings,
    conn: asyncssh.SSHClientConnection,
    *,
    fast: bool = True,
    known_path: str | None = None,
    known_detail: str | None = None,
) -> Connection:
    """One channel to the host broker over an SSH connection the caller holds (the container relay's shared one):
    closing the Connection closes the channel (and its `--dial-stdio` process), never `conn`. Raises
    SSHBridgeError (TcpFallback: dial its `url` instead).

    `known_path`: the host socket an earlier open learnt (`info["host_socket"]`), with its `known_detail`
    (`info["transport_detail"]`): opened first, with no broker.json read and no `--ensure`; when that fails the
    full path runs (`fast` broker.json through the mount, else `--ensure` and the palace identity check).
    """
    t0 = time.monotonic()
    info: dict[str, Any] = {"ssh_host": settings.ssh_host}
    if known_path is not None:
        try:
            if known_detail == "ssh-stdio":  # this host refuses streamlocal: its stdio bridge, at once
                c = await _open_to_socket(settings, conn, known_path, alias=settings.ssh_host, info=info,
                                          allow_tcp=False, owns_conn=False, stdio_first=True)
            else:
                reader, writer = await _open_streamlocal(conn, known_path, settings.connect_timeout)
                c = _streamlocal_connection(settings, conn, reader, writer, f"ssh://{settings.ssh_host}{known_path}",
                                            known_path, info, owns_conn=False)
        except (SSHBridgeError, asyncssh.ChannelOpenError, asyncio.TimeoutError) as exc:
            log.info("the host socket %s learnt earlier did not open (%s); looking for the broker again", known_path, exc)
        else:
            c.info.update(via="known", ensure=None, setup_s=round(time.monotonic() - t0, 4))
            return c
    return await _open_broker_channel(settings, conn, fast=fast, info=info, t0=t0, owns_conn=False)


async def _open_broker_channel(
    settings: Settings,
    conn: asyncssh.SSHClientConnection,
    *,
    fast: bool,
    info: dict[str, Any],
    t0: float,
    owns_conn: bool,
) -> Connection:
    """The one dialer over an SSH connection: broker.json through the mount (fresh, our palace.id) → its socket;
    else `--ensure` on the host, the palace identity check, then `_open_to_socket`."""
    record = _fresh_record(settings) if fast else None
    if record is not None:
        path = record["endpoint"][len("unix://") :]
        try:
            reader, writer = await _open_streamlocal(conn, path, settings.connect_timeout)
        except (asyncssh.ChannelOpenError, asyncio.TimeoutError) as exc:
            log.info("broker.json names %s, which did not open through SSH (%s); running --ensure", path, exc)
        else:
            info.update(ensure=None, via="broker.json", palace_id=record.get("palace_id"),
                        setup_s=round(time.monotonic() - t0, 4))
            return _streamlocal_connection(
                settings, conn, reader, writer, f"ssh://{settings.ssh_host}{path}", path, info, owns_conn
            )
    t_ens = time.monotonic()
    ensured = await remote_ensure(settings, conn)
    check_palace_identity(settings, ensured)
    path = _socket_path(ensured["endpoint"])
    info.update(ensure=ensured, via="ensure", palace_id=ensured.get("palace_id"), ensure_s=round(time.monotonic() - t_ens, 4))
    c = await _open_to_socket(settings, conn, path, alias=settings.ssh_host, info=info, allow_tcp=True, owns_conn=owns_conn)
    c.info["setup_s"] = round(time.monotonic() - t0, 4)
    return c


async def open_ssh_url(settings: Settings, url: str) -> Connection:
    """`MEMPALACE_BROKER=ssh://alias/path/to/broker.sock`: that socket, no --ensure, no palace check."""
    endpoint = urls.parse(url)
    if endpoint.scheme != "ssh":
        raise SSHBridgeError(f"not an ssh:// URL: {url!r}")
    alias, user, port, path = endpoint.host, endpoint.user, endpoint.port, endpoint.path
    t0 = time.monotonic()
    conn = await connect(settings, alias, username=user, port=port)
    try:
        info: dict[str, Any] = {"ssh_host": alias, "ssh_connect_s": round(time.monotonic() - t0, 4)}
        c = await _open_to_socket(settings, conn, path, alias=alias, info=info, allow_tcp=False)
        c.endpoint = url
        c.info["setup_s"] = round(time.monotonic() - t0, 4)
        return c
    except BaseException:
        await _Channel(conn).close()
        raise
