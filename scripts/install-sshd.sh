#!/usr/bin/env bash
# Make sure OpenSSH's server and client tools exist (the integration tests
# start a throwaway sshd on 127.0.0.1 and need /usr/sbin/sshd and ssh-keygen).
# Installs Debian's openssh-server/openssh-client with apt-get only when
# something is missing; never starts or enables a system sshd.
set -euo pipefail

SSHD=/usr/sbin/sshd

have_all() {
  [ -x "$SSHD" ] && command -v ssh-keygen >/dev/null 2>&1
}

if have_all; then
  echo "install-sshd: $SSHD and ssh-keygen present"
  exit 0
fi

if [ "$(uname -s)" != Linux ]; then
  # macOS ships both; anywhere else installing them is not automated here. Not an error: the tests
  # that need sshd skip and say so (tests/sshd.py), the rest of the suite runs.
  echo "install-sshd: $SSHD or ssh-keygen is missing on $(uname -s); the SSH tests will be skipped" >&2
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  cat >&2 <<MSG
install-sshd: $SSHD or ssh-keygen is missing, and installing them needs root.
  Debian/Ubuntu: sudo apt-get install -y --no-install-recommends openssh-server openssh-client
  then run this again. (The installed system sshd service is not needed by the tests;
  you may disable it: sudo systemctl disable --now ssh)
MSG
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-sshd: $SSHD is missing and apt-get is not available; install OpenSSH's server by hand." >&2
  exit 1
fi

echo "install-sshd: installing openssh-server openssh-client with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: keep the package's maintainer scripts from starting a
# system-wide sshd (there is often no init system here anyway).
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  CREATED_POLICY=1
fi
cleanup() { if [ "$CREATED_POLICY" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends openssh-server openssh-client

if ! have_all; then
  echo "install-sshd: apt-get finished but $SSHD or ssh-keygen is still missing" >&2
  exit 1
fi
echo "install-sshd: installed $(ssh -V 2>&1 | head -n1 || echo openssh)"
