"""Model ops the GLM layers are written in: RMSNorm, SwiGLU, and a linear layer that takes a
dense weight or a packed weight-only one (runners/glm/packed.py), with the norm, residual and
SwiGLU fused into the CUDA GEMV where that runs (the `autoglm::int8_linear` / `int4_linear`
ops, registered by runners/glm/woq.py, which builds every packed weight), and the torch ops of
attention: heads split with rope, grouped-query attention over a cache. Kernels that replace some
of these (runners/glm/kernels/) take their reference from here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

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


def split_heads(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k and v [B, Hkv, S, D] of the fused projection `qkv` [B, S, (Hq + 2 Hkv) * D]
    (`bias_qkv` added first), with transformers' GLM rope (`cos`/`sin` [B, S, rotary]) on q and k."""
    batch, seq, _ = qkv.shape
    if bias_qkv is not None:
        qkv = qkv + bias_qkv
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def grouped_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      bias: torch.Tensor, attend_len: int, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """GQA without repeating K/V: each KV head's group of query heads shares one matmul.

    q: [B, Hq, S, D]; k_cache/v_cache: [B, Hkv, L, D]; bias: [B, 1, 1, S, attend_len] additive.
    Returns [B, Hq, S, D]. Only the first `attend_len` cache slots are read.
    `k_scale`/`v_scale` [B, Hkv, L]: the caches hold int8 codes, value = code * scale (per token
    and head); the scales are folded into the scores and the probabilities, so the codes enter
    the matmuls only cast, never rescaled element by element.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    k = k_cache[:, :, :attend_len]
    v = v_cache[:, :, :attend_len]
    if k_scale is not None and seq == 1 and INT8_DECODE_ATTENTION == "reduction" and torch.compiler.is_compiling():
        return _int8_decode_attention(q, k, v, bias, k_scale[:, :, :attend_len], v_scale[:, :, :attend_len])
    if k_scale is not None:
        k, v = k.to(q.dtype), v.to(q.dtype)
    qg = q.reshape(batch, kv_heads, (heads // kv_heads) * seq, head_dim)  # [B, Hkv, G*S, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * head_dim**-0.5  # [B, Hkv, G*S, L]
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, :attend_len]
    scores = scores.view(batch, kv_heads, heads // kv_heads, seq, attend_len) + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.view(batch, kv_heads, -1, attend_len)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, :attend_len]
    out = torch.matmul(probs.to(q.dtype), v)  # [B, Hkv, G*S, D]
    return out.view(batch, heads, seq, head_dim)


# How a compiled decode step (one new token) attends over int8 K/V. "matmul": cast the codes to
# the model dtype and run the two batched matmuls (cuBLAS); the cast writes a model-dtype copy of
# the attended KV first, so a step moves more KV bytes than with model-dtype KV. "reduction": the
# products written as broadcast multiply + sum, which Inductor fuses into reductions that read the
# int8 codes directly (CUDA cores, no copy). Eager runs (CPU, compile=false) always use "matmul".
INT8_DECODE_ATTENTION = "reduction"


def _int8_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """One query token per row over int8 codes: q [B, Hq, 1, D]; k/v [B, Hkv, L, D] int8;
    scales [B, Hkv, L]; bias [B, 1, 1, 1, L]. Returns [B, Hq, 1, D]."""
    batch, heads, _, head_dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()  # [B, Hkv, G, D]
    scores = (qg[:, :, :, None, :] * k[:, :, None, :, :].float()).sum(-1)  # [B, Hkv, G, L]
    scores = scores * (k_scale[:, :, None, :].float() * head_dim**-0.5) + bias.view(batch, 1, 1, length)
    probs = torch.softmax(scores, dim=-1) * v_scale[:, :, None, :].float()  # [B, Hkv, G, L]
    out = (probs[..., None] * v[:, :, None, :, :].float()).sum(-2)  # [B, Hkv, G, D]
    return out.to(q.dtype).view(batch, heads, 1, head_dim)
