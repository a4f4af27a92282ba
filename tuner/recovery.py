"""The study's budget and its repairs: what counts, crashes in a row, dead workers' trials,
the baseline queued once.

The trial budget is the study's total; a re-run does only what is missing. Crashes (FAIL) do
not use the budget: a run stops after MAX_SAME_CRASH identical crashes in a row or
`fail_limit` crashes in all, so fixing the cause and running again continues the study.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from tuner import record
from tuner.progress import Progress
from tuner.space import Space
from tuner.storage import heartbeat_interval, trial_handle

# The same crash this many times in a row stops the study with that error.
MAX_SAME_CRASH = 3


def owner_identity() -> dict[str, Any]:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": proc.create_time()}


def owner_alive(owner: dict[str, Any]) -> bool:
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
    interrupted is queued again (by `requeue`, or by Optuna's RetryHeartbeatStaleTrialCallback),
    and the copy is what counts once a worker claims it.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    # Trials a warm start copied from an earlier study were measured there, not here.
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in states and not record.CARRIED_OVER.get(t))


def fail_limit(budget: int) -> int:
    """Crashes one run tolerates before it stops (they do not use the budget, so bound them)."""
    return max(MAX_SAME_CRASH, budget)


def repeated_crash(study: optuna.Study) -> str:
    """The fail reason when the last MAX_SAME_CRASH finished trials all crashed the same way."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    last = sorted(finished, key=lambda t: t.datetime_complete or t.datetime_start)[-MAX_SAME_CRASH:]
    if len(last) < MAX_SAME_CRASH or not all(t.state == TrialState.FAIL and record.runner_failed(t) for t in last):
        return ""
    # Crash reasons end with the child's last stderr line; hang reasons name only the timeout.
    reasons = {str(record.FAIL_REASON.get(t, "")).strip() for t in last}
    return record.FAIL_REASON.get(last[-1], "") if len(reasons) == 1 else ""


def recover_stale_trials(study: optuna.Study, progress: Progress) -> int:
    """Trials left RUNNING by a dead process on this host become FAIL and are queued again.

    Journal and SQLite storages have no heartbeat, so the owner host/pid recorded at start
    tells a dead owner from a live worker. Called under the claim lock, so two workers never
    recover (and queue) the same trial twice.
    """
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = record.OWNER.get(t) or {}
        # No owner under the claim lock: its process died between `ask` and recording itself
        # (a kill -9 right then); left RUNNING it would hold a unit of budget forever.
        if owner and (owner.get("host") != host or owner_alive(owner)):
            continue
        row = trial_handle(study, t)
        why = (f"owner process {owner.get('pid')} died mid-trial" if owner
               else "the process that started it died before recording itself (died mid-trial)")
        try:
            record.INTERRUPTED.put(row, True)
            record.FAIL_REASON.put(row, why)
            row.fail()
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile (a worker not taking the lock, e.g. an older version)
        requeue(study, t)
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


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    attrs = record.RETRY_OF.entry(trial.number)
    if record.is_baseline(trial):
        attrs.update(record.BASELINE.entry(True))
    study.enqueue_trial(trial.params, user_attrs=attrs)


def ensure_baseline(study: optuna.Study, space: Space) -> None:
    """Enqueue the unmodified default configuration once, as the study's first trial.

    A baseline that crashed (FAIL) is queued again on the next run, so fixing the cause brings
    the study its reference point back.
    """
    if not space.search.baseline or not space.params:
        return
    if any(record.is_baseline(t) and t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(space.baseline_params(), user_attrs=record.BASELINE.entry(True))


def live_running(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    """Other workers' RUNNING trials that will either finish or be recovered by a claim.

    With heartbeats, every trial a worker of ours owns; without, only those of live processes
    on this host (a dead owner's trial is recovered at the next claim; another host's cannot be
    judged without a heartbeat).
    """
    beats = bool(heartbeat_interval(storage))
    host = socket.gethostname()
    live = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = record.OWNER.get(t)
        if owner and (beats or (owner.get("host") == host and owner_alive(owner))):
            live.append(t)
    return live
