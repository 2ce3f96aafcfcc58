#!/usr/bin/env bash
# A second engine for the tests: mempalace VERSION in its own virtualenv, as a user would have it.
# The tests that depend on the engine's version run against the pinned engine (.venv) and this one
# (tests/conftest.py `engine` fixture); they skip it when it is missing.
#
# usage: scripts/setup-engine.sh [VERSION]        (default 3.4.0) -> <repo>/.venv-engine-VERSION
# env:   PYTHON=python3.x   interpreter used to create the venv (default python3)
# Skips itself when that version is already installed there. A fresh install takes ~65 s here
# (pip resolves and installs chromadb, onnxruntime, numpy... again: the engine must not share
# the bridge's environment, or it would not be the environment a 3.4.0 user has).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${1:-3.4.0}"
VENV="$REPO/.venv-engine-$VERSION"

installed="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("mempalace"))' 2>/dev/null || true)"
if [ "$installed" = "$VERSION" ] && [ -x "$VENV/bin/mempalace-mcp" ]; then
  echo "setup-engine: mempalace $VERSION is in place ($VENV)"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-engine: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
echo "setup-engine: pip install mempalace==$VERSION into $VENV"
start=$SECONDS
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "mempalace==$VERSION"
echo "setup-engine: mempalace $VERSION installed in $((SECONDS - start)) s"
