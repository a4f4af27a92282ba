"""In-process caches that let a warm trial process (`python -m runners.child --serve`) skip work.

- `ModelCache`: built + compressed (+ compiled) models keyed by the knobs that change the model;
  trials differing only in serving knobs (batch size, timeout, scheduler) reuse them.
- `ReferenceCache`: the unoptimised model's log-probs on the evaluation set, per model spec,
  dtype and eval set, so a trial never rebuilds the reference once it exists; also kept on disk
  (`reference_path`), so another process or a later study of the same model reads it back.
- `BASES`: the unquantised base weights per (model spec, dtype, device, seed, attention), kept in
  host memory; each compression variant is derived from a copy (`derive_model`) instead of being
  built (or loaded from a checkpoint) again.

All hold few entries: a glm-4-9b model is 18 GB of device memory.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.knobs import inert_knobs
from runners.registry import runner_spec

# Knobs that change the built model: those declared `rebuilds=True` (runners/knobs.py). The
# resolved engine kind (fast | hf, the `engine_kind` argument) is keyed too: under `engine: auto`
# the kv_cache policy picks it (dynamic -> hf). kv_cache, kv_bits, kv_slots and
# prefill_chunk_tokens are otherwise properties of the engine's cache and scheduler, not of the
# weights (quality is cached per KV policy in the built model). The `dtype` knob is keyed by its
# resolved value (the `dtype` argument), so `dtype: null` and the model's own dtype share a build.
MODEL_KNOBS = tuple(k for k in runner_spec("glm-infer").rebuilding_knobs() if k != "dtype")
_INFER_KNOBS = runner_spec("glm-infer").knobs


def model_key(model_spec: dict[str, Any], dtype: str, device: str, seed: int, knobs: dict[str, Any],
              engine_kind: str) -> str:
    """What determines the built model: spec, dtype, device, seed, compression, engine, compile."""
    relevant = {k: knobs.get(k) for k in MODEL_KNOBS}
    # Knobs that do nothing given the others (at 16 bits, at zero sparsity: their `applies_when`
    # in runners/knobs.py) must not split the cache.
    relevant.update(dict.fromkeys(inert_knobs(_INFER_KNOBS, knobs).keys() & relevant.keys()))
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
            free_device_memory()

    def drop(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            free_device_memory()

    def clear(self) -> None:
        if self._items:
            self._items.clear()
            free_device_memory()

    def __len__(self) -> int:
        return len(self._items)


def free_device_memory() -> None:
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


# ---------------------------------------------------------------- base weights, derived variants

# Share of the host memory available at keep time that a kept base may take: the trial's own
# compressed model, the reference and the OS page cache need the rest.
HOST_BUDGET_FRACTION = 0.5
# Where this process's caches on disk live (set by the tuner's launcher for its children).
CACHE_DIR_ENV = "AUTOGLM_CACHE_DIR"


def base_key(model_spec: dict[str, Any], dtype: str, device: str, seed: int, attn_implementation: str) -> str:
    """What determines the unquantised base model (no compression knob)."""
    return json.dumps({"model": model_spec, "dtype": dtype, "device": device, "seed": seed,
                       "attn": attn_implementation}, sort_keys=True, default=str)


@dataclass
class KeptWeights:
    """A base model's every parameter and buffer, copied to host memory, plus what rebuilds its
    module skeleton. `aliases` maps a tied name (e.g. lm_head.weight) to the name holding it."""

    model_cls: type
    dtype: Any
    config: Any
    generation_config: Any
    tensors: dict[str, Any]  # name -> host tensor (pinned when the model lives on CUDA)
    requires_grad: dict[str, bool]
    aliases: dict[str, str]
    nbytes: int


def host_budget_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available * HOST_BUDGET_FRACTION)


def keep_weights(model: Any, budget_bytes: int | None = None) -> KeptWeights | None:
    """A host copy of `model`'s weights, or None when it would not fit the host budget."""
    import torch

    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in named:
        if id(tensor) in canonical:
            aliases[name] = canonical[id(tensor)]
        else:
            canonical[id(tensor)] = name
    unique = {name: tensor for name, tensor in named if name not in aliases}
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    if nbytes > (host_budget_bytes() if budget_bytes is None else budget_bytes):
        return None
    tensors = {}
    for name, tensor in unique.items():
        host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
        tensors[name] = host.copy_(tensor.detach())
    requires_grad = {name: bool(t.requires_grad) for name, t in unique.items()}
    return KeptWeights(type(model), model.dtype, copy.deepcopy(model.config), copy.deepcopy(getattr(model, "generation_config", None)),
                       tensors, requires_grad, aliases, nbytes)


def derive_model(kept: KeptWeights, device: str) -> Any:
    """A fresh module with copies of the kept weights on `device`: compressing it in place
    leaves the kept base untouched. The skeleton is built on the meta device (no init)."""
    import torch

    with torch.device("meta"):
        model = kept.model_cls._from_config(copy.deepcopy(kept.config), dtype=kept.dtype)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    fresh: dict[str, Any] = {}
    for name, host in kept.tensors.items():
        tensor = host.to(device, copy=True, non_blocking=True)
        fresh[name] = torch.nn.Parameter(tensor, requires_grad=kept.requires_grad[name]) if name in params else tensor
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
    for name, target in kept.aliases.items():
        fresh[name] = fresh[target]
    for name, tensor in fresh.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(tensor, torch.nn.Parameter):
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor
    if kept.generation_config is not None:
        model.generation_config = copy.deepcopy(kept.generation_config)
    return model.eval()


# ---------------------------------------------------------------- caches on disk


def cache_dir() -> Path | None:
    """The folder of this process's on-disk caches (the tuner puts it beside the study's storage)."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root) if root else None


def reference_path(key: str) -> Path | None:
    """Where the reference log-probs of `key` (see `runners.infer.reference_key`) are kept on disk."""
    root = cache_dir()
    if root is None:
        return None
    return root / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def load_reference(key: str) -> Any | None:
    """The reference log-probs stored for `key`, or None (absent, unreadable, or a different key)."""
    import torch

    path = reference_path(key)
    if path is None or not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign file is a cache miss, not an error
        return None
    return stored["log_probs"] if stored.get("key") == key else None


def store_reference(key: str, log_probs: Any) -> None:
    """Write atomically: several trial processes of one study may store the same reference."""
    import torch

    path = reference_path(key)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"key": key, "log_probs": log_probs}, tmp)
    tmp.replace(path)


BASES = LruCache(capacity=1)
