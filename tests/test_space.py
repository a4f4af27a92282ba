"""Space files: good ones become dataclasses and distributions; bad ones exit 2, naming the
file and key, with no traceback and nothing created."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from tuner.cli import main
from tuner.space import grid_values, load_space

GOOD = """
study: s
runner: glm-infer
model: {preset: glm-tiny}
device: cpu
workload: {arrival: poisson, rate_rps: 8, requests: 10, prompt_tokens: {dist: uniform, low: 4, high: 8}}
params:
  batch_size: {type: int, low: 1, high: 8, log: true}
  quant_bits: {type: categorical, choices: [16, 8]}
  sparsity: {type: float, low: 0.0, high: 0.5, step: 0.25}
fixed: {scheduler: dynamic}
objectives:
  - {metric: throughput_tok_s, direction: maximize}
  - {metric: latency_p99_ms, direction: minimize}
constraints:
  - {metric: kl_divergence, max: 0.05}
search: {sampler: tpe, trials: 3, seed: 1}
"""


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_space_becomes_distributions(tmp_path):
    space = load_space(str(write(tmp_path, GOOD)))
    dists = space.distributions()
    assert dists["batch_size"] == optuna.distributions.IntDistribution(1, 8, log=True)
    assert dists["quant_bits"] == optuna.distributions.CategoricalDistribution([16, 8])
    assert dists["sparsity"] == optuna.distributions.FloatDistribution(0.0, 0.5, step=0.25)
    assert [o.metric for o in space.objectives] == ["throughput_tok_s", "latency_p99_ms"]
    assert space.constraints[0].violation(0.07) == pytest.approx(0.02)
    assert space.constraints[0].violation(0.01) == 0.0
    assert space.search.trials == 3 and space.fixed == {"scheduler": "dynamic"}
    # Baseline = runner defaults clipped into the ranges: batch 8, 16 bits, no sparsity.
    assert space.baseline_params() == {"batch_size": 8, "quant_bits": 16, "sparsity": 0.0}


def test_cli_overrides_win_over_the_file(tmp_path):
    space = load_space(str(write(tmp_path, GOOD)), {"trials": 7, "device": "cuda:1", "study": "x", "seed": None})
    assert (space.search.trials, space.device, space.study, space.search.seed) == (7, "cuda:1", "x", 1)


def test_bundled_files_load_by_name():
    for name in ("batch_quant", "batch_quant.yaml"):
        space = load_space(name)
        assert space.study == "batch_quant"
        assert set(space.params) == {"batch_size", "quant_bits", "sparsity", "kv_cache", "batch_timeout_ms"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml")))
def test_every_bundled_space_loads_and_names_its_study(name):
    assert load_space(name).study == name


def test_grid_values_enumerate_steps():
    space = load_space("batch_quant")
    assert grid_values(space.params["sparsity"]) == [0.0, 0.25, 0.5]
    assert grid_values(space.params["quant_bits"]) == [16, 8, 4]


BAD = [
    # (id, file text, text expected in the one-line message)
    ("malformed", "study: [unclosed\n", "malformed YAML at line"),
    ("empty", "", "file is empty"),
    ("not-a-mapping", "- a\n- b\n", "top level must be a mapping"),
    ("unsafe-tag", "study: !!python/object/apply:os.system ['true']\n", "unsafe or unknown YAML tag"),
    ("duplicate-key", "study: a\nstudy: b\n", "duplicate key 'study'"),
    ("unknown-top-key", GOOD + "colour: red\n", "colour: unknown key"),
    ("unknown-knob", GOOD.replace("sparsity: {type", "sparsness: {type"), "params.sparsness: unknown knob"),
    ("wrong-type", GOOD.replace("low: 1, high: 8", "low: one, high: 8"), "params.batch_size.low: must be an integer"),
    ("low-gt-high", GOOD.replace("low: 1, high: 8", "low: 9, high: 8"), "params.batch_size.low: must be <= high"),
    ("empty-choices", GOOD.replace("choices: [16, 8]", "choices: []"), "params.quant_bits.choices: must not be empty"),
    ("bad-choice", GOOD.replace("choices: [16, 8]", "choices: [16, 3]"), "params.quant_bits.choices: must be one of"),
    ("bad-param-type", GOOD.replace("type: int", "type: integer"), "params.batch_size.type: must be int, float or categorical"),
    ("unknown-metric", GOOD.replace("metric: throughput_tok_s", "metric: speed"), "objectives[0].metric: unknown metric 'speed'"),
    ("bad-direction", GOOD.replace("direction: maximize", "direction: up"), "objectives[0].direction: must be maximize or minimize"),
    ("no-objectives", GOOD.split("objectives:")[0], "objectives: required"),
    ("constraint-without-bound", GOOD.replace("{metric: kl_divergence, max: 0.05}", "{metric: kl_divergence}"), "constraints[0]: needs a `max` or `min` bound"),
    ("bad-sampler", GOOD.replace("sampler: tpe", "sampler: magic"), "search.sampler: must be one of"),
    ("bad-preset", GOOD.replace("preset: glm-tiny", "preset: glm-huge"), "model.preset: unknown preset"),
    ("bad-device", GOOD.replace("device: cpu", "device: tpu"), "device: must be auto, cpu, cuda or cuda:K"),
    ("bad-arrival", GOOD.replace("arrival: poisson", "arrival: bursty"), "workload.arrival: must be one of"),
    ("bad-fixed", GOOD.replace("{scheduler: dynamic}", "{scheduler: eager}"), "fixed.scheduler: must be one of"),
    ("log-with-zero", GOOD.replace("low: 1, high: 8, log: true", "low: 0, high: 8, log: true"), "params.batch_size.low: must be > 0 with log"),
    ("grid-needs-step", GOOD.replace("sampler: tpe", "sampler: grid").replace("low: 0.0, high: 0.5, step: 0.25", "low: 0.0, high: 0.5"), "params.sparsity: the grid sampler needs a `step`"),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_exits_2_naming_file_and_key(in_tmp, capsys, text, expected):
    path = write(in_tmp, text)
    code = main(["--space", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and expected in err, err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["space.yaml"], "nothing may be created"


def test_missing_file_exits_2(in_tmp, capsys):
    assert main(["--space", "no/such/file.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no/such/file.yaml" in err and "no such file" in err
    assert list(in_tmp.iterdir()) == []


def test_bad_flag_and_storage_exit_2(in_tmp, capsys):
    assert main(["--space", "batch_quant", "--trials", "many"]) == 2
    assert main(["--space", "batch_quant", "--trials", "0"]) == 2
    assert "search.trials" in capsys.readouterr().err
    assert main(["--space", "batch_quant", "--storage", "redis://x"]) == 2
    assert "unsupported URL" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []
