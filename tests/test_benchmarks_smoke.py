"""Smoke-sized runs of the newer benchmarks (hub mode, the relay floor, long polls, every path in one run), so their
harnesses cannot rot.

Benchmarks print figures; these runs assert only that each completes and writes its report with every path in it
(no timing is asserted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sshd import sshd_available

REPO = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def test_relay_floor_smoke(home: Path, tmp_path: Path) -> None:
    if not sshd_available() or shutil.which("ssh") is None:
        pytest.skip("needs /usr/sbin/sshd and the OpenSSH client")
    text = run("bench_relay_floor.py", "--calls", "5", "--gap-ms", "1", out=tmp_path / "floor.md")
    for path in (
        "direct",
        "unix hop",
        "OpenSSH client (reference)",
        "asyncssh, streams",
        "asyncssh, callbacks",
        "the container daemon's relay",
    ):
        assert f"| {path} |" in text, text


def test_hub_bench_smoke(home: Path, tmp_path: Path) -> None:
    text = run("bench_hub.py", "--calls", "3", "--spawns", "1", out=tmp_path / "hub.md")
    assert "hub with the bridge" in text and "upstream's hub alone" in text and "after the kill" in text, text


def test_longpoll_bench_smoke(home: Path, tmp_path: Path) -> None:
    series = tmp_path / "series.csv"
    text = run("bench_longpoll.py", "--calls", "20", "--wakes", "2", "--series", str(series), out=tmp_path / "lp.md")
    assert "no wait pending" in text and "a `mempalace_event_wait` pending" in text and "Woken by" in text, text
    rows = series.read_text().splitlines()
    assert rows[0] == "t_s,condition,status_ms" and {r.split(",")[1] for r in rows[1:]} == {"idle", "wait pending"}


def test_bench_all_smoke(home: Path, tmp_path: Path) -> None:
    """benchmarks/bench_all.py at smoke sizes: every path in every figure's table, and both plots drawn."""
    out = tmp_path / "BENCHMARKS.md"
    text = run("bench_all.py", "--smoke", "--plots-dir", str(tmp_path), out=out)
    sections = {}  # "1. Per-call latency …" → its text, up to the next heading
    for part in text.split("\n## ")[1:]:
        title = part.split("\n", 1)[0]
        if title[:1].isdigit():
            sections[title] = part
    assert [title.split(".")[0] for title in sections] == ["1", "2", "3", "4", "5", "5b", "6"], list(sections)
    assert "| (e) floor: two byte relays |" in sections[next(t for t in sections if t.startswith("1."))]
    assert "per-call overhead through the shim over (a)" in text and "a read behind a burst of writes" in text
    cpu_table = text.split("| path | calls | hops µs per call |", 1)[1].split("\n\n", 1)[0]
    cpu_rows = {line.split(" | ")[0].lstrip("| "): line for line in cpu_table.splitlines() if line.startswith("| (")}
    assert "broker" in cpu_rows["(b) shim → broker"] and "shim" in cpu_rows["(b) shim → broker"], cpu_rows
    assert "relay" in cpu_rows["(e) floor: two byte relays"], cpu_rows  # figure 1's CPU per call, by process
    for title, body in sections.items():
        for label in ("(a) direct", "(b) shim → broker", "(d) hub"):
            assert f"| {label} |" in body, f"{label} missing from section {title!r}:\n{body}"
    for png in ("bench-latency.png", "bench-longpoll.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    if not sshd_available():
        pytest.skip("no OpenSSH sshd here: the container path is skipped (the harness says so in its report)")
    for title, body in sections.items():
        assert "| (c) container daemon |" in body, f"(c) missing from section {title!r}:\n{body}"


def test_balanced_order_gives_every_path_each_neighbour_equally_often() -> None:
    """Figure 2's spawn order: what ran just before a spawn slows it, so no path may always follow the same one."""
    from collections import Counter

    from benchmarks.bench_all import balanced_order

    for n in (2, 3, 4, 5):
        follows: Counter[tuple[int, int]] = Counter()
        for k in range(n if n % 2 == 0 else 2 * n):
            row = balanced_order(n, k)
            assert sorted(row) == list(range(n)), row
            follows.update(zip(row, row[1:], strict=False))
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1, (n, follows)
