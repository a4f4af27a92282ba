"""A `glm-train` trial's knobs as a typed plan, checked against the device (runners/train.py
runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.model import DTYPES


@dataclass(frozen=True)
class TrainPlan:
    """A trial's training knobs, parsed and checked against the device."""

    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    checkpoint_every: int  # 0 = no recomputation, 1 = every layer, N = every N-th layer
    offload_activations: bool  # saved activations go to pinned host memory
    weight_dtype: torch.dtype
    amp_dtype: torch.dtype | None  # None = no autocast
    fused_optimizer: bool
    optimizer: str
    compile: bool

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


def parse_checkpointing(value: str) -> tuple[int, bool]:
    """`grad_checkpointing` -> (recompute every N-th layer or 0, offload saved activations)."""
    if value == "off":
        return 0, False
    if value == "on":
        return 1, False
    if value == "offload":
        return 0, True
    if value.startswith("every_") and value[6:].isdigit() and int(value[6:]) >= 1:
        return int(value[6:]), False
    raise ValueError(f"grad_checkpointing: expected off | on | every_N | offload, got {value!r}")


def make_plan(knobs: dict[str, Any], model_spec: dict[str, Any], device: str) -> TrainPlan:
    """Typed knobs; combinations that cannot run on `device` raise InfeasibleConfig."""
    every, offload = parse_checkpointing(str(knobs["grad_checkpointing"]))
    # Training keeps float32 master weights unless the trial asks otherwise; `amp_dtype`
    # picks the compute precision.
    weight_dtype = DTYPES[knobs.get("dtype") or model_spec.get("dtype") or "float32"]
    amp = None if knobs["amp_dtype"] == "float32" else DTYPES[knobs["amp_dtype"]]
    plan = TrainPlan(int(knobs["micro_batch_size"]), int(knobs["grad_accum_steps"]),
                     int(knobs["seq_len"]), every, offload, weight_dtype, amp,
                     bool(knobs["fused_optimizer"]), str(knobs["optimizer"]), bool(knobs["compile"]))
    _check_plan(plan, device)
    return plan


def _check_plan(plan: TrainPlan, device: str) -> None:
    cuda = device.startswith("cuda")
    if min(plan.micro_batch_size, plan.grad_accum_steps) < 1 or plan.seq_len < 2:
        raise InfeasibleConfig("micro_batch_size and grad_accum_steps must be >= 1 and seq_len >= 2")
    if plan.offload_activations and not cuda:
        raise InfeasibleConfig("grad_checkpointing=offload moves saved activations to host memory; "
                               "on a CPU device they already live there, so it needs a CUDA device")
    if plan.optimizer == "adamw_cpu_offload" and not cuda:
        raise InfeasibleConfig("optimizer=adamw_cpu_offload (torchao CPUOffloadOptimizer) supports "
                               "only CUDA/XPU devices")
    if plan.offload_activations and plan.compile:
        # Measured (torch 2.13 CPU, torch 2.11 CUDA): save_on_cpu restores saved tensors
        # contiguous, and the compiled backward asserts the original strides: it cannot run.
        raise InfeasibleConfig("grad_checkpointing=offload with compile: torch.compile's backward rejects "
                               "the re-laid-out tensors that save_on_cpu hands back")
    if plan.amp_dtype is torch.float16 and plan.weight_dtype is not torch.float32:
        raise InfeasibleConfig("amp_dtype=float16 needs float32 master weights: GradScaler refuses "
                               f"to unscale {plan.weight_dtype} gradients")
    if plan.amp_dtype is torch.float16 and plan.optimizer == "adamw_cpu_offload":
        raise InfeasibleConfig("amp_dtype=float16 needs GradScaler, which cannot unscale through "
                               "torchao's CPUOffloadOptimizer (its parameters live on the host)")
    if plan.amp_dtype not in (None, plan.weight_dtype) and plan.weight_dtype is not torch.float32:
        raise InfeasibleConfig(f"autocast to {plan.amp_dtype} over {plan.weight_dtype} weights mixes "
                               "two low precisions; use float32 weights with amp")
