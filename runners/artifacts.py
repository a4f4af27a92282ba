"""Per-trial artifact files: raw per-request samples and resource timelines as CSV."""

from __future__ import annotations

import csv
import dataclasses
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
    """One row per measured request with its derived latencies in ms."""
    rows = []
    for t in timings:
        row = dataclasses.asdict(t)
        row["ttft_ms"] = (t.first_token_s - t.arrival_s) * 1e3
        row["latency_ms"] = (t.finish_s - t.arrival_s) * 1e3
        row["tpot_ms"] = ((t.finish_s - t.first_token_s) / (t.output_tokens - 1) * 1e3
                          if t.output_tokens > 1 else "")
        rows.append(row)
    return rows
