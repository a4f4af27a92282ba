"""Run (or resume) an Optuna study over a validated space.

The loop is ask -> launch the runner in a child process -> tell, so every outcome becomes
data: measured trials are COMPLETE, config failures COMPLETE-but-infeasible, crashes and hangs
FAIL. The trial budget is the study's total; a re-run does only what is missing. Crashes
(FAIL) do not use the budget: a run stops after MAX_SAME_CRASH identical crashes in a row or
`fail_limit` crashes in all, so fixing the cause and running again continues the study.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from runners.contract import TrialConfig
from runners.knobs import runner_knobs
from tuner import search as search_policy
from tuner.errors import UsageError
from tuner.launcher import LaunchOutcome, ProcessLauncher, WarmLauncher
from tuner.paths import inside
from tuner.progress import Progress, final_lines
from tuner.space import Space, apply_overrides, grid_values, validate
from tuner.storage import heartbeat_interval, journal_path, sqlite_path, storage_kind
from tuner.workers import ClaimLock, Heartbeat, PrefixedStream, worker_identity

optuna.logging.set_verbosity(optuna.logging.WARNING)
# set_metric_names is stable in practice; its "experimental" warning would only add noise.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Optuna warns when `ask` meets a heartbeat storage outside `optimize`; this loop runs the same
# protocol itself (fail_stale_trials before ask, a heartbeat thread while the trial runs).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
# Unrunnable trials carry -inf/+inf values on purpose (so every sampler ranks them last); the GP
# sampler clips them to the worst finite value for its fit and would say so on every suggestion.
warnings.filterwarnings("ignore", message="Clip non-finite values to the min/max finite values")
# Seconds between looks at other workers' running trials once the budget is all claimed.
WAIT_POLL_S = 1.0
# The same crash this many times in a row stops the study with that error.
MAX_SAME_CRASH = 3


@dataclass
class RunOptions:
    storage_url: str
    out_dir: Path
    quiet: bool = False
    warm: bool = False
    worker: dict[str, Any] = field(default_factory=dict)  # merged into each trial's `owner`
    join: bool = False  # a worker joining by name: keep the study's stored space as it is


@dataclass
class RunSummary:
    study: str
    ran: int
    counted: int
    budget: int
    feasible_pareto: int
    timed_out: bool
    grid_exhausted: bool = False
    completed: int = 0  # trials of the study that reached COMPLETE (feasible or not)
    stopped_by: str = ""  # why this run stopped short of the budget: the repeated crash, the fail limit
    plateau: str = ""  # why the plateau rule (`search.stop`) ended the study, if it did


# ---------------------------------------------------------------- samplers and studies


def make_sampler(space: Space, salt: str = "") -> optuna.samplers.BaseSampler:
    """The space's sampler; a `salt` derives another seed from the space's (see `_worker_ticket`)."""
    search = space.search
    seed = search.seed if not salt else _salted_seed(search.seed, salt)
    startup = search.n_startup_trials or min(10, max(2, search.trials // 3))
    if search.sampler == "auto":
        choice = search_policy.auto_sampler(space)
        if choice.sampler == "grid":
            return _named_sampler(space, "grid", seed, startup)
        startup = search.n_startup_trials or choice.n_startup_trials or startup
        if choice.sampler == "gp" and (exhaustive := search_policy.auto_gp(space, seed, startup)) is not None:
            return exhaustive  # a finite space: the GP scores every untried point (tuner/search.py)
        # `auto` never repeats a tried or running config of a finite space (NoRepeatSampler).
        inner = _named_sampler(space, choice.sampler, seed, startup)
        return search_policy.NoRepeatSampler(inner, seed) if search_policy.space_size(space) < math.inf else inner
    return _named_sampler(space, search.sampler, seed, startup)


def _named_sampler(space: Space, name: str, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    search = space.search
    # Every sampler below reads the constraints each trial records (`trial.set_constraint`:
    # runnable, and one per bound), so infeasible configs steer it away from their region.
    if name == "tpe":
        # Multivariate TPE models the knobs jointly (batch size and quant bits interact); the
        # constant liar treats running trials as bad so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, search.trials // 4)))
    if name == "gp":
        # Optuna's GP conditions on running trials itself (its answer to parallel suggestions).
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {n: grid_values(p) for n, p in space.params.items()}
    return optuna.samplers.GridSampler(grid, seed=seed)


def _salted_seed(seed: int, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:4], "big")


def open_study(space: Space, storage: optuna.storages.BaseStorage, store_space: bool = True) -> optuna.Study:
    """Create or load the study; `store_space` records this space (budget included) for workers."""
    directions = [o.direction for o in space.objectives]
    study = optuna.create_study(study_name=space.study, storage=storage, directions=directions,
                                sampler=make_sampler(space), load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise UsageError(f"study {space.study!r} already exists with directions {stored}; "
                         f"the space asks {directions} (use another --study name)")
    stored_metrics = study.metric_names
    names = [o.metric for o in space.objectives]
    if stored_metrics and stored_metrics != names:
        raise UsageError(f"study {space.study!r} already exists with objectives {stored_metrics}; "
                         f"the space asks {names} (use another --study name)")
    if not stored_metrics:
        study.set_metric_names(names)
        study.set_user_attr("runner", space.runner)
        study.set_user_attr("constraints", [_constraint_dict(c) for c in space.constraints])
    if store_space and (not stored_metrics or study.user_attrs.get("space") != space.raw):
        # The latest `--space` command defines the study (a re-run may raise --trials); workers
        # joining by name read it from here.
        study.set_user_attr("space", space.raw)
        study.set_user_attr("space_source", space.source)
    return study


def space_from_study(study: optuna.Study, overrides: dict[str, Any] | None = None) -> Space:
    """The space a study was last run with (for workers joining it), with e.g. `device` overridden."""
    raw = study.user_attrs.get("space")
    if not raw:
        raise UsageError(f"study {study.study_name!r} was not created by autoglm-tune (no stored space)")
    return validate(apply_overrides(raw, overrides or {}), source=f"study {study.study_name}",
                    default_study=study.study_name)


def _constraint_dict(c: Any) -> dict[str, Any]:
    return {k: v for k, v in (("metric", c.metric), ("max", c.max), ("min", c.min)) if v is not None}


# ---------------------------------------------------------------- budget, baseline, recovery


def owner_identity() -> dict[str, Any]:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": proc.create_time()}


def _owner_alive(owner: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(owner["pid"]))
        return abs(proc.create_time() - float(owner["pid_started"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False


def counted_trials(study: optuna.Study) -> int:
    """Trials that used budget: those running now and finished ones (COMPLETE, PRUNED).

    No FAIL counts. A crash or hang says nothing about the config's merit, so after the cause
    is fixed a re-run must still have budget for it; a run bounds its crashes instead
    (MAX_SAME_CRASH in a row, `fail_limit` in all). A trial whose worker died or was
    interrupted is queued again (by `_requeue`, or by Optuna's RetryHeartbeatStaleTrialCallback),
    and the copy is what counts once a worker claims it.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    # Trials a warm start copied from an earlier study were measured there, not here.
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in states and not t.user_attrs.get("carried_over"))


def fail_limit(budget: int) -> int:
    """Crashes one run tolerates before it stops (they do not use the budget, so bound them)."""
    return max(MAX_SAME_CRASH, budget)


def repeated_crash(study: optuna.Study) -> str:
    """The fail reason when the last MAX_SAME_CRASH finished trials all crashed the same way."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    last = sorted(finished, key=lambda t: t.datetime_complete or t.datetime_start)[-MAX_SAME_CRASH:]
    if len(last) < MAX_SAME_CRASH or not all(t.state == TrialState.FAIL and _runner_failed(t) for t in last):
        return ""
    # Crash reasons end with the child's last stderr line; hang reasons name only the timeout.
    reasons = {str(t.user_attrs.get("fail_reason", "")).strip() for t in last}
    return last[-1].user_attrs.get("fail_reason", "") if len(reasons) == 1 else ""


def _runner_failed(trial: optuna.trial.FrozenTrial) -> bool:
    return "outcome" in trial.user_attrs and not trial.user_attrs.get("interrupted")


def recover_stale_trials(study: optuna.Study, progress: Progress) -> int:
    """Trials left RUNNING by a dead process on this host become FAIL and are queued again.

    Journal and SQLite storages have no heartbeat, so the owner host/pid recorded at start
    tells a dead owner from a live worker. Called under the claim lock, so two workers never
    recover (and queue) the same trial twice.
    """
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner") or {}
        # No owner under the claim lock: its process died between `ask` and recording itself
        # (a kill -9 right then); left RUNNING it would hold a unit of budget forever.
        if owner and (owner.get("host") != host or _owner_alive(owner)):
            continue
        storage = study._storage
        why = (f"owner process {owner.get('pid')} died mid-trial" if owner
               else "the process that started it died before recording itself (died mid-trial)")
        try:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", why)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile (a worker not taking the lock, e.g. an older version)
        _requeue(study, t)
        recovered += 1
    if recovered:
        progress.say(f"recovered {recovered} trial(s) left running by a dead process; queued again")
    return recovered


def recover_dead_workers(study: optuna.Study, storage: optuna.storages.BaseStorage, progress: Progress) -> None:
    """Fail and re-queue trials whose worker died: by heartbeat where the storage has one."""
    if heartbeat_interval(storage):
        # Optuna's own: fails trials silent past the grace period, then runs the storage's
        # RetryHeartbeatStaleTrialCallback, which queues a WAITING copy.
        optuna.storages.fail_stale_trials(study)
    else:
        recover_stale_trials(study, progress)


def _requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    attrs = {"retry_of": trial.number}
    if trial.user_attrs.get("baseline"):
        attrs["baseline"] = True
    study.enqueue_trial(trial.params, user_attrs=attrs)


def ensure_baseline(study: optuna.Study, space: Space) -> None:
    """Enqueue the unmodified default configuration once, as the study's first trial.

    A baseline that crashed (FAIL) is queued again on the next run, so fixing the cause brings
    the study its reference point back.
    """
    if not space.search.baseline or not space.params:
        return
    if any(t.user_attrs.get("baseline") and t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(space.baseline_params(), user_attrs={"baseline": True})


# ---------------------------------------------------------------- one trial


def trial_config(space: Space, params: dict[str, Any], number: int, artifact_dir: Path) -> TrialConfig:
    knobs = {**space.fixed, **params}
    defaults = {k: v.default for k, v in runner_knobs(space.runner, space.model).items()}
    return TrialConfig(runner=space.runner, model=dict(space.model), device=space.device,
                       workload=dict(space.workload), knobs={**defaults, **knobs}, seed=space.search.seed,
                       artifact_dir=str(artifact_dir.resolve()), trial_number=number, study=space.study,
                       slo=dict(space.slo), constraints=[_constraint_dict(c) for c in space.constraints])


def _worst(direction: str) -> float:
    return -math.inf if direction == "maximize" else math.inf


def tell_outcome(study: optuna.Study, trial: optuna.Trial, space: Space, outcome: LaunchOutcome) -> str:
    """Record everything about the trial, then tell Optuna. Returns a one-line detail."""
    trial.set_user_attr("outcome", outcome.state)
    trial.set_user_attr("wall_s", outcome.wall_s)
    if outcome.state == "fail":
        trial.set_user_attr("fail_reason", outcome.reason)
        trial.set_user_attr("stderr_tail", outcome.stderr_tail)
        study.tell(trial, state=TrialState.FAIL)
        return outcome.reason
    result = outcome.result
    for key in ("metrics", "unavailable", "environment", "artifacts", "info"):
        trial.set_user_attr(key, getattr(result, key))
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
        trial.set_constraint(f"{c.metric}{'<=' + str(c.max) if c.max is not None else ''}"
                             f"{'>=' + str(c.min) if c.min is not None else ''}", violation)
    stopped = result.info.get("stopped_early") if runnable else None
    # Every trial carries the same constraints (samplers refuse a study whose trials differ).
    trial.set_constraint("stopped_early", 1.0 if stopped else 0.0)
    violations.append(1.0 if stopped else 0.0)
    if stopped:
        # A window stopped once its outcome was decided: measured, but partial, so never on a front.
        trial.set_user_attr("stopped_early", stopped)
        reason = f"window stopped early: {stopped['rule']}"
        trial.set_user_attr("infeasible_reason", reason)
    store_constraint_list(study, trial, violations)
    if not runnable or any(v > 0 for v in violations):
        # The measured values stay in `metrics`. Told as the worst, an infeasible trial can never
        # dominate: optuna-dashboard's "Best Trial" is the Pareto front of values alone.
        values = [_worst(o.direction) for o in space.objectives]
    if not runnable:
        trial.set_user_attr("infeasible_reason", reason)
    try:
        study.tell(trial, values)
    except (RuntimeError, KeyError):
        # Optuna's GridSampler.after_trial calls study.stop() once the last point is taken (which
        # raises outside study.optimize), and looks up a grid id that enqueued trials (the
        # baseline) do not have. Optuna stores the trial's state and values even when it raises.
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise
    return reason


def store_constraint_list(study: optuna.Study, trial: optuna.Trial, violations: list[float]) -> None:
    """Also write the violations as the list Optuna's `constraints_func` stores.

    Optuna 5's samplers read the named `constraints:<name>` attributes `set_constraint` writes;
    optuna-dashboard reads only the plain `constraints` list (a trial without it is drawn as
    feasible). The trial's `constraints` view then holds both (named keys and "0", "1", ...),
    with the same values; `reports.frames.named_constraints` shows the named ones.
    """
    study._storage.set_trial_system_attr(trial._trial_id, "constraints", [float(v) for v in violations])


# Runner info keys lifted to trial user attrs, so a reader sees at once whether a number is clean.
WINDOW_FLAGS = ("contaminated", "remeasured", "host_busy")


def record_window_flags(trial: optuna.Trial, info: dict[str, Any]) -> None:
    """`contaminated`: the window compiled/captured/autotuned even when measured again (the
    evidence of both windows); `remeasured`: the first window did, the stored one did not (a
    shape set-up missed); `host_busy`: other processes used this GPU / CPU meanwhile."""
    for flag in WINDOW_FLAGS:
        if info.get(flag):
            trial.set_user_attr(flag, info[flag])


def grid_exhausted(study: optuna.Study) -> bool:
    """Every point of a grid study has been tried (more trials would repeat points)."""
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)


# ---------------------------------------------------------------- the loop


def run_study(space: Space, storage: optuna.storages.BaseStorage, options: RunOptions) -> RunSummary:
    """Claim and run trials until the study's total budget is used; one of possibly many workers."""
    gpu = options.worker.get("gpu")
    progress = Progress(space.search.trials, options.quiet,
                        PrefixedStream(sys.stdout, f"gpu {gpu}: ") if gpu is not None else None)
    study = open_study(space, storage, store_space=not options.join)
    claims = ClaimLock(options.storage_url, storage, space.study)
    with claims:
        recover_dead_workers(study, storage, progress)
        apply_warm_start(study, space, options.storage_url, progress)
        ensure_baseline(study, space)
        ticket = _worker_ticket(study)
    if ticket:
        study.sampler = make_sampler(space, salt=f"worker {ticket}")
    budget = space.search.trials
    progress.say(f"study {space.study}: {counted_trials(study)}/{budget} trials done; runner {space.runner} on "
                 f"{space.device}; storage {options.storage_url}; artifacts {options.out_dir}")
    cache = cache_dir_for(options.storage_url, options.out_dir)
    launcher = (WarmLauncher(space.search.trial_timeout_s, options.out_dir / "runner-stderr.log", cache_dir=cache)
                if options.warm else ProcessLauncher(space.search.trial_timeout_s, cache_dir=cache))
    deadline = time.monotonic() + space.search.timeout_min * 60 if space.search.timeout_min else math.inf
    ran, timed_out, waiting, exhausted, fails, stopped_by, plateau = 0, False, False, False, 0, "", ""
    try:
        while True:
            if time.monotonic() >= deadline:
                timed_out = True
                progress.say(f"time budget of {space.search.timeout_min} min reached; stopping")
                break
            if grid_exhausted(study):
                exhausted = True
                progress.say(f"every point of the grid has been tried ({counted_trials(study)} trials); stopping")
                break
            trial = claim_trial(study, storage, space, options, claims, progress)
            if trial is None:
                # All budget is claimed. Stay while other workers run trials: if one of them
                # dies, its trial is handed back and someone must run it again.
                others = _live_running(study, storage)
                if not others:
                    break
                if not waiting:
                    progress.say(f"budget claimed; waiting for {len(others)} trial(s) running on other workers")
                waiting = True
                time.sleep(WAIT_POLL_S)
                continue
            waiting = False
            state, fatal = _one_trial(study, storage, trial, space, options, launcher, progress, budget)
            ran += 1
            fails += state == "fail" and not fatal
            # A trial whose files could not be written (read-only or full disk) stops the run cleanly.
            stopped_by = fatal or _crash_stop(study, fails, budget)
            if stopped_by:
                progress.say(f"stopping: {stopped_by}")
                break
            if space.search.drift_every and ran % space.search.drift_every == 0:
                measure_drift(study, space, launcher, options, progress, claims)
            plateau = check_plateau(study, space, progress)
            if plateau:
                break
        if ran and not timed_out and not stopped_by:
            measure_drift(study, space, launcher, options, progress, claims)
        elif ran and timed_out:
            progress.say("drift not measured again: the time budget is used")
    finally:
        launcher.close()
    pareto = _pareto_size(study)
    completed = sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    stop_note = " (stopped on a plateau, search.stop)" if plateau else ""
    progress.say(f"done: {counted_trials(study)}/{budget} trials{stop_note}, {pareto} on the feasible Pareto front")
    for line in final_lines(study, space, options.storage_url):
        progress.say(line)
    return RunSummary(space.study, ran, counted_trials(study), budget, pareto, timed_out, exhausted,
                      completed, stopped_by, plateau)


def _crash_stop(study: optuna.Study, fails: int, budget: int) -> str:
    """Why this run must stop crashing: one error repeated, or too many crashes in all."""
    same = repeated_crash(study)
    if same:
        return (f"the same crash in {MAX_SAME_CRASH} trials in a row: {same} "
                f"(fix it and run the same command again: crashed trials do not use the budget)")
    if fails >= fail_limit(budget):
        return f"{fails} trials crashed in this run (limit {fail_limit(budget)}); see their fail_reason"
    return ""


def cache_dir_for(storage_url: str, out_dir: Path) -> Path:
    """Where the children's compile caches and quality references live: beside the study's
    storage file (`runs/.cache` for the default journal), so every study stored there shares
    them and a second study of the same model starts warm; beside the artifacts for a database
    server. `AUTOGLM_CACHE_DIR` overrides it (see `tuner.launcher.cache_env`)."""
    kind = storage_kind(storage_url)
    if kind == "journal":
        return journal_path(storage_url).parent / ".cache"
    path = sqlite_path(storage_url) if kind == "sqlite" else None
    return path.parent / ".cache" if path is not None else out_dir / ".cache"


# ---------------------------------------------------------------- drift


DRIFT_METRIC = "throughput_tok_s"


def _baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("baseline") and not t.user_attrs.get("retry_of"):
            return t
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("baseline"):
            return t
    return None


def measure_drift(study: optuna.Study, space: Space, launcher: Any, options: RunOptions, progress: Progress,
                  claims: ClaimLock) -> float | None:
    """Measure the baseline configuration again and store `drift` = throughput now / first.

    The first baseline trial of the study is the reference. The re-measure is no trial (it uses
    no budget and joins no Pareto front); each one is kept in the study attr `drift_checks`.
    Done once per trial count: a second worker finishing at the same count does not repeat it.
    """
    if not space.search.baseline or not space.params:
        return None
    first = _baseline_trial(study)
    if first is None or DRIFT_METRIC not in (first.user_attrs.get("metrics") or {}):
        progress.say(f"drift not measured: no baseline trial with {DRIFT_METRIC} to compare with")
        return None
    with claims:
        done = counted_trials(study)
        checks = list(study.user_attrs.get("drift_checks", []))
        if checks and checks[-1].get("after_trials") == done:
            return study.user_attrs.get("drift")
        study.set_user_attr("drift_checks", [*checks, {"after_trials": done, "pending": True}])
    config = trial_config(space, first.params, -1, options.out_dir / f"drift_{done:05d}")
    outcome = launcher.run(config, Path(config.artifact_dir))
    reference = float(first.user_attrs["metrics"][DRIFT_METRIC])
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
        study.set_user_attr("drift", ratio)
        progress.say(f"drift: baseline {DRIFT_METRIC} {reference:.4g} at trial {first.number}, {float(value):.4g} "
                     f"after {done} trials (ratio {ratio:.3f})")
    checks = [c for c in study.user_attrs.get("drift_checks", []) if not c.get("pending")]
    study.set_user_attr("drift_checks", [*checks, check])
    return ratio


def apply_warm_start(study: optuna.Study, space: Space, storage_url: str, progress: Progress) -> None:
    """`search.warm_start`, once per study (under the claim lock): seed it from the earlier study.

    An identical space's copies include the earlier baseline, so none is queued again; for an
    overlapping space the baseline is queued before the carried configs, so it stays first.
    """
    rule = space.search.warm_start
    if rule is None or "warm_start" in study.user_attrs:
        return
    source = search_policy.load_source(rule, storage_url)
    result = search_policy.warm_start(study, space, source, lambda: ensure_baseline(study, space))
    study.set_user_attr("warm_start", {"study": result.source, "mode": result.mode, "trials": result.carried})
    progress.say(f"warm start from study {result.source}: {result.detail} "
                 f"(trials {_numbers(result.carried)}; user attr warm_start_from)")


def _numbers(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:20])) + (f", ... ({len(numbers)} in all)" if len(numbers) > 20 else "") \
        if numbers else "none"


def check_plateau(study: optuna.Study, space: Space, progress: Progress) -> str:
    """`search.stop`: why the study stops on a hypervolume plateau now, or ""."""
    rule = space.search.stop
    if rule is None:
        return ""
    found = search_policy.study_plateau(study, rule)
    if found is None:
        return ""
    evidence = found.describe(rule)
    study.set_user_attr("stopped", {"rule": "plateau", "evidence": evidence})
    progress.say(f"stopping on a plateau: {evidence}")
    return evidence


def _worker_ticket(study: optuna.Study) -> int:
    """How many workers (study runs) came to this study before this one; under the claim lock.

    The first worker samples with the space's seed, so a one-worker study reproduces; every
    later one (a parallel worker, or a resumed run that would otherwise replay the first run's
    proposals) derives its own seed from its ticket. Workers seeded alike would propose the very
    same configs side by side. The workload seed stays the study's, so trials stay comparable.
    """
    ticket = int(study.user_attrs.get("workers_started", 0))
    study.set_user_attr("workers_started", ticket + 1)
    return ticket


def claim_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, space: Space,
                options: RunOptions, claims: ClaimLock, progress: Progress) -> optuna.Trial | None:
    """Under the claim lock: recover dead workers' trials, count, and ask if budget is left.

    The new trial is RUNNING (and, on heartbeat storages, has its first heartbeat) before the
    lock is released, so the next worker's count includes it: the budget is exact.
    """
    with claims:
        recover_dead_workers(study, storage, progress)
        if counted_trials(study) >= space.search.trials:
            return None
        trial = study.ask(space.distributions())  # pops a queued retry first, if any
        if heartbeat_interval(storage):
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("owner", {**owner_identity(), **worker_identity(space.device), **options.worker})
        history = storage.get_trial_system_attrs(trial._trial_id).get("retry_history")
        if history:  # a RetryHeartbeatStaleTrialCallback copy: name the trial it re-runs
            trial.set_user_attr("retry_of", history[-1])
    return trial


def _live_running(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    """Other workers' RUNNING trials that will either finish or be recovered by a claim.

    With heartbeats, every trial a worker of ours owns; without, only those of live processes
    on this host (a dead owner's trial is recovered at the next claim; another host's cannot be
    judged without a heartbeat).
    """
    beats = bool(heartbeat_interval(storage))
    host = socket.gethostname()
    live = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if owner and (beats or (owner.get("host") == host and _owner_alive(owner))):
            live.append(t)
    return live


def _pareto_size(study: optuna.Study) -> int:
    try:
        return len(study.best_trials)
    except ValueError:
        return 0


def _one_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: optuna.Trial, space: Space,
               options: RunOptions, launcher: Any, progress: Progress, budget: int) -> tuple[str, str]:
    """Run and record one trial; returns its launch state (ok | infeasible | fail | stale) and,
    when the study must stop (its files could not be written), the reason, else ""."""
    artifact_dir = inside(options.out_dir, f"trial_{trial.number:05d}")
    config = trial_config(space, trial.params, trial.number, artifact_dir)
    trial.set_user_attr("config", _plain(config))
    trial.set_user_attr("artifact_dir", config.artifact_dir)
    try:
        with Heartbeat(storage, trial._trial_id), progress.running(trial.number, artifact_dir):
            outcome = launcher.run(config, artifact_dir)
    except KeyboardInterrupt:
        launcher.close()
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("fail_reason", "interrupted by the user")
        study.tell(trial, state=TrialState.FAIL)
        _requeue(study, study.trials[trial.number])
        raise
    if outcome.fatal:
        # Not the config's fault: the trial does not use budget and runs again on the next start.
        trial.set_user_attr("interrupted", True)
    try:
        detail = tell_outcome(study, trial, space, outcome)
    except optuna.exceptions.UpdateFinishedTrialError:
        # This worker was silent past the grace period (suspended, network cut): another worker
        # failed the trial and queued a retry, which will produce the result instead.
        progress.say(f"trial {trial.number} was failed as stale by another worker; its result is dropped")
        return "stale", ""
    frozen = study.trials[trial.number]
    progress.trial_done(study, frozen, counted_trials(study), outcome.state, detail,
                        [o.metric for o in space.objectives], outcome.wall_s)
    if outcome.fatal:
        _requeue(study, frozen)
        return outcome.state, outcome.reason
    return outcome.state, ""


def _plain(config: TrialConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)
