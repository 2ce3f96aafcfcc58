"""Reliability: who can reach the palace (issue #10).

- every state file and the socket are owner-only (files 0600, directories 0700);
- a second Unix user is refused at the socket and at broker.json (its TCP token) with EACCES — run as
  that user (`useradd` + `runuser`), since root ignores mode bits;
- a TCP client with a wrong, empty, truncated or non-string token gets -32064 and nothing else, and
  the token is compared with `hmac.compare_digest` only (read from the source: a count, not a timing);
- host keys are always verified: a host whose key CHANGED after a session worked is refused, never
  answered by a local engine (the wrong-key, unknown-key and unverifiable-key cases at first connect
  are tests/test_ssh.py test_wrong_host_key_names_known_hosts and
  test_unverifiable_host_key_never_leads_to_degraded_mode, and tests/test_ssh_refusal.py; here the
  server's own key is replaced between two sessions);
- a palace path with spaces, `;`, `$(...)` and backticks reaches the host broker over SSH exactly,
  and no shell runs any of it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import shutil
import signal
import stat
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mp_ssh_bridge import protocol, state
from tests.conftest import REPO, BrokerHandle
from tests.helpers import kill_pid, wait_for
from tests.platforms import RUNUSER
from tests.reliability import record
from tests.sshd import SSHServer, keygen, two_sides
from tests.test_shim_support import ShimProc

pytestmark = [pytest.mark.reliability]

USERADD = shutil.which("useradd")
USERDEL = shutil.which("userdel")
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _elect_broker(tmp_path: Path) -> dict[str, Any]:
    """A broker elected by a session (detached, so it has broker.log too), with one tool call served."""
    s = ShimProc(stderr_path=tmp_path / "elect.err")
    try:
        assert "result" in s.initialize()
        assert "result" in s.tool("mempalace_status", timeout=120)
    finally:
        s.close()
    rec = state.read_broker_json(Path(os.environ["MEMPALACE_PATH"]) / "broker.json")
    assert rec is not None
    return rec


# --- modes -------------------------------------------------------------------------------------
def test_every_state_file_and_the_socket_are_owner_only(home: Path, tmp_path: Path) -> None:
    rec = _elect_broker(tmp_path)
    paths = state.StatePaths(Path(rec["state_dir"]))
    named = {"broker.lock": paths.lock, "broker.json": paths.json, "broker.log": paths.log,
             "palace.id": paths.palace_id_file, "socket": paths.socket()}
    missing = [k for k, p in named.items() if not os.path.lexists(p)]
    assert missing == [], f"expected state files missing: {missing}"
    seen: dict[str, str] = {}
    loose: list[str] = []
    for p in [paths.root, *paths.root.rglob("*"), paths.socket(), state.runtime_dir()]:
        if not os.path.lexists(p) or p.is_symlink():
            continue
        m = _mode(p)
        seen[str(p.relative_to(paths.root)) if p.is_relative_to(paths.root) else str(p)] = f"{m:o}"
        want = 0o700 if p.is_dir() else 0o600
        if m & 0o077 or (p.is_dir() and m != want):
            loose.append(f"{p} {m:o} (want {want:o})")
    record("security-modes", tried=f"{len(seen)} files and directories of a live broker's state directory, its socket and "
           "the per-user runtime directory", happened=f"{len(loose)} with group/other bits" + (f": {loose}" if loose else ""),
           figures={"modes": seen})
    assert loose == [], loose
    assert stat.S_ISSOCK(os.stat(paths.socket()).st_mode) and _mode(paths.socket()) == 0o600


# --- a second Unix user ----------------------------------------------------------------------------
@pytest.fixture
def other_user() -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user (useradd) and run as it (runuser)")
    if not (RUNUSER and USERADD and USERDEL and SYSTEM_PYTHON):
        pytest.skip(f"needs useradd, userdel, runuser and a system python3 (found {USERADD}, {USERDEL}, {RUNUSER}, {SYSTEM_PYTHON})")
    name = f"mpbrel{uuid.uuid4().hex[:6]}"
    made = subprocess.run([USERADD, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"useradd refused: {made.stderr.strip()}")
    yield name
    subprocess.run([USERDEL, name], capture_output=True)


PROBE = r"""
import errno, json, socket, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ALLOWED"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
    s.recv(100)
attempt("socket", connect)
attempt("broker.json", lambda: open(sys.argv[2]).read())
attempt("palace.id", lambda: open(sys.argv[3]).read())
attempt("broker.log", lambda: open(sys.argv[4]).read())
print(json.dumps(out))
"""


def _probe_as(user: str, paths: state.StatePaths) -> dict[str, str]:
    assert RUNUSER and SYSTEM_PYTHON
    out = subprocess.run([RUNUSER, "-u", user, "--", SYSTEM_PYTHON, "-c", PROBE, str(paths.socket()), str(paths.json),
                          str(paths.palace_id_file), str(paths.log)], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_second_unix_user_is_refused(home: Path, tmp_path: Path, other_user: str) -> None:
    rec = _elect_broker(tmp_path)
    paths = state.StatePaths(Path(rec["state_dir"]))
    assert "tcp_token" not in rec or rec["tcp_token"]
    # let the other user walk down to the state directory: the test's temporary parents are 0700
    # themselves, which would refuse it before the bridge's own modes are even looked at
    opened = []
    for parent in [paths.root.parent, *paths.root.parent.parents]:
        if str(parent) in ("/", "/tmp"):
            break
        opened.append((parent, _mode(parent)))
        os.chmod(parent, _mode(parent) | 0o011)
    try:
        as_is = _probe_as(other_user, paths)
        # the second layer: even with the directory traversable, each file refuses on its own
        os.chmod(paths.root, 0o711)
        try:
            files_only = _probe_as(other_user, paths)
        finally:
            os.chmod(paths.root, 0o700)
    finally:
        for parent, m in opened:
            os.chmod(parent, m)
    record("security-second-user", tried=f"a second Unix user ({other_user}) connects to broker.sock and reads broker.json, "
           "palace.id and broker.log: once as the state directory is, once with it opened to 0711",
           happened=f"as is: {as_is}; directory traversable: {files_only}", figures={"as_is": as_is, "dir_0711": files_only})
    assert set(as_is.values()) == {"EACCES"}, as_is
    assert set(files_only.values()) == {"EACCES"}, files_only


# --- TCP tokens -------------------------------------------------------------------------------
def test_tcp_tokens_wrong_empty_prefix_and_wrong_type_are_refused(broker_factory: Callable[..., BrokerHandle]) -> None:
    b = broker_factory("--tcp", "127.0.0.1:0", wait_engine=False)
    host, port = b.record["endpoints"]["tcp"][len("tcp://"):].rsplit(":", 1)
    token = b.record["tcp_token"]
    assert isinstance(token, str) and len(token) >= 32
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    bad: dict[str, Any] = {
        "wrong": flipped, "empty": "", "prefix": token[: len(token) // 2], "one short": token[:-1], "one long": token + "x",
        "number": 12345, "object": {"token": token}, "list": [token], "null": None, "true": True,
        "padded": f" {token} ", "upper": token.upper() if token.upper() != token else token.lower(),
    }

    async def attempt(first: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(protocol.encode(first))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = json.loads(line) if line else None
            try:
                writer.write(protocol.encode(protocol.request(2, "ping")))
                await writer.drain()
                after = await asyncio.wait_for(reader.readline(), 10)
            except ConnectionError:
                after = b""
            return reply, (json.loads(after) if after else None)
        finally:
            writer.close()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in bad.items():
            out[name] = await attempt(protocol.request(1, "broker/auth", {"token": value}))
        out["no params"] = await attempt(protocol.request(1, "broker/auth"))
        out["params a list"] = await attempt(protocol.request(1, "broker/auth", [token]))
        out["another method first"] = await attempt(protocol.request(1, "tools/list", {"token": token}))
        out["right"] = await attempt(protocol.request(1, "broker/auth", {"token": token}))
        return out

    out = asyncio.run(main())
    right = out.pop("right")
    assert right[0] is not None and right[0]["result"] == {"ok": True} and (right[1] or {}).get("result") == {}, right
    refused = {k: (v[0] or {}).get("error", {}).get("code") for k, v in out.items()}
    served_after = [k for k, v in out.items() if v[1] is not None]
    record("security-tcp-tokens", tried=f"{len(out)} wrong first messages on the TCP listener ({', '.join(out)}) and the right one",
           happened=f"refused with -32064: {sum(1 for c in refused.values() if c == protocol.UNAUTHORIZED)} of {len(out)}; "
           f"served anything afterwards: {served_after or 'none'}", figures={"codes": refused})
    assert all(c == protocol.UNAUTHORIZED == -32064 for c in refused.values()), refused
    assert served_after == [], {k: out[k] for k in served_after}


def _broker_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((REPO / "broker").glob("*.py"))}


def test_the_token_is_compared_in_constant_time_only() -> None:
    """Counts, not timings: `_authenticate` calls hmac.compare_digest, and no `==` / `!=` / `in` anywhere in the
    broker has a token on either side (a comparison with None excepted)."""
    from mp_ssh_bridge_broker import server

    auth = inspect.getsource(server.Server._authenticate)
    calls = [n for n in ast.walk(ast.parse(inspect.cleandoc("\n" + auth) if auth.startswith(" ") else auth))
             if isinstance(n, ast.Call) and ast.unparse(n.func) in ("hmac.compare_digest", "compare_digest", "secrets.compare_digest")]
    assert len(calls) >= 1, auth

    def tokenish(node: ast.AST) -> bool:
        return any("token" in ast.unparse(sub).lower() for sub in ast.walk(node) if isinstance(sub, ast.Name | ast.Attribute | ast.Subscript))

    plain: list[str] = []
    for name, src in _broker_sources().items():
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Constant) and s.value is None for s in sides):
                continue
            if any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops) and any(tokenish(s) for s in sides):
                text = ast.unparse(node)
                if "token" in text.lower() and "progress" not in text.lower():  # MCP progress tokens are not secrets
                    plain.append(f"{name}:{node.lineno}: {text}")
    assert plain == [], f"a token compared with a plain operator: {plain}"


# --- host keys --------------------------------------------------------------------------------
def test_a_changed_host_key_is_refused_never_served_locally(
    sshd: SSHServer, home: Path, tmp_path: Path
) -> None:
    host_state, ctr_state, wrapper = two_sides(home)
    env = sshd.container_env(ctr_state, wrapper)
    first = ShimProc(env=env, stderr_path=tmp_path / "before.err")
    try:
        assert "result" in first.initialize(), first.stderr()
        assert first.call("ping", timeout=60)["result"] == {}
    finally:
        first.close()
    # the host is reinstalled (or impersonated): same address, another key; known_hosts still has the old one
    sshd.stop()
    for suffix in ("", ".pub"):
        Path(f"{sshd.host_key}{suffix}").unlink()
    keygen(sshd.host_key, "fixture-host-changed")
    sshd.start()
    after = ShimProc(env=env, stderr_path=tmp_path / "after.err")
    try:
        r = after.call("ping", timeout=60)
        t = after.tool("mempalace_status", timeout=60)
    finally:
        after.close()
    record("security-changed-host-key", tried="a container session works, then the host's SSH key changes (known_hosts keeps the old)",
           happened=f"ping: {r.get('error', r.get('result'))}; tool call: {t.get('error', {}).get('code')}")
    assert r["error"]["code"] == protocol.BROKER_UNREACHABLE, r
    assert "host key" in r["error"]["message"], r
    assert t["error"]["code"] == protocol.BROKER_UNREACHABLE, t
    assert not (ctr_state / "degraded.json").exists()
    assert "degraded mode" not in (tmp_path / "after.err").read_text(errors="replace")


# --- a hostile palace path over SSH ---------------------------------------------------------------
def test_palace_path_with_shell_metacharacters_reaches_the_host_exactly(
    sshd: SSHServer, home: Path, tmp_path: Path
) -> None:
    root = home.parent
    canary = [root / "injected-semicolon", root / "injected-dollar", root / "injected-backtick", root / "injected-quote"]
    palace = (f"{root}/my palace; touch {canary[0]} $(touch {canary[1]}) `touch {canary[2]}` "
              f"'; touch {canary[3]}; ' \"x\" & | > < * ? ~ #end")
    host_state, ctr_state, wrapper = two_sides(home)
    env = sshd.container_env(ctr_state, wrapper, MP_BRIDGE_REMOTE_PALACE=palace)
    marker = uuid.uuid4().hex
    s = ShimProc(env=env, stderr_path=tmp_path / "ctr.err")
    try:
        assert "result" in s.initialize(), s.stderr()
        added = s.tool("mempalace_add_drawer", {"wing": "w", "room": "r", "content": f"metachar {marker}"}, timeout=120)
        assert "result" in added and '"success": true' in added["result"]["content"][0]["text"], (added, s.stderr())
    finally:
        s.close()
    rec = state.read_broker_json(host_state / "broker.json")
    assert rec is not None
    try:
        created = [str(c) for c in canary if c.exists()]
        record("security-palace-path-over-ssh", tried=f"a container session with MP_BRIDGE_REMOTE_PALACE={palace!r}",
               happened=f"host broker serves {rec['palace']!r}; canary files created: {created or 'none'}")
        assert created == [], f"shell injection: {created}"
        assert rec["palace"] == palace, (rec["palace"], palace)
        assert (Path(palace) / "chroma.sqlite3").exists()
    finally:
        kill_pid(rec["pid"], signal.SIGTERM, timeout=20)
        wait_for(lambda: not (host_state / "broker.json").exists(), 20, what="broker gone")
