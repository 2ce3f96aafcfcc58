"""The owner record (mp_ssh_bridge/owner.py; docs/PROTOCOL.md "Ownership"): claims, ranks, releases, and
the corners where two sides of a VM boundary could both believe they own the palace."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mp_ssh_bridge import liveness, owner, state
from tests.test_liveness import FOREIGN, HERE, FakeClock

STALE = 30.0


@pytest.fixture
def paths(tmp_path: Path) -> state.StatePaths:
    root = tmp_path / "state"
    root.mkdir(mode=0o700)
    return state.StatePaths(root)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_claim_at_a_time_and_release_frees_it(paths: state.StatePaths) -> None:
    held = owner.claim(paths, "broker", STALE)
    record = json.loads(paths.owner.read_text())
    assert record["kind"] == "broker" and record["pid"] == os.getpid() and record["token"] == held.token
    assert oct(paths.owner.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(owner.Busy) as busy:
        owner.claim(paths, "grant", STALE)
    assert "the broker (pid" in str(busy.value) and busy.value.record is not None
    assert held.release() and not paths.owner.exists()
    assert not held.release()  # idempotent
    again = owner.claim(paths, "local", STALE)
    assert again.ours() and not held.ours()


def test_a_gone_holder_is_replaced_and_its_record_moved_aside(paths: state.StatePaths) -> None:
    gone = owner.claim(paths, "local", STALE, pid=dead_pid())
    fresh = owner.claim(paths, "broker", STALE)
    assert fresh.ours() and not gone.ours()
    assert not gone.beat(), "a holder that lost the palace must never rewrite the record"
    assert json.loads(paths.owner.read_text())["token"] == fresh.token
    assert [p.name for p in paths.root.iterdir() if p.name.startswith("owner.json.")] == []


def test_a_foreign_holder_counts_alive_until_its_heartbeat_stands_still(paths: state.StatePaths, tmp_path: Path) -> None:
    clock = FakeClock()
    rules = {"seen": liveness.Seen(paths.root, tmp_path / "seen", me=HERE), "clock": clock, "sleep": lambda _s: None}
    record = owner.new_record("local", 4242, what="a container session")
    record.update(host=FOREIGN.host, boot_id=FOREIGN.boot_id, pid_ns=None)
    state.write_json_atomic(paths.owner, record)
    with pytest.raises(owner.Busy):
        owner.claim(paths, "broker", STALE, **rules)  # first reading: alive
    clock.now += STALE - 1
    with pytest.raises(owner.Busy):
        owner.claim(paths, "broker", STALE, **rules)
    clock.now += 2  # stood still for more than the limit (and the confirming reading agrees)
    took = owner.claim(paths, "broker", STALE, **rules)
    assert took.ours()


def test_requests_rank_grant_over_broker_over_local(paths: state.StatePaths) -> None:
    local = owner.claim(paths, "local", STALE)
    assert owner.wanted_by(paths, "local", STALE) is None
    broker_wants = owner.Request(paths, "broker")
    assert owner.wanted_by(paths, "local", STALE)["token"] == broker_wants.token
    assert owner.wanted_by(paths, "broker", STALE) is None  # a broker does not yield to its own kind
    grant_wants = owner.Request(paths, "grant", what="mempalace mine ~/notes")
    assert owner.wanted_by(paths, "local", STALE)["kind"] == "grant"
    assert owner.wanted_by(paths, "broker", STALE)["token"] == grant_wants.token
    local.release()
    with pytest.raises(owner.Busy) as busy:  # the broker may not overtake the waiting grant
        owner.claim(paths, "broker", STALE, request_token=broker_wants.token)
    assert "mempalace mine ~/notes" in str(busy.value)
    grant = owner.claim(paths, "grant", STALE, request_token=grant_wants.token, fields={"what": "mempalace mine"})
    grant_wants.withdraw()
    grant.release()
    assert owner.claim(paths, "broker", STALE, request_token=broker_wants.token).ours()


def test_a_request_of_a_gone_process_is_removed(paths: state.StatePaths) -> None:
    stale = owner.Request(paths, "grant", pid=dead_pid())
    assert stale.path.exists()
    assert owner.live_requests(paths, STALE) == []
    assert not stale.path.exists()


def test_an_old_bridges_degraded_session_holds_the_palace(paths: state.StatePaths) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        state.write_json_atomic(paths.degraded, {"pid": sleeper.pid, **liveness.writer_identity(),
                                                 "heartbeat": time.time(), "palace": "/p"})
        with pytest.raises(owner.Busy, match="degraded mode"):
            owner.claim(paths, "broker", STALE)
        mine = dict(state.read_json_object(paths.degraded) or {}, pid=os.getpid())
        state.write_json_atomic(paths.degraded, mine)  # our own degraded.json does not stop our own claim
        assert owner.claim(paths, "local", STALE).ours()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unreadable_owner_json_holds_until_it_is_old(paths: state.StatePaths) -> None:
    paths.owner.write_bytes(b"")  # a claim between its O_EXCL create and its write
    with pytest.raises(owner.Busy, match="no complete record"):
        owner.claim(paths, "broker", STALE)
    old = time.time() - STALE * owner.UNREADABLE_STALE_FACTOR - 5
    os.utime(paths.owner, (old, old))
    assert owner.claim(paths, "broker", STALE).ours()


def test_without_hard_links_the_claim_is_an_exclusive_create(paths: state.StatePaths,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(_src: object, _dst: object) -> None:
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_link)
    held = owner.claim(paths, "local", STALE)
    assert held.ours() and json.loads(paths.owner.read_text())["kind"] == "local"
    with pytest.raises(owner.Busy):
        owner.claim(paths, "broker", STALE)
    assert [p.name for p in paths.root.iterdir() if p.name.endswith(".tmp")] == []


def test_a_fresh_claim_renamed_by_a_late_judge_is_put_back(paths: state.StatePaths) -> None:
    """The other side judged the old record gone, but a new holder claimed before our rename."""
    judged = owner.new_record("local", dead_pid())
    fresh = owner.claim(paths, "broker", STALE)
    owner._move_aside(paths, judged)
    assert fresh.ours(), "the fresh holder's record must survive a judge who read the old one"


def test_claims_race_and_exactly_one_wins(paths: state.StatePaths) -> None:
    winners: list[owner.Claim] = []
    losers: list[str] = []
    barrier = threading.Barrier(8)

    def racer(kind: str) -> None:
        barrier.wait()
        try:
            winners.append(owner.claim(paths, kind, STALE))
        except owner.Busy as exc:
            losers.append(str(exc))

    threads = [threading.Thread(target=racer, args=("local" if i % 2 else "broker",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7


def test_acquire_waits_for_the_release_and_reports_progress(paths: state.StatePaths) -> None:
    held = owner.claim(paths, "broker", STALE)
    seen: list[float] = []

    def holder_yields() -> None:
        while owner.wanted_by(paths, "broker", STALE) is None:
            time.sleep(0.02)
        time.sleep(0.3)  # finishing its running call
        held.release()

    threading.Thread(target=holder_yields, daemon=True).start()
    started = time.monotonic()
    grant = owner.acquire(paths, "grant", STALE, timeout=10, progress=lambda _b, waited: seen.append(waited),
                          fields={"what": "mempalace mine x"})
    assert grant.ours() and grant.record["what"] == "mempalace mine x"
    assert 0.3 <= time.monotonic() - started < 5 and seen
    assert list(paths.owner_requests.iterdir()) == [], "the request is withdrawn once the palace is ours"


def test_acquire_gives_up_at_its_bound_naming_the_holder(paths: state.StatePaths) -> None:
    owner.claim(paths, "broker", STALE)
    started = time.monotonic()
    with pytest.raises(owner.Busy, match="the broker"):
        owner.acquire(paths, "local", STALE, timeout=0.5)
    assert time.monotonic() - started < 3
    assert list(paths.owner_requests.iterdir()) == []


def test_describe_says_what_and_how_long(paths: state.StatePaths) -> None:
    grant = owner.new_record("grant", 7, what="mempalace mine ~/x", expires=time.time() + 60)
    grant["since"] = time.time() - 42
    text = owner.describe(grant)
    assert "`mempalace mine ~/x` under `mp-bridge run`" in text and "for 42 s" in text and "at most until" in text
    assert owner.describe(dict(grant, kind="local")).startswith("a session running its own engine")


def test_a_hub_owner_is_named_and_ranks_as_the_broker_that_records_it(paths: state.StatePaths) -> None:
    """While the broker routes to upstream's hub, owner.json says `hub`: the hub is the palace's writer, the broker
    (its pid, its heartbeat) keeps the record alive, and a grant outranks it as it outranks the broker."""
    rec = owner.new_record("hub", 7, hub={"pid": 99, "url": "http://127.0.0.1:5/mcp"})
    text = owner.describe(rec)
    assert text.startswith("upstream's hub (pid 99, http://127.0.0.1:5/mcp), which the broker (pid 7 on"), text
    assert owner.RANK["hub"] == owner.RANK["broker"] and "hub" in owner.BROKER_KINDS
    grant = owner.new_record("grant", 8, request=True)
    assert owner.outranking([grant], "hub") is grant
    assert owner.outranking([owner.new_record("local", 9, request=True)], "hub") is None
    assert owner.hub_of(rec) == {"pid": 99, "url": "http://127.0.0.1:5/mcp"}
    older = owner.new_record("broker", 7, hub={"pid": 99, "url": "u"})  # a bridge from before the kind: the same
    assert owner.hub_of(older) == {"pid": 99, "url": "u"} and owner.describe(older).startswith("upstream's hub (pid 99")
    assert owner.hub_of(owner.new_record("broker", 7, hub=None)) is None
    assert owner.hub_of(owner.new_record("grant", 7, hub={"pid": 1})) is None


def test_separate_lock_dirs_keep_flocks_apart(tmp_path: Path) -> None:
    """The tests' stand-in for a VM boundary: the same state directory, each side's locks its own."""
    root = tmp_path / "state"
    root.mkdir()
    host = state.StatePaths(root)
    ctr = state.StatePaths(root, tmp_path / "ctr-locks")
    assert host.owner == ctr.owner and host.lock != ctr.lock and host.owner_lock != ctr.owner_lock


def test_an_engine_that_outlives_its_owner_keeps_the_palace(paths: state.StatePaths) -> None:
    """A degraded session killed with -9 leaves its engine finishing a call: no grant may start beside it."""
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from mp_ssh_bridge import hostinfo

        owner.claim(paths, "local", STALE, pid=dead_pid(),
                    fields={"engine_pid": engine.pid, "engine_proc_start": hostinfo.proc_start(engine.pid)})
        with pytest.raises(owner.Busy, match=f"its engine pid {engine.pid} still runs"):
            owner.claim(paths, "grant", STALE)
    finally:
        engine.kill()
        engine.wait()
    assert owner.claim(paths, "grant", STALE).ours()


def test_a_claim_is_not_lost_to_a_failed_read(paths: state.StatePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    held = owner.claim(paths, "broker", STALE)
    real = Path.read_bytes

    def flaky(self: Path) -> bytes:
        if self == paths.owner:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    assert held.ours(), "an unreadable owner.json proves nothing"
    monkeypatch.setattr(Path, "read_bytes", real)
    paths.owner.unlink()
    assert not held.ours()


def test_a_skipped_beat_is_an_oserror(paths: state.StatePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    held = owner.claim(paths, "broker", STALE)
    monkeypatch.setattr(owner, "LOCK_WAIT_S", 0.05)
    import fcntl

    fd = os.open(paths.owner_lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = paths.owner.read_bytes()
        with pytest.raises(OSError):
            held.beat(engine_pid=1)
        assert paths.owner.read_bytes() == before
    finally:
        os.close(fd)
    assert held.beat(engine_pid=1) and json.loads(paths.owner.read_text())["engine_pid"] == 1


def test_a_holder_that_exited_unreaped_is_gone(paths: state.StatePaths) -> None:
    """A killed broker whose parent never reaps it (a test runner, a container's pid 1) must not hold forever."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        from mp_ssh_bridge import hostinfo
        from tests.helpers import wait_for

        wait_for(lambda: hostinfo.is_zombie(child.pid), 10, what="the child to exit unreaped")
        owner.claim(paths, "broker", STALE, pid=child.pid)
        assert owner.claim(paths, "broker", STALE).ours()
    finally:
        child.wait()
