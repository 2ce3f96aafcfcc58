#!/usr/bin/env bash
# Everything `make test` needs on a fresh clone:
#   .venv + pip install -e '.[host,test]'     (scripts/setup.sh)
#   the embedding model in <repo>/.test-home  (tests symlink each test HOME's .cache to it)
#   /usr/sbin/sshd and ssh-keygen             (scripts/install-sshd.sh; apt-get as root)
#   mempalace 3.4.0 in .venv-engine-3.4.0     (scripts/setup-engine.sh; the second engine the
#                                              version-dependent tests run against; ~65 s once)
#   systemd-analyze                           (Debian's systemd package, apt-get as root, only when
#                                              missing: tests/test_service.py verifies the generated
#                                              unit with it; nothing is started or enabled)
# Safe to run again: every step skips itself when already done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" "$REPO/.test-home"
bash "$REPO/scripts/install-sshd.sh"
bash "$REPO/scripts/setup-engine.sh" 3.4.0
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup-tests: installing systemd (for systemd-analyze) with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else  # macOS, or no root: the unit check skips and says so; the rest of the suite runs
    echo "setup-tests: systemd-analyze is missing; tests/test_service.py skips its unit check" \
         "(Debian/Ubuntu: sudo apt-get install -y --no-install-recommends systemd)" >&2
  fi
fi
echo "setup-tests: ready"
