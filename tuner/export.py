"""`autoglm-tune export-table`: write a study as a table the replay runner answers from.

One row per finished trial that has a config (the first measurement of a config wins; later
repeats are dropped and counted): a column per knob the study searched or held fixed, a column
per metric the trials recorded (contract names) and `infeasible_reason` (the runner's reason
for a config that could not run; empty for a row that ran). Constraints are not baked in: the
replay re-applies whatever constraints its space declares to the recorded metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from runners.contract import METRICS
from runners.replay import REASON_COLUMN, ReplayTable
from tuner import record
from tuner.errors import UsageError


def knob_names(study: optuna.Study) -> list[str]:
    """The searched params (in the stored space's order) and then its fixed knobs."""
    raw = record.STUDY_SPACE.get(study) or {}
    names = list(raw.get("params") or {})
    for t in study.get_trials(deepcopy=False):
        names += [k for k in t.params if k not in names]
    names += [k for k in (raw.get("fixed") or {}) if k not in names]
    return names


def _row(trial: FrozenTrial, knobs: list[str], fixed: dict[str, Any]) -> dict[str, Any] | None:
    outcome = record.OUTCOME.get(trial)
    if trial.state != TrialState.COMPLETE or outcome not in ("ok", "infeasible"):
        return None  # a FAIL is infrastructure, not an answer about the config
    resolved = (record.CONFIG.get(trial) or {}).get("knobs") or {}
    row = {k: trial.params.get(k, resolved.get(k, fixed.get(k))) for k in knobs}
    metrics = record.metrics(trial)
    row.update({m: metrics[m] for m in METRICS if m in metrics})
    # A window stopped early ran (outcome ok) but was cut short: its partial metrics are no
    # answer about the config, so its row carries the stop as the reason and replays infeasible.
    cut_short = outcome == "infeasible" or bool(record.STOPPED_EARLY.get(trial))
    row[REASON_COLUMN] = record.INFEASIBLE_REASON.get(trial, "") if cut_short else ""
    return row


def table_frame(study: optuna.Study) -> tuple[pd.DataFrame, int]:
    """The replay table of `study` and how many repeated configs were dropped."""
    knobs = knob_names(study)
    fixed = (record.STUDY_SPACE.get(study) or {}).get("fixed") or {}
    rows, seen, repeats = [], set(), 0
    for trial in study.get_trials(deepcopy=False):
        row = _row(trial, knobs, fixed)
        if row is None:
            continue
        key = repr([row[k] for k in knobs])
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        rows.append(row)
    if not rows:
        raise UsageError(f"study {study.study_name!r} has no finished trial to export")
    frame = pd.DataFrame(rows)
    metric_columns = [m for m in METRICS if m in frame]
    return frame[knobs + metric_columns + [REASON_COLUMN]], repeats


def export_table(study: optuna.Study, path: Path) -> tuple[int, int]:
    """Write the table; returns (rows, dropped repeats). Read back once, so a bad write shows here."""
    frame, repeats = table_frame(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Python's shortest round-trip float repr, so replayed values equal the stored ones.
    frame.to_csv(path, index=False)
    ReplayTable.read(path)
    return len(frame), repeats


def parser() -> argparse.ArgumentParser:
    from tuner.cli import Parser

    p = Parser(prog="autoglm-tune export-table",
                description="Write a study's trials as a CSV that `runner: replay` answers from.")
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--storage", default=None, help="the study's storage (default: the journal file)")
    p.add_argument("--out", required=True, help="the CSV file to write")
    return p


def main(argv: list[str]) -> int:
    from tuner.storage import DEFAULT_STORAGE, open_existing_storage

    args = parser().parse_args(argv)
    url = args.storage or DEFAULT_STORAGE
    storage = open_existing_storage(url)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        raise UsageError(f"--study {args.study}: no such study in {url}") from None
    rows, repeats = export_table(study, Path(args.out))
    note = f" ({repeats} repeated config(s) dropped: the first measurement is kept)" if repeats else ""
    print(f"wrote {rows} row(s) of study {args.study} to {args.out}{note}")
    return 0
