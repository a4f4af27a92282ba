"""The host's drift over a study: the baseline configuration measured again, compared to its
first measurement (`drift` = throughput now / first, every check kept in `drift_checks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import record
from tuner.progress import Progress
from tuner.recovery import counted_trials
from tuner.space import Space
from tuner.tell import trial_config
from tuner.workers import ClaimLock

DRIFT_METRIC = "throughput_tok_s"


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's first completed baseline (not a retry, where one exists)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in complete:
        if record.is_baseline(t) and not record.RETRY_OF.get(t):
            return t
    return next((t for t in complete if record.is_baseline(t)), None)


def measure_drift(study: optuna.Study, space: Space, launcher: Any, out_dir: Path, progress: Progress,
                  claims: ClaimLock) -> float | None:
    """Measure the baseline configuration again and store `drift` = throughput now / first.

    The first baseline trial of the study is the reference. The re-measure is no trial (it uses
    no budget and joins no Pareto front); each one is kept in the study attr `drift_checks`.
    Done once per trial count: a second worker finishing at the same count does not repeat it.
    """
    if not space.search.baseline or not space.params:
        return None
    first = baseline_trial(study)
    if first is None or DRIFT_METRIC not in record.metrics(first):
        progress.say(f"drift not measured: no baseline trial with {DRIFT_METRIC} to compare with")
        return None
    with claims:
        done = counted_trials(study)
        checks = list(record.STUDY_DRIFT_CHECKS.get(study, []))
        if checks and checks[-1].get("after_trials") == done:
            return record.STUDY_DRIFT.get(study)
        record.STUDY_DRIFT_CHECKS.put(study, [*checks, {"after_trials": done, "pending": True}])
    config = trial_config(space, first.params, -1, out_dir / f"drift_{done:05d}")
    outcome = launcher.run(config, Path(config.artifact_dir))
    reference = float(record.metrics(first)[DRIFT_METRIC])
    value = outcome.result.metrics.get(DRIFT_METRIC) if outcome.result is not None else None
    check: dict[str, Any] = {"after_trials": done, "first": reference}
    if value is None or reference <= 0:
        check["unavailable"] = outcome.reason or f"{DRIFT_METRIC} not measured"
        progress.say(f"drift not measured: the baseline re-run gave no {DRIFT_METRIC} ({check['unavailable']})")
        ratio = None
    else:
        ratio = float(value) / reference
        check.update(now=float(value), ratio=ratio)
        if outcome.result.info.get("host_busy"):
            check["host_busy"] = outcome.result.info["host_busy"]
        record.STUDY_DRIFT.put(study, ratio)
        progress.say(f"drift: baseline {DRIFT_METRIC} {reference:.4g} at trial {first.number}, {float(value):.4g} "
                     f"after {done} trials (ratio {ratio:.3f})")
    checks = [c for c in record.STUDY_DRIFT_CHECKS.get(study, []) if not c.get("pending")]
    record.STUDY_DRIFT_CHECKS.put(study, [*checks, check])
    return ratio
