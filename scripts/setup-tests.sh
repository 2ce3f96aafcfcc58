#!/usr/bin/env bash
# Everything `make test` needs on a fresh clone:
#   .venv + pip install -e '.[test]'          (scripts/setup.sh)
#   the embedding model in <repo>/.test-home  (tests symlink each test HOME's .cache to it)
#   /usr/sbin/sshd and ssh-keygen             (scripts/install-sshd.sh; apt-get as root)
#   mempalace 3.4.0 in .venv-engine-3.4.0     (scripts/setup-engine.sh; the second engine the
#                                              version-dependent tests run against; ~65 s once)
# Safe to run again: every step skips itself when already done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" "$REPO/.test-home"
bash "$REPO/scripts/install-sshd.sh"
bash "$REPO/scripts/setup-engine.sh" 3.4.0
echo "setup-tests: ready"
