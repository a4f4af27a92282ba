"""Iteration-level (continuous) batching over transformers' GLM: sequences join and leave the
running batch between decode steps.

The running batch is one left-padded `DynamicCache` ([B, kv_heads, S, head_dim] per layer) with
a [B, S] attention mask. A join prefills the newcomers in their own cache, then pads both
caches on the left to a common length and stacks them on the batch axis; a leave selects the
remaining rows and trims the columns that have become padding for every row. Greedy decoding,
as in `runners.glm.engines.hf.HFEngine`, whose model, prompts and prefill it shares
(`TransformersLoop`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from runners.glm.engines.base import PromptFn
from runners.glm.engines.hf import TransformersLoop
from runners.workload import Request


class ContinuousEngine(TransformersLoop):
    """Implements `runners.scheduler.IterationEngine` on a causal LM."""

    def __init__(self, model: torch.nn.Module, device: str, prompt_fn: PromptFn,
                 record_tokens: bool = False) -> None:
        super().__init__(model, device, prompt_fn)
        self.record_tokens = record_tokens
        self.generated: dict[int, list[int]] = {}  # rid -> tokens, when record_tokens
        self.rids: list[int] = []  # row order of the running batch
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [B, S]
        self._tokens = torch.zeros(0, 1, dtype=torch.long, device=device)  # [B, 1] last token
        self._next_pos = torch.zeros(0, 1, dtype=torch.long, device=device)  # [B, 1]

    @property
    def batch(self) -> int:
        return len(self.rids)

    @torch.inference_mode()
    def join(self, requests: Sequence[Request]) -> None:
        ids, mask = self._left_pad([self.prompt_fn(r) for r in requests])  # [b, L]
        cache = DynamicCache(config=self.model.config)
        tokens, next_pos = self._prefill(ids, mask, cache)
        self.work.add_forward(ids.numel(), ids.shape[0], cache_positions=0)
        self._merge(cache, mask, tokens, next_pos, [r.rid for r in requests])
        self._emit(tokens)

    @torch.inference_mode()
    def step(self) -> None:
        if not self.rids:
            return
        self.work.add_forward(self.batch, self.batch, cache_positions=self.batch * self._mask.shape[1])
        self._mask = torch.cat([self._mask, self._mask.new_ones(self.batch, 1)], dim=1)
        logits = self.model(input_ids=self._tokens, attention_mask=self._mask, position_ids=self._next_pos,
                            past_key_values=self._cache, use_cache=True).logits[:, -1]
        self._tokens = logits.argmax(-1, keepdim=True)
        self._next_pos = self._next_pos + 1
        self._emit(self._tokens)

    def leave(self, rids: Sequence[int]) -> None:
        gone = set(rids)
        keep = [row for row, rid in enumerate(self.rids) if rid not in gone]
        self.rids = [self.rids[row] for row in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._tokens, self._next_pos = self._tokens[:0], self._next_pos[:0]
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row need not be read again.
        trim = int((mask.cumsum(-1) == 0).sum(-1).min())
        self._mask = mask[:, trim:]
        self._tokens = self._tokens.index_select(0, index)
        self._next_pos = self._next_pos.index_select(0, index)
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor,
               next_pos: torch.Tensor, rids: list[int]) -> None:
        if self._cache is None:
            self._cache, self._mask, self._tokens, self._next_pos = cache, mask, tokens, next_pos
            self.rids = list(rids)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        for old, new in zip(self._layers(self._cache), self._layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self._tokens = torch.cat([self._tokens, tokens])
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self.rids.extend(rids)

    @staticmethod
    def _layers(cache: DynamicCache | None) -> list:
        return list(cache.layers) if cache is not None else []

    def _emit(self, tokens: torch.Tensor) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)  # the tokens exist only once the device is done
        if self.record_tokens:
            for rid, token in zip(self.rids[-tokens.shape[0]:], tokens[:, 0].tolist(), strict=True):
                self.generated.setdefault(rid, []).append(token)


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` to `width`."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
