"""A trial whose effective config an earlier trial measured is answered from that trial's record."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState

from runners.glm.model_cache import model_key
from runners.knobs import INFER_KNOBS, Knob, When, effective_knobs, inert_knobs
from tests.ux_runner import UX_KNOBS, UX_RUNNER
from tuner import record
from tuner import study as study_module
from tuner.repeats import find_repeat
from tuner.space import validate
from tuner.storage import open_storage
from tuner.study import RunOptions, run_study
from tuner.tell import trial_config

# `pad` is a knob the UX runner never reads; declared to matter only at x > 1, so the tuner must
# answer x=1 trials that differ in it from the earlier one, and still run x=2 ones.
PAD_KNOBS = {**UX_KNOBS, "pad": Knob("pad", "a", str, ("a", "b"), applies_when=(When("x", ">", 1.0),))}


def test_quant_scheme_is_inert_at_16_bits_only():
    assert inert_knobs(INFER_KNOBS, {"quant_bits": 16})["quant_scheme"] == "quant_scheme has no effect at quant_bits=16"
    at8 = inert_knobs(INFER_KNOBS, {"quant_bits": 8})
    assert "quant_scheme" not in at8 and "quant_kernel" not in at8 and at8["quant_group_size"].endswith("quant_bits=8")
    assert "quant_group_size" not in inert_knobs(INFER_KNOBS, {"quant_bits": 4})


def test_sparsity_kind_and_method_are_inert_at_zero_sparsity_and_kv_bits_without_quantized_kv():
    dense = inert_knobs(INFER_KNOBS, {"sparsity": 0.0, "kv_cache": "static"})
    assert {"sparsity_kind", "sparsity_method", "kv_bits"} <= dense.keys()
    assert dense["sparsity_method"] == "sparsity_method has no effect at sparsity=0.0"
    sparse = inert_knobs(INFER_KNOBS, {"sparsity": 0.3, "kv_cache": "quantized"})
    assert not {"sparsity_kind", "sparsity_method", "kv_bits"} & sparse.keys()
    assert effective_knobs(INFER_KNOBS, {"sparsity": 0.0, "sparsity_method": "wanda", "batch_size": 4}) == \
        {"sparsity": 0.0, "batch_size": 4}
    with pytest.raises(ValueError, match="When.op"):
        When("x", ">=", 1)


def test_the_model_cache_shares_a_build_exactly_where_the_tuner_sees_a_repeat():
    base = {k: v.default for k, v in INFER_KNOBS.items()}

    def key(**knobs):
        return model_key({"preset": "glm-tiny"}, "float32", "cpu", 0, {**base, **knobs}, "fast")

    assert key(quant_scheme="fp8") == key()  # 16 bits
    assert key(quant_bits=8, quant_scheme="fp8") != key(quant_bits=8)
    assert key(sparsity_method="wanda") == key() and key(sparsity=0.5, sparsity_method="wanda") != key(sparsity=0.5)


def _glm_space() -> object:
    raw = {"study": "q", "runner": "glm-infer", "model": {"preset": "glm-tiny"}, "device": "cpu",
           "params": {"quant_bits": {"type": "categorical", "choices": [16, 8]},
                      "quant_scheme": {"type": "categorical", "choices": ["weight_only", "dynamic_activation"]},
                      "sparsity": {"type": "categorical", "choices": [0.0, 0.5]}},
           "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}],
           "search": {"sampler": "random", "trials": 4, "seed": 0}}
    return validate(raw, "q.yaml", "q")


def test_glm_infer_repeats_are_found_by_effective_config_among_complete_trials_only(tmp_path):
    space = _glm_space()
    study = optuna.create_study(study_name="q", directions=["maximize"])
    dist = space.distributions()

    def add(params, state=TrialState.COMPLETE, **attrs):
        number = len(study.trials)
        config = dataclasses.asdict(trial_config(space, params, number, tmp_path / f"t{number}"))
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dist, state=state, values=[1.0] if state == TrialState.COMPLETE else None,
            user_attrs={**record.CONFIG.entry(config), **attrs}))

    def repeat_of(params):
        found = find_repeat(study, space, trial_config(space, params, 99, tmp_path / "t99"))
        return (found.source.number, found.why) if found else None

    add({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.5}, state=TrialState.FAIL)
    assert repeat_of({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.5}) is None  # FAIL: no source
    add({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.0}, **record.CARRIED_OVER.entry(True))
    assert repeat_of({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.0}) is None  # another study's
    add({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.0})  # trial 2
    assert repeat_of({"quant_bits": 16, "quant_scheme": "dynamic_activation", "sparsity": 0.0}) == \
        (2, "quant_scheme has no effect at quant_bits=16")
    assert repeat_of({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.0}) == (2, "identical config")
    add({"quant_bits": 8, "quant_scheme": "weight_only", "sparsity": 0.0})
    assert repeat_of({"quant_bits": 8, "quant_scheme": "dynamic_activation", "sparsity": 0.0}) is None  # it matters
    assert repeat_of({"quant_bits": 16, "quant_scheme": "weight_only", "sparsity": 0.5}) is None  # sparsity matters


def _pad_space(trials: int) -> dict:
    return {"study": "pad", "runner": UX_RUNNER, "device": "cpu", "workload": {"rate_rps": 30, "requests": 8},
            "params": {"x": {"type": "categorical", "choices": [1.0, 2.0]},
                       "pad": {"type": "categorical", "choices": ["a", "b"]},
                       "mode": {"type": "categorical", "choices": ["ok", "crash"]}},
            "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                           {"metric": "latency_p99_ms", "direction": "minimize"}],
            "constraints": [{"metric": "ttft_p99_ms", "max": 2000}],
            "search": {"sampler": "random", "trials": trials, "seed": 1, "trial_timeout_s": 30, "baseline": False}}


def test_a_repeat_is_answered_from_the_record_without_launching_and_a_knob_that_matters_runs(
        tmp_path, monkeypatch, capsys):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, UX_RUNNER, PAD_KNOBS)
    launched = []

    class CountingLauncher(study_module.ProcessLauncher):
        def run(self, config, workdir):
            launched.append(config.trial_number)
            return super().run(config, workdir)

    monkeypatch.setattr(study_module, "ProcessLauncher", CountingLauncher)
    configs = [{"x": 1.0, "pad": "a", "mode": "crash"},   # 0 FAIL
               {"x": 1.0, "pad": "a", "mode": "crash"},   # 1 runs again: a FAIL is no source
               {"x": 1.0, "pad": "a", "mode": "ok"},      # 2 runs (the source)
               {"x": 1.0, "pad": "b", "mode": "ok"},      # 3 same as #2: pad has no effect at x=1.0
               {"x": 2.0, "pad": "a", "mode": "ok"},      # 4 runs: x matters
               {"x": 2.0, "pad": "b", "mode": "ok"}]      # 5 runs: pad matters at x=2.0
    space = validate(_pad_space(4), "pad.yaml", "pad")
    url = str(tmp_path / "j.journal")
    storage = open_storage(url)
    study = optuna.create_study(study_name="pad", storage=storage, directions=["maximize", "minimize"])
    for params in configs:
        study.enqueue_trial(params)
    summary = run_study(space, storage, RunOptions(url, tmp_path / "out"))
    trials = optuna.load_study(study_name="pad", storage=storage).trials
    out = capsys.readouterr().out
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert not record.SAME_AS.recorded(trials[1])
    source, repeat = trials[2], trials[3]
    assert repeat.state == TrialState.COMPLETE and repeat.values == source.values
    assert record.SAME_AS.get(repeat) == {"trial": 2, "why": "pad has no effect at x=1.0"}
    assert repeat.constraints == source.constraints and record.feasible(repeat) == record.feasible(source)
    assert record.metrics(repeat) == record.metrics(source) and record.OUTCOME.get(repeat) == "ok"
    assert launched == [0, 1, 2, 4, 5]  # no runner for trial 3
    assert record.WALL_S.get(repeat) < record.WALL_S.get(source)
    # Nor was its folder written: the record's artifacts are the source's.
    assert not (tmp_path / "out" / "trial_00003").exists() and (tmp_path / "out" / "trial_00002").exists()
    assert record.ARTIFACT_DIR.get(repeat) == record.ARTIFACT_DIR.get(source)
    assert "trial 3 (x=1 pad=b mode=ok) same as #2 (pad has no effect at x=1.0): feasible" in out, out
    assert not record.SAME_AS.recorded(trials[4]) and not record.SAME_AS.recorded(trials[5])
    assert trials[5].values == trials[4].values  # the runner ignores pad, but it was declared to matter: it ran
    assert summary.counted == 4 and len(trials) == 6  # the repeat uses budget (no device time); FAILs do not


def test_the_exhaustive_gp_treats_a_tried_configs_twin_as_tried(monkeypatch):
    from runners.knobs import RUNNER_KNOBS
    from tuner.gp_search import ExhaustiveGPSampler
    from tuner.search import grid_points

    monkeypatch.setitem(RUNNER_KNOBS, UX_RUNNER, PAD_KNOBS)
    raw = _pad_space(4)
    raw["params"] = {"x": {"type": "categorical", "choices": [1.0, 2.0, 3.0]},
                     "pad": {"type": "categorical", "choices": ["a", "b"]}}
    raw["search"]["sampler"] = "auto"
    space = validate(raw, "pad.yaml", "pad")
    points = grid_points(space)
    assert len(points) == 6  # 5 configs: at x=1 pad has no effect
    for seed in (0, 1):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=ExhaustiveGPSampler(space, points, seed=seed, n_startup_trials=2))
        seen = []
        for _ in range(5):
            trial = study.ask(space.distributions())
            x, pad = trial.params["x"], trial.params["pad"]
            seen.append((x, pad if x > 1.0 else "-"))
            # x=1 dominates: its twin (the other pad) is where the GP would look next, were it untried
            # (with exact-params matching it asked it in 10 of 10 seeds).
            study.tell(trial, [300.0, 10.0] if x == 1.0 else [100.0 * x + (pad == "b"), 20.0])
        assert len(set(seen)) == 5, seen  # each of the 5 configs once: x=1 with the other pad never asked


def test_the_front_lists_each_measured_config_once():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values, attrs in (([100.0, 5.0], {}), ([100.0, 5.0], record.SAME_AS.entry({"trial": 0, "why": "w"})),
                          ([50.0, 2.0], {}), ([40.0, 9.0], {})):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    assert sorted(t.number for t in study.best_trials) == [0, 1, 2]
    assert sorted(t.number for t in record.front(study)) == [0, 2]
