"""The `glm-train` runner: real training steps on transformers' GLM with a trial's knobs.

One optimizer step = `grad_accum_steps` micro-batches of `micro_batch_size` sequences of
`seq_len` tokens (forward with labels, backward), then the optimizer step. The steps after
`warmup_steps` (which absorb torch.compile, cuBLAS/autotune and allocator warm-up) are timed.

Data: by default a seeded synthetic effective batch of token ids that every optimizer step
sees again (a fixed batch: the loss must fall, which checks the step; speed does not depend on
the ids). With workload `data_path`, consecutive `seq_len` windows of a local token file (see
`load_token_file`) are read in order, wrapping around.

FLOPs per optimizer step (for `train_mfu`), PaLM's convention (Chowdhery et al. 2022, app. B):
    tokens * (6 * N_matmul + 12 * L * H * Dh * T)
N_matmul = all parameters except the input embedding table (a lookup, no matmul; GLM's lm_head
is untied and does count); L layers, H query heads, Dh head dim, T = seq_len. The attention
term counts the full T x T score and value products (no causal discount), and recomputation by
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runners.base import Runner, resolve_device
from runners.contract import InfeasibleConfig, TrialConfig, TrialResult
from runners.glm.model import build_model, model_info
from runners.measure.artifacts import write_rows
from runners.measure.ceilings import Ceilings, lookup_ceilings
from runners.measure.environment import describe
from runners.measure.monitor import ResourceSampler, StepTimer
from runners.registry import resolve_knobs, resolve_workload
from runners.scheduler import RealClock
from runners.train_plan import TrainPlan, make_plan

# Fixed, not a knob: the study tunes speed and memory, and AdamW's cost does not depend on lr.
LEARNING_RATE = 1e-3
MIB = 2**20


# ---------------------------------------------------------------- model, optimizer, data


def enable_checkpointing(model: torch.nn.Module, every: int) -> int:
    """Recompute activations of every `every`-th decoder layer in backward; returns how many.

    transformers names the switch `activation_checkpointing_enable` from 5.23 on and
    `gradient_checkpointing_enable` before; both set a per-layer `gradient_checkpointing`
    flag, which is turned back off on the layers between the chosen ones.
    """
    if every <= 0:
        return 0
    kwargs = {"use_reentrant": False}  # non-reentrant: works with torch.compile and autocast
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return sum(bool(layer.gradient_checkpointing) for layer in layers)


def make_optimizer(model: torch.nn.Module, plan: TrainPlan, device: str) -> tuple[Any, str]:
    """The optimizer and a note on what the knobs did on this device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "adamw":
        fused = plan.fused_optimizer or None  # None lets torch pick foreach, its default
        note = ("fused AdamW (one multi-tensor kernel per step on CUDA, a vectorised C++ loop on CPU)"
                if plan.fused_optimizer else "torch AdamW, default foreach implementation")
        return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=fused), note
    if plan.optimizer == "adamw_8bit":
        from torchao.optim import AdamW8bit

        # torchao compiles its per-parameter update; `fused_optimizer` has no meaning here.
        return AdamW8bit(params, lr=LEARNING_RATE), "torchao AdamW8bit (block-wise 8-bit states; fused knob ignored)"
    if plan.optimizer == "adamw_cpu_offload":
        from torchao.optim import CPUOffloadOptimizer

        # States and the update live on the host; fused=True is torch's fast CPU AdamW path.
        optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, lr=LEARNING_RATE, fused=True)
        return optimizer, "torchao CPUOffloadOptimizer(AdamW fused on the host); fused knob ignored"
    raise ValueError(f"unknown optimizer {plan.optimizer!r}")


def load_token_file(path: str, vocab_size: int) -> torch.Tensor:
    """A 1-D int64 token stream from `.npy` / `.pt` (token ids) or any other file (its bytes).

    Bytes are ids 0..255, so a text file trains byte-level on any model with vocab >= 256.
    """
    file = Path(path)
    if not file.is_file():
        raise InfeasibleConfig(f"workload.data_path {path!r} is not a file")
    if file.suffix == ".npy":
        ids = torch.from_numpy(np.load(file, allow_pickle=False).astype(np.int64).reshape(-1))
    elif file.suffix == ".pt":
        ids = torch.as_tensor(torch.load(file, weights_only=True)).reshape(-1).long()
    else:
        ids = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InfeasibleConfig(f"{path}: token ids span {int(ids.min())}..{int(ids.max())}, "
                               f"outside the model's vocabulary 0..{vocab_size - 1}")
    return ids


def batches(plan: TrainPlan, vocab_size: int, seed: int, device: str,
            data_path: str | None = None) -> Iterator[torch.Tensor]:
    """One [micro*accum, seq_len] id tensor per optimizer step, already on `device`."""
    rows = plan.sequences_per_step
    if data_path is None:
        gen = torch.Generator().manual_seed(seed)
        # ids 0..2 are pad/bos/eos in the preset configs; keep the synthetic text free of them.
        fixed = torch.randint(3, vocab_size, (rows, plan.seq_len), generator=gen).to(device)
        while True:
            yield fixed
    stream = load_token_file(data_path, vocab_size)
    windows = stream.numel() // plan.seq_len
    if windows < 1:
        raise InfeasibleConfig(f"{data_path}: {stream.numel()} tokens, fewer than seq_len={plan.seq_len}")
    sequences = stream[: windows * plan.seq_len].view(windows, plan.seq_len).to(device)
    step = 0
    while True:
        index = torch.arange(step * rows, (step + 1) * rows, device=device) % windows
        yield sequences[index]
        step += 1


# ---------------------------------------------------------------- the step


class TrainStep:
    """Forward + backward over the micro-batches of one effective batch, then the update."""

    def __init__(self, model: torch.nn.Module, plan: TrainPlan, device: str) -> None:
        self.plan = plan
        self.device_type = torch.device(device).type
        self.optimizer, self.optimizer_note = make_optimizer(model, plan, device)
        # float16 overflows without loss scaling; bf16/fp32 need none (scaler disabled = no-op).
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=plan.amp_dtype is torch.float16)
        self.model = torch.compile(model) if plan.compile else model

    def _forward_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.plan.amp_dtype is not None:
            stack.enter_context(torch.autocast(self.device_type, dtype=self.plan.amp_dtype))
        if self.plan.offload_activations:
            # Tensors saved for backward are copied to pinned host memory in forward and back in
            # backward: activation memory moves off the GPU at the price of PCIe traffic.
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=True))
        return stack

    def accumulate(self, batch: torch.Tensor) -> torch.Tensor:
        """Gradients of the mean loss over `batch` ([micro*accum, T]); returns that loss (detached).

        Each micro-batch loss is divided by the number of micro-batches: all micro-batches hold
        the same number of label tokens, so the summed gradients equal the full batch's.
        """
        total = torch.zeros((), device=batch.device)
        for chunk in batch.split(self.plan.micro_batch_size):  # chunk: [micro, T]
            with self._forward_context():
                loss = self.model(input_ids=chunk, labels=chunk, use_cache=False).loss
                loss = loss / self.plan.grad_accum_steps
            self.scaler.scale(loss).backward()  # backward outside autocast, as torch.amp advises
            total += loss.detach().float()
        return total

    def apply(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.accumulate(batch)
        self.apply()
        return loss


def train_flops_per_step(model: torch.nn.Module, plan: TrainPlan) -> float:
    """Model FLOPs of one optimizer step (formula in the module docstring)."""
    cfg = model.config
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * plan.seq_len
    return float(plan.tokens_per_step * (6 * matmul_params + attention))


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class LoopOutcome:
    warmup_losses: list[float]
    losses: list[float]
    step_ms: list[float]
    window_s: float
    grad_scales: list[float]


def run_loop(step: TrainStep, data: Iterator[torch.Tensor], warmup_steps: int, train_steps: int,
             device: str, sampler: ResourceSampler | None = None) -> LoopOutcome:
    """Warm-up steps untimed, then `train_steps` timed steps inside `sampler` (if given)."""
    warmup = [step(next(data)) for _ in range(warmup_steps)]
    _sync(device)
    losses, scales = [], []
    with sampler if sampler is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        timer = StepTimer(device, RealClock()).start()
        for _ in range(train_steps):
            losses.append(step(next(data)))
            timer.mark()
            scales.append(step.scaler.get_scale() if step.scaler.is_enabled() else 1.0)
        _sync(device)
        window_s = time.perf_counter() - t0
    # Losses stay on the device during the window; one read at the end avoids a sync per step.
    return LoopOutcome([float(x) for x in warmup], [float(x) for x in losses],
                       timer.durations_ms(), window_s, scales)


# ---------------------------------------------------------------- the runner


class GlmTrainRunner(Runner):
    name = "glm-train"

    def run(self, config: TrialConfig) -> TrialResult:
        t_setup = time.perf_counter()
        knobs = resolve_knobs(self.name, config.knobs)
        workload = resolve_workload(self.name, config.workload)
        device = resolve_device(config.device)
        plan = make_plan(knobs, config.model, device)
        # Read before the model is built, so a first-time measurement runs on an idle, empty device.
        ceilings = lookup_ceilings(device)
        model = build_model(config.model, plan.weight_dtype, device, config.seed)
        if plan.seq_len > model.config.max_position_embeddings:
            raise InfeasibleConfig(f"seq_len={plan.seq_len} exceeds the model's "
                                   f"max_position_embeddings={model.config.max_position_embeddings}")
        model.train()
        checkpointed = enable_checkpointing(model, plan.checkpoint_every)
        step = TrainStep(model, plan, device)
        data = batches(plan, model.config.vocab_size, int(workload.get("seed", config.seed)), device,
                       workload.get("data_path"))
        info: dict[str, Any] = {
            "model": dataclasses.asdict(model_info(model)), "device": device,
            "weight_dtype": _name(plan.weight_dtype), "compute_dtype": _name(plan.amp_dtype or plan.weight_dtype),
            "checkpointed_layers": checkpointed, "optimizer": step.optimizer_note,
            "effective_batch_sequences": plan.sequences_per_step, "tokens_per_step": plan.tokens_per_step,
            "learning_rate": LEARNING_RATE, "data": workload.get("data_path") or "synthetic fixed batch",
        }
        info["setup_s"] = time.perf_counter() - t_setup

        sampler = ResourceSampler(device)
        outcome = run_loop(step, data, int(workload["warmup_steps"]), int(workload["train_steps"]),
                           device, sampler)
        metrics, unavailable = self._metrics(outcome, plan, sampler, info)
        flops = train_flops_per_step(model, plan)
        self._add_mfu(metrics, unavailable, info, flops, ceilings)
        artifacts = self._write_artifacts(config, outcome, plan, sampler)
        return TrialResult("ok", metrics, environment=describe(device), unavailable=unavailable,
                           artifacts=artifacts, info=info)

    @staticmethod
    def _metrics(outcome: LoopOutcome, plan: TrainPlan, sampler: ResourceSampler,
                 info: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
        steps = len(outcome.losses)
        tokens = plan.tokens_per_step * steps
        resources, unavailable = sampler.summary(tokens=tokens)
        metrics: dict[str, float] = {
            "train_tokens_s": tokens / outcome.window_s,
            "train_step_ms": outcome.window_s * 1e3 / steps,
            "train_step_p50_ms": float(np.percentile(outcome.step_ms, 50)),
            "train_step_p90_ms": float(np.percentile(outcome.step_ms, 90)),
            "train_loss": outcome.losses[-1],
            "setup_s": info["setup_s"],
        }
        # NVML's device-memory peak on CUDA (what a memory cap is about), the RSS peak on CPU;
        # on CUDA without NVML the allocator's reserved peak stands in, and `info` says so.
        peak = resources.pop("peak_memory_mib", None)
        source = "nvml" if sampler.device.startswith("cuda") else "rss"
        if peak is None and "torch_peak_reserved_mib" in resources:
            peak, source = resources["torch_peak_reserved_mib"], "torch_peak_reserved_mib"
            info["train_peak_memory_why_not_nvml"] = unavailable.get("peak_memory_mib", "")
        if peak is not None:
            metrics["train_peak_memory_mib"] = peak
        else:
            unavailable["train_peak_memory_mib"] = unavailable.get("peak_memory_mib", "no memory reading")
        unavailable.pop("peak_memory_mib", None)
        metrics.update(resources)  # torch allocator peaks, power, energy per trained token
        info.update({"train_peak_memory_source": source, "first_loss": (outcome.warmup_losses or outcome.losses)[0],
                     "sampler": sampler.info})
        return metrics, unavailable

    @staticmethod
    def _add_mfu(metrics: dict[str, float], unavailable: dict[str, str], info: dict[str, Any],
                 flops_per_step: float, looked_up: tuple[Ceilings | None, str]) -> None:
        info["flops_per_step"] = flops_per_step
        ceilings, reason = looked_up
        if ceilings is None:
            unavailable["train_mfu"] = reason
            return
        achieved = flops_per_step * 1e3 / metrics["train_step_ms"]  # FLOP/s over the measured window
        metrics["train_mfu"] = achieved / ceilings.matmul_flops_per_s
        info["achieved_flops_per_s"] = achieved
        info["matmul_ceiling"] = {"flops_per_s": ceilings.matmul_flops_per_s, "dtype": ceilings.matmul_dtype,
                                  "n": ceilings.matmul_n, "measured_at": ceilings.measured_at}

    @staticmethod
    def _write_artifacts(config: TrialConfig, outcome: LoopOutcome, plan: TrainPlan,
                         sampler: ResourceSampler) -> dict[str, str]:
        if not config.artifact_dir:
            return {}
        folder = Path(config.artifact_dir)
        rows = [{"step": i, "phase": "warmup", "loss": loss, "step_ms": "", "tokens": plan.tokens_per_step}
                for i, loss in enumerate(outcome.warmup_losses)]
        first = len(rows)
        for i, (loss, ms, scale) in enumerate(zip(outcome.losses, outcome.step_ms, outcome.grad_scales, strict=True)):
            rows.append({"step": first + i, "phase": "measured", "loss": loss, "step_ms": ms,
                         "tokens": plan.tokens_per_step, "tokens_s": plan.tokens_per_step / ms * 1e3,
                         "grad_scale": scale})
        return {"steps": write_rows(folder / "train_steps.csv", rows),
                "timeline": write_rows(folder / "timeline.csv", sampler.samples)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
