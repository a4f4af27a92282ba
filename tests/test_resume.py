"""kill -9 of the tuner mid-study, then the same command: nothing completed is lost or re-run,
the trial the dead process left RUNNING becomes FAIL and is retried, the budget is total."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import yaml
from optuna.trial import TrialState

from tests.fault_runner import FAULT_RUNNER
from tuner.storage import open_storage


def space_file(path):
    path.write_text(yaml.safe_dump({
        "study": "resume", "runner": FAULT_RUNNER, "device": "cpu",
        "params": {"x": {"type": "float", "low": 0.5, "high": 2.0}},
        "fixed": {"sleep_s": 1.5},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                       {"metric": "latency_p99_ms", "direction": "minimize"}],
        "search": {"sampler": "random", "trials": 5, "seed": 0, "trial_timeout_s": 30},
    }))
    return path


def command(space):
    return [sys.executable, "-m", "tests.fault_runner", "--space", str(space), "--quiet"]


def states(journal):
    study = optuna.load_study(study_name="resume", storage=open_storage(str(journal)))
    return study, [t.state for t in study.get_trials()]


def test_kill_9_then_resume(in_tmp):
    space = space_file(in_tmp / "resume.yaml")
    journal = in_tmp / "runs" / "optuna.journal"
    proc = subprocess.Popen(command(space), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until 2 trials are done and a third runs
        time.sleep(0.2)
        if journal.exists():
            try:
                _, st = states(journal)
            except KeyError:  # the journal file is opened before the study's first record lands
                continue
            if st.count(TrialState.COMPLETE) >= 2 and TrialState.RUNNING in st:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study, before = states(journal)
    done_before = {t.number: t.values for t in study.get_trials() if t.state == TrialState.COMPLETE}
    assert len(done_before) >= 2 and TrialState.RUNNING in before

    assert subprocess.run(command(space), timeout=120).returncode == 0
    study, after = states(journal)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5  # the total budget, not 5 more
    for number, values in done_before.items():  # completed trials kept, not re-run
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    stale = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(stale) == 1 and stale[0].state == TrialState.FAIL
    assert "died mid-trial" in stale[0].user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == stale[0].number]
    assert len(retry) == 1 and retry[0].params == stale[0].params
    assert retry[0].state == TrialState.COMPLETE
    # A third run has nothing left to do.
    assert subprocess.run(command(space), timeout=60).returncode == 0
    assert len(optuna.load_study(study_name="resume", storage=open_storage(str(journal))).trials) == len(trials)


def test_a_trial_left_running_before_its_owner_was_recorded_is_recovered(tmp_path):
    """A kill -9 between `ask` and recording the owner left a RUNNING trial nobody could claim:
    it held a unit of budget forever (the resume then ran one trial short)."""
    from tuner.progress import Progress
    from tuner.study import counted_trials, recover_stale_trials

    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.journal")), study_name="s")
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no owner attribute
    assert counted_trials(study) == 1
    assert recover_stale_trials(study, Progress(1, quiet=True)) == 1
    frozen = study.trials[orphan.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["interrupted"]
    assert "died" in frozen.user_attrs["fail_reason"]
    assert counted_trials(study) == 0  # the queued retry waits; it counts once claimed
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
