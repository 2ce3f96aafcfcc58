#!/bin/sh
# mp-ssh-bridge's container start hook: runs `mp-bridge doctor` once and prints ONE verdict line on
# stderr (the container's log), so a broken link to the host's broker (no key mounted, sshd refusing,
# known_hosts missing) shows at start instead of as a pi session that cannot reach its memory.
#
# From pi-devbox's entrypoint-user.sh (it runs as developer, so doctor checks developer's ~/.ssh-local):
#     . /usr/local/lib/mp-ssh-bridge/mp-bridge-entrypoint.sh     sourced, or
#     /usr/local/lib/mp-ssh-bridge/mp-bridge-entrypoint.sh       run
# Either way it comes back at once with status 0: doctor runs in the background, bounded, and the
# start never waits for it or fails because of it.
#
#   MP_BRIDGE_ENTRYPOINT_DOCTOR  background (default) | wait (in the foreground, still bounded: the
#                                verdict comes before whatever follows) | off
#   MP_BRIDGE_DOCTOR_TIMEOUT     seconds doctor may take (default 30); then it is stopped and the line
#                                says so
#
# No `set -eu` here: sourced, it would change the caller's shell options, and nothing in this file may
# fail the start, even under a caller's `set -eu` (every command that may fail is guarded). Every name
# it uses starts with _mpb_ and is removed again at the end.

_mpb_say() { printf 'mp-ssh-bridge: %s\n' "$*" >&2; }

# The verdict from `mp-bridge doctor --json` ({"ok": …, "checks": [{"name", "status", "detail", "fix"}]},
# one key a line): counts, and the first failed check with what it found.
_mpb_verdict() {
  awk '
    function val(line) {
      sub(/^[^:]*: "/, "", line); sub(/",?[ \t\r]*$/, "", line)
      gsub(/\\"/, "\"", line); gsub(/\\u2014/, "-", line); gsub(/\\\\/, "\\", line)
      return line
    }
    /^ *"name": "/ { name = val($0); checks++ }
    /^ *"status": "fail"/ { fails++; if (first == "") { first = name; want = 1 } }
    /^ *"status": "warn"/ { warns++; wnames = wnames (wnames == "" ? "" : ", ") name }
    /^ *"detail": "/ { if (want) { detail = val($0); want = 0 } }
    END {
      if (checks == 0) exit 1
      if (length(detail) > 240) detail = substr(detail, 1, 237) "..."
      if (fails) printf "doctor: %d failed, %d warning(s); first: %s: %s (run `mp-bridge doctor` for the fixes)\n", fails, warns, first, detail
      else if (warns) printf "doctor: ok, %d warning(s): %s (`mp-bridge doctor` says more)\n", warns, wnames
      else printf "doctor: all %d checks passed\n", checks
    }' "$1"
}

_mpb_doctor() {
  _mpb_limit=${MP_BRIDGE_DOCTOR_TIMEOUT:-30}
  case $_mpb_limit in '' | *[!0-9]*) _mpb_limit=30 ;; esac
  if ! command -v mp-bridge >/dev/null 2>&1; then
    _mpb_say "mp-bridge is not on PATH, no doctor run (PATH=$PATH): was docker/install.sh run in this image?"
    return 0
  fi
  _mpb_out=$(mktemp "${TMPDIR:-/tmp}/mp-bridge-doctor.XXXXXX" 2>/dev/null) || _mpb_out=${TMPDIR:-/tmp}/mp-bridge-doctor.$$
  mp-bridge doctor --json >"$_mpb_out" 2>&1 </dev/null &
  _mpb_pid=$!
  # The bound: a watchdog that stops doctor (TERM, then KILL) and leaves a mark; stopped itself
  # (and its sleep with it) as soon as doctor is done.
  (
    trap 'kill "${_mpb_nap:-}" 2>/dev/null; exit 0' TERM
    sleep "$_mpb_limit" &
    _mpb_nap=$!
    wait "$_mpb_nap" || exit 0
    : >"$_mpb_out.timeout"
    kill -TERM "$_mpb_pid" 2>/dev/null || exit 0
    sleep 2 &
    _mpb_nap=$!
    wait "$_mpb_nap" || exit 0
    kill -KILL "$_mpb_pid" 2>/dev/null || :
  ) </dev/null >/dev/null 2>&1 &
  _mpb_dog=$!
  _mpb_rc=0
  wait "$_mpb_pid" || _mpb_rc=$?
  kill -TERM "$_mpb_dog" 2>/dev/null || :
  wait "$_mpb_dog" 2>/dev/null || :
  if [ -e "$_mpb_out.timeout" ]; then
    _mpb_say "doctor did not finish within ${_mpb_limit} s and was stopped; run \`mp-bridge doctor\` by hand"
  elif _mpb_line=$(_mpb_verdict "$_mpb_out"); then
    _mpb_say "$_mpb_line"
  else
    _mpb_last=$(awk 'NF { last = $0 } END { print substr(last, 1, 240) }' "$_mpb_out") || _mpb_last=""
    _mpb_say "doctor could not run (exit ${_mpb_rc}): ${_mpb_last:-no output}"
  fi
  rm -f "$_mpb_out" "$_mpb_out.timeout"
  return 0
}

case ${MP_BRIDGE_ENTRYPOINT_DOCTOR:-background} in
  off) ;;
  *)
    if [ -z "${MP_BRIDGE_ENTRYPOINT_DOCTOR_DONE:-}" ]; then  # once per start, even if sourced twice
      MP_BRIDGE_ENTRYPOINT_DOCTOR_DONE=1
      export MP_BRIDGE_ENTRYPOINT_DOCTOR_DONE
      if [ "${MP_BRIDGE_ENTRYPOINT_DOCTOR:-background}" = wait ]; then
        _mpb_doctor
      else
        # Detached twice over: the container's PID 1 reaps it, whatever the caller execs next.
        ( _mpb_doctor </dev/null & )
      fi
    fi ;;
esac
unset -f _mpb_say _mpb_verdict _mpb_doctor
unset _mpb_limit _mpb_out _mpb_pid _mpb_dog _mpb_rc _mpb_line _mpb_last
:
