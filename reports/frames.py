"""Study -> pandas frames with the contract's metric names as columns.

Everything here reads: the Optuna storage (trials, user attrs, constraints) and the per-trial
artifact files the trial recorded. Nothing is ever written back to a study.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from runners.contract import METRICS
from tuner import record
from tuner.notes import broken_constraints, change_pct, overload_note, stopped_early_note
from tuner.space import Objective

# Pareto-chart categories, in drawing order (the front last, so it is on top).
INFEASIBLE, DOMINATED, PARETO = "infeasible", "feasible dominated", "feasible Pareto"

# Columns every trials frame has, even for an empty study, so callers can rely on them.
BASE_COLUMNS = ["number", "state", "outcome", "category", "feasible", "pareto", "baseline", "reason",
                "overloaded", "stopped_early", "duration_s", "wall_s", "datetime_start", "retry_of",
                "device_name", "host", "gpu", "artifact_dir"]


def objectives(study: optuna.Study) -> list[Objective]:
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    return [Objective(n, d.name.lower()) for n, d in zip(names, study.directions, strict=True)]


# ---------------------------------------------------------------- one trial


def named_constraints(trial: FrozenTrial) -> dict[str, float]:
    """The trial's constraints by name; the positional copy kept for optuna-dashboard ("0", "1") left out."""
    return {k: v for k, v in trial.constraints.items() if not k.isdigit()}


def reason(trial: FrozenTrial, bounds: list[dict[str, Any]] | None = None) -> str:
    """Why a trial is not a feasible measurement: the recorded reason, else each broken bound as
    `metric = value > bound` (with the study's `bounds`), else the violated constraint names."""
    explicit = record.INFEASIBLE_REASON.get(trial) or record.FAIL_REASON.get(trial)
    if explicit:
        return str(explicit)
    if bounds and record.metrics(trial):
        broken = broken_constraints(record.metrics(trial), bounds)
        if broken:
            return "; ".join(broken)
    violated = [f"{name} (violated by {value:.3g})" for name, value in named_constraints(trial).items() if value > 0]
    return ("constraint " + ", ".join(violated)) if violated else ""


def _category(trial: FrozenTrial, pareto: bool) -> str:
    if trial.state != TrialState.COMPLETE:
        return trial.state.name.lower()  # running | fail | waiting | pruned
    if not record.feasible(trial):
        return INFEASIBLE
    return PARETO if pareto else DOMINATED


def _warm_start_from(attrs: dict[str, Any]) -> str | None:
    """`STUDY#N` for a trial a warm start carried over (copied) or enqueued from an earlier study."""
    origin = record.WARM_START_FROM.get(attrs)
    return f"{origin['study']}#{origin['trial']}" if isinstance(origin, dict) else None


def trial_row(trial: FrozenTrial, pareto_numbers: frozenset[int] = frozenset(),
              bounds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    attrs = trial.user_attrs
    owner = record.OWNER.get(attrs) or {}
    env = record.ENVIRONMENT.get(attrs) or {}
    pareto = trial.number in pareto_numbers
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "outcome": record.OUTCOME.get(attrs, ""),
        "category": _category(trial, pareto),
        "feasible": record.feasible(trial),
        "pareto": pareto,
        "baseline": record.is_baseline(attrs),
        "reason": reason(trial, bounds),
        "overloaded": overload_note(attrs),
        "stopped_early": stopped_early_note(attrs),
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
        "wall_s": record.WALL_S.get(attrs),
        "datetime_start": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None,
        "retry_of": record.RETRY_OF.get(attrs),
        "warm_start_from": _warm_start_from(attrs),
        "device_name": env.get("device_name"),
        "host": owner.get("host"),
        "gpu": None if owner.get("gpu") is None else str(owner.get("gpu")),
        "artifact_dir": record.ARTIFACT_DIR.get(attrs),
        "contaminated": bool(record.CONTAMINATED.get(attrs)),  # its window compiled, even measured again
        "host_busy": bool(record.HOST_BUSY.get(attrs)),
    }
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    metrics = record.metrics(attrs)
    row.update({name: metrics[name] for name in METRICS if name in metrics})
    return row


# ---------------------------------------------------------------- whole study


def pareto_numbers(study: optuna.Study) -> frozenset[int]:
    """Trial numbers of the feasible Pareto set over all objectives (`record.front`: `study.best_trials`
    without same-as copies)."""
    try:
        return frozenset(t.number for t in record.front(study))
    except (ValueError, RuntimeError):  # single-objective study without a completed trial
        return frozenset()


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, feasibility, params (`param_*`), metrics, provenance."""
    front = pareto_numbers(study)
    bounds = record.constraints(study)
    rows = [trial_row(t, front, bounds) for t in study.get_trials(deepcopy=False)]
    frame = pd.DataFrame(rows)
    for column in BASE_COLUMNS:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    return frame


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto set (`study.best_trials`), same columns as `trials_frame`."""
    frame = trials_frame(study)
    return frame[frame["pareto"].astype(bool)].reset_index(drop=True)


# Unit suffixes of contract metric names (longest first) and words written as abbreviations.
_UNIT_SUFFIXES = ("_j_per_tok", "_tok_s", "_rps", "_mib", "_gib", "_ms", "_mhz", "_pct", "_w", "_s")
_WORDS = {"ttft": "TTFT", "tpot": "TPOT", "kl": "KL", "mbu": "MBU", "mfu": "MFU", "ci": "CI"}


def metric_label(metric: str) -> str:
    """A metric as an axis title with its unit: `throughput (tok/s)`, `p99 latency (ms)`."""
    unit = METRICS.get(metric, ("",))[0]
    stem = next((metric[: -len(s)] for s in _UNIT_SUFFIXES if metric.endswith(s)), metric)
    words = stem.split("_")
    quantile = [w for w in words if len(w) > 1 and w[0] == "p" and w[1:].isdigit()]
    words = quantile[:1] + [_WORDS.get(w, w) for w in words if w not in quantile[:1]]
    name = " ".join(words) or metric
    return f"{name} ({unit})" if unit and unit not in ("1", "ratio", "") else name


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c in METRICS]


def param_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("param_")]


def best_per_objective(frame: pd.DataFrame, objs: list[Objective]) -> pd.DataFrame:
    """Best feasible value per objective, its trial, the measured baseline's value and the change
    as a signed percentage (`best_vs_baseline_pct`: +83 means 83 % more than the baseline).

    The baseline counts when it was measured, feasible or not: the change says how far the best
    config is from doing nothing, whether or not doing nothing met the bounds."""
    feasible = frame[frame["feasible"].astype(bool)] if len(frame) else frame
    measured = frame[(frame["outcome"] == "ok") & (frame["state"] == "COMPLETE")] if len(frame) else frame
    baseline = measured[measured["baseline"].astype(bool)] if len(measured) else measured
    rows = []
    for o in objs:
        values = feasible[o.metric].dropna() if o.metric in feasible else pd.Series(dtype=float)
        if values.empty:
            rows.append({"objective": o.metric, "direction": o.direction, "best": None, "trial": None,
                         "baseline": None, "best_vs_baseline_pct": None})
            continue
        index = values.idxmax() if o.direction == "maximize" else values.idxmin()
        base = baseline[o.metric].dropna() if o.metric in baseline else pd.Series(dtype=float)
        base_value = float(base.iloc[0]) if not base.empty else None
        best = float(values[index])
        rows.append({"objective": o.metric, "direction": o.direction, "best": best,
                     "trial": int(frame.loc[index, "number"]), "baseline": base_value,
                     "best_vs_baseline_pct": change_pct(best, base_value)})
    return pd.DataFrame(rows, columns=["objective", "direction", "best", "trial", "baseline", "best_vs_baseline_pct"])


def baseline_status(frame: pd.DataFrame) -> str:
    """What is true of the study's baseline: measured | measured, infeasible | failed | not run."""
    rows = frame[frame["baseline"].astype(bool)] if len(frame) else frame
    if rows.empty:
        return "not run"
    measured = rows[(rows["state"] == "COMPLETE") & (rows["outcome"] == "ok")]
    if measured.empty:
        return "failed" if (rows["state"] == "FAIL").any() else "infeasible (not runnable)"
    return "measured" if bool(measured["feasible"].iloc[0]) else "measured, infeasible"


def best_delta_text(best: Any, change: Any, status: str) -> str:
    """The line under a best-value tile: the change vs the baseline, or why there is none."""
    if best is None or pd.isna(best):
        return "no feasible trial yet"
    if change is None or pd.isna(change):
        return {"not run": "no baseline in this study", "failed": "baseline failed (no measurement)"}.get(
            status, f"baseline {status}: no value")
    if abs(change) < 0.05:
        return "the baseline is best" + (" (baseline infeasible)" if status == "measured, infeasible" else "")
    return f"{change:+.1f}% vs baseline" + (" (infeasible)" if status == "measured, infeasible" else "")


def ordered_columns(frame: pd.DataFrame, objs: list[Objective]) -> pd.DataFrame:
    """Columns in reading order: identity, knobs, objectives, verdict, other metrics, provenance."""
    head = [c for c in ("number", "category", "baseline") if c in frame]
    knobs = param_columns(frame)
    goals = [o.metric for o in objs if o.metric in frame]
    verdict = [c for c in ("feasible", "reason", "overloaded", "stopped_early") if c in frame]
    metrics = [c for c in metric_columns(frame) if c not in goals]
    first = head + knobs + goals + verdict + metrics
    return frame[first + [c for c in frame.columns if c not in first]]


def _distinct(trials: list[FrozenTrial], section: record.Attr, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for t in trials:
        picked = {k: (section.get(t) or {}).get(k) for k in keys}
        if any(v is not None for v in picked.values()) and picked not in seen:
            seen.append(picked)
    return seen


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """What a reviewer reads first: what was searched, where it ran, how it went."""
    trials = study.get_trials(deepcopy=False)
    states = pd.Series([t.state.name for t in trials], dtype=object).value_counts().to_dict()
    outcomes = pd.Series([record.OUTCOME.get(t, "") for t in trials], dtype=object)
    return {
        "study": study.study_name,
        "runner": record.STUDY_RUNNER.get(study),
        "space_source": record.STUDY_SPACE_SOURCE.get(study),
        "space": record.STUDY_SPACE.get(study),
        "constraints": record.constraints(study),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in objectives(study)],
        "trials": len(trials),
        "states": {str(k): int(v) for k, v in states.items()},
        "outcomes": {str(k): int(v) for k, v in outcomes[outcomes != ""].value_counts().items()},
        "devices": _distinct(trials, record.ENVIRONMENT, ("device_name", "driver", "device")),
        "versions": _distinct(trials, record.ENVIRONMENT, ("torch", "transformers", "torchao", "python")),
        "workers": _distinct(trials, record.OWNER, ("host", "gpu")),
        "drift": record.STUDY_DRIFT.get(study),  # baseline throughput, last re-measure / first
        "drift_checks": record.STUDY_DRIFT_CHECKS.get(study) or [],
    }


# ---------------------------------------------------------------- artifacts


def artifact_path(attrs: dict[str, Any], name: str) -> Path | None:
    """Where a trial's artifact lies: the path it recorded, else `<artifact_dir>/<name>.csv`."""
    recorded = (record.ARTIFACTS.get(attrs) or {}).get(name)
    candidates = [Path(recorded)] if recorded else []
    folder = record.ARTIFACT_DIR.get(attrs)
    if folder:
        candidates += [Path(folder) / f"{name}.csv", Path(folder) / f"{name}.parquet"]
    return next((p for p in candidates if p.is_file()), None)


def load_artifact(attrs: dict[str, Any], name: str) -> pd.DataFrame | None:
    """A trial's per-request samples (`requests`) or resource timeline (`timeline`), if recorded."""
    path = artifact_path(attrs, name)
    if path is None:
        return None
    try:
        return read_table(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def stacked_artifact(study: optuna.Study, numbers: list[int], name: str) -> pd.DataFrame:
    """The same artifact of several trials, one frame with a `trial` column (for overlays)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    parts = []
    for number in numbers:
        frame = load_artifact(by_number[number].user_attrs, name) if number in by_number else None
        if frame is not None and len(frame):
            parts.append(frame.assign(trial=f"#{number}"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---------------------------------------------------------------- CSV / Parquet


def arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column; params of mixed choices (False, "on") become text."""
    out = frame.copy()
    for column in out.select_dtypes(include="object").columns:
        kinds = {type(v) for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1:
            out[column] = out[column].map(lambda v: v if v is None else str(v))
    return out


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write a frame as CSV or Parquet, chosen by the file suffix."""
    path = Path(path)
    if path.suffix == ".parquet":
        arrow_safe(frame).to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    arrow_safe(frame).to_parquet(buffer, index=False)
    return buffer.getvalue()
