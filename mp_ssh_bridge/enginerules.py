"""Which mempalace rules the installed engine follows, learned once and remembered cheaply.

The shim resolves the engine's files (`palace.resolve`) in stdlib Python on every agent
start, but mempalace changed its rules between versions: 3.4 keeps a fresh user's palace in
`~/.mempalace/palace`, 3.11 in `~/.config/mempalace/palace`. Applying one version's rules to
the other's engine would key the broker by files the engine never opens, and the broker then
(rightly) refuses to serve. So the rules are learned from the engine itself: its own
interpreter runs its own `MempalaceConfig` in a throwaway HOME under a few environments
(behaviour, not version numbers, so a release between 3.4 and 3.11 is read for what it does).

Asking costs a Python start and a mempalace import (a few hundred ms), so the answer is
cached in `$XDG_CACHE_HOME/mp-ssh-bridge/engine-rules.json`, keyed by the engine script's
real path and checked against the stat (mtime, size, inode) of that script and of the
engine's `mempalace/config.py`: an upgrade or reinstall rewrites them, and the rules are
asked again. A cache hit costs a few stats and one small JSON read (well under 1 ms).

When nothing can be learned (no engine, not a Python script, a failing import) the rules
are mempalace 3.11's, the version the bridge depends on; the broker's start-up check
(`palace.engine_resolve`) still refuses files the engine would not open. Stdlib only.
"""

from __future__ import annotations

import json
import os

from mp_ssh_bridge import enginecmd
from mp_ssh_bridge.palace import RULES_3_11, Rules, interpreter_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_ENGINE = "mempalace-mcp"
CACHE_NAME = "engine-rules.json"
ASK_TIMEOUT_S = 60.0  # a cold mempalace import on a slow disk; only on a cache miss

# Run in the engine's interpreter, in a throwaway HOME: what its own MempalaceConfig does.
RULES_PROBE = r"""
import json, os, shutil, sys, tempfile
scratch = os.path.realpath(tempfile.mkdtemp(prefix="mp-bridge-rules-"))
NAMES = ("MEMPALACE_CONFIG_DIR", "XDG_CONFIG_HOME", "MEMPALACE_PALACE_PATH", "MEMPALACE_PALACE", "MEMPAL_PALACE_PATH")
for name in NAMES:
    os.environ.pop(name, None)
os.environ["HOME"] = scratch
try:
    import mempalace.config as mc
    base = dict(os.environ)

    def ask(**env):
        os.environ.clear()
        os.environ.update(base, **env)
        try:
            cfg = mc.MempalaceConfig()
            where = str(getattr(cfg, "config_dir", None) or getattr(cfg, "_config_dir"))
            return os.path.abspath(where), os.path.abspath(os.path.expanduser(str(cfg.palace_path)))
        finally:
            os.environ.clear()
            os.environ.update(base)

    fresh = ask()[0]
    explicit = os.path.join(scratch, "explicit")
    palace_env = [n for n in NAMES[2:] if ask(**{n: os.path.join(scratch, n)})[1] == os.path.join(scratch, n)]
    bom_dir = os.path.join(scratch, "bom")
    os.makedirs(bom_dir)
    with open(os.path.join(bom_dir, "config.json"), "wb") as fh:
        fh.write(b"\xef\xbb\xbf" + json.dumps({"palace_path": os.path.join(scratch, "bom-palace")}).encode())
    bom = mc.MempalaceConfig(config_dir=bom_dir).palace_path == os.path.join(scratch, "bom-palace")
    try:
        from importlib.metadata import version
        engine_version = version("mempalace")
    except Exception:
        engine_version = None
    known = fresh in (os.path.join(scratch, ".config", "mempalace"), os.path.join(scratch, ".mempalace"))
    print(json.dumps({
        "rules": {"xdg": fresh == os.path.join(scratch, ".config", "mempalace"),
                  "config_env": ask(MEMPALACE_CONFIG_DIR=explicit)[0] == explicit,
                  "palace_env": palace_env, "config_bom": bom} if known else None,
        "config_py": os.path.realpath(mc.__file__), "version": engine_version}))
finally:
    shutil.rmtree(scratch, ignore_errors=True)
"""


def engine_argv(command: str) -> list[str]:
    """MP_BRIDGE_ENGINE's command line, split as the settings model does (shlex only when quoting is used)."""
    if any(ch in command for ch in "'\"\\"):
        import shlex

        return shlex.split(command)
    return command.split()


def cache_file(environ: Mapping[str, str]) -> str:
    base = (environ.get("XDG_CACHE_HOME") or "").strip()
    if not base or not os.path.isabs(base):
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mp-ssh-bridge", CACHE_NAME)


def _stamp(path: str) -> list[object] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [path, st.st_mtime_ns, st.st_size, st.st_ino]


def _read_cache(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached(script: str, environ: Mapping[str, str]) -> tuple[bool, Rules | None]:
    """(remembered, its rules) for the engine at `script` (a real path), if its files are unchanged since.

    Remembered rules of None: the engine was asked and could not say (3.11's rules apply, silently).
    """
    entry = _read_cache(cache_file(environ)).get(script)
    if not isinstance(entry, dict) or not isinstance(entry.get("stamps"), list) or not entry["stamps"]:
        return False, None
    for stamp in entry["stamps"]:
        if not isinstance(stamp, list) or not stamp or not isinstance(stamp[0], str) or _stamp(stamp[0]) != stamp:
            return False, None
    rules = Rules.from_dict(entry.get("rules"))
    return rules is not None or entry.get("rules") is None, rules


def python_of(argv: list[str]) -> str | None:
    """The interpreter that runs this engine command: a console script's `#!`, or `python -m ...` itself."""
    python = interpreter_of(argv[0])
    if python is None and len(argv) > 1 and "python" in os.path.basename(argv[0]):
        python = argv[0]
    return python


def ask(python: str, environ: Mapping[str, str]) -> tuple[Rules | None, dict[str, object]]:
    """Run RULES_PROBE in the engine's interpreter: (its rules or None, the raw answer)."""
    import subprocess

    try:
        out = subprocess.run([python, "-c", RULES_PROBE], env=dict(environ), capture_output=True, timeout=ASK_TIMEOUT_S,
                             cwd="/", check=False, stdin=subprocess.DEVNULL)
        answer = json.loads(out.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return None, {"error": f"{python} could not say which rules it follows: {exc}", "retry": True}
    if not isinstance(answer, dict):
        return None, {"error": f"{python} answered {answer!r:.200}"}
    return Rules.from_dict(answer.get("rules")), answer


def _remember(script: str, rules: Rules | None, answer: dict[str, object], environ: Mapping[str, str]) -> None:
    stamps = [_stamp(script)]
    config_py = answer.get("config_py")
    if isinstance(config_py, str):
        stamps.append(_stamp(config_py))
    if None in stamps:
        return
    path = cache_file(environ)
    data = _read_cache(path)
    data[script] = {"stamps": stamps, "rules": rules.as_dict() if rules else None, "version": answer.get("version")}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)  # atomic: concurrent shims each write a whole file
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def for_engine(argv: list[str], environ: Mapping[str, str] = os.environ) -> Rules:
    """The rules of the engine `argv` (argv[0] an existing path): remembered, else asked (and remembered), else 3.11's."""
    real = os.path.realpath(argv[0])
    remembered, rules = cached(real, environ)
    if remembered:
        return rules or RULES_3_11
    python = python_of([real, *argv[1:]])
    answer: dict[str, object] = {"error": f"{real} is not a Python console script"}
    if python:
        rules, answer = ask(python, environ)
    if rules is None:
        from mp_ssh_bridge.diag import log

        log(20, f"cannot learn how the engine {real} resolves its palace ({answer.get('error', 'unknown rules')}); "
                "using mempalace 3.11's rules (the broker still checks the engine's own answer)")
    if not answer.get("retry"):  # a timeout or a failed start is asked again next time; an answer is kept
        _remember(real, rules, answer, environ)
    return rules or RULES_3_11


def for_argv(argv: list[str], environ: Mapping[str, str] = os.environ) -> Rules:
    """The rules of the engine this command line runs (as the broker would find it on PATH)."""
    try:
        found = enginecmd.resolve(argv, environ.get("PATH"))
    except enginecmd.EngineNotFound:
        return RULES_3_11  # no engine: no broker can run it either, and its error says so
    return for_engine(found, environ)


def for_command(command: str | None, environ: Mapping[str, str] = os.environ) -> Rules:
    """The rules of MP_BRIDGE_ENGINE's command line (None or blank: `mempalace-mcp`)."""
    argv = engine_argv(command) if command and command.strip() else [DEFAULT_ENGINE]
    return for_argv(argv, environ) if argv else RULES_3_11
