"""The glm-train runner on the tiny preset, on CPU: each knob does what it says, measured."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runners.contract import InfeasibleConfig, TrialConfig
from runners.glm.model import build_model
from runners.knobs import resolve_knobs
from runners.train import (
    GlmTrainRunner,
    TrainStep,
    batches,
    enable_checkpointing,
    train_flops_per_step,
)
from runners.train_plan import make_plan, parse_checkpointing

ROOT = Path(__file__).resolve().parents[1]
TINY = {"preset": "glm-tiny"}


@pytest.fixture(autouse=True)
def _ceilings_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The matmul ceiling behind train_mfu is measured once and cached; keep it out of $HOME.
    monkeypatch.setenv("AUTOGLM_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _config(knobs: dict, workload: dict | None = None, model: dict | None = None, artifact_dir: str = "") -> TrialConfig:
    return TrialConfig("glm-train", model or TINY, "cpu", workload or {"train_steps": 4, "warmup_steps": 1},
                       knobs, seed=0, artifact_dir=artifact_dir)


def _setup(knobs: dict, model: dict | None = None) -> tuple[torch.nn.Module, TrainStep, object]:
    model_spec = model or TINY
    plan = make_plan(resolve_knobs("glm-train", knobs), model_spec, "cpu")
    net = build_model(model_spec, plan.weight_dtype, "cpu", seed=0).train()
    enable_checkpointing(net, plan.checkpoint_every)
    return net, TrainStep(net, plan, "cpu"), plan


# ---------------------------------------------------------------- children (memory, OOM), in parallel

# Big enough that activations (~tens of MiB per layer) stand clear of RSS noise; 8 layers so
# that every_2 sits measurably between off and on.
_MEMORY_MODEL = {"preset": "glm-tiny", "num_layers": 8}
_MEMORY_KNOBS = {"micro_batch_size": 4, "seq_len": 512}


def _spawn(tmp: Path, name: str, config: TrialConfig) -> tuple[subprocess.Popen, Path]:
    """`python -m runners.child CONFIG RESULT`, exactly as the tuner starts a trial."""
    cfg, res = tmp / f"{name}.json", tmp / f"{name}.result.json"
    cfg.write_text(config.to_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runners.child", str(cfg), str(res)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, res


@pytest.fixture(scope="module")
def child_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each config in a fresh process, so one trial's RSS peak cannot leak into another's.

    Every trial goes through the real child entry point, which applies the memory cap.
    """
    tmp = tmp_path_factory.mktemp("children")
    with pytest.MonkeyPatch.context() as patch:  # the children inherit the environment
        patch.setenv("AUTOGLM_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return _run_children(tmp)


def _run_children(tmp: Path) -> dict[str, dict]:
    workload = {"train_steps": 1, "warmup_steps": 0}  # one step reaches the peak
    # 256 MiB of growth holds the OpenMP threads and the ceilings measurement, but not this
    # batch's activations (~600 MiB): the allocator must fail.
    oom = _config({"micro_batch_size": 16, "seq_len": 512, "memory_limit_mib": 256}, workload, _MEMORY_MODEL)
    configs = {ck: _config({**_MEMORY_KNOBS, "grad_checkpointing": ck}, workload, _MEMORY_MODEL)
               for ck in ("off", "every_2", "on")}
    configs["oom"] = oom
    results = {}
    for name, config in configs.items():
        # One at a time, each in a fresh process: the peaks must not compete for memory or cores,
        # and one trial's RSS must not leak into the next.
        proc, res = _spawn(tmp, name, config)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: child failed\n{err[-6000:]}"
        results[name] = json.loads(res.read_text())
    return results


def test_checkpointing_lowers_rss_peak(child_results: dict[str, dict]) -> None:
    peak = {ck: child_results[ck]["metrics"]["train_peak_memory_mib"] for ck in ("off", "every_2", "on")}
    layers = {ck: child_results[ck]["info"]["checkpointed_layers"] for ck in ("off", "every_2", "on")}
    assert layers == {"off": 0, "every_2": 4, "on": 8}
    # Measured on a 2-core dev box: off ~578, every_2 ~510, on ~459 MiB. Each step down must be clear.
    assert peak["on"] < peak["every_2"] - 20 < peak["off"] - 40, peak


def test_forced_oom_is_infeasible(child_results: dict[str, dict]) -> None:
    result = child_results["oom"]
    assert result["status"] == "infeasible"
    assert "out of memory" in result["reason"]


# ---------------------------------------------------------------- the step itself


def test_accumulation_keeps_the_effective_batch() -> None:
    """micro 2 x accum 2 sees the tokens of micro 4 x accum 1 and gives the same gradient and update."""
    grads, params = [], []
    for knobs in ({"micro_batch_size": 2, "grad_accum_steps": 2}, {"micro_batch_size": 4, "grad_accum_steps": 1}):
        net, step, plan = _setup({**knobs, "seq_len": 32})
        batch = next(batches(plan, net.config.vocab_size, seed=3, device="cpu"))
        assert batch.shape == (4, 32) and plan.tokens_per_step == 128
        step.accumulate(batch)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        step.apply()
        params.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # Adam divides by |g| + 1e-8: gradients near eps amplify rounding, so compare at 1 % of lr.
    assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-5)


def test_accumulated_gradient_matches_full_batch_loss_scale() -> None:
    # The accumulated gradient equals the gradient of the mean loss over the whole batch, i.e. the
    # micro-batch losses are divided by the accumulation count (a missing division doubles it).
    net, step, plan = _setup({"micro_batch_size": 1, "grad_accum_steps": 2, "seq_len": 16})
    batch = next(batches(plan, net.config.vocab_size, seed=1, device="cpu"))
    step.accumulate(batch)
    accumulated = net.lm_head.weight.grad.clone()
    net.zero_grad()
    net(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    assert torch.allclose(accumulated, net.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_loss_decreases_on_fixed_batch(tmp_path: Path) -> None:
    result = GlmTrainRunner().run(_config({"micro_batch_size": 2, "seq_len": 64},
                                          {"train_steps": 10, "warmup_steps": 0}, artifact_dir=str(tmp_path)))
    first, last = result.info["first_loss"], result.metrics["train_loss"]
    assert math.isclose(first, math.log(1024), rel_tol=0.05)  # random init: ~uniform over the vocab
    assert last < first - 1.0
    rows = list(csv.DictReader(open(result.artifacts["steps"])))
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) == 10 and all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_metrics_and_artifacts(tmp_path: Path) -> None:
    result = GlmTrainRunner().run(_config({"micro_batch_size": 2, "seq_len": 32},
                                          {"train_steps": 5, "warmup_steps": 2}, artifact_dir=str(tmp_path)))
    m = result.metrics
    assert result.status == "ok"
    for name in ("train_tokens_s", "train_step_ms", "train_step_p50_ms", "train_step_p90_ms",
                 "train_peak_memory_mib", "train_mfu", "train_loss"):
        assert name in m and m[name] > 0, name
    assert m["train_step_p50_ms"] <= m["train_step_p90_ms"]
    assert 0 < m["train_mfu"] < 1
    # tokens/s and the mean step time describe the same window.
    assert math.isclose(m["train_tokens_s"], 64 / (m["train_step_ms"] / 1e3), rel_tol=1e-6)
    rows = list(csv.DictReader(open(result.artifacts["steps"])))
    assert [r["phase"] for r in rows] == ["warmup"] * 2 + ["measured"] * 5
    assert Path(result.artifacts["timeline"]).exists()
    assert result.environment["torch"] == torch.__version__
    assert "torch_peak_allocated_mib" in result.unavailable  # no CUDA allocator on CPU


def test_flops_formula() -> None:
    net, _, plan = _setup({"micro_batch_size": 2, "grad_accum_steps": 3, "seq_len": 64})
    cfg = net.config
    params = sum(p.numel() for p in net.parameters()) - cfg.vocab_size * cfg.hidden_size  # no embedding
    per_token = 6 * params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 64
    assert train_flops_per_step(net, plan) == 2 * 3 * 64 * per_token


# ---------------------------------------------------------------- each knob


def test_checkpointing_knob_values() -> None:
    assert parse_checkpointing("off") == (0, False)
    assert parse_checkpointing("on") == (1, False)
    assert parse_checkpointing("every_4") == (4, False)
    assert parse_checkpointing("offload") == (0, True)
    net, *_ = _setup({"grad_checkpointing": "every_2"}, {"preset": "glm-tiny", "num_layers": 5})
    assert [layer.gradient_checkpointing for layer in net.model.layers] == [True, False, True, False, True]


def test_checkpointing_gives_the_same_gradient() -> None:
    grads = []
    for ck in ("off", "on"):
        net, step, plan = _setup({"grad_checkpointing": ck, "micro_batch_size": 2, "seq_len": 32})
        step.accumulate(next(batches(plan, net.config.vocab_size, seed=0, device="cpu")))
        grads.append(net.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_amp_dtype_sets_compute_precision_and_scaler(amp: str) -> None:
    net, step, plan = _setup({"amp_dtype": amp, "seq_len": 16})
    seen: list[torch.dtype] = []
    net.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step(next(batches(plan, net.config.vocab_size, seed=0, device="cpu")))
    assert seen == [getattr(torch, amp)]
    assert next(net.parameters()).dtype == torch.float32  # master weights stay float32
    assert step.scaler.is_enabled() == (amp == "float16")


def test_fp32_default_runs_without_autocast() -> None:
    net, step, plan = _setup({"seq_len": 16})
    seen: list[torch.dtype] = []
    net.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step(next(batches(plan, net.config.vocab_size, seed=0, device="cpu")))
    assert seen == [torch.float32] and not step.scaler.is_enabled()


def test_optimizer_knobs() -> None:
    _, step, _ = _setup({"fused_optimizer": True})
    assert isinstance(step.optimizer, torch.optim.AdamW) and step.optimizer.defaults["fused"] is True
    _, step, _ = _setup({})
    assert not step.optimizer.defaults["fused"]
    _, step, _ = _setup({"optimizer": "adamw_8bit"})
    assert type(step.optimizer).__name__ == "AdamW8bit"  # its first step compiles (~20 s on CPU): not run here


def test_compile_knob_wraps_the_model() -> None:
    net, step, _ = _setup({"compile": True})
    assert isinstance(step.model, torch._dynamo.eval_frame.OptimizedModule) and step.model._orig_mod is net


@pytest.mark.parametrize("knobs, why", [
    ({"grad_checkpointing": "offload"}, "CUDA"),
    ({"optimizer": "adamw_cpu_offload"}, "CUDA"),
    ({"amp_dtype": "float16", "dtype": "bfloat16"}, "GradScaler"),
    ({"seq_len": 4096}, "max_position_embeddings"),
])
def test_impossible_combinations_are_infeasible(knobs: dict, why: str) -> None:
    with pytest.raises(InfeasibleConfig, match=why):
        GlmTrainRunner().run(_config(knobs))


def test_plan_checks_on_a_cuda_device() -> None:
    # Pure logic (no GPU touched): what stays infeasible even where CUDA is present.
    def plan(knobs: dict) -> object:
        return make_plan(resolve_knobs("glm-train", knobs), TINY, "cuda:0")

    assert plan({"grad_checkpointing": "offload"}).offload_activations
    assert plan({"optimizer": "adamw_cpu_offload"}).optimizer == "adamw_cpu_offload"
    with pytest.raises(InfeasibleConfig, match="save_on_cpu"):
        plan({"grad_checkpointing": "offload", "compile": True})
    with pytest.raises(InfeasibleConfig, match="CPUOffloadOptimizer"):
        plan({"optimizer": "adamw_cpu_offload", "amp_dtype": "float16"})


# ---------------------------------------------------------------- data files


def test_data_path_token_and_text_files(tmp_path: Path) -> None:
    ids = np.arange(3, 3 + 10 * 16) % 1024
    np.save(tmp_path / "ids.npy", ids)
    plan = make_plan(resolve_knobs("glm-train", {"micro_batch_size": 2, "grad_accum_steps": 2, "seq_len": 16}),
                     TINY, "cpu")
    stream = batches(plan, 1024, seed=0, device="cpu", data_path=str(tmp_path / "ids.npy"))
    first, second, third = next(stream), next(stream), next(stream)
    assert first.tolist() == ids[:64].reshape(4, 16).tolist()
    assert second[:2].tolist() == ids[64:96].reshape(2, 16).tolist()  # consecutive windows
    assert third[2:].tolist() == ids[:32].reshape(2, 16).tolist()  # 10 windows: wraps around
    (tmp_path / "text.txt").write_text("hello GLM " * 20)
    text = next(batches(plan, 1024, seed=0, device="cpu", data_path=str(tmp_path / "text.txt")))
    assert bytes(text[0].tolist()).decode() == "hello GLM hello "
    result = GlmTrainRunner().run(_config({"seq_len": 16}, {"train_steps": 2, "warmup_steps": 0,
                                                            "data_path": str(tmp_path / "text.txt")}))
    assert result.status == "ok" and result.info["data"].endswith("text.txt")


def test_data_path_outside_vocab_is_infeasible(tmp_path: Path) -> None:
    torch.save(torch.tensor([5, 2000, 7] * 50), tmp_path / "ids.pt")
    with pytest.raises(InfeasibleConfig, match="vocabulary"):
        GlmTrainRunner().run(_config({"seq_len": 16}, {"data_path": str(tmp_path / "ids.pt")}))


def test_train_memory_space_loads() -> None:
    pytest.importorskip("optuna")
    from tuner.space import load_space

    space = load_space(str(ROOT / "search_spaces" / "train_memory.yaml"))
    assert space.runner == "glm-train"
    assert {o.metric: o.direction for o in space.objectives} == {
        "train_tokens_s": "maximize", "train_peak_memory_mib": "minimize"}
    assert any(c.metric == "train_peak_memory_mib" and c.max for c in space.constraints)
    assert space.baseline_params().get("micro_batch_size", 1) == 1


# ---------------------------------------------------------------- on the GPU machine (-m gpu)

_GPU_MODEL = {"preset": "glm-tiny", "num_layers": 8}


def _gpu_run(knobs: dict) -> dict:
    config = TrialConfig("glm-train", _GPU_MODEL, "cuda", {"train_steps": 3, "warmup_steps": 2},
                         {"micro_batch_size": 4, "seq_len": 512, **knobs})
    result = GlmTrainRunner().run(config)
    assert result.status == "ok" and math.isfinite(result.metrics["train_loss"])
    return result.metrics


@pytest.mark.gpu
@pytest.mark.parametrize("knobs", [
    {}, {"amp_dtype": "bfloat16", "fused_optimizer": True}, {"amp_dtype": "float16"},
    {"grad_checkpointing": "every_2"}, {"grad_checkpointing": "offload"},
    {"compile": True, "amp_dtype": "bfloat16", "grad_checkpointing": "on"},
])
def test_gpu_knobs_run(knobs: dict) -> None:
    metrics = _gpu_run(knobs)
    print(knobs, {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["train_peak_memory_mib"] > 0 and 0 < metrics["train_mfu"] < 1


@pytest.mark.gpu
def test_gpu_checkpointing_and_offload_lower_the_allocator_peak() -> None:
    peak = {ck: _gpu_run({"grad_checkpointing": ck})["torch_peak_allocated_mib"]
            for ck in ("off", "every_2", "on", "offload")}
    print("torch_peak_allocated_mib by grad_checkpointing:", peak)
    assert peak["on"] < peak["every_2"] < peak["off"], peak
    assert peak["offload"] < peak["off"], peak


@pytest.mark.gpu
def test_gpu_optimizer_state_memory() -> None:
    # 8-bit moments and host-resident moments both shrink what the GPU allocator holds; this is
    # also where both torchao variants run on CUDA (the knob test above leaves them out).
    peak = {opt: _gpu_run({"optimizer": opt})["torch_peak_allocated_mib"]
            for opt in ("adamw", "adamw_8bit", "adamw_cpu_offload")}
    print("torch_peak_allocated_mib by optimizer:", peak)
    assert peak["adamw_cpu_offload"] < peak["adamw_8bit"] < peak["adamw"], peak
