"""Run (or resume) an Optuna study over a validated space: one worker's loop.

The loop is claim (ask, under the claim lock) -> launch the runner in a child process ->
tell (`tuner.tell`), until the study's total budget is used; `tuner.recovery` says what counts
and repairs dead workers' trials, `tuner.drift` re-measures the baseline, `tuner.samplers`
builds the sampler. The attrs a trial carries are declared in `tuner.record`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from runners.contract import TrialResult
from runners.registry import refused_up_front
from tuner import record, repeats, warm_start
from tuner import search as search_policy
from tuner.drift import measure_drift
from tuner.errors import UsageError
from tuner.final import final_lines
from tuner.launcher import LaunchOutcome, ProcessLauncher, WarmLauncher
from tuner.paths import inside
from tuner.progress import Progress
from tuner.recovery import (
    MAX_SAME_CRASH,
    counted_trials,
    ensure_baseline,
    fail_limit,
    live_running,
    owner_identity,
    recover_dead_workers,
    recover_stale_trials,
    repeated_crash,
    requeue,
)
from tuner.ruled_out import broken_quality_source
from tuner.samplers import make_sampler
from tuner.space import Space, apply_overrides, validate
from tuner.storage import heartbeat_interval, journal_path, sqlite_path, storage_kind, trial_handle
from tuner.tell import constraint_dict, grid_exhausted, record_window_flags, tell_outcome, trial_config
from tuner.workers import ClaimLock, Heartbeat, PrefixedStream, worker_identity

# Re-exported: callers (tests, benchmarks) import the loop's parts from here.
__all__ = ["RunOptions", "RunSummary", "cache_dir_for", "claim_trial", "counted_trials", "ensure_baseline",
           "make_sampler", "open_study", "record_window_flags", "recover_stale_trials", "run_study",
           "space_from_study", "tell_outcome", "trial_config"]

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


# ---------------------------------------------------------------- studies


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
        record.STUDY_RUNNER.put(study, space.runner)
        record.STUDY_CONSTRAINTS.put(study, [constraint_dict(c) for c in space.constraints])
    if store_space and (not stored_metrics or record.STUDY_SPACE.get(study) != space.raw):
        # The latest `--space` command defines the study (a re-run may raise --trials); workers
        # joining by name read it from here.
        record.STUDY_SPACE.put(study, space.raw)
        record.STUDY_SPACE_SOURCE.put(study, space.source)
    return study


def space_from_study(study: optuna.Study, overrides: dict[str, Any] | None = None) -> Space:
    """The space a study was last run with (for workers joining it), with e.g. `device` overridden."""
    raw = record.STUDY_SPACE.get(study)
    if not raw:
        raise UsageError(f"study {study.study_name!r} was not created by autoglm-tune (no stored space)")
    return validate(apply_overrides(raw, overrides or {}), source=f"study {study.study_name}",
                    default_study=study.study_name)


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
                others = live_running(study, storage)
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
                measure_drift(study, space, launcher, options.out_dir, progress, claims)
            plateau = check_plateau(study, space, progress)
            if plateau:
                break
        if ran and not timed_out and not stopped_by:
            measure_drift(study, space, launcher, options.out_dir, progress, claims)
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


def apply_warm_start(study: optuna.Study, space: Space, storage_url: str, progress: Progress) -> None:
    """`search.warm_start`, once per study (under the claim lock): seed it from the earlier study.

    An identical space's copies include the earlier baseline, so none is queued again; for an
    overlapping space the baseline is queued before the carried configs, so it stays first.
    """
    rule = space.search.warm_start
    if rule is None or record.STUDY_WARM_START.recorded(study):
        return
    source = warm_start.load_source(rule, storage_url)
    result = warm_start.warm_start(study, space, source, lambda: ensure_baseline(study, space))
    record.STUDY_WARM_START.put(study, {"study": result.source, "mode": result.mode, "trials": result.carried})
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
    record.STUDY_STOPPED.put(study, {"rule": "plateau", "evidence": evidence})
    progress.say(f"stopping on a plateau: {evidence}")
    return evidence


def _worker_ticket(study: optuna.Study) -> int:
    """How many workers (study runs) came to this study before this one; under the claim lock.

    The first worker samples with the space's seed, so a one-worker study reproduces; every
    later one (a parallel worker, or a resumed run that would otherwise replay the first run's
    proposals) derives its own seed from its ticket. Workers seeded alike would propose the very
    same configs side by side. The workload seed stays the study's, so trials stay comparable.
    """
    ticket = int(record.STUDY_WORKERS_STARTED.get(study, 0))
    record.STUDY_WORKERS_STARTED.put(study, ticket + 1)
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
        row = trial_handle(study, trial)
        if heartbeat_interval(storage):
            row.record_heartbeat()
        record.OWNER.put(trial, {**owner_identity(), **worker_identity(space.device), **options.worker})
        history = row.system_attrs().get("retry_history")
        if history:  # a RetryHeartbeatStaleTrialCallback copy: name the trial it re-runs
            record.RETRY_OF.put(trial, history[-1])
    return trial


def _pareto_size(study: optuna.Study) -> int:
    try:
        return len(record.front(study))
    except ValueError:
        return 0


def _answer_repeat(study: optuna.Study, trial: optuna.Trial, space: Space, config: Any, progress: Progress) -> bool:
    """Answer the trial from an earlier one with the same effective config (`tuner.repeats`), if any."""
    started = time.monotonic()
    repeat = repeats.find_repeat(study, space, config)
    if repeat is None:
        return False
    repeats.tell_repeat(study, trial, repeat, time.monotonic() - started)
    frozen = study.trials[trial.number]
    progress.trial_done(study, frozen, counted_trials(study), record.OUTCOME.get(frozen, ""), "",
                        [o.metric for o in space.objectives], record.WALL_S.get(frozen, 0.0),
                        same_as=f"#{repeat.source.number} ({repeat.why})")
    return True


def _known_without_running(study: optuna.Study, space: Space, config: Any) -> tuple[LaunchOutcome, str] | None:
    """The outcome of a trial known to be infeasible before it runs, and how it was known, or None:
    a combination its runner refuses on any device (the child would say the same after its
    start-up), or a stack whose quality an earlier trial measured over a bound (tuner/ruled_out.py:
    the runner scores quality once per built model and KV policy)."""
    if refused := refused_up_front(space.runner, space.model, config.knobs):
        result = TrialResult("infeasible", reason=refused, info={"refused_up_front": True})
        return LaunchOutcome("infeasible", result, refused), "refused up front"
    if (known := broken_quality_source(study, space, config.knobs)) is not None:
        return LaunchOutcome("ok", known), f"quality as #{known.info['same_quality_as']}, not run"
    return None


def _one_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: optuna.Trial, space: Space,
               options: RunOptions, launcher: Any, progress: Progress, budget: int) -> tuple[str, str]:
    """Run and record one trial; returns its launch state (ok | infeasible | fail | stale | repeat) and,
    when the study must stop (its files could not be written), the reason, else ""."""
    artifact_dir = inside(options.out_dir, f"trial_{trial.number:05d}")
    config = trial_config(space, trial.params, trial.number, artifact_dir)
    record.CONFIG.put(trial, dataclasses.asdict(config))
    record.ARTIFACT_DIR.put(trial, config.artifact_dir)
    if _answer_repeat(study, trial, space, config, progress):
        return "repeat", ""
    if known := _known_without_running(study, space, config):
        outcome, how = known
        detail = tell_outcome(study, trial, space, outcome)
        progress.trial_done(study, study.trials[trial.number], counted_trials(study), outcome.state, detail,
                            [o.metric for o in space.objectives], 0.0, not_run=how)
        return "infeasible", ""
    try:
        with Heartbeat(trial_handle(study, trial)), progress.running(trial.number, artifact_dir):
            outcome = launcher.run(config, artifact_dir)
    except KeyboardInterrupt:
        launcher.close()
        record.INTERRUPTED.put(trial, True)
        record.FAIL_REASON.put(trial, "interrupted by the user")
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study.trials[trial.number])
        raise
    if outcome.fatal:
        # Not the config's fault: the trial does not use budget and runs again on the next start.
        record.INTERRUPTED.put(trial, True)
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
        requeue(study, frozen)
        return outcome.state, outcome.reason
    return outcome.state, ""
