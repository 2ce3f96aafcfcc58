#!/usr/bin/env python3
"""Write docs/RELIABILITY.md from the reliability suite's records (.reliability/*.json).

Each record is one case (tests/reliability.py `record()`): what was tried, what happened, the
figures, the command that reproduces it. `make reliability` runs the suite in full mode and then
this script; it can also be run alone:

    python scripts/reliability_report.py [--results .reliability] [--out docs/RELIABILITY.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

INTRO = """\
# Reliability

What the bridge promises, tried on purpose and counted. The suite is part of the tests
(`pytest -m reliability`); every case records what it tried and what happened, and this page is
written from those records by `scripts/reliability_report.py`. Do not edit it by hand.

- **CI (short mode)** — `make test` runs every reliability case with small counts (4 writers,
  a few hundred fuzz cases, …) and asserts counts only: nothing acknowledged is lost, no
  exception, anything above a bound is refused. It never asserts a timing.
- **Full mode** — `make reliability` sets `RELIABILITY=full`: the same cases with the issue's
  counts (8 writers, both supported engines, the contrast without a broker, ≥ 10,000 fuzz
  cases, …), then rewrites this page. It takes much longer; run it before a release or after a
  change to the broker, the shim or the SSH path.

Words used below: a write is **acknowledged** when the session got a success result; **refused,
not executed** when the bridge answered an error with `data.outcome = "not_executed"` (safe to
retry); **outcome unknown** for every other error (`-32060`, a deadline with `outcome:
"unknown"`, a lost connection). Every acknowledged write must be found afterwards, through a
fresh session and directly in the files.
"""

SECTIONS = [
    ("storm", "The write storm", "Writers on the host and in containers (over a real sshd), each the official MCP SDK "
     "client launching `mp-shim`, writing drawers, diary entries and knowledge-graph facts; the broker and then its "
     "engine are killed with SIGKILL mid-storm."),
    ("contrast", "The contrast: no broker", "The same storm's writes from two plain `mempalace-mcp` engines on one "
     "palace under different HOMEs (a host and a container), which is what agents do without the bridge. "
     "Measured, not asserted. The original RFC measured 770 of 2000 vectors unreadable with mempalace 3.4.0. "
     "What this run saw is below; the damage depends on timing (earlier runs of this suite saw writes reported "
     "failed that were stored, writes never answered, and a palace file quarantined), so a run without damage "
     "proves nothing: nothing keeps the two engines apart. Through the bridge the storm above is kept safe by "
     "one writer, not by timing."),
    ("fault", "Faults", "Each fault has a clear outcome within a bound."),
    ("security", "Security", "Owner-only state, other users refused, tokens and host keys checked, paths passed "
     "to the host without a shell seeing them."),
    ("fuzz", "Fuzzing", "Random and malformed input on the broker socket and the shim's stdin (tests/test_fuzz.py)."),
    ("bounds", "Bounds", "Floods of requests, bytes, connections and file descriptors (tests/test_bounds.py)."),
    ("handover", "Ownership: hand-over", "A container-side session owns the palace; a host session starts and the "
     "palace moves to the host broker (tests/test_ownership_e2e.py: shared state directory, each side's flocks in "
     "its own directory, the container side in its own mount namespace so the host's socket is out of reach)."),
    ("grant", "Ownership: grants", "`mp-bridge run -- mempalace mine` while host and container sessions write; two "
     "runs at once; one killed with SIGKILL mid-mine."),
]


def load(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(results.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(entry, dict) and "case" in entry:
            out.append(entry)
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(v)


def case_block(entry: dict[str, Any]) -> str:
    lines = [f"### {entry['case']}", ""]
    lines.append(f"*Mode: {entry.get('mode', '?')}; recorded {entry.get('when', '?')}.*")
    lines.append("")
    lines.append(f"- **Tried:** {entry.get('tried', '')}")
    lines.append(f"- **Happened:** {entry.get('happened', '')}")
    figures = entry.get("figures") or {}
    if figures:
        lines += ["", "| figure | value |", "| --- | --- |"]
        for k, v in figures.items():
            cell = _value(v).replace("|", "\\|")
            lines.append(f"| {k} | {cell} |")
    command = " ".join(shlex.quote(t) if "[" in t else t for t in entry.get("reproduce", "").split(" "))
    lines += ["", "Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def section_of(case: str) -> str:
    for key, _, _ in SECTIONS:
        if case.startswith(key):
            return key
    return "other"


def _figures(entries: list[dict[str, Any]], prefix: str, key: str) -> list[Any]:
    return [(e.get("figures") or {}).get(key) for e in entries if e["case"].startswith(prefix)
            and (e.get("figures") or {}).get(key) is not None]


def targets(entries: list[dict[str, Any]]) -> str:
    """The issue's targets against what the records say (None of a figure: that case did not record it)."""
    def total(values: list[Any]) -> str:
        nums = [v for v in values if isinstance(v, (int, float))]
        return str(sum(nums)) if nums else "not measured"

    def worst(values: list[Any]) -> str:
        nums = [v for v in values if isinstance(v, (int, float))]
        return f"{max(nums):g}" if nums else "not measured"

    lost = [v for k in ("acked_lost_session", "acked_lost_direct") for v in _figures(entries, "storm", k)]
    rows = [
        ("acknowledged writes lost (storms, both checks)", "0", total(lost)),
        ("scar files after the storms", "0", total(_figures(entries, "storm", "scars"))),
        ("broker RSS growth under one client's abuse, MB", "≤ 100",
         worst(_figures(entries, "bounds", "rss_growth_mb"))),
        ("other clients' broker/status p99 during a flood, ms", "≤ 50",
         worst(_figures(entries, "bounds", "status_p99_ms"))),
        ("fuzz cases (socket + stdin)", "≥ 10,000 each", " + ".join(str(v) for v in _figures(entries, "fuzz", "cases"))
         or "not measured"),
        ("exceptions escaping for any fuzz case", "0", total(_figures(entries, "fuzz", "exceptions"))),
        ("recovery after fd exhaustion without a restart", "yes",
         "yes" if _figures(entries, "bounds", "recovered_without_restart") else "not measured"),
        ("hand-over: the host session's memory, s (max)", "≤ 30", worst(_figures(entries, "handover", "handover_s_max"))),
        ("writers on the palace at once, any sample (hand-over, grants)", "≤ 1",
         worst(_figures(entries, "handover", "max_writers_seen") + _figures(entries, "grant", "max_writers_seen"))),
        ("acknowledged writes lost (hand-over, grants)", "0",
         total(_figures(entries, "handover", "acked_lost") + _figures(entries, "grant", "acked_lost"))),
        ("mined files not stored (grants)", "0", total(_figures(entries, "grant", "mined_lost"))),
    ]
    lines = ["\n## Targets\n", "| target | wanted | measured |", "| --- | --- | --- |"]
    lines += [f"| {name} | {want} | {got} |" for name, want, got in rows]
    return "\n".join(lines) + "\n"


def render(entries: list[dict[str, Any]]) -> str:
    parts = [INTRO]
    modes = sorted({e.get("mode", "?") for e in entries})
    if not entries:
        parts.append("\n*No records yet: run `make reliability`.*\n")
        return "\n".join(parts)
    if modes != ["full"]:
        parts.append(f"\n> These figures include records from a **{' and '.join(modes)}** run; only `make reliability` "
                     "(full mode) gives the issue's counts.\n")
    parts.append(targets(entries))
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        grouped.setdefault(section_of(e["case"]), []).append(e)
    titles = [(k, t, d) for k, t, d in SECTIONS] + [("other", "Other cases", "")]
    for key, title, description in titles:
        cases = grouped.get(key)
        if key == "contrast" and not cases:
            parts += [f"\n## {title}\n", description, "",
                      "*Not measured yet: the contrast runs only in full mode (`make reliability`).*", ""]
            continue
        if not cases:
            continue
        parts += [f"\n## {title}\n", description, ""]
        if key == "contrast":
            for e in cases:
                f = e.get("figures") or {}
                parts.append(f"- **{f.get('engine', e['case'])}**: {f.get('writes_tried', '?')} writes tried, "
                             f"{f.get('acked', '?')} acknowledged, {f.get('unknown', '?')} answered with an error, "
                             f"{f.get('exceptions', 0)} with no reply at all within the bound "
                             f"({f.get('unknown_but_stored', '?')} of those unanswered or failed writes stored anyway), "
                             f"scar files: {f.get('scars', '?')}; "
                             f"**{f.get('acked_lost_session', '?')} lost** (acknowledged, not readable afterwards); "
                             f"{f.get('acked_lost_direct', '?')} missing from the files themselves, "
                             f"{f.get('acked_drawers_not_searchable', '?')} drawers not found by search (vectors).")
            parts.append("")
        parts += [case_block(e) for e in sorted(cases, key=lambda e: e["case"])]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / ".reliability")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    args = parser.parse_args(argv)
    entries = load(args.results)
    args.out.write_text(render(entries))
    print(f"wrote {args.out} from {len(entries)} records in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
