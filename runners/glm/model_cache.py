"""In-process caches that let a warm trial process (`python -m runners.child --serve`) skip work.

- `ModelCache`: built + compressed (+ compiled) models keyed by the knobs that change the model;
  trials differing only in serving knobs (batch size, timeout, scheduler) reuse them.
- `ReferenceCache`: the unoptimised model's log-probs on the evaluation set, per model spec,
  dtype and eval set, so a trial never rebuilds the reference once it exists.

Both hold few entries: a glm-4-9b model is 18 GB of device memory.
"""

from __future__ import annotations

import gc
import json
from collections import OrderedDict
from typing import Any

# Knobs that change the built model. The resolved engine kind (fast | hf, the `engine_kind`
# argument) is keyed too: under `engine: auto` the kv_cache policy picks it (dynamic -> hf).
# kv_cache, kv_bits, kv_slots and prefill_chunk_tokens are otherwise properties of the engine's
# cache and scheduler, not of the weights (quality is cached per KV policy in the built model).
MODEL_KNOBS = ("quant_bits", "quant_scheme", "quant_group_size", "quantize_lm_head", "quant_kernel", "sparsity",
               "sparsity_kind", "attn_implementation", "compile", "decode_attention", "engine")


def model_key(model_spec: dict[str, Any], dtype: str, device: str, seed: int, knobs: dict[str, Any],
              engine_kind: str) -> str:
    """What determines the built model: spec, dtype, device, seed, compression, engine, compile."""
    relevant = {k: knobs.get(k) for k in MODEL_KNOBS}
    # Knobs that do nothing at 16 bits / zero sparsity must not split the cache.
    if int(relevant["quant_bits"] or 16) == 16:
        relevant.update(quant_scheme=None, quant_group_size=None, quantize_lm_head=None, quant_kernel=None)
    elif int(relevant["quant_bits"]) != 4:
        relevant["quant_group_size"] = None
    if not float(relevant["sparsity"] or 0.0):
        relevant["sparsity_kind"] = None
    return json.dumps({"model": model_spec, "dtype": dtype, "device": device, "seed": seed,
                       "engine_kind": engine_kind, **relevant}, sort_keys=True, default=str)


class LruCache:
    """A tiny LRU dict; evicting an entry frees device memory at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            _free_device_memory()

    def drop(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            _free_device_memory()

    def clear(self) -> None:
        if self._items:
            self._items.clear()
            _free_device_memory()

    def __len__(self) -> int:
        return len(self._items)


def _free_device_memory() -> None:
    import torch

    # Modules hold reference cycles, so a dropped GPU model is only freed by a full collection
    # (~0.3 s); on CPU reference counting frees what matters and the collection is skipped.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


# Process-wide: one built model (a second 9B model would double device memory) and a few
# reference log-prob tensors (kept in host memory).
MODELS = LruCache(capacity=1)
REFERENCES = LruCache(capacity=4)
