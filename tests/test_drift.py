"""Drift: the baseline is measured again (every N trials and at the end) and the ratio stored."""

from __future__ import annotations

import optuna
import pytest

from reports.frames import study_summary
from reports.html import drift_sentence
from runners.knobs import RUNNER_KNOBS
from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tuner.space import SpaceError, validate
from tuner.storage import open_storage
from tuner.study import RunOptions, cache_dir_for, run_study


@pytest.fixture
def fault_runner_registered(monkeypatch):
    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


def _space(trials, drift_every=None, baseline=True):
    search = {"sampler": "random", "trials": trials, "seed": 1, "trial_timeout_s": 30, "baseline": baseline}
    if drift_every is not None:
        search["drift_every"] = drift_every
    raw = {"study": "drifty", "runner": FAULT_RUNNER, "device": "cpu",
           "params": {"x": {"type": "float", "low": 0.5, "high": 2.0}},
           "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}], "search": search}
    return validate(raw, "drifty.yaml", "drifty")


def _run(tmp_path, space, capsys):
    url = str(tmp_path / "j.journal")
    storage = open_storage(url)
    run_study(space, storage, RunOptions(url, tmp_path / "out"))
    return optuna.load_study(study_name="drifty", storage=storage), capsys.readouterr().out


def test_baseline_re_measured_every_n_trials_and_at_the_end(tmp_path, fault_runner_registered, capsys):
    study, out = _run(tmp_path, _space(trials=4, drift_every=2), capsys)
    # the fault runner's throughput is 100 * x: the same baseline config measures the same
    assert study.user_attrs["drift"] == pytest.approx(1.0)
    checks = study.user_attrs["drift_checks"]
    assert [c["after_trials"] for c in checks] == [2, 4]  # the end (4) is not measured twice
    assert all(c["ratio"] == pytest.approx(1.0) and c["first"] == c["now"] for c in checks)
    assert len(study.trials) == 4  # re-measures use no trial of the budget
    assert "drift: baseline throughput_tok_s 100 at trial 0, 100 after 4 trials (ratio 1.000)" in out
    assert (tmp_path / "out" / "drift_00002" / "result.json").exists()
    summary = study_summary(study)
    assert summary["drift"] == pytest.approx(1.0)
    assert drift_sentence(summary).startswith("Drift: baseline throughput re-measured / first = 1.000")


def test_no_baseline_no_drift(tmp_path, fault_runner_registered, capsys):
    study, _ = _run(tmp_path, _space(trials=2, baseline=False), capsys)
    assert "drift" not in study.user_attrs
    assert drift_sentence(study_summary(study)).startswith("Drift: the baseline was not measured again")


def test_drift_every_must_be_positive(fault_runner_registered):
    with pytest.raises(SpaceError, match="search.drift_every"):
        _space(trials=2, drift_every=0)


def test_caches_sit_beside_the_storage(tmp_path):
    assert cache_dir_for(str(tmp_path / "runs" / "optuna.journal"), tmp_path / "x") == tmp_path / "runs" / ".cache"
    assert cache_dir_for(f"sqlite:///{tmp_path}/s.db", tmp_path / "x") == tmp_path / ".cache"
    assert cache_dir_for("postgresql://u@h/db", tmp_path / "x") == tmp_path / "x" / ".cache"


def test_child_env_points_compile_caches_there(tmp_path, monkeypatch):
    from tuner.launcher import _child_env

    for name in ("AUTOGLM_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    env = _child_env(tmp_path / ".cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".cache" / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / ".cache" / "triton")
    assert env["AUTOGLM_CACHE_DIR"] == str(tmp_path / ".cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # the user's choice wins
    assert _child_env(tmp_path / ".cache")["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
