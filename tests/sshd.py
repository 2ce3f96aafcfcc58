"""A throwaway OpenSSH server on 127.0.0.1 for the container-path tests (and the SSH benchmark).

`SSHServer` owns one directory with everything sshd and a client need: host
and client ed25519 keys (ssh-keygen), authorized_keys, known_hosts with
`[127.0.0.1]:PORT <hostkey>`, sshd_config (`StrictModes no`, `UsePAM no`,
absolute paths, pid file, `-E` log) and an OpenSSH client config with a
`Host host` alias that also carries ControlMaster/ControlPath/ControlPersist
lines (asyncssh ignores them; a real user's config has them). It logs in as
the current user (root here: `PermitRootLogin prohibit-password`).

sshd runs in the foreground (`-D`) as our child, so stopping it is exact.
`kill()` also kills every per-connection sshd below it, which is what "the
host's sshd died" looks like to a client; `freeze()` SIGSTOPs them all (a hung
host: only keepalive notices).

Use the `sshd` / `sshd_factory` fixtures (import them into the test module:
`from tests.sshd import sshd, sshd_factory  # noqa: F401`).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import platforms
from tests.helpers import children_of

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin:" + os.environ.get("PATH", "")) or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
ALIAS = "host"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> None:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


def public_key(path: Path) -> str:
    """`type base64` of a .pub file (no comment)."""
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in children_of(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


class SSHServer:
    """One sshd on 127.0.0.1:port with its keys and a client config for alias `host`."""

    def __init__(self, directory: Path, port: int | None = None, extra: dict[str, str] | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.extra = dict(extra or {})
        self.user = getpass.getuser()
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.sshd_config = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.log = self.dir / "sshd.log"
        self.client_config = self.dir / "ssh_config"
        self._prepare()

    # --- files ---------------------------------------------------------------------
    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.host_key.exists():
            keygen(self.host_key, "fixture-host")
        if not self.client_key.exists():
            keygen(self.client_key, "fixture-client")
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public_key(self.host_key)}\n")
        self.write_sshd_config()
        self.write_client_config(self.client_config)

    def write_sshd_config(self) -> None:
        options = {
            "Port": str(self.port),
            "ListenAddress": "127.0.0.1",
            "HostKey": str(self.host_key),
            "PidFile": str(self.pid_file),
            "AuthorizedKeysFile": str(self.authorized_keys),
            "StrictModes": "no",  # keys under /tmp (mode 1777)
            "UsePAM": "no",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowTcpForwarding": "yes",
            "AllowStreamLocalForwarding": "yes",
            "PrintMotd": "no",
            "LogLevel": "VERBOSE",
            "MaxStartups": "100",
        }
        options.update(self.extra)
        self.sshd_config.write_text("".join(f"{k} {v}\n" for k, v in options.items()))

    def write_client_config(
        self,
        path: Path,
        *,
        known_hosts: Path | None = None,
        identity: Path | None = None,
        port: int | None = None,
        alias: str = ALIAS,
    ) -> Path:
        """An OpenSSH client config for `alias` → this server (fields overridable for negative tests)."""
        path.write_text(
            f"Host {alias}\n"
            f"  HostName 127.0.0.1\n"
            f"  Port {port or self.port}\n"
            f"  User {self.user}\n"
            f"  IdentityFile {identity or self.client_key}\n"
            f"  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known_hosts or self.known_hosts}\n"
            f"  ControlMaster auto\n"
            f"  ControlPath {self.dir}/cm-%r@%h:%p\n"
            f"  ControlPersist 10m\n"
        )
        return path

    def container_env(self, state_dir: Path, remote_broker: Path, config: Path | None = None,
                      **extra: str) -> dict[str, str]:
        """What a container session's environment says to reach this server's host: role, its own state
        directory (the mount), the SSH config (this server's client config unless `config`), the alias
        `host`, and the remote broker command."""
        return {"MP_BRIDGE_ROLE": "container", "MEMPALACE_PATH": str(state_dir),
                "MP_BRIDGE_SSH_CONFIG": str(config or self.client_config), "MP_BRIDGE_SSH_HOST": "host",
                "MP_BRIDGE_REMOTE_BROKER": str(remote_broker), **extra}

    def wrong_known_hosts(self) -> Path:
        """A known_hosts that records ANOTHER key for [127.0.0.1]:PORT."""
        other = self.dir / "other_host_ed25519"
        if not other.exists():
            keygen(other, "impostor")
        path = self.dir / "known_hosts.wrong"
        path.write_text(f"[127.0.0.1]:{self.port} {public_key(other)}\n")
        return path

    # --- process ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> SSHServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if os.getuid() == 0 and platforms.LINUX:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # Debian's privilege separation dir
        subprocess.run([SSHD, "-t", "-f", str(self.sshd_config)], check=True, capture_output=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd not listening on {self.port} after {timeout}s: {self.log_tail()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _signal_tree(self, sig: int) -> None:
        if self.proc is None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the listener and every session under it (the host's sshd is gone)."""
        if self.proc is None:
            return
        self._signal_tree(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP the listener and its sessions: TCP stays up, nothing answers (a hung host)."""
        self._signal_tree(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.thaw()
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def write_broker_wrapper(path: Path, home: Path, state_dir: Path, *, extra: str = "") -> Path:
    """A remote `mempalace-broker` for the SSH session, which inherits sshd's environment,
    not the test's: it sets HOME, MEMPALACE_PATH and PATH, then execs the venv's broker.
    (It is also what "MP_BRIDGE_REMOTE_BROKER = an absolute path" looks like.)"""
    bin_dir = Path(sys.executable).parent
    path.write_text(
        "#!/bin/sh\n"
        f"export HOME='{home}'\n"
        f"export MEMPALACE_PATH='{state_dir}'\n"
        f"export MP_BRIDGE_CONFIG='{home}/mp-bridge.toml'\n"
        f"export PATH='{bin_dir}':\"$PATH\"\n"
        f"{extra}"
        f"exec '{bin_dir}/mempalace-broker' \"$@\"\n"
    )
    os.chmod(path, 0o755)
    return path


def sshd_available() -> bool:
    return os.path.exists(SSHD) and os.path.exists(SSH_KEYGEN)


@pytest.fixture
def sshd_factory() -> Iterator[Callable[..., SSHServer]]:
    """Start sshd servers (options in `extra` override sshd_config lines); all stopped at teardown."""
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD}); run scripts/install-sshd.sh")
    root = Path(tempfile.mkdtemp(prefix="mpb-sshd-", dir="/tmp"))
    servers: list[SSHServer] = []

    def start(extra: dict[str, str] | None = None, port: int | None = None) -> SSHServer:
        server = SSHServer(root / f"s{len(servers)}", port=port, extra=extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshd(sshd_factory: Callable[..., SSHServer]) -> SSHServer:
    """One running sshd with stream-local forwarding allowed."""
    return sshd_factory()


def two_sides(home: Path, ctr_state: Path | None = None, *, extra: str = "") -> tuple[Path, Path, Path]:
    """The host's state dir under `home` (with its palace.id), a container's view of it (`ctr_state`,
    default `<home>/../ctr/.mempalace`: the same palace.id, no reachable socket), and the host broker
    command the container's SSH session runs (write_broker_wrapper). (host_state, ctr_state, wrapper)."""
    from mp_ssh_bridge import state

    host_state = home / ".mempalace"
    state.ensure_private_dir(host_state)
    state.palace_id(state.StatePaths(host_state))
    ctr_state = ctr_state or home.parent / "ctr" / ".mempalace"
    ctr_state.mkdir(parents=True, mode=0o700)
    shutil.copyfile(host_state / "palace.id", ctr_state / "palace.id")
    return host_state, ctr_state, write_broker_wrapper(home.parent / "remote-broker.sh", home, host_state, extra=extra)
