"""Every registered runner goes through the same checks on the tiny GLM, on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runners import RUNNERS, load_runner
from runners.contract import METRICS, TrialConfig, TrialResult

# The smallest honest run of each runner, and the metrics it must always produce on CPU.
CASES = {
    "glm-infer": ({"arrival": "poisson", "rate_rps": 200, "requests": 12, "warmup_requests": 2,
                   "prompt_tokens": 8, "output_tokens": 4, "eval_sequences": 2, "eval_tokens": 16},
                  {"batch_size": 4},
                  {"throughput_tok_s", "latency_p99_ms", "ttft_p50_ms", "tpot_p50_ms", "peak_memory_mib",
                   "kl_divergence", "top1_agreement", "measured_requests"}),
    "glm-train": ({"train_steps": 3, "warmup_steps": 1},
                  {"micro_batch_size": 2, "seq_len": 32},
                  {"train_tokens_s", "train_step_ms", "train_peak_memory_mib", "train_loss"}),
}


# Runners that answer from a recorded table build no model: tests/test_replay.py checks them.
TABLE_RUNNERS = {"replay"}


def test_every_registered_runner_has_a_contract_case():
    assert set(RUNNERS) - TABLE_RUNNERS == set(CASES)


@pytest.fixture(params=sorted(CASES))
def runner_case(request, tmp_path):
    name = request.param
    workload, knobs, required = CASES[name]
    config = TrialConfig(name, {"preset": "glm-tiny"}, "cpu", workload, knobs, seed=0,
                         artifact_dir=str(tmp_path / "artifacts"))
    return name, load_runner(name).run(config), required


def test_result_uses_contract_names_and_real_numbers(runner_case):
    _, result, required = runner_case
    assert result.status == "ok", result.reason
    assert required <= set(result.metrics)
    unknown = set(result.metrics) - set(METRICS) - {"setup_s"}
    assert not unknown, f"metrics outside the contract: {unknown}"
    for name, value in result.metrics.items():
        assert isinstance(value, float | int) and math.isfinite(value), (name, value)


def test_absent_metrics_carry_a_reason_and_are_never_zero_filled(runner_case):
    _, result, _ = runner_case
    assert not set(result.unavailable) & set(result.metrics)
    assert all(isinstance(r, str) and r for r in result.unavailable.values())
    # On CPU there is no NVML: power and energy must be absent, not 0.
    for name in ("mean_power_w", "energy_j_per_tok"):
        assert name not in result.metrics


def test_environment_and_artifacts_are_recorded(runner_case):
    _, result, _ = runner_case
    assert result.environment["torch"] and result.environment["device"] == "cpu"
    assert result.artifacts, "a per-trial artifact with raw samples is required"
    for path in result.artifacts.values():
        assert Path(path).stat().st_size > 0


def test_result_round_trips_through_json(runner_case):
    _, result, _ = runner_case
    again = TrialResult.from_dict(json.loads(result.to_json()))
    assert again.metrics == pytest.approx(result.metrics)
