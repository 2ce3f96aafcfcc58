"""The reliability suite's two modes, and where its figures go.

CI runs every reliability case in its short mode (small counts; assertions on counts, never on
timings). `make reliability` sets RELIABILITY=full: the same cases with the issue's counts (≥ 8
writers, ≥ 10,000 fuzz cases, …), and each case records what it tried and what happened with
`record()`; scripts/reliability_report.py turns those records into docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FULL = os.environ.get("RELIABILITY", "").lower() == "full"
RESULTS = Path(os.environ.get("RELIABILITY_RESULTS", Path(__file__).resolve().parent.parent / ".reliability"))


def scale(short: int, full: int) -> int:
    """A count for this run: `short` in CI, `full` under `make reliability`."""
    return full if FULL else short


def record(case: str, tried: str, happened: str, figures: dict[str, Any] | None = None,
           reproduce: str | None = None) -> None:
    """Write one case's outcome (one JSON file per case) for docs/RELIABILITY.md.

    `tried`: what was done, with counts. `happened`: what was observed. `figures`: the numbers
    (RSS, p99, counts). `reproduce`: the exact command (defaults to the pytest node for `case`).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    entry = {
        "case": case,
        "mode": "full" if FULL else "short",
        "tried": tried,
        "happened": happened,
        "figures": figures or {},
        "reproduce": reproduce or f"RELIABILITY=full .venv/bin/python -m pytest -q {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in case)
    (RESULTS / f"{safe}.json").write_text(json.dumps(entry, indent=2) + "\n")
