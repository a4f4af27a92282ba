"""The trial record: every user attr the tuner writes on a trial or a study, declared once.

The tuner writes through these declarations (`tuner.tell`, `tuner.study`, `tuner.recovery`,
`tuner.drift`); `reports`, `ui/` (the dashboard) and `tuner.regress` read through them, so an
attr's name is spelled in this module only (`tests/test_layers.py` checks). Each
`Attr` says its key, the types its value may have and what it means; `Attr.get` reads it
from a trial, a study or a plain `user_attrs` mapping, `Attr.put` writes it.

The one feasibility rule lives here too (`feasible`, `measured`, `usable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState


@dataclass(frozen=True)
class Attr:
    """One user attr: its key in Optuna's storage, the value's types, what it means."""

    key: str
    kinds: tuple[type, ...]
    meaning: str

    def get(self, source: Any, default: Any = None) -> Any:
        """The value on a trial or study (anything with `user_attrs`) or in an attrs mapping."""
        attrs = source if isinstance(source, Mapping) else source.user_attrs
        return attrs.get(self.key, default)

    def recorded(self, source: Any) -> bool:
        """Whether the attr is recorded at all (any value, even a false one)."""
        attrs = source if isinstance(source, Mapping) else source.user_attrs
        return self.key in attrs

    def put(self, target: Any, value: Any) -> None:
        """Record the value on a running trial, a study or a `tuner.storage.TrialHandle`."""
        target.set_user_attr(self.key, value)

    def entry(self, value: Any) -> dict[str, Any]:
        """`{key: value}`, for `study.enqueue_trial(..., user_attrs=...)`."""
        return {self.key: value}


def _attr(key: str, kinds: type | tuple[type, ...], meaning: str) -> Attr:
    return Attr(key, kinds if isinstance(kinds, tuple) else (kinds,), meaning)


_FLAG = (bool, str, dict, list)  # a window flag: true, or the evidence (the runner's `info` entry)

# ---------------------------------------------------------------- per trial

OUTCOME = _attr("outcome", str, "the launch's state: ok | infeasible | fail")
WALL_S = _attr("wall_s", (int, float), "seconds from launching the runner to its result")
FAIL_REASON = _attr("fail_reason", str, "why a FAIL trial failed (a crash's last stderr line, a hang, a kill)")
STDERR_TAIL = _attr("stderr_tail", str, "the last lines the runner wrote to stderr (FAIL trials)")
METRICS = _attr("metrics", dict, "contract metric name -> measured value (also for infeasible trials)")
UNAVAILABLE = _attr("unavailable", dict, "contract metric name -> why it was not measured")
ENVIRONMENT = _attr("environment", dict, "device, driver and library versions the runner saw")
ARTIFACTS = _attr("artifacts", dict, "artifact name (requests, timeline) -> file path")
INFO = _attr("info", dict, "the runner's free-form notes (serving, ceilings, compile events)")
INFEASIBLE_REASON = _attr("infeasible_reason", str, "why a COMPLETE trial is not a feasible measurement")
STOPPED_EARLY = _attr("stopped_early", dict, "{rule, evidence}: the window stopped once its outcome was decided")
CONTAMINATED = _attr("contaminated", _FLAG, "the window compiled/captured/autotuned even when measured again")
REMEASURED = _attr("remeasured", _FLAG, "the first window compiled, the stored (second) one did not")
HOST_BUSY = _attr("host_busy", _FLAG, "other processes used this GPU / CPU during the window")
OWNER = _attr("owner", dict, "the worker running it: host, pid, pid_started, gpu, ...")
RETRY_OF = _attr("retry_of", int, "the number of the trial this one runs again")
BASELINE = _attr("baseline", bool, "the unmodified default configuration (the study's reference)")
CONFIG = _attr("config", dict, "the resolved runners.contract.TrialConfig, as a dict")
ARTIFACT_DIR = _attr("artifact_dir", str, "the folder of the trial's files")
INTERRUPTED = _attr("interrupted", bool, "stopped from outside (Ctrl-C, a dead worker, unwritable files)")
CARRIED_OVER = _attr("carried_over", bool, "copied by a warm start from an earlier study (uses no budget)")
SAME_AS = _attr("same_as", dict, "{trial, why}: the earlier trial with the same effective config whose "
                "record answered this one (no runner launched; tuner.repeats)")
WARM_START_FROM = _attr("warm_start_from", dict, "{study, trial[, extended: true]}: the earlier trial a warm "
                        "start copied or queued (extended: queued one value past the earlier range's edge)")

# Runner `info` entries lifted to trial attrs, so a reader sees at once whether a number is clean.
WINDOW_FLAGS = (CONTAMINATED, REMEASURED, HOST_BUSY)
# The runner result's sections, each stored as the attr of the same name.
RESULT_SECTIONS = (METRICS, UNAVAILABLE, ENVIRONMENT, ARTIFACTS, INFO)

TRIAL_ATTRS: dict[str, Attr] = {a.key: a for a in (
    OUTCOME, WALL_S, FAIL_REASON, STDERR_TAIL, *RESULT_SECTIONS, INFEASIBLE_REASON, STOPPED_EARLY,
    *WINDOW_FLAGS, OWNER, RETRY_OF, BASELINE, CONFIG, ARTIFACT_DIR, INTERRUPTED, CARRIED_OVER, WARM_START_FROM, SAME_AS)}

# ---------------------------------------------------------------- per study

STUDY_RUNNER = _attr("runner", str, "the runner the study's trials ran")
STUDY_CONSTRAINTS = _attr("constraints", list, "the space's bounds: [{metric, max?, min?}, ...]")
STUDY_SPACE = _attr("space", dict, "the raw space (budget included) the latest run used; workers read it")
STUDY_SPACE_SOURCE = _attr("space_source", str, "where that space came from (a file, a bundled name)")
STUDY_DRIFT = _attr("drift", float, "baseline throughput at the last re-measure / at the first")
STUDY_DRIFT_CHECKS = _attr("drift_checks", list, "every baseline re-measure: {after_trials, first, now, ratio, ...}")
STUDY_WARM_START = _attr("warm_start", dict, "{study, mode, trials}: the warm start applied once")
STUDY_STOPPED = _attr("stopped", dict, "{rule, evidence}: why `search.stop` ended the study")
STUDY_WORKERS_STARTED = _attr("workers_started", int, "study runs so far (each worker's sampler seed ticket)")

STUDY_ATTRS: dict[str, Attr] = {a.key: a for a in (
    STUDY_RUNNER, STUDY_CONSTRAINTS, STUDY_SPACE, STUDY_SPACE_SOURCE, STUDY_DRIFT, STUDY_DRIFT_CHECKS,
    STUDY_WARM_START, STUDY_STOPPED, STUDY_WORKERS_STARTED)}


# A system attr, not a user attr: the plain list of violations optuna-dashboard reads (the named
# ones Optuna's samplers read are `trial.set_constraint`'s `constraints:<name>`).
CONSTRAINT_LIST_KEY = "constraints"


# ---------------------------------------------------------------- reading


def metrics(source: Any) -> dict[str, Any]:
    """The trial's measured metrics (empty when none were recorded)."""
    return METRICS.get(source) or {}


def is_baseline(source: Any) -> bool:
    return bool(BASELINE.get(source))


def constraints(study: Any) -> list[dict[str, Any]]:
    """The study's bounds as stored at creation (empty for a study without any)."""
    return STUDY_CONSTRAINTS.get(study) or []


def feasible(trial: FrozenTrial) -> bool:
    """COMPLETE and no constraint violated: the one feasibility rule (Optuna's own, on the
    named constraints `trial.set_constraint` writes and the plain list older studies stored)."""
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def front(study: Any) -> list[FrozenTrial]:
    """The feasible Pareto set, `study.best_trials`, each measured config once: a trial answered
    from an earlier one's record (`same_as`) ties with it exactly, so it adds nothing but a copy.
    Raises what `best_trials` raises (ValueError: a single-objective study with no result)."""
    return [t for t in study.best_trials if not SAME_AS.recorded(t)]


def measured(trial: FrozenTrial) -> bool:
    """COMPLETE with the runner's `ok`: numbers were measured (feasible or not)."""
    return trial.state == TrialState.COMPLETE and OUTCOME.get(trial) == "ok"


def rerunnable(trial: FrozenTrial) -> bool:
    """Measured, with the config to run it again and the metrics to compare with (regress)."""
    return measured(trial) and bool(CONFIG.get(trial)) and bool(METRICS.get(trial))


def usable(trial: FrozenTrial) -> bool:
    """Re-runnable and feasible: a config `autoglm-tune regress --init` may accept."""
    return rerunnable(trial) and feasible(trial)


def runner_failed(trial: FrozenTrial) -> bool:
    """The runner itself failed (an outcome was recorded), not an interruption from outside."""
    return OUTCOME.recorded(trial) and not INTERRUPTED.get(trial)


def problems(attrs: Mapping[str, Any], declared: Mapping[str, Attr] = TRIAL_ATTRS) -> list[str]:
    """Each attr that is undeclared or whose value has another type than declared."""
    found = []
    for key, value in attrs.items():
        attr = declared.get(key)
        if attr is None:
            found.append(f"{key}: not declared in tuner.record")
        elif value is not None and not isinstance(value, attr.kinds):
            found.append(f"{key}: {type(value).__name__}, declared {'/'.join(k.__name__ for k in attr.kinds)}")
    return found
