"""Model ops the GLM layers are written in: RMSNorm, SwiGLU, and a linear layer that takes a
dense weight or a packed weight-only one (runners/glm/packed.py), with the norm, residual and
SwiGLU fused into the CUDA GEMV where that runs (the `autoglm::int8_linear` / `int4_linear`
ops, registered by runners/glm/woq.py, which builds every packed weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runners.glm.packed import Int4Weight, Int8Weight, gate_up_order


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' GlmRMSNorm, op for op (fp32 statistics, weight applied in the input dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu_apart(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up] (the GLM MLP's activation, as transformers writes it)."""
    gate, up = x.chunk(2, dim=-1)
    return up * F.silu(gate)


def _fuses(x: torch.Tensor, weight: object) -> bool:
    """Whether the norm / residual / SwiGLU go into the kernel: a CUDA-GEMV weight and one input
    row (the row count is static where this is traced)."""
    return (isinstance(weight, (Int8Weight, Int4Weight)) and weight.gemv == "cuda"
            and x.numel() == x.shape[-1] and x.is_cuda)


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight | Int4Weight, norm: torch.Tensor | None = None,
           eps: float = 0.0, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """[residual +] rms_norm(x, norm) @ weight^T, no bias, or with `swiglu` silu(gate) * up of that
    product for a [gate | up] weight: `F.linear` for a dense (or torchao) weight, our kernels for
    a packed one; norm, residual and SwiGLU fused where the CUDA GEMV runs."""
    if swiglu and residual is not None:
        raise ValueError("a linear adds a residual or applies SwiGLU to its output, not both")
    if isinstance(weight, (Int8Weight, Int4Weight)):
        op = torch.ops.autoglm.int8_linear if isinstance(weight, Int8Weight) else torch.ops.autoglm.int4_linear
        if _fuses(x, weight) and (swiglu or not weight.gated):
            return op(x, *weight, norm, eps, residual, swiglu)
        out = op(x if norm is None else rms_norm(x, norm, eps), *weight)
        out = gate_up_order(out) if weight.gated else out
    else:
        out = F.linear(x if norm is None else rms_norm(x, norm, eps), weight)
    out = swiglu_apart(out) if swiglu else out
    return out if residual is None else residual + out
