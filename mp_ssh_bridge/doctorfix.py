"""`mp-bridge doctor --fix`: repair what doctor found, when it is safe, and say exactly what was done.

Only repairs whose effect is certain: tighten the modes of the state directory and its files
(owner-only), reclaim a broker.json that no live broker owns (under broker.lock, as stop does),
and start a broker when none runs (the same election a session makes; in a container, the
host's `mempalace-broker --ensure` over SSH). Never signals a process, never touches the palace.
"""

from __future__ import annotations

import os
import stat

from mp_ssh_bridge.settings import Settings


def _tighten(settings: Settings) -> list[str]:
    paths = settings.paths
    done: list[str] = []
    if not paths.root.is_dir():
        return done
    for path in (paths.root, paths.json, paths.palace_id_file, paths.lock, paths.log, paths.degraded):
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
            continue  # another user's file: doctor says so; nothing here to change
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            continue
        try:  # by descriptor, never following a link swapped in since lstat (the directory may be writable)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if path == paths.root else 0))
            try:
                os.fchmod(fd, mode & ~0o077)  # owner-only: group and others lose every bit
            finally:
                os.close(fd)
        except OSError as exc:
            done.append(f"could not chmod {path}: {exc.strerror or exc}")
            continue
        done.append(f"chmod {mode & ~0o077:o} {path} (was {mode:o})")
    return done


def _start_broker(settings: Settings) -> str:
    if settings.resolved_role() == "container":
        from mp_ssh_bridge import ssh
        from mp_ssh_bridge.errors import ShimError
        from mp_ssh_bridge.links import run_async

        bound = settings.ensure_timeout + settings.connect_timeout + 10
        try:
            status, out, err = run_async(ssh.run_on_host(settings, *ssh.ensure_args(settings),
                                                         bound=settings.ensure_timeout + 5), bound)
        except (ShimError, TimeoutError) as exc:
            return f"could not start the host's broker over SSH: {exc}"
        if status != 0:
            return f"the host's broker did not start (exit {status}): {err.strip()[-300:]}"
        info = ssh.parse_ensure_output(out)
        return f"{'started' if info.get('started') else 'found'} the host's broker, pid {info.get('pid')}"
    from mp_ssh_bridge.election import EnsureError, ensure_broker

    try:
        info = ensure_broker(settings)
    except EnsureError as exc:
        return f"could not start a broker: {exc}"
    return f"{'started' if info.get('started') else 'found'} a broker, pid {info.get('pid')} ({info.get('endpoint')})"


def fix(settings: Settings, found: list[tuple[str, str]]) -> list[str]:
    """Apply the safe repairs; one line per thing done (or tried). `found`: (status, name) of each check doctor
    made first — no broker is started beside a stray writer or for an engine that cannot run."""
    from mp_ssh_bridge.stopping import reclaim_stale

    done = _tighten(settings)
    if settings.resolved_role() == "host":
        reclaimed = reclaim_stale(settings)
        if reclaimed:
            done.append(reclaimed)
    blockers = [name for status, name in found if status == "fail" and name in ("stray writers", "engine command")]
    if blockers:
        done.append(f"did not start a broker: fix {' and '.join(blockers)} first")
    else:
        done.append(_start_broker(settings))
    return done
