"""Per-trial artifact files: raw per-request samples and resource timelines as CSV."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def request_rows(timings: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per measured request with its derived latencies in ms (runners/stats.py derives
    them; tpot is empty for a one-token request)."""
    from runners.stats import per_request_ms  # numpy + scipy: only where requests are written

    each = per_request_ms(timings)
    rows = []
    for i, t in enumerate(timings):
        row = dataclasses.asdict(t)
        row["ttft_ms"] = float(each["ttft"][i])
        row["latency_ms"] = float(each["latency"][i])
        tpot = float(each["tpot"][i])
        row["tpot_ms"] = "" if math.isnan(tpot) else tpot
        rows.append(row)
    return rows
