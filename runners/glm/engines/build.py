"""Where the GLM stack's engines are built: the fast engine of a compressed `FastGlm` (kept with
the model across trials), and the engine serving one trial. Nothing outside `engines/` builds
one; serving code takes the engine it is given."""

from __future__ import annotations

from typing import Any

import torch

from runners.glm.engines.base import PrefixLenFn, PromptFn, TrialEngine
from runners.glm.engines.fast import FastEngine
from runners.glm.engines.hf import HFEngine
from runners.glm.engines.kv_pool import PREFILL_GROUP_TOKENS


def graph_min_batch(knobs: dict[str, Any]) -> int:
    """Smallest batch bucket whose decode step is captured in a CUDA graph.

    torchao int8 dynamic-activation decode failed CUDA graph capture at batch 1 on the H200
    (and the failed capture left the process's CUDA RNG unusable); batch 32 captured fine.
    """
    if int(knobs["quant_bits"]) == 8 and knobs["quant_scheme"] == "dynamic_activation":
        return 32
    return 1


def inductor_options(knobs: dict[str, Any]) -> dict[str, Any]:
    """Per-compile Inductor options for these knobs.

    int8 weight-only: Inductor's post-grad pattern rewrites `mm(x, int8 weight -> bf16) * scale`
    into `aten._weight_int8pack_mm`, whose CUDA kernel took 588 ms per decode step at batch 32 on
    the H200 (an fp32 reference kernel). Batch 1 never reaches it (the M=1 matmul is decomposed
    into a fused reduction first). Turning the pattern matcher off for these models keeps
    batches > 1 on cuBLAS with the int8 -> bf16 dequantisation as its own kernel.
    """
    if (int(knobs["quant_bits"]) == 8 and knobs["quant_scheme"] == "weight_only"
            and knobs.get("quant_kernel", "torchao") == "torchao"):
        return {"pattern_matcher": False}
    return {}


def build_fast_engine(model: Any, device: str, knobs: dict[str, Any]) -> FastEngine:
    """The static-KV engine over a `FastGlm`, with the knobs' compile and attention settings."""
    return FastEngine(model, device, bool(knobs["compile"]), graph_min_batch(knobs), inductor_options(knobs),
                      fused_attention=knobs["decode_attention"] == "cuda")


def trial_engine(model: torch.nn.Module, fast: FastEngine | None, knobs: dict[str, Any], device: str,
                 prompts: PromptFn, prefix_len_fn: PrefixLenFn) -> TrialEngine:
    """The engine serving this trial: transformers' loop (no `fast` engine built), `FastEngine`
    (static KV, static batches) or its slot pool (`SlotEngine`: continuous batching, or a
    non-static KV policy)."""
    if fast is None:
        return HFEngine(model, device, knobs["kv_cache"], int(knobs["kv_bits"]), prompts)
    engine: Any = fast
    if knobs.get("scheduler", "dynamic") == "continuous" or knobs["kv_cache"] != "static":
        fast.release_buckets()  # earlier trials' static buckets would count in this trial's peak memory
        engine = fast.slot_engine(knobs["kv_cache"], int(knobs["kv_bits"]), int(knobs.get("prefill_chunk_tokens", 0)),
                                  int(knobs.get("decode_length_step", 0)),
                                  int(knobs.get("prefill_group_tokens", PREFILL_GROUP_TOKENS)))
    engine.begin_trial(prompts, prefix_len_fn, knobs["prefix_cache"], float(knobs["prefix_cache_mib"]))
    return engine
