"""The replay runner: answers trials from a recorded table instead of building a model.

`runner: replay` with `model: {table: FILE}`. FILE is a CSV with one column per knob (named as
in the space's `params`/`fixed`), one per metric (contract names, e.g. `throughput_tok_s`) and
`infeasible_reason` (empty when the row ran). A trial's knobs must match a row: strings, bools
and empty cells exactly, numbers to 1e-9 relative; otherwise the trial is infeasible with the
reason "not in table". `autoglm-tune export-table` writes such a table from any study.

It runs behind the same launcher, constraints and storage as any runner, so samplers, reports
and the dashboard see no difference. Torch-free (and Optuna-free): a replay trial's child process
starts in ~0.1 s, and `benchmarks/search_efficiency.py` calls `replay` in-process, the same code
path the runner takes.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from runners.base import Runner
from runners.contract import METRICS, TrialConfig, TrialResult
from runners.knobs import Knob

REASON_COLUMN = "infeasible_reason"
REL_TOL = 1e-9
NOT_IN_TABLE = "not in table"


class TableError(ValueError):
    """A table that cannot be replayed (unreadable, no knob column, no metric column)."""


@dataclass(frozen=True)
class Row:
    index: int  # 0-based data row (line index + 2 in the file, after the header)
    knobs: dict[str, Any]
    metrics: dict[str, float]
    infeasible_reason: str


def parse_cell(text: str) -> Any:
    """A CSV cell as the knob value it stands for: empty -> None, True/False, int, float, str."""
    text = text.strip()
    if text == "":
        return None
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def same_value(recorded: Any, asked: Any) -> bool:
    """Numbers within 1e-9 relative (a grid's 0.1 * 3 is 0.30000000000000004); others exactly."""
    if isinstance(recorded, bool) or isinstance(asked, bool):
        return type(recorded) is type(asked) and recorded == asked
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(asked, numbers):
        return math.isclose(float(recorded), float(asked), rel_tol=REL_TOL, abs_tol=0.0)
    return recorded == asked


class ReplayTable:
    """A recorded table: knob columns, metric columns and the rows, with lookups by knobs."""

    def __init__(self, source: str, knob_columns: list[str], metric_columns: list[str], rows: list[Row]) -> None:
        self.source = source
        self.knob_columns = knob_columns
        self.metric_columns = metric_columns
        self.rows = rows
        # Exact-text index first; the tolerant scan is the fallback for floats that differ in the
        # last digits.
        self._exact: dict[tuple[str, ...], Row] = {}
        for row in rows:
            self._exact.setdefault(self._key(row.knobs), row)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ReplayTable:
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                lines = list(reader)
        except OSError as exc:
            raise TableError(f"cannot read {path} ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise TableError(f"{path} is not a UTF-8 CSV file") from None
        if not header:
            raise TableError(f"{path} is empty (a header row naming knobs and metrics is needed)")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise TableError(f"{path}: duplicate column names in {header}")
        metric_columns = [h for h in header if h in METRICS]
        knob_columns = [h for h in header if h not in METRICS and h != REASON_COLUMN]
        if not knob_columns:
            raise TableError(f"{path}: no knob column (every column is a metric or {REASON_COLUMN})")
        if not metric_columns:
            raise TableError(f"{path}: no metric column (contract metric names, e.g. throughput_tok_s)")
        rows = []
        for number, line in enumerate(lines):
            if not any(cell.strip() for cell in line):
                continue
            if len(line) != len(header):
                raise TableError(f"{path}: line {number + 2} has {len(line)} cells, the header {len(header)}")
            cells = dict(zip(header, line, strict=True))
            metrics = {m: float(v) for m in metric_columns if (v := parse_cell(cells[m])) is not None}
            rows.append(Row(len(rows), {k: parse_cell(cells[k]) for k in knob_columns}, metrics,
                            cells.get(REASON_COLUMN, "").strip()))
        return cls(str(path), knob_columns, metric_columns, rows)

    @staticmethod
    def _key(knobs: dict[str, Any]) -> tuple[str, ...]:
        return tuple(sorted(f"{k}={v!r}" for k, v in knobs.items()))

    def lookup(self, knobs: dict[str, Any]) -> Row | None:
        """The first row whose every knob column equals the trial's value of that knob.

        Knobs the table has no column for are not compared (the runner never varied them); a
        knob column the trial does not set never matches.
        """
        asked = {k: knobs[k] for k in self.knob_columns if k in knobs}
        if len(asked) < len(self.knob_columns):
            return None
        exact = self._exact.get(self._key(asked))
        if exact is not None:
            return exact
        for row in self.rows:
            if all(same_value(row.knobs[k], asked[k]) for k in self.knob_columns):
                return row
        return None

    def knobs(self) -> dict[str, Knob]:
        """The table's knob columns as knobs the space validator accepts.

        The default is the first row's value (an exported study's first row is its baseline);
        the kind is whatever the column holds, so e.g. a number column takes int or float params.
        """
        out = {}
        for name in self.knob_columns:
            values = [row.knobs[name] for row in self.rows]
            kinds: set[type] = set()
            for value in values:
                kinds.update((int, float) if isinstance(value, (int, float)) and not isinstance(value, bool)
                             else (type(value),))
            kind = tuple(sorted(kinds, key=lambda k: k.__name__)) or (str,)
            out[name] = Knob(name, values[0] if values else None, kind,
                             help=f"a column of the replay table {self.source}")
        return out


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int) -> ReplayTable:
    return ReplayTable.read(path)


def load_table(path: str | os.PathLike[str]) -> ReplayTable:
    """The table at `path`, read once per process while the file is unchanged."""
    resolved = str(Path(path).resolve())
    try:
        mtime = os.stat(resolved).st_mtime_ns
    except OSError as exc:
        raise TableError(f"cannot read {path} ({exc.strerror})") from None
    return _cached(resolved, mtime)


def replay(table: ReplayTable, knobs: dict[str, Any]) -> TrialResult:
    """The recorded outcome of `knobs`: the runner's answer, and the benchmark's lookup."""
    row = table.lookup(knobs)
    info: dict[str, Any] = {"replay_table": table.source}
    if row is None:
        return TrialResult("infeasible", reason=NOT_IN_TABLE, info=info)
    info["replay_row"] = row.index
    if row.infeasible_reason:
        return TrialResult("infeasible", reason=row.infeasible_reason, info=info)
    unavailable = {m: "empty in the replay table" for m in table.metric_columns if m not in row.metrics}
    return TrialResult("ok", dict(row.metrics), unavailable=unavailable, info=info,
                       environment={"runner": "replay", "replay_table": table.source})


def table_knobs(model: dict[str, Any]) -> dict[str, Knob]:
    """The knobs of a replay space: its table's knob columns (for the space validator). With
    `recorded_with: RUNNER`, a column that is one of that runner's knobs takes its declaration
    (default, choices, `applies_when`, `rebuilds`, `quality`), so the tuner reads the replayed
    study as it read the recorded one (twins, quality keys, refusals)."""
    columns = load_table(model["table"]).knobs()
    if not model.get("recorded_with"):
        return columns
    from runners.registry import runner_knobs

    declared = runner_knobs(model["recorded_with"])
    return {name: declared.get(name, knob) for name, knob in columns.items()}


class ReplayRunner(Runner):
    name = "replay"

    def run(self, config: TrialConfig) -> TrialResult:
        return replay(load_table(config.model["table"]), config.knobs)
