"""One declaration per runner (runners/registry.py): the tuner validates from it, the runner takes
its workload defaults from it, the model cache keys by its `rebuilds` knobs; and the metric paths
that were derived twice now agree because they are one."""

from __future__ import annotations

import math

import pytest

from runners.glm.model_cache import MODEL_KNOBS, model_key
from runners.knobs import INFER_KNOBS, Knob
from runners.measure import ceilings
from runners.measure.artifacts import request_rows
from runners.registry import BUILTIN, PLUGINS, RUNNER_KNOBS, resolve_workload, runner_spec
from runners.scheduler import RequestTiming
from runners.serving import WindowRule
from runners.stats import per_request_ms, serving_metrics
from tuner.space import SpaceError, validate

TINY = {"preset": "glm-tiny"}
# Context under which every compression knob matters (4-bit, sparse): no knob is masked.
COMPRESSED = {"quant_bits": 4, "sparsity": 0.5}


def _other_value(knob: Knob):
    if knob.choices is not None:
        return next(c for c in knob.choices if c != knob.default)
    if knob.kind is bool:
        return not knob.default
    return 0.25 if knob.name == "sparsity" else knob.default + 1


def _key(knobs: dict, kind: str = "fast") -> str:
    resolved = {name: k.default for name, k in INFER_KNOBS.items()} | COMPRESSED | knobs
    return model_key(TINY, "float32", "cpu", 0, resolved, kind)


def test_the_model_cache_keys_exactly_the_knobs_declared_to_rebuild():
    rebuilding = {n for n, k in INFER_KNOBS.items() if k.rebuilds}
    assert set(MODEL_KNOBS) == rebuilding - {"dtype"}  # dtype is keyed by its resolved value
    assert {"quant_bits", "sparsity", "engine", "compile"} <= rebuilding
    for name in MODEL_KNOBS:
        if name in COMPRESSED:
            continue
        assert _key({name: _other_value(INFER_KNOBS[name])}) != _key({}), f"{name} must split the cache"
    for name in set(INFER_KNOBS) - rebuilding:
        assert _key({name: _other_value(INFER_KNOBS[name])}) == _key({}), f"{name} must share a build"


def test_each_runner_takes_its_own_workload_keys():
    base = {"study": "s", "runner": "glm-train", "device": "cpu", "workload": {"train_steps": 2},
            "objectives": [{"metric": "train_tokens_s"}]}
    assert validate(base, "t.yaml", "t").workload == {"train_steps": 2}
    with pytest.raises(SpaceError, match=r"workload.requests: unknown key \(allowed: data_path, seed"):
        validate({**base, "workload": {"requests": 4}}, "t.yaml", "t")
    infer = {"study": "s", "device": "cpu", "workload": {"ci_metric": "ttft", "requests": 8},
             "objectives": [{"metric": "throughput_tok_s"}]}
    workload = validate(infer, "i.yaml", "i").workload
    assert WindowRule.from_workload(workload).metric == "ttft"  # the key the window reads is settable
    with pytest.raises(SpaceError, match=r"workload.ci_metric: must be one of \['ttft', 'tpot', 'latency'\]"):
        validate({**infer, "workload": {"ci_metric": "p99"}}, "i.yaml", "i")
    with pytest.raises(SpaceError, match="workload.requests: must be <= 100000, got 100001"):
        validate({**infer, "workload": {"requests": 100_001}}, "i.yaml", "i")


def test_workload_defaults_come_from_the_declaration():
    assert resolve_workload("glm-infer", {"requests": 8}) == {
        "arrival": "poisson", "rate_rps": 8.0, "requests": 8, "warmup_requests": 4, "prompt_tokens": 32,
        "output_tokens": 16, "eval_sequences": 4, "eval_tokens": 64}
    assert resolve_workload("glm-train", {}) == {"train_steps": 8, "warmup_steps": 3}


def test_a_plug_in_runner_registers_through_its_knob_table():
    target = "tests.fault_runner:FaultRunner"
    RUNNER_KNOBS[target] = {"x": Knob("x", 1.0, (int, float))}
    try:
        spec = runner_spec(target)
        assert spec.target == target and set(spec.knobs) == {"x"} and "requests" in spec.workload_keys
        assert target in RUNNER_KNOBS and target not in BUILTIN
    finally:
        del RUNNER_KNOBS[target]
    assert target not in PLUGINS
    with pytest.raises(KeyError, match="unknown runner"):
        runner_spec(target)
    with pytest.raises(KeyError, match="built-in runner"):
        RUNNER_KNOBS["glm-infer"] = {}


def test_knob_bounds_are_part_of_the_knob():
    sparsity = INFER_KNOBS["sparsity"]
    assert sparsity.check(0.5) is None
    assert sparsity.check(1.0) == "1.0 is outside [0, 1)"
    assert INFER_KNOBS["batch_size"].check(0) == "0 is outside [1, 65536]"


def _timing(rid: int, arrival: float, first: float, finish: float, tokens: int) -> RequestTiming:
    return RequestTiming(rid, arrival, arrival, first, finish, 8, tokens, 0, 1)


def test_request_rows_and_serving_metrics_read_one_latency_derivation():
    timings = [_timing(0, 0.0, 0.1, 0.5, 5), _timing(1, 0.2, 0.4, 0.4, 1), _timing(2, 0.3, 0.6, 1.1, 3)]
    each = per_request_ms(timings)
    assert each["ttft"].tolist() == pytest.approx([100.0, 200.0, 300.0])
    assert each["tpot"][0] == pytest.approx(100.0) and math.isnan(each["tpot"][1])
    assert each["tpot"][2] == pytest.approx(250.0)
    rows = request_rows(timings)
    assert [r["ttft_ms"] for r in rows] == each["ttft"].tolist()
    assert [r["latency_ms"] for r in rows] == each["latency"].tolist()
    assert rows[1]["tpot_ms"] == "" and rows[2]["tpot_ms"] == each["tpot"][2]
    # The one-token request meets a tpot bound; the others are judged by theirs.
    metrics, _ = serving_metrics(timings, slo={"tpot_ms": 200.0})
    assert metrics["goodput_rps"] == pytest.approx(2 / 1.1)
    assert metrics["latency_p50_ms"] == pytest.approx(500.0)


def test_the_ceiling_lookup_has_one_error_rule(monkeypatch):
    def out_of_memory(device, *args, **kwargs):
        raise MemoryError("CUDA out of memory.\nTried to allocate 1 GiB")

    monkeypatch.setattr(ceilings, "get_ceilings", out_of_memory)
    found, reason = ceilings.lookup_ceilings("cuda:0")
    assert found is None and reason == "hardware ceilings could not be measured: MemoryError: CUDA out of memory."
    given = ceilings.Ceilings(1e9, 1e12, "dev", "drv", "2026-01-01T00:00:00+00:00")
    assert ceilings.lookup_ceilings("cuda:0", given) == (given, "")


def test_every_builtin_runner_names_a_loadable_class_path():
    for name, spec in BUILTIN.items():
        module, _, cls = spec.target.partition(":")
        assert module.startswith("runners.") and cls, name


def test_quality_knobs_are_the_built_model_and_the_kv_policy():
    from runners.knobs import quality_knobs

    base = {"batch_size": 8, "scheduler": "dynamic", "quant_bits": 4, "kv_cache": "static", "kv_bits": 8}
    key = quality_knobs(INFER_KNOBS, base)
    # batch size, scheduler and batch timeout do not change what the quality pass measures
    assert key == quality_knobs(INFER_KNOBS, {**base, "batch_size": 1, "scheduler": "continuous",
                                              "batch_timeout_ms": 1.0})
    assert key != quality_knobs(INFER_KNOBS, {**base, "kv_cache": "quantized"})
    assert key != quality_knobs(INFER_KNOBS, {**base, "quant_bits": 8})
    # kv_bits matters only to quantized KV (its applies_when)
    assert key == quality_knobs(INFER_KNOBS, {**base, "kv_bits": 4})
    quantized = {**base, "kv_cache": "quantized"}
    assert quality_knobs(INFER_KNOBS, quantized) != quality_knobs(INFER_KNOBS, {**quantized, "kv_bits": 4})
    assert ("kv_cache", "static") in key and not any(name == "batch_size" for name, _ in key)
    # a table that declares no rebuilding or quality knob says nothing about quality
    assert quality_knobs({"x": Knob("x", 1, int)}, {"x": 2}) is None
