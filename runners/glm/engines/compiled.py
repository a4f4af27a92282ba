"""How the fast engines compile their decode step: Inductor settings set explicitly per trial,
and a compiled function whose batch dimension is marked dynamic on every call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def configure_inductor() -> None:
    """Settings for the compiled layer, set explicitly so no earlier trial's leak changes them."""
    import torch._dynamo
    import torch._inductor.config as inductor

    # Batch-1 matmuls become fused reductions tuned for bandwidth (and int8 dequant fuses in);
    # without this, M=1 goes to a generic GEMM and int8 weights are materialised as bf16.
    inductor.coordinate_descent_tuning = True
    inductor.coordinate_descent_check_all_directions = True
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True
    # One recompile per (batch, length) bucket is expected; keep them all.
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256


def batch_dynamic(fn: Callable[..., torch.Tensor], batched: Sequence[int]) -> Callable[..., torch.Tensor]:
    """`fn` (compiled) with dimension 0 of its positional arguments `batched` (tensors, or tuples
    of tensors such as int8 caches) and of every tensor keyword argument marked dynamic before
    each call: one graph serves every batch bucket >= 2 (a size-1 dimension is specialised).
    The weights are not marked: their shapes stay static in the compiled graph."""
    import torch._dynamo

    def mark(arg: Any) -> None:
        for t in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        for index in batched:
            mark(args[index])
        for value in kwargs.values():
            mark(value)
        return fn(*args, **kwargs)
    return call
