"""Study -> pandas frames with the contract's metric names as columns."""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from runners.contract import METRICS


def _feasible(trial: FrozenTrial) -> bool:
    constraints = trial.system_attrs.get("constraints") or [
        v for k, v in trial.system_attrs.items() if k.startswith("constraints:")]
    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in constraints)


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "outcome": attrs.get("outcome", ""),
        "feasible": _feasible(trial),
        "baseline": bool(attrs.get("baseline", False)),
        "reason": attrs.get("infeasible_reason") or attrs.get("fail_reason") or "",
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
    }
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    metrics = attrs.get("metrics") or {}
    row.update({name: metrics[name] for name in METRICS if name in metrics})
    env = attrs.get("environment") or {}
    row["device_name"] = env.get("device_name")
    row["host"] = (attrs.get("owner") or {}).get("host")
    row["artifact_dir"] = attrs.get("artifact_dir")
    return row


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, feasibility, params (`param_*`), metrics, provenance."""
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto set (`study.best_trials`), same columns as `trials_frame`."""
    try:
        best = study.best_trials
    except ValueError:
        best = []
    return pd.DataFrame([trial_row(t) for t in best], columns=trials_frame(study).columns)
