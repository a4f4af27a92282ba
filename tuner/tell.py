"""One trial's config going out and its outcome coming back: everything recorded, then told.

Every outcome becomes data: measured trials are COMPLETE, config failures COMPLETE but
infeasible (told the worst values), crashes and hangs FAIL. The attrs written here are the
ones `tuner.record` declares.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from runners.contract import TrialConfig
from runners.knobs import runner_knobs
from tuner import record
from tuner.launcher import LaunchOutcome
from tuner.space import Space
from tuner.storage import trial_handle


def constraint_dict(c: Any) -> dict[str, Any]:
    return {k: v for k, v in (("metric", c.metric), ("max", c.max), ("min", c.min)) if v is not None}


def trial_config(space: Space, params: dict[str, Any], number: int, artifact_dir: Path) -> TrialConfig:
    knobs = {**space.fixed, **params}
    defaults = {k: v.default for k, v in runner_knobs(space.runner, space.model).items()}
    return TrialConfig(runner=space.runner, model=dict(space.model), device=space.device,
                       workload=dict(space.workload), knobs={**defaults, **knobs}, seed=space.search.seed,
                       artifact_dir=str(artifact_dir.resolve()), trial_number=number, study=space.study,
                       slo=dict(space.slo), constraints=[constraint_dict(c) for c in space.constraints])


def _worst(direction: str) -> float:
    return -math.inf if direction == "maximize" else math.inf


def tell_outcome(study: optuna.Study, trial: optuna.Trial, space: Space, outcome: LaunchOutcome) -> str:
    """Record everything about the trial, then tell Optuna. Returns a one-line detail."""
    record.OUTCOME.put(trial, outcome.state)
    record.WALL_S.put(trial, outcome.wall_s)
    if outcome.state == "fail":
        record.FAIL_REASON.put(trial, outcome.reason)
        record.STDERR_TAIL.put(trial, outcome.stderr_tail)
        study.tell(trial, state=TrialState.FAIL)
        return outcome.reason
    result = outcome.result
    for section in record.RESULT_SECTIONS:
        section.put(trial, getattr(result, section.key))
    record_window_flags(trial, result.info)
    reason = outcome.reason
    values: list[float] = []
    for objective in space.objectives:
        value = result.metrics.get(objective.metric) if result.status == "ok" else None
        if result.status == "ok" and value is None:
            why = result.unavailable.get(objective.metric, "not reported")
            reason = reason or f"objective {objective.metric} not measured: {why}"
        values.append(_worst(objective.direction) if value is None else float(value))
    runnable = result.status == "ok" and not reason
    trial.set_constraint("runnable", 0.0 if runnable else 1.0)
    violations = [0.0 if runnable else 1.0]
    for c in space.constraints:
        value = result.metrics.get(c.metric)
        if runnable and value is None:
            reason = f"constraint metric {c.metric} not measured: {result.unavailable.get(c.metric, 'not reported')}"
        violation = c.violation(float(value)) if value is not None else 1.0
        violations.append(violation)
        trial.set_constraint(c.name, violation)
    stopped = result.info.get("stopped_early") if runnable else None
    # Every trial carries the same constraints (samplers refuse a study whose trials differ).
    trial.set_constraint("stopped_early", 1.0 if stopped else 0.0)
    violations.append(1.0 if stopped else 0.0)
    if stopped:
        # A window stopped once its outcome was decided: measured, but partial, so never on a front.
        record.STOPPED_EARLY.put(trial, stopped)
        reason = f"window stopped early: {stopped['rule']}"
        record.INFEASIBLE_REASON.put(trial, reason)
    store_constraint_list(study, trial, violations)
    if not runnable or any(v > 0 for v in violations):
        # The measured values stay in `metrics`. Told as the worst, an infeasible trial can never
        # dominate: optuna-dashboard's "Best Trial" is the Pareto front of values alone.
        values = [_worst(o.direction) for o in space.objectives]
    if not runnable:
        record.INFEASIBLE_REASON.put(trial, reason)
    tell_values(study, trial, values)
    return reason


def tell_values(study: optuna.Study, trial: optuna.Trial, values: list[float]) -> None:
    """`study.tell(trial, values)`, also when a grid sampler objects after storing them."""
    try:
        study.tell(trial, values)
    except (RuntimeError, KeyError):
        # Optuna's GridSampler.after_trial calls study.stop() once the last point is taken (which
        # raises outside study.optimize), and looks up a grid id that enqueued trials (the
        # baseline) do not have. Optuna stores the trial's state and values even when it raises.
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise


def store_constraint_list(study: optuna.Study, trial: optuna.Trial, violations: list[float]) -> None:
    """Also write the violations as the list Optuna's `constraints_func` stores.

    Optuna 5's samplers read the named `constraints:<name>` attributes `set_constraint` writes;
    optuna-dashboard reads only the plain `constraints` list (a trial without it is drawn as
    feasible). The trial's `constraints` view then holds both (named keys and "0", "1", ...),
    with the same values; `reports.frames.named_constraints` shows the named ones.
    """
    trial_handle(study, trial).set_system_attr(record.CONSTRAINT_LIST_KEY, [float(v) for v in violations])


def record_window_flags(trial: optuna.Trial, info: dict[str, Any]) -> None:
    """`contaminated`: the window compiled/captured/autotuned even when measured again (the
    evidence of both windows); `remeasured`: the first window did, the stored one did not (a
    shape set-up missed); `host_busy`: other processes used this GPU / CPU meanwhile."""
    for flag in record.WINDOW_FLAGS:
        if info.get(flag.key):
            flag.put(trial, info[flag.key])


def grid_exhausted(study: optuna.Study) -> bool:
    """Every point of a grid study has been tried (more trials would repeat points)."""
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)
