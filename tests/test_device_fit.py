"""The space fits the device before the first trial: impossible values removed, or refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runners.capabilities import DeviceFacts, cpu_facts, from_json, impossible_values, to_json
from tuner.cli import main
from tuner.device_fit import device_table, fit_space, fit_to_device, might_not_fit
from tuner.errors import UsageError
from tuner.space import validate

PACKAGES = {"torchao": True, "triton": True, "optimum.quanto": True, "flash_attn": False}
H200 = DeviceFacts("cuda:0", (9, 0), "NVIDIA H200", PACKAGES)
A100 = DeviceFacts("cuda:0", (8, 0), "NVIDIA A100", PACKAGES)


def _space(params, fixed=None, device="cpu"):
    raw = {"study": "fit", "runner": "glm-infer", "model": {"preset": "glm-tiny"}, "device": device,
           "workload": {"arrival": "poisson", "rate_rps": 5, "requests": 8},
           "params": params, "fixed": fixed or {},
           "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}]}
    return validate(raw, source="fit.yaml", default_study="fit")


def test_cpu_cannot_run_gpu_only_values():
    table = impossible_values("glm-infer", DeviceFacts("cpu", packages=PACKAGES))
    assert set(table["quant_bits"]) == {4}
    assert set(table["kv_cache"]) == {"offloaded"}
    assert set(table["quant_kernel"]) == {"triton", "cuda"}
    assert table["compile"] == {True: table["compile"][True]} and "CUDA graphs" in table["compile"][True]
    assert "2:4" in table["sparsity_kind"] and "cuda" in table["decode_attention"]


def test_gpu_facts_decide_gpu_values():
    assert "quant_scheme" not in impossible_values("glm-infer", H200)  # SM 9.0 has fp8
    assert "SM 8.0" in impossible_values("glm-infer", A100)["quant_scheme"]["fp8"]
    assert "quant_bits" not in impossible_values("glm-infer", H200)
    assert "sparsity_kind" not in impossible_values("glm-infer", A100)
    t4 = DeviceFacts("cuda:0", (7, 5), "Tesla T4", PACKAGES)
    assert "SM 7.5" in impossible_values("glm-infer", t4)["sparsity_kind"]["2:4"]
    no_triton = DeviceFacts("cuda:0", (9, 0), "H200", {**PACKAGES, "triton": False})
    assert set(impossible_values("glm-infer", no_triton)["quant_kernel"]) == {"triton", "cuda"}


def test_json_round_trip_keeps_value_types():
    facts, table = from_json(to_json("glm-infer", A100))
    assert facts == A100
    assert table == impossible_values("glm-infer", A100)
    assert True in from_json(to_json("glm-infer", cpu_facts()))[1]["compile"]  # a bool stays a bool


def test_impossible_choices_are_removed_with_one_line_each():
    space = _space({"quant_bits": {"type": "categorical", "choices": [16, 8, 4]},
                    "kv_cache": {"type": "categorical", "choices": ["dynamic", "static", "offloaded"]},
                    "batch_size": {"type": "int", "low": 1, "high": 8}})
    lines = []
    fitted = fit_to_device(space, False, lines.append)
    assert fitted.params["quant_bits"].choices == (16, 8)
    assert fitted.params["kv_cache"].choices == ("dynamic", "static")
    assert fitted.params["batch_size"] == space.params["batch_size"]
    assert len(lines) == 2 and "quant_bits=4 removed" in lines[0] and "offloaded" in lines[1]
    assert fitted.raw["params"]["quant_bits"]["choices"] == [16, 8]  # what the study stores
    assert fit_to_device(space, True, lines.append) is space and len(lines) == 2  # --keep-infeasible


def test_bool_and_int_values_do_not_match_each_other():
    # compile=True is impossible on CPU; quant_bits=1 is not a choice but 1 == True in Python
    table = impossible_values("glm-infer", cpu_facts())
    space = _space({"compile": {"type": "categorical", "choices": [False, True]},
                    "batch_size": {"type": "categorical", "choices": [1, 2]}})
    fitted = fit_space(space, table, lambda _: None)
    assert fitted.params["compile"].choices == (False,)
    assert fitted.params["batch_size"].choices == (1, 2)


def test_nothing_left_or_an_impossible_fixed_value_is_refused():
    table = impossible_values("glm-infer", cpu_facts())
    only_int4 = _space({"quant_bits": {"type": "categorical", "choices": [4]}})
    with pytest.raises(UsageError, match="params.quant_bits: no choice can run"):
        fit_space(only_int4, table, lambda _: None)
    fixed = _space({"batch_size": {"type": "int", "low": 1, "high": 4}}, fixed={"kv_cache": "offloaded"})
    with pytest.raises(UsageError, match="fixed.kv_cache"):
        fit_space(fixed, table, lambda _: None)


def test_a_space_that_fits_every_device_asks_nothing():
    space = _space({"batch_size": {"type": "int", "low": 1, "high": 4},
                    "kv_cache": {"type": "categorical", "choices": ["dynamic", "static"]}}, device="cuda")
    assert not might_not_fit(space)
    # int8 needs torchao, which some environment may lack: that space is checked
    assert might_not_fit(_space({"quant_bits": {"type": "categorical", "choices": [16, 8]}}, device="cuda"))

    def refuse(runner, device):
        raise AssertionError("described the device although nothing could be removed")

    assert fit_to_device(space, False, print, table=refuse) is space


def test_the_child_describes_the_device():
    done = subprocess.run([sys.executable, "-m", "runners.capabilities", "glm-infer", "auto"],
                          capture_output=True, text=True, check=True, timeout=120)
    facts, table = from_json(done.stdout.strip().splitlines()[-1])
    assert facts.device in ("cpu",) or facts.device.startswith("cuda")
    assert table == impossible_values("glm-infer", facts)
    assert device_table("glm-infer", "cpu") == ("cpu", impossible_values("glm-infer", cpu_facts()))


def test_cli_refuses_a_space_with_nothing_left(in_tmp, capsys):
    (in_tmp / "int4.yaml").write_text(
        "runner: glm-infer\nmodel: {preset: glm-tiny}\ndevice: cpu\n"
        "workload: {arrival: poisson, rate_rps: 5, requests: 8}\n"
        "params: {quant_bits: {type: categorical, choices: [4]}}\n"
        "objectives: [{metric: throughput_tok_s, direction: maximize}]\n")
    assert main(["--space", "int4.yaml"]) == 2
    assert "no choice can run on cpu" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()  # nothing created
