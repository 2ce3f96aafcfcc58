#!/bin/sh
# Install mp-ssh-bridge into a container image, the pi-devbox way, and put its shim FIRST on the PATH
# as `mempalace-mcp`.
#
# Why: pi's mempalace extension (mempalace-toolkit's mempalace.ts) spawns `mempalace-mcp` BY NAME.
# In a container that bind-mounts the host's ~/.mempalace, the real engine there would be a second
# writer beside the host's, and flock does not cross the VM boundary: vectors get lost. With the shim
# first on PATH the same spawn reaches the host's one broker over SSH instead (docker/README.md).
# The real engine stays reachable behind it: pi-devbox's own mempalace uv tool (INSTALL_MEMPALACE=true,
# /usr/local/bin/mempalace-mcp) later on PATH, or the one in the bridge's own environment when SPEC asks
# for the `host` extra (`mp-ssh-bridge[host] @ git+…`), which the shim's engine lookup
# (mp_ssh_bridge/enginecmd.py) tries last; both skip anything that is the shim. Without the extra the
# bridge is its client footprint (a few MB, no chromadb): pi-devbox already pins its own engine.
#
# usage: install.sh [SPEC]
#   SPEC, else $MP_SSH_BRIDGE_SPEC, else $MP_SSH_BRIDGE_REPO@$MP_SSH_BRIDGE_REF: what to install,
#   pinned. Any requirement uv and pip take: git+https://github.com/OWNER/mp-ssh-bridge@v0.1.0 (a tag
#   or a commit), /path/to/mp_ssh_bridge-0.1.0-py3-none-any.whl, git+file:///src/mp-ssh-bridge@SHA,
#   mp-ssh-bridge==0.1.0 from an index. There is no unpinned default: an image says what it bakes.
#
# environment:
#   MP_SSH_BRIDGE_PREFIX        /usr/local/lib/mp-ssh-bridge; its bin/ is the PATH shadow (the
#                               Dockerfile fragment puts it first with ENV PATH); pip's venv is its venv/
#   MP_SSH_BRIDGE_INSTALLER     auto (uv when on PATH, else pip) | uv | pip
#   MP_SSH_BRIDGE_PYTHON        the interpreter (uv's --python; the one that makes pip's venv); default
#                               python3 from PATH, never a uv download into root's home that the
#                               container's user could not read
#   MP_SSH_BRIDGE_INSTALL_ARGS  more arguments for `uv tool install` / `pip install`, split on blanks,
#                               e.g. "--no-index --find-links /wheels" for an offline build
#   MP_SSH_BRIDGE_PROFILE_D     /etc/profile.d: where mp-ssh-bridge.sh puts the shadow back in front
#                               for login shells (Debian's /etc/profile resets PATH); empty: not written
#   MP_SSH_BRIDGE_CLI_SHIM      optional: a copy of configs/mempalace-cli-shim, installed as `mempalace`
#                               in the shadow (writing CLI commands then go through `mp-bridge run`)
#   UV_TOOL_DIR, UV_TOOL_BIN_DIR  uv's own (pi-devbox: /opt/uv-tools, /usr/local/bin)
#   INSTALL_MEMPALACE           pi-devbox's build arg: false installs nothing (an image without memory
#                               has nothing to bridge, and no engine for a local owner)
#
# Idempotent: run again with the same SPEC, it changes nothing. It writes no secret: the SSH config,
# key and known_hosts are mounted at run time (docker/compose.example.yml).
set -eu

say() { printf 'mp-ssh-bridge install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

case ${INSTALL_MEMPALACE:-true} in
  false | False | FALSE | 0 | no | off)
    say "INSTALL_MEMPALACE=${INSTALL_MEMPALACE}: nothing installed (no memory in this image, nothing to bridge)"
    exit 0 ;;
esac

spec=${1:-${MP_SSH_BRIDGE_SPEC:-}}
if [ -z "$spec" ] && [ -n "${MP_SSH_BRIDGE_REF:-}" ]; then
  [ -n "${MP_SSH_BRIDGE_REPO:-}" ] || die "MP_SSH_BRIDGE_REF=${MP_SSH_BRIDGE_REF} needs MP_SSH_BRIDGE_REPO (e.g. git+https://github.com/OWNER/mp-ssh-bridge)"
  spec=${MP_SSH_BRIDGE_REPO}@${MP_SSH_BRIDGE_REF}
fi
[ -n "$spec" ] || die "nothing to install: pass a pinned SPEC (a git+https URL @tag or @commit, a wheel) or set MP_SSH_BRIDGE_SPEC, or MP_SSH_BRIDGE_REPO and MP_SSH_BRIDGE_REF"

prefix=${MP_SSH_BRIDGE_PREFIX:-/usr/local/lib/mp-ssh-bridge}
shadow=$prefix/bin
case $shadow in
  /*) ;;
  *) die "MP_SSH_BRIDGE_PREFIX must be an absolute path, got $prefix" ;;
esac
case $shadow in
  *[!A-Za-z0-9/._+-]*) die "MP_SSH_BRIDGE_PREFIX may hold only letters, digits and / . _ + - (it goes into PATH and a profile script): $prefix" ;;
esac
python=${MP_SSH_BRIDGE_PYTHON:-python3}
installer=${MP_SSH_BRIDGE_INSTALLER:-auto}
if [ "$installer" = auto ]; then
  if command -v uv >/dev/null 2>&1; then installer=uv; else installer=pip; fi
fi

# The extra arguments, split on blanks (and never glob-expanded) on purpose.
set -f
# shellcheck disable=SC2086
set -- ${MP_SSH_BRIDGE_INSTALL_ARGS:-}
set +f

case $installer in
  uv)
    # A tool environment under UV_TOOL_DIR and its commands (mp-shim, mp-bridge, mempalace-broker) in
    # UV_TOOL_BIN_DIR, as pi-devbox installs mempalace itself. No cache left in the image.
    : "${UV_NO_CACHE:=1}"
    export UV_NO_CACHE
    say "uv tool install $spec"
    uv tool install --python "$python" "$@" "$spec"
    env_dir=$(uv tool dir)/mp-ssh-bridge
    ;;
  pip)
    env_dir=$prefix/venv
    if [ ! -x "$env_dir/bin/python" ]; then
      say "creating $env_dir with $python"
      "$python" -m venv "$env_dir"
    fi
    say "pip install $spec into $env_dir"
    "$env_dir/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$@" "$spec"
    ;;
  *) die "MP_SSH_BRIDGE_INSTALLER must be auto, uv or pip, got $installer" ;;
esac

bin=$env_dir/bin
for exe in mp-shim mp-bridge python; do
  [ -x "$bin/$exe" ] || die "$bin/$exe is missing after the install: is $spec mp-ssh-bridge?"
done

# The PATH shadow: links, so an upgrade of the environment is picked up and the shim still knows
# itself (enginecmd.is_shim follows links to the console script that names mp_ssh_bridge.shim).
mkdir -p "$shadow"
ln -sfn "$bin/mp-shim" "$shadow/mempalace-mcp"
ln -sfn "$bin/mp-shim" "$shadow/mp-shim"
ln -sfn "$bin/mp-bridge" "$shadow/mp-bridge"
if [ -n "${MP_SSH_BRIDGE_CLI_SHIM:-}" ]; then
  [ -f "$MP_SSH_BRIDGE_CLI_SHIM" ] || die "MP_SSH_BRIDGE_CLI_SHIM=$MP_SSH_BRIDGE_CLI_SHIM does not exist"
  if ! [ "$MP_SSH_BRIDGE_CLI_SHIM" -ef "$shadow/mempalace" ]; then
    rm -f "$shadow/mempalace"
    cp "$MP_SSH_BRIDGE_CLI_SHIM" "$shadow/mempalace"
  fi
  chmod 0755 "$shadow/mempalace"
fi
# The container's user (pi-devbox: developer) runs all of it; root built it.
chmod -R a+rX "$env_dir" "$shadow"

# Login shells: Debian's /etc/profile sets PATH afresh, dropping the image's ENV PATH, and then
# `mempalace-mcp` would be the real engine again. Put the shadow back in front there too.
profile_d=${MP_SSH_BRIDGE_PROFILE_D-/etc/profile.d}
if [ -n "$profile_d" ]; then
  mkdir -p "$profile_d"
  cat > "$profile_d/mp-ssh-bridge.sh" <<EOF
# mp-ssh-bridge (written by docker/install.sh): the shim's PATH shadow first in login shells too, so
# \`mempalace-mcp\` is mp-shim and reaches the host's broker instead of opening the palace here.
case \$PATH in
  $shadow | $shadow:*) ;;
  *) PATH="$shadow:\$PATH"; export PATH ;;
esac
EOF
  chmod 0644 "$profile_d/mp-ssh-bridge.sh"
fi

# Check what was built, with the PATH the image will have: `mempalace-mcp` is the shim, and the
# engine a local-owner broker would run is a real one (both stdlib-only, no palace is opened).
version=$(PATH="$shadow:$PATH" mempalace-mcp --version) || die "mempalace-mcp --version failed through $shadow"
case $version in
  mp-shim*) ;;
  *) die "mempalace-mcp on PATH is not the shim (it says: $version)" ;;
esac
engine=$(PATH="$shadow:$PATH" "$bin/python" -c '
import sys
from mp_ssh_bridge.enginecmd import EngineNotFound, resolve
try:
    print(resolve(["mempalace-mcp"])[0])
except EngineNotFound as exc:
    sys.exit(f"no real engine: {exc}")
') || die "the shim would find no real mempalace-mcp behind it"
say "mempalace-mcp -> $version ($shadow); the real engine behind it: $engine"
