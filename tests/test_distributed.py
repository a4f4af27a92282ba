"""Several workers on one study (issue 8), on the single-host default (journal file).

The checks are functions of a storage URL, so tests/test_postgres.py runs the same ones against
a real PostgreSQL: exact global budget with parallel workers, no trial run twice or lost, a
worker killed with SIGKILL mid-trial has its trial failed and retried by another worker.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tuner.cli import main
from tuner.space import load_space
from tuner.storage import open_storage
from tuner.study import RunOptions, claim_trial, ensure_baseline, open_study
from tuner.workers import ClaimLock, parse_gpus, physical_gpu

TRIAL_LINE = re.compile(r"^(?:gpu \S+: )?\[\d+/\d+\] trial (\d+) ", re.MULTILINE)


# ---------------------------------------------------------------- helpers (shared with test_postgres)


@pytest.fixture
def fault_registered(monkeypatch):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


def write_space(path: Path, study: str, trials: int, sleep_s: float) -> Path:
    path.write_text(yaml.safe_dump({
        "study": study, "runner": FAULT_RUNNER, "device": "cpu",
        "params": {"x": {"type": "float", "low": 0.5, "high": 2.0}},
        "fixed": {"sleep_s": sleep_s},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                       {"metric": "latency_p99_ms", "direction": "minimize"}],
        "search": {"sampler": "random", "trials": trials, "seed": 0, "trial_timeout_s": 60},
    }))
    return path


def create_study(url: str, space_path: Path) -> optuna.Study:
    """What the first host's `autoglm-tune --space ...` does before workers join by name."""
    space = load_space(str(space_path))
    study = open_study(space, open_storage(url))
    ensure_baseline(study, space)
    return study


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def start_worker(url: str, name: str, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.fault_runner", "worker", "--study", name, "--storage", url,
           "--out", str(out), *extra]
    with log.open("w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def reported_trials(logs: list[Path]) -> list[int]:
    """Trial numbers the workers reported finished, each worker's progress lines together."""
    return [int(n) for log in logs for n in TRIAL_LINE.findall(log.read_text())]


def kill_with_runner(pid: int) -> None:
    """SIGKILL a worker and the runner it started (a host going down takes both)."""
    children = psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the checks


def check_exact_budget(url: str, tmp: Path, workers: int, trials: int, extra: tuple[str, ...] = ()) -> None:
    """N workers start at once on one study: exactly `trials` trials, each run once, none lost."""
    create_study(url, write_space(tmp / "exact.yaml", "exact", trials, sleep_s=0.3))
    logs = [tmp / f"worker{i}.log" for i in range(workers)]
    procs = [start_worker(url, "exact", tmp / "out", log, *extra) for log in logs]
    codes = finish(procs, timeout=90)
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0] * workers, output
    all_trials = load(url, "exact").get_trials()
    assert len(all_trials) == trials, output  # nothing over budget, no trial handed back
    assert all(t.state == TrialState.COMPLETE for t in all_trials)
    reported = reported_trials(logs)
    assert sorted(reported) == list(range(trials)), output  # each trial reported by one worker, once
    for t in all_trials:  # each trial ran to a result in its own folder
        assert (Path(t.user_attrs["artifact_dir"]) / "result.json").exists()
    owners = {t.user_attrs["owner"]["pid"] for t in all_trials}
    assert owners <= {p.pid for p in procs} and len(owners) >= 2  # the work was shared
    # Each worker samples with its own seed: parallel workers do not propose the same configs.
    assert len({t.params["x"] for t in all_trials}) == trials


def check_kill_recovered(url: str, tmp: Path, workers: int, trials: int, extra: tuple[str, ...] = ()) -> list:
    """SIGKILL one worker mid-trial: that trial ends FAIL, another worker re-runs its params,
    and the study still completes exactly `trials` trials. Returns (failed, retry) trials."""
    create_study(url, write_space(tmp / "kill.yaml", "kill", trials, sleep_s=2.0))
    logs = [tmp / f"worker{i}.log" for i in range(workers)]
    procs = [start_worker(url, "kill", tmp / "out", log, *extra) for log in logs]
    victim = procs[0]
    study = load(url, "kill")

    def victim_running():
        # `artifact_dir` is the last thing recorded before the runner starts: killing after it
        # lands mid-run, not mid-write (a journal writer killed holding its file lock stalls the
        # others for the lock's 30 s grace period; that is Optuna's recovery, not ours to test).
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                   if t.user_attrs.get("owner", {}).get("pid") == victim.pid and "artifact_dir" in t.user_attrs]
        return running[0] if running else None

    killed = wait_for(victim_running, 60, "the victim worker to run a trial")
    kill_with_runner(victim.pid)
    victim.wait()
    codes = finish(procs[1:], timeout=90)
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0] * (workers - 1), output
    all_trials = load(url, "kill").get_trials()
    failed = all_trials[killed.number]
    assert failed.state == TrialState.FAIL, output
    retries = [t for t in all_trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1, output
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["owner"]["pid"] != victim.pid
    # The failed trial does not use budget; its retry does, and nothing runs beyond it.
    assert sum(t.state == TrialState.COMPLETE for t in all_trials) == trials
    assert len(all_trials) == trials + 1, output
    return [failed, retry]


def check_claims_are_atomic(url: str, tmp: Path, space_path: Path, processes: int = 4) -> None:
    """The race of issue 8: several workers see budget-1 counted trials at the same instant.

    Every process waits at a barrier, then claims; with budget 1 exactly one may get a trial.
    """
    space = load_space(str(space_path))
    open_study(space, open_storage(url))
    ctx = multiprocessing.get_context("fork")
    start, claimed, done = ctx.Barrier(processes), ctx.Barrier(processes + 1), ctx.Event()
    procs = [ctx.Process(target=_claim_once, args=(url, space, tmp, (start, claimed, done)))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        claimed.wait(60)  # every process has claimed (or not) and is still alive: its trial is live
        trials = load(url, space.study).get_trials()
    finally:
        done.set()
        for proc in procs:
            proc.join(60)
    assert [p.exitcode for p in procs] == [0] * processes
    assert len(trials) == 1 and trials[0].state == TrialState.RUNNING


def _claim_once(url, space, tmp, sync) -> None:
    import tuner.study
    from tuner.progress import Progress

    counted = tuner.study.counted_trials

    def slow_count(study):  # widen the window between counting and asking, as a busy host would
        n = counted(study)
        time.sleep(0.3)
        return n

    tuner.study.counted_trials = slow_count
    storage = open_storage(url)
    study = open_study(space, storage, store_space=False)
    claims = ClaimLock(url, storage, space.study)
    start, claimed, done = sync
    start.wait(60)
    claim_trial(study, storage, space, RunOptions(url, tmp, quiet=True), claims, Progress(1, quiet=True))
    claimed.wait(60)
    done.wait(60)
    os._exit(0)  # leave the claimed trial RUNNING: the parent only counts


# ---------------------------------------------------------------- journal (the single-host default)


def test_two_journal_workers_run_the_exact_budget(in_tmp, fault_registered):
    check_exact_budget(str(in_tmp / "runs" / "optuna.journal"), in_tmp, workers=2, trials=6)


def test_journal_worker_killed_mid_trial_is_recovered(in_tmp, fault_registered):
    failed, _ = check_kill_recovered(str(in_tmp / "runs" / "optuna.journal"), in_tmp, workers=2, trials=4)
    # No heartbeat on a journal: the survivor saw the dead owner's pid and handed the trial back.
    assert failed.user_attrs["interrupted"] and "died mid-trial" in failed.user_attrs["fail_reason"]


def test_journal_claims_are_atomic(in_tmp, fault_registered):
    space = write_space(in_tmp / "race.yaml", "race", trials=1, sleep_s=0)
    check_claims_are_atomic(str(in_tmp / "race.journal"), in_tmp, space)


def test_gpus_fans_out_one_pinned_worker_per_gpu(in_tmp, fault_registered, capfd):
    """`--gpus 0,1` on this host: two forked workers, CUDA_VISIBLE_DEVICES pinned, device cuda:0
    inside, one global budget, each trial's owner names its GPU. (The fault runner ignores the
    device, so this runs on CPU; tests below check real GPUs.)"""
    space = write_space(in_tmp / "fan.yaml", "fan", trials=6, sleep_s=0.5)
    assert main(["--space", str(space), "--gpus", "0,1"]) == 0
    progress = capfd.readouterr().out
    assert sorted(int(n) for n in TRIAL_LINE.findall(progress)) == list(range(6))  # each reported once
    assert "gpu 0: [" in progress and "gpu 1: [" in progress  # whose line is whose
    trials = load(str(in_tmp / "runs" / "optuna.journal"), "fan").get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    owners = [t.user_attrs["owner"] for t in trials]
    assert {o["gpu"] for o in owners} == {"0", "1"}
    assert all(o["cuda_visible_devices"] == o["gpu"] and o["device"] == "cuda:0" for o in owners)
    assert all(t.user_attrs["config"]["device"] == "cuda:0" for t in trials)
    assert len({o["pid"] for o in owners}) == 2


def test_sqlite_is_refused_for_parallel_workers(in_tmp, fault_registered, capsys):
    space = write_space(in_tmp / "s.yaml", "s", trials=2, sleep_s=0)
    assert main(["--space", str(space), "--gpus", "0,1", "--storage", "sqlite:///s.db"]) == 2
    assert main(["worker", "--study", "s", "--storage", "sqlite:///s.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("SQLite is not safe") == 2 and "Traceback" not in err
    assert not (in_tmp / "s.db").exists() and not (in_tmp / "runs").exists()  # nothing created


def test_worker_usage_errors_exit_2(in_tmp, fault_registered, capsys):
    assert main(["worker", "--study", "nope"]) == 2
    assert "no such journal file" in capsys.readouterr().err
    create_study(str(in_tmp / "runs" / "optuna.journal"), write_space(in_tmp / "s.yaml", "s", 2, 0))
    assert main(["worker", "--study", "nope"]) == 2
    assert "--study nope: no such study" in capsys.readouterr().err
    assert main(["worker", "--study", "s", "--gpus", "0,0"]) == 2
    assert main(["worker", "--study", "s", "--gpus", "0", "--device", "cpu"]) == 2
    assert main(["worker", "--study", "s", "--heartbeat-s", "0"]) == 2
    err = capsys.readouterr().err
    assert "each GPU once" in err and "give one of the two" in err and "seconds >= 1" in err


def test_gpu_ids_parse_and_map_through_cuda_visible_devices():
    assert parse_gpus("0, 1,3") == ["0", "1", "3"]
    assert parse_gpus("GPU-8f3c2a1e-1111-2222-3333-444455556666") == ["GPU-8f3c2a1e-1111-2222-3333-444455556666"]
    assert physical_gpu("cuda:1", "4,6") == "6"  # index 1 of what this process sees
    assert physical_gpu("cuda", None) == "0" and physical_gpu("cuda:2", None) == "2"
    assert physical_gpu("cpu", "0") is None and physical_gpu("cuda:1", "0") is None


# ---------------------------------------------------------------- real GPUs


@pytest.mark.gpu
def test_gpus_0_1_run_trials_on_both_gpus_at_once(in_tmp):
    """On a host with 2+ GPUs: the tiny GLM stack, one worker per GPU; trials record both GPU
    ids (the runner's own `cuda_visible_devices` too) and run concurrently."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    assert main(["--space", "batch_quant", "--study", "two_gpus", "--trials", "6", "--gpus", "0,1", "--quiet"]) == 0
    trials = load(str(in_tmp / "runs" / "optuna.journal"), "two_gpus").get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["owner"]["gpu"] for t in trials} == {"0", "1"}
    ran = [t for t in trials if t.user_attrs.get("environment")]  # measured or infeasible: the runner ran
    assert {t.user_attrs["environment"]["cuda_visible_devices"] for t in ran} == {"0", "1"}
    by_gpu = {g: [t for t in trials if t.user_attrs["owner"]["gpu"] == g] for g in ("0", "1")}
    overlap = any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
                  for a in by_gpu["0"] for b in by_gpu["1"])
    assert overlap  # both GPUs worked at the same time
