"""Trial outcomes: measured -> COMPLETE; config failure -> COMPLETE but infeasible;
crash or hang -> FAIL with the reason and stderr tail; the study always goes on."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from runners.contract import TrialConfig, TrialResult
from runners.knobs import RUNNER_KNOBS
from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tuner.launcher import ProcessLauncher, WarmLauncher
from tuner.space import validate
from tuner.storage import open_storage
from tuner.study import RunOptions, run_study


def fault_config(mode: str, x: float = 1.0) -> TrialConfig:
    return TrialConfig(FAULT_RUNNER, {}, "cpu", {}, {"mode": mode, "x": x})


@pytest.fixture
def fault_runner_registered(monkeypatch):
    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


@pytest.mark.parametrize("launcher_kind", ["process", "warm"])
def test_launcher_classifies_each_outcome(tmp_path, launcher_kind):
    launcher = (ProcessLauncher(timeout_s=5) if launcher_kind == "process"
                else WarmLauncher(timeout_s=5, stderr_path=tmp_path / "warm.log"))
    try:
        ok = launcher.run(fault_config("ok", 2.0), tmp_path / "ok")
        assert ok.state == "ok" and ok.result.metrics["throughput_tok_s"] == 200.0
        infeasible = launcher.run(fault_config("infeasible"), tmp_path / "inf")
        assert infeasible.state == "infeasible" and "cannot run here" in infeasible.reason
        oom = launcher.run(fault_config("oom"), tmp_path / "oom")
        assert oom.state == "infeasible" and oom.reason.startswith("out of memory")
        crash = launcher.run(fault_config("crash"), tmp_path / "crash")
        assert crash.state == "fail" and "SIGABRT" in crash.reason
        assert "about to crash" in crash.stderr_tail
        hang = launcher.run(fault_config("hang"), tmp_path / "hang")
        assert hang.state == "fail" and "hung" in hang.reason and hang.wall_s < 10
        again = launcher.run(fault_config("ok"), tmp_path / "again")  # a fresh child after the hang
        assert again.state == "ok"
    finally:
        launcher.close()


def test_real_runner_out_of_memory_is_infeasible(tmp_path):
    # glm-small's embedding alone is 128 MiB of float32: it cannot fit a 64 MiB cap.
    config = TrialConfig("glm-infer", {"preset": "glm-small"}, "cpu", {"requests": 4},
                         {"memory_limit_mib": 64})
    outcome = ProcessLauncher(timeout_s=120).run(config, tmp_path)
    assert outcome.state == "infeasible", outcome.stderr_tail
    assert outcome.reason.startswith("out of memory")


def fault_space(trials: int):
    raw = {
        "study": "faults", "runner": FAULT_RUNNER, "device": "cpu",
        "params": {"mode": {"type": "categorical", "choices": ["ok", "infeasible", "crash", "hang"]},
                   "x": {"type": "float", "low": 0.5, "high": 2.0}},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                       {"metric": "latency_p99_ms", "direction": "minimize"}],
        "constraints": [{"metric": "kl_divergence", "max": 0.05}],
        "search": {"sampler": "grid" if False else "random", "trials": trials, "seed": 3,
                   "trial_timeout_s": 3, "baseline": False},
    }
    return raw


def test_study_records_every_outcome_and_goes_on(tmp_path, fault_runner_registered):
    from runners import RUNNERS

    raw = fault_space(trials=2)  # crashes and hangs do not use the budget: 2 = ok + infeasible
    space = validate(raw, "faults.yaml", "faults")
    storage = open_storage(str(tmp_path / "j.journal"))
    study = optuna.create_study(study_name="faults", storage=storage,
                                directions=["maximize", "minimize"])
    for mode in ("crash", "hang", "ok", "infeasible"):
        study.enqueue_trial({"mode": mode, "x": 2.0})
    assert FAULT_RUNNER not in RUNNERS  # loaded by module path in the child
    summary = run_study(space, storage, RunOptions(str(tmp_path / "j.journal"), tmp_path / "out", quiet=True))
    assert summary.counted == 2 and len(study.trials) == 4
    trials = {t.params["mode"]: t for t in study.get_trials()}
    ok, infeasible = trials["ok"], trials["infeasible"]
    assert ok.state == TrialState.COMPLETE and ok.values == [200.0, 5.0]
    assert all(v <= 0 for v in ok.system_attrs.values() if isinstance(v, float))
    assert infeasible.state == TrialState.COMPLETE
    assert infeasible.user_attrs["infeasible_reason"] == "mode=infeasible cannot run here"
    assert infeasible.values == [-math.inf, math.inf]
    for mode in ("crash", "hang"):
        assert trials[mode].state == TrialState.FAIL
        assert trials[mode].user_attrs["fail_reason"]
    assert "about to crash" in trials["crash"].user_attrs["stderr_tail"]
    assert [t.number for t in study.best_trials] == [ok.number]


def test_warm_runner_survives_clean_refusals_and_restarts_after_oom(tmp_path):
    launcher = WarmLauncher(timeout_s=10, stderr_path=tmp_path / "warm.log")
    try:
        assert launcher.run(fault_config("ok"), tmp_path / "a").state == "ok"
        pid = launcher._proc.pid
        refused = launcher.run(fault_config("infeasible"), tmp_path / "b")
        assert refused.state == "infeasible" and refused.result.info["cuda_touched"] is False
        assert launcher._proc is not None and launcher._proc.pid == pid  # models kept
        assert launcher.run(fault_config("oom"), tmp_path / "c").state == "infeasible"
        assert launcher._proc is None  # a fresh process for the next trial
        assert launcher.run(fault_config("ok"), tmp_path / "d").state == "ok"
        assert launcher._proc.pid != pid
    finally:
        launcher.close()


@pytest.mark.parametrize(("mode", "restart"), [("infeasible", False), ("failed_capture", True)])
def test_after_cuda_only_a_refusal_that_wraps_a_failure_marks_the_process(tmp_path, monkeypatch, mode, restart):
    # On a GPU every trial after the first finds CUDA initialised; a plain refusal must still
    # keep the warm process (and its models), a refusal raised from a failed step must not.
    from runners import child

    monkeypatch.setattr(child, "_cuda_initialized", lambda: True)
    config_path, result_path = tmp_path / "config.json", tmp_path / "result.json"
    config_path.write_text(fault_config(mode).to_json())
    child.run_one(config_path, result_path)
    result = TrialResult.from_dict(json.loads(result_path.read_text()))
    assert result.status == "infeasible" and result.info["cuda_touched"] is restart


@pytest.mark.parametrize("trials", [2, 5])
def test_grid_study_ends_cleanly_when_every_point_is_tried(tmp_path, fault_runner_registered, trials):
    # Optuna's GridSampler calls study.stop() after the last point, which raises outside
    # study.optimize; a budget larger than the grid must not repeat points either.
    raw = fault_space(trials=trials)
    raw["params"] = {"x": {"type": "categorical", "choices": [1.0, 2.0]}}
    raw["search"]["sampler"] = "grid"
    space = validate(raw, "faults.yaml", "faults")
    storage = open_storage(str(tmp_path / "j.journal"))
    summary = run_study(space, storage, RunOptions(str(tmp_path / "j.journal"), tmp_path / "out", quiet=True))
    study = optuna.load_study(study_name="faults", storage=storage)
    assert sorted(t.params["x"] for t in study.trials) == [1.0, 2.0]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert summary.counted == 2 and summary.grid_exhausted


def test_grid_study_with_a_baseline_trial_runs_its_one_point(tmp_path, fault_runner_registered):
    # The enqueued baseline has no grid id; Optuna looked one up when one grid point was left.
    raw = fault_space(trials=2)
    raw["params"] = {"x": {"type": "categorical", "choices": [2.0]}}
    raw["search"].update(sampler="grid", baseline=True)
    space = validate(raw, "faults.yaml", "faults")
    storage = open_storage(str(tmp_path / "j.journal"))
    summary = run_study(space, storage, RunOptions(str(tmp_path / "j.journal"), tmp_path / "out", quiet=True))
    study = optuna.load_study(study_name="faults", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[1].params["x"] == 2.0 and summary.counted == 2
