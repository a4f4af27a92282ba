"""Batched greedy generation on transformers' GLM with a chosen KV-cache policy.

A manual prefill + decode loop (rather than `generate`) so that every step's completion time
is known: that is where TTFT and TPOT come from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache, StaticCache

from runners.contract import InfeasibleConfig
from runners.glm.engines.base import (
    CAPABILITIES,
    PrefixLenFn,
    PromptFn,
    StaticBatchEngine,
    TrialPlan,
    continuous_kv_refusal,
)
from runners.glm.work import WorkCounter, left_pad
from runners.scheduler import IterationEngine
from runners.workload import Request


def make_cache(policy: str, model: torch.nn.Module, device: str, max_len: int, kv_bits: int) -> Any:
    """A fresh KV cache of `policy` (dynamic | static | offloaded | quantized)."""
    config = model.config
    if policy == "dynamic":
        return DynamicCache(config=config)
    if policy == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if policy == "offloaded":
        if not device.startswith("cuda"):
            raise InfeasibleConfig("kv_cache=offloaded moves GPU KV to CPU memory: needs a CUDA device")
        return DynamicCache(config=config, offloading=True)
    if policy == "quantized":
        return _quantized_cache(config, kv_bits)
    raise InfeasibleConfig(f"unknown kv_cache policy {policy!r}")


def _quantized_cache(config: Any, kv_bits: int) -> Any:
    try:
        import optimum.quanto  # noqa: F401 - the quanto backend of QuantizedCache
    except ImportError:
        raise InfeasibleConfig("kv_cache=quantized needs the optimum-quanto package") from None
    if kv_bits not in (2, 4):
        raise InfeasibleConfig(f"kv_cache=quantized with the quanto backend supports kv_bits 2 or 4, not {kv_bits}")
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    # Quantise every token (no full-precision residual window), grouped along head_dim.
    return QuantizedCache(backend="quanto", config=config, nbits=kv_bits,
                          q_group_size=min(64, head_dim), residual_length=0)


class TransformersLoop:
    """What transformers' loops share: the model, its prompts, left padding and the prefill."""

    def __init__(self, model: torch.nn.Module, device: str, prompt_fn: PromptFn) -> None:
        self.model = model
        self.device = device
        self.prompt_fn = prompt_fn
        self.pad_id = int(model.config.pad_token_id or 0)
        self.work = WorkCounter(model)

    def counters(self) -> dict[str, float]:
        return self.work.snapshot()

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(prompts, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy first tokens [B, 1] of the left-padded prompts `ids`/`mask` [B, S] prefilled into
        `cache`, and each row's next rotary position [B, 1]."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits[:, -1]
        return logits.argmax(-1, keepdim=True), positions[:, -1:] + 1


class HFEngine(TransformersLoop, StaticBatchEngine):
    """Runs a batch of requests to completion; one call per batch."""

    capabilities = CAPABILITIES["hf"]
    quality_first = False
    prefix_cache = None

    def __init__(self, model: torch.nn.Module, device: str, kv_cache: str, kv_bits: int,
                 prompt_fn: PromptFn) -> None:
        super().__init__(model, device, prompt_fn)
        self.kv_cache = kv_cache
        self.kv_bits = kv_bits

    # --- TrialEngine: nothing to compile, no prefix cache, no pool ------------------------------
    def begin_trial(self, prompt_fn: PromptFn, prefix_len_fn: PrefixLenFn | None, prefix_policy: str,
                    prefix_budget_mib: float) -> None:
        self.prompt_fn = prompt_fn

    def prepare_trial(self, plan: TrialPlan) -> None:
        return None

    def compile_seconds(self) -> float:
        return 0.0

    def compile_info(self, since_s: float) -> dict[str, Any]:
        return {}

    def pool_info(self) -> dict[str, Any] | None:
        return None

    def iteration_engine(self, knobs: dict[str, Any]) -> IterationEngine:
        """This loop batched per iteration (`scheduler: continuous`): a `ContinuousEngine` over
        the same model and prompts; InfeasibleConfig where the knobs' KV policy cannot."""
        reason = continuous_kv_refusal(knobs.get("kv_cache", self.kv_cache))
        if reason:
            raise InfeasibleConfig(f"{reason} (engine=fast batches every other policy per iteration)")
        from runners.glm.engines.continuous import ContinuousEngine  # it builds on TransformersLoop

        return ContinuousEngine(self.model, self.device, self.prompt_fn)

    def batch_steps(self, requests: Sequence[Request], prompts: list[list[int]],
                    new_tokens: int) -> Iterator[torch.Tensor]:
        return self.decode(prompts, new_tokens)

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], new_tokens: int) -> Iterator[torch.Tensor]:
        """Greedy generation; yields each step's tokens, [B, 1], prefill's first."""
        input_ids, mask = self._left_pad(prompts)  # [B, S]
        batch, prompt_len = input_ids.shape
        cache = make_cache(self.kv_cache, self.model, self.device, prompt_len + new_tokens, self.kv_bits)
        token, next_pos = self._prefill(input_ids, mask, cache)
        yield token
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            logits = self.model(input_ids=token, attention_mask=mask, position_ids=next_pos,
                                past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            next_pos = next_pos + 1
            yield token

    @torch.inference_mode()
    def teacher_forced_log_probs(self, ids: torch.Tensor, prefill_tokens: int) -> torch.Tensor:
        """Log-probs [N, T, V] (float32) through this engine's KV-cache policy: the first
        `prefill_tokens` prefilled into the cache, the rest fed one token at a time, so a lossy
        cache (quantized, offloaded) shows in the comparison."""
        rows, total = ids.shape
        cache = make_cache(self.kv_cache, self.model, self.device, total, self.kv_bits)
        out = self.model(input_ids=ids[:, :prefill_tokens], past_key_values=cache, use_cache=True)
        outputs = [out.logits.float()]
        for t in range(prefill_tokens, total):
            position = torch.full((rows, 1), t, dtype=torch.long, device=ids.device)
            out = self.model(input_ids=ids[:, t:t + 1], position_ids=position, past_key_values=cache,
                             use_cache=True)
            outputs.append(out.logits.float())
        return torch.log_softmax(torch.cat(outputs, dim=1), dim=-1)
