"""Every sampler choice builds and drives a study; seeded samplers reproduce."""

from __future__ import annotations

import optuna
import pytest

from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tuner.space import load_space, validate
from tuner.storage import open_storage
from tuner.study import RunOptions, make_sampler, run_study

SAMPLER_CLASSES = {"auto": "ExhaustiveGPSampler", "tpe": "TPESampler", "nsga2": "NSGAIISampler",
                   "gp": "GPSampler", "random": "RandomSampler", "grid": "GridSampler"}


def raw_space(sampler: str, trials: int = 3) -> dict:
    return {"study": f"s-{sampler}", "runner": FAULT_RUNNER, "device": "cpu",
            "params": {"x": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5}},
            "objectives": [{"metric": "throughput_tok_s"}, {"metric": "latency_p99_ms"}],
            "search": {"sampler": sampler, "trials": trials, "seed": 7, "baseline": False}}


@pytest.fixture(autouse=True)
def fault_runner_registered(monkeypatch):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


@pytest.mark.parametrize("sampler", sorted(SAMPLER_CLASSES))
def test_each_sampler_runs_a_study(tmp_path, sampler):
    space = validate(raw_space(sampler), "s.yaml", "s")
    assert type(make_sampler(space)).__name__ == SAMPLER_CLASSES[sampler]
    url = str(tmp_path / "j.journal")
    summary = run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    assert summary.counted == 3 and summary.feasible_pareto >= 1
    # Objective directions default to each metric's better direction.
    study = optuna.load_study(study_name=space.study, storage=open_storage(url))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_seeded_random_sampler_reproduces(tmp_path):
    params = []
    for run in range(2):
        url = str(tmp_path / f"j{run}.journal")
        space = validate(raw_space("random", trials=4), "s.yaml", "s")
        run_study(space, open_storage(url), RunOptions(url, tmp_path / f"o{run}", quiet=True))
        study = optuna.load_study(study_name=space.study, storage=open_storage(url))
        params.append([t.params for t in study.trials])
    assert params[0] == params[1]


def test_bundled_spaces_all_validate():
    from tuner.space import bundled_dir

    names = sorted(p.stem for p in bundled_dir().glob("*.yaml"))
    assert {"batch_quant", "kv_cache", "serving_timeout"} <= set(names)
    for name in names:
        assert load_space(name).objectives


def test_a_resumed_grid_study_runs_every_point_once(tmp_path):
    """A second run of a grid study (it gets a worker ticket, hence a salted seed for other
    samplers) must continue the same grid: no point twice, none missed."""
    raw = raw_space("grid", trials=4)
    raw["params"]["x"] = {"type": "float", "low": 0.5, "high": 4.0, "step": 0.5}  # 8 points
    url = str(tmp_path / "j.journal")
    run_study(validate(raw, "s.yaml", "s"), open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    raw["search"]["trials"] = 8
    run_study(validate(raw, "s.yaml", "s"), open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    study = optuna.load_study(study_name=raw["study"], storage=open_storage(url))
    xs = sorted(t.params["x"] for t in study.trials)
    assert xs == [0.5 * i for i in range(1, 9)]
