#!/usr/bin/env bash
# Set up a checkout: create .venv, install the project (editable, with the `host` extra (the engine) and the
# `test` extra, which also brings the `mcp` SDK the demo uses) and provision
# the offline embedding model into a HOME for the demo.
#
# usage: scripts/setup.sh [MODEL_HOME]     (default: <repo>/.demo/home)
# env:   PYTHON=python3.x   interpreter used to create .venv (default python3)
#        FORCE_INSTALL=1    re-run pip even when nothing changed
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
MODEL_HOME="${1:-$REPO/.demo/home}"
VENV="$REPO/.venv"
STAMP="$VENV/.mp-ssh-bridge-install"

# --- virtualenv ---------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi

"$VENV/bin/python" - <<'PYEOF' || { echo "setup: Python >= 3.10 is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF

# --- the project --------------------------------------------------------------
# The install is editable in setuptools' "strict" mode: a tree of links under build/ on a plain
# .pth path. (The default mode would put an import hook in every Python start-up, ~18 ms and
# pathlib/re/urllib for each agent session, because broker/ installs under another name.)
# Code changes need no reinstall; a new or removed module does, so the stamp covers the list of
# modules as well as pyproject.toml; skip pip when both are unchanged and the scripts are there.
want_stamp="$("$VENV/bin/python" -c 'import glob,hashlib,sys
h = hashlib.sha256(open("pyproject.toml","rb").read())
h.update("\n".join(sorted(glob.glob("mp_ssh_bridge/*.py") + glob.glob("broker/*.py"))).encode())
print(h.hexdigest(), sys.version.split()[0])')"
if [ "${FORCE_INSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && [ -x "$VENV/bin/mempalace-broker" ] && [ -x "$VENV/bin/mp-shim" ] && [ -x "$VENV/bin/mempalace-mcp" ]; then
  echo "setup: .venv is up to date (pyproject.toml unchanged)"
else
  echo "setup: pip install -e '.[host,test]' into .venv"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -e '.[host,test]' \
    --config-settings editable_mode=strict
  printf '%s\n' "$want_stamp" > "$STAMP"
fi

# --- offline embedding model ---------------------------------------------------
PYTHON="$VENV/bin/python" bash "$REPO/scripts/provision-model.sh" "$MODEL_HOME"
