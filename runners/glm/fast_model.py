"""A compact PyTorch-native GLM decoder over a preallocated (static) KV cache.

Why not transformers' modeling on the hot path: measured on an H200 (TECH.md), its compiled
static-cache decode spends ~2.8 ms of a 7 ms batch-1 step on things other than weight traffic
(separate q/k/v launches, per-step mask construction, attention over the whole cache). This
module keeps the same weights and the same arithmetic (transformers' RMSNorm, its interleaved
partial-rotary `apply_rotary_pos_emb`, fp32 softmax) but

- fuses q/k/v into one Linear (one launch, one weight stream),
- writes K/V straight into caller-owned buffers at given slots (no Cache object),
- is a pure function per layer of tensors only, so *one* compiled graph serves all layers
  (compile time does not grow with depth) and the whole step can be captured in a CUDA graph.

Verified token-identical (greedy) and logit-close to `GlmForCausalLM` in tests/test_glm_stack.py.
Compression (torchao quantisation, sparsity, or our packed int8/int4 `PackedLinear`) is applied to
this module's Linear layers; `ops.linear` dispatches on the weight's kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runners.glm.kernels.decode_attention import decode_attention
from runners.glm.kernels.row_attention import row_decode_attention
from runners.glm.ops import grouped_attention, linear, rms_norm, split_heads

# A layer's tensors in a fixed order; None where the architecture has no such tensor.
LayerTensors = tuple[Any, ...]
LayerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Dims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


# A layer's KV cache: a tensor [B, Hkv, L, D] of the model dtype, or int8 codes and their
# per-(token, head) scales: (codes [B, Hkv, L, D] int8, scales [B, Hkv, L]).
KvCache = Any
INT8_MAX = 127.0


def quantize_kv(x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (token, head): x [..., D] -> codes [..., D] int8, scales [...]."""
    scale = (x.abs().amax(-1).float() / INT8_MAX).clamp(min=1e-8)
    codes = torch.round(x.float() / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale.to(scale_dtype)


def _store(cache: KvCache, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Write x [B, Hkv, S, D] at `slots`: [S] shared by every row, or [B, S] per row."""
    if slots.dim() == 1:
        # Index assignment (index_put_) is what Inductor re-inplaces into the cache buffer;
        # an out-of-place update would copy the whole cache every step.
        if isinstance(cache, tuple):
            codes, scale = quantize_kv(x, cache[1].dtype)
            cache[0][:, :, slots] = codes
            cache[1][:, :, slots] = scale
        else:
            cache[:, :, slots] = x
        return
    # Per-row slots (continuous batching: each row at its own length). Advanced indices on
    # dims 0 and 2 put their broadcast shape [B, S] first: values are [B, S, Hkv, (D)].
    rows = torch.arange(x.shape[0], device=slots.device)[:, None]  # [B, 1]
    if isinstance(cache, tuple):
        codes, scale = quantize_kv(x, cache[1].dtype)
        cache[0][rows, :, slots] = codes.transpose(1, 2)
        cache[1][rows, :, slots] = scale.transpose(1, 2)
    else:
        cache[rows, :, slots] = x.transpose(1, 2)


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor,
                    k_cache: KvCache, v_cache: KvCache) -> torch.Tensor:
    """Write this step's k/v [B, Hkv, S, D] into the caches at `slots`, then attend: [B, Hq, S, D].
    The attended length is the bias's last dimension ([B, 1, 1, S, attend_len]), not an int
    argument, so a compile that marks that dimension dynamic (`compiled.chunk_dynamic`) has one
    graph for every attend length instead of a recompile per value of the int."""
    _store(k_cache, k, slots)
    _store(v_cache, v, slots)
    attend_len = bias.shape[-1]
    if isinstance(k_cache, tuple):
        return grouped_attention(q, k_cache[0], v_cache[0], bias, attend_len, k_cache[1], v_cache[1])
    return grouped_attention(q, k_cache, v_cache, bias, attend_len)


def row_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                        lengths: torch.Tensor, k_cache: KvCache, v_cache: KvCache) -> torch.Tensor:
    """One token per row: write k/v [B, Hkv, 1, D] at per-row `slots` [B, 1], then row b attends
    over its first `lengths[b]` positions. Returns [B, Hq, 1, D]."""
    _store(k_cache, k, slots)
    _store(v_cache, v, slots)
    if isinstance(k_cache, tuple):
        out = row_decode_attention(q[:, :, 0], k_cache[0], v_cache[0], lengths, k_cache[1], v_cache[1])
    else:
        out = row_decode_attention(q[:, :, 0], k_cache, v_cache, lengths)
    return out[:, :, None]


def layer_forward(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  bias: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  weights: LayerTensors, dims: Dims, attend_len: int, fused_attention: bool = False,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One GLM decoder layer; writes this step's K/V into the caches at `slots`.

    h: [B, S, H]; cos/sin: [B, S, rotary]; slots: [S] cache positions of the S new tokens, the
    same for every row, or [B, S] per row (the slot engine's rows are at different lengths).
    k_cache/v_cache: `KvCache` (plain or int8 with scales).
    `fused_attention`: one sequence decoding one token runs bias, rope, cache write and attention
    as one CUDA kernel (`decode_attention`); other shapes and devices, the ops below.
    `lengths` [B] (one new token per row, per-row `slots` [B, 1]): each row attends over its own
    first `lengths[b]` cache positions through `row_attention` (no `bias`, no length bucket read).
    """
    (w_in, w_qkv, b_qkv, w_o, w_post_attn_out, w_post_attn, w_gate_up, w_down, w_post_mlp) = weights
    batch, seq, _ = h.shape
    d, hq, hkv = dims.head_dim, dims.num_heads, dims.num_kv_heads
    # Bias added apart: addmm goes to a cuBLAS GEMM (3.1 TB/s measured at batch 1), a plain mm
    # becomes Inductor's bandwidth-tuned fused reduction (3.6-4.3 TB/s). `linear` takes the
    # norms and residual adds so the CUDA GEMV can fuse them (elsewhere they are plain ops).
    qkv = linear(h, w_qkv, norm=w_in, eps=dims.eps)
    if fused_attention and batch == seq == 1 and h.is_cuda and slots.dim() == 1 and not isinstance(k_cache, tuple):
        attn = decode_attention(qkv, b_qkv, cos, sin, slots, k_cache, v_cache, bias, attend_len, hq, hkv, d)
    else:
        q, k, v = split_heads(qkv, b_qkv, cos, sin, hq, hkv, d)  # [B, Hq|Hkv, S, D], rope on q, k
        if lengths is not None:
            attn = row_cache_attention(q, k, v, slots, lengths, k_cache, v_cache)
        else:
            attn = cache_attention(q, k, v, slots, bias, k_cache, v_cache)
        attn = attn.transpose(1, 2).reshape(batch, seq, hq * d)
    if w_post_attn_out is None:
        h = linear(attn, w_o, residual=h)
    else:  # GLM-4-0414 post-norm
        h = h + rms_norm(linear(attn, w_o), w_post_attn_out, dims.eps)
    act = linear(h, w_gate_up, norm=w_post_attn, eps=dims.eps, swiglu=True)  # silu(gate) * up
    if w_post_mlp is None:
        return linear(act, w_down, residual=h)
    return h + rms_norm(linear(act, w_down), w_post_mlp, dims.eps)


class FastLayer(nn.Module):
    """The tensors of one decoder layer, q/k/v fused."""

    def __init__(self, hf_layer: nn.Module) -> None:
        super().__init__()
        attn = hf_layer.self_attn
        self.input_norm = hf_layer.input_layernorm.weight
        self.qkv_proj = _fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.post_attention_norm = hf_layer.post_attention_layernorm.weight
        self.gate_up_proj = hf_layer.mlp.gate_up_proj
        self.down_proj = hf_layer.mlp.down_proj
        post_attn = getattr(hf_layer, "post_self_attn_layernorm", None)
        post_mlp = getattr(hf_layer, "post_mlp_layernorm", None)
        self.post_self_attn_norm = post_attn.weight if post_attn is not None else None
        self.post_mlp_norm = post_mlp.weight if post_mlp is not None else None

    def tensors(self) -> LayerTensors:
        # Read at call time: quantisation swaps a Linear's weight for a tensor subclass.
        return (self.input_norm, self.qkv_proj.weight, self.qkv_proj.bias, self.o_proj.weight,
                self.post_self_attn_norm, self.post_attention_norm, self.gate_up_proj.weight,
                self.down_proj.weight, self.post_mlp_norm)


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


class FastGlm(nn.Module):
    """GLM / GLM-4-0414 decode module sharing (not copying) transformers' weights, q/k/v fused.

    Building it takes the q/k/v projections out of `hf_model`'s layers (to avoid holding two
    copies of them); the transformers model must not be used afterwards.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleList()
        for hf_layer in base.layers:
            self.layers.append(FastLayer(hf_layer))
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(hf_layer.self_attn, name, None)  # free the unfused copies
        self.final_norm = base.norm.weight
        self.lm_head = hf_model.lm_head
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dims = Dims(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, float(cfg.rms_norm_eps))
        self._rotary = base.rotary_emb
        self.cos_table, self.sin_table = self._rope_table(int(cfg.max_position_embeddings))
        self.requires_grad_(False)

    @torch.no_grad()
    def _rope_table(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' own rotary module, evaluated once for every position: [P, rotary].
        weight = self.final_norm
        ids = torch.arange(positions, device=weight.device)[None]
        cos, sin = self._rotary(weight[None, None], ids)
        return cos[0].to(weight.dtype), sin[0].to(weight.dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.dtype

    def run_layers(self, tokens: torch.Tensor, rope_pos: torch.Tensor, slots: torch.Tensor,
                   bias: torch.Tensor | None, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                   attend_len: int, layer_fn: LayerFn = layer_forward,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the last layer (before the final norm), [B, S, H]; fills the
        caches at `slots`.

        tokens/rope_pos: [B, S]; bias: [B, 1, 1, S, attend_len] (0 or a large negative), or None
        with `lengths` [B] (one token per row: each row attends its own first lengths[b] positions).
        """
        h = self.embed_tokens(tokens)
        cos, sin = self.cos_table[rope_pos], self.sin_table[rope_pos]
        extra = {} if lengths is None else {"lengths": lengths}
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            h = layer_fn(h, cos, sin, slots, bias, k_cache, v_cache, layer.tensors(), self.dims, attend_len, **extra)
        return h


def head_forward(h: torch.Tensor, norm_weight: torch.Tensor, head_weight: Any, eps: float) -> torch.Tensor:
    """Final norm + output projection of the last position: logits [B, V]. A pure function so
    the fast path can compile it like a layer (a quantised lm_head then fuses its dequant)."""
    return linear(h[:, -1], head_weight, norm=norm_weight, eps=eps)


def row_bias(positions: torch.Tensor, attend_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, S, attend_len] for rows without padding: key j is visible to a
    query at absolute position p when j <= p (`positions` [B, S], or [S] shared by the rows)."""
    keys = torch.arange(attend_len, device=positions.device)
    pos = positions if positions.dim() == 2 else positions[None]
    visible = keys[None, None] <= pos[:, :, None]  # [B, S, L]
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)[:, None, None]


def attention_bias(query_slots: torch.Tensor, pad_len: torch.Tensor, attend_len: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, S, attend_len]: causal, left padding hidden.

    A padded query row may still see its own slot, so no softmax row is empty (an all-masked row
    would give NaN K/V at pad slots, and NaN times a zero weight is still NaN later).
    """
    keys = torch.arange(attend_len, device=query_slots.device)  # [L]
    q = query_slots[None, :, None]  # [1, S, 1]
    visible = (keys <= q) & ((keys >= pad_len[:, None, None]) | (keys == q))  # [B, S, L]
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias = bias.masked_fill(~visible, torch.finfo(dtype).min)
    return bias[:, None, None]
