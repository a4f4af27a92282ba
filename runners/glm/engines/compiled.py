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


def shape_generic_compile(fn: Callable[..., torch.Tensor], options: dict[str, Any] | None
                          ) -> Callable[..., torch.Tensor]:
    """`fn` compiled for many shapes: one graph per model variant whose dimensions the caller
    marks dynamic (`batch_dynamic`, `chunk_dynamic`), the weights' shapes static.

    Why not one compile per bucket, as the batch-1 path: compiled per (batch, length) bucket, a
    9B model's continuous engine spent 20-30 s of set-up per bucket (H200: 6 batch buckets took
    minutes), and with more than one row (or a prefill chunk) the projections are cuBLAS GEMMs
    whatever the compile mode. Why not dynamic=True: then every size was symbolic, the weights'
    too, and the norms and activations became generic kernels over symbolic hidden sizes. No
    coordinate-descent tuning: it benchmarks every reduction kernel's launch configs (the batch-1
    roofline path's gain), but here the reductions (norms, softmax, argmax) move a few MB, and
    tuning them was most of this compile's set-up time.

    Compiled prefill: eager inside CUDA graphs, a chunk of glm-4-9b (H200) cost ~10 ms at 16
    tokens and 14.7 ms at 256 (300-370 TFLOP/s at the widest, against 700-760 for its GEMMs
    alone): the rest was ~25 unfused norm, rope, mask and softmax kernels per layer. Compiled,
    a chat request's prefill went from ~19 to ~12 ms (BENCHMARKS.md, "third pass")."""
    return torch.compile(fn, fullgraph=True, dynamic=None,
                         options={**(options or {}), "coordinate_descent_tuning": False})


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


def chunk_dynamic(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` (a compiled `layer_forward`) with a prefill chunk's width and attend length marked
    dynamic before each call: h/cos/sin [R, W, ...] on dimension 1, slots ([W], or [R, W] per
    row) on their last, the bias [R, 1, 1, W, A] on 3 and 4 (the attention reads A off the bias,
    not off the int argument, which Dynamo would specialise). One graph then serves every
    (width, attend) bucket instead of one compile each; an attend length equal to the pool's
    length recompiles once (the narrowed cache is then contiguous, a guard of the matmul's
    decomposition). A prefill group (R >= 2 rows, `engines/slots.py`) also has its rows marked,
    on dimension 0 of those tensors and of the caches: one more graph for every row bucket."""
    import torch._dynamo

    def rows(arg: Any) -> None:
        for t in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(t, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def call(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None,
             k_cache: Any, v_cache: Any, *rest: Any, **kwargs: Any) -> torch.Tensor:
        for t in (h, cos, sin):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch._dynamo.maybe_mark_dynamic(slots, slots.dim() - 1)
        if bias is not None:
            torch._dynamo.maybe_mark_dynamic(bias, 3)
            torch._dynamo.maybe_mark_dynamic(bias, 4)
        if h.shape[0] > 1:  # a size-1 dimension is specialised: single-row chunks keep their graph
            for arg in (h, cos, sin, slots, bias, k_cache, v_cache):
                rows(arg)
        return fn(h, cos, sin, slots, bias, k_cache, v_cache, *rest, **kwargs)
    return call
