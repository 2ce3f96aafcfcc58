#!/usr/bin/env bash
# Set up a checkout: create .venv, install the project (editable, with the
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
# Skip pip when pyproject.toml is unchanged since the last successful install
# and the console scripts are there (the install is editable, so code changes
# need no reinstall; new dependencies or entry points come with pyproject).
want_stamp="$("$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest(), sys.version.split()[0])')"
if [ "${FORCE_INSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && [ -x "$VENV/bin/mempalace-broker" ] && [ -x "$VENV/bin/mp-shim" ] && [ -x "$VENV/bin/mempalace-mcp" ]; then
  echo "setup: .venv is up to date (pyproject.toml unchanged)"
else
  echo "setup: pip install -e '.[test]' into .venv"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -e '.[test]'
  printf '%s\n' "$want_stamp" > "$STAMP"
fi

# --- offline embedding model ---------------------------------------------------
PYTHON="$VENV/bin/python" bash "$REPO/scripts/provision-model.sh" "$MODEL_HOME"
