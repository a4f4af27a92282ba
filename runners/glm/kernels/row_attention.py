"""Decode attention of many sequences at their own lengths, over plain or int8 KV: a Triton kernel.

Why: the slot engine's multi-row decode step attended through two batched matmuls over a whole
length bucket, with a mask hiding each row's unused positions. Every row then read the bucket's
KV (glm-4-9b, 64 rows, a 2048 bucket: 5.2 GB a step against 18.8 GB of weights), however short
its sequence, and int8 KV was worse: the codes were cast to the model dtype first (a copy of
the attended KV every step) or reduced by Inductor-generated broadcasts (H200: TPOT 49.5 ms
against 10.9 ms for bf16 KV at batch 32, and a 195 s compile). This kernel reads each row's
`lengths[b]` positions only, int8 codes directly (value = code * scale per token and head), so
quantized KV moves half the bytes of bf16 KV instead of more.

How (flash-decoding): one program per (row, KV head, split of `SPLIT_KEYS` positions). A program
loads the G query heads that share its KV head as one [GP, D] tile (GP = G padded to the 16 rows
a tensor-core dot needs), walks its split in blocks of `BLOCK` keys with an online softmax, and
writes its partial (running max, sum, unnormalised output). float32 inputs take IEEE dots (not TF32),
so a float32 model's greedy tokens do not depend on which path attended. Programs past a row's length write
an empty partial and read no KV. Scales are folded in: scores times the K scales, probabilities
times the V scales, so codes enter the dots only converted, never rescaled element by element.

The custom op `autoglm::row_decode_partials` launches the kernel and nothing else: it returns the
split partials, and `row_decode_attention` merges them (`combine`), casts and reshapes in plain
torch ops outside it. Why: an op is opaque to torch.compile, so whatever eager work runs inside it
stays separate launches in the decode step. Measured on an H200 (glm-4-9b, batch 16, CUDA graph),
the merge, cast, reshape, a `q.contiguous()` copy and a lengths cast run inside the op were ~11
small kernels a layer (~1 ms of a 6.7 ms step, against 7 us for the kernel). Outside the op,
Inductor fuses the merge and the cast into the compiled layer's own kernels; the kernel reads q
through its strides (no copy while the head dim has stride 1) and `lengths` in its own integer
dtype (no cast). The op sits inside the compiled layer (dynamic shapes; its fake gives the
partials' shapes) and its launch is captured in the decode step's CUDA graph. Where Triton or a
GPU is missing (CPU CI), `row_decode_attention` runs `reference`, the same arithmetic in torch
ops, which the tests compare the kernel with (on CPU through Triton's interpreter).
"""

from __future__ import annotations

import functools
import os

import torch

SPLIT_KEYS = 256  # positions per program: a 2048 pool is 8 splits, a short row reads one
BLOCK = 64  # keys per inner step
MIN_GROUP_ROWS = 16  # tensor-core dots need at least 16 rows


@functools.cache
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


# A constant to torch.compile: `row_decode_attention` asks inside the compiled layer; Dynamo runs
# this once at trace time instead of tracing through the cache wrapper and the import.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return _import_triton()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_run(q: torch.Tensor) -> bool:
    """The kernel runs for CUDA tensors (or any tensors under Triton's interpreter)."""
    return triton_available() and (q.is_cuda or _interpreting())


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction, built on first use (triton imported lazily)
    import triton
    import triton.language as tl

    @triton.jit
    def row_decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                          sq_b, sq_h, sk_b, sk_h, sk_l, ss_b, ss_h, sm_scale,
                          n_splits, group: tl.constexpr, group_rows: tl.constexpr, head_dim: tl.constexpr,
                          split_keys: tl.constexpr, block: tl.constexpr, quantized: tl.constexpr,
                          precision: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(len_ptr + row).to(tl.int32)  # int64 or int32 lengths, read as they are
        g = tl.arange(0, group_rows)
        d = tl.arange(0, head_dim)
        g_ok = g < group
        q = tl.load(q_ptr + row * sq_b + (kv_head * group + g)[:, None] * sq_h + d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [GP, D]
        m_i = tl.full([group_rows], float("-inf"), tl.float32)
        l_i = tl.zeros([group_rows], tl.float32)
        acc = tl.zeros([group_rows, head_dim], tl.float32)
        start = split * split_keys
        end = tl.minimum(start + split_keys, length)
        kv_base = row * sk_b + kv_head * sk_h
        for first in range(start, end, block):
            keys = first + tl.arange(0, block)
            k_ok = keys < end
            offs = kv_base + keys[:, None] * sk_l + d[None, :]
            k = tl.load(k_ptr + offs, mask=k_ok[:, None], other=0)  # [BLOCK, D]
            v = tl.load(v_ptr + offs, mask=k_ok[:, None], other=0)
            scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=precision) * sm_scale  # [GP, BLOCK] fp32
            if quantized:
                k_scale = tl.load(ks_ptr + row * ss_b + kv_head * ss_h + keys, mask=k_ok, other=0.0)
                scores = scores * k_scale.to(tl.float32)[None, :]
            scores = tl.where(k_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])  # [GP, BLOCK]
            l_i = l_i * alpha + tl.sum(p, 1)
            if quantized:
                v_scale = tl.load(vs_ptr + row * ss_b + kv_head * ss_h + keys, mask=k_ok, other=0.0)
                p = p * v_scale.to(tl.float32)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=precision)
            m_i = m_new
        # Partials laid out [B, Hkv, splits, GP(, D)]; an empty split keeps -inf / 0 / 0.
        part = (row * tl.num_programs(1) + kv_head) * n_splits + split
        tl.store(m_ptr + part * group_rows + g, m_i)
        tl.store(l_ptr + part * group_rows + g, l_i)
        tl.store(acc_ptr + (part * group_rows + g)[:, None] * head_dim + d[None, :], acc)

    return row_decode_kernel


def _group_rows(group: int) -> int:
    """GP: the query heads of a KV head padded to a power of two of at least 16 rows. A loop of
    comparisons, not bit tricks, so a symbolic `group` (a dynamic-shape compile) works too."""
    rows = MIN_GROUP_ROWS
    while rows < group:
        rows *= 2
    return rows


def partial_shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernel's partials for q [B, Hq, D], k [B, Hkv, L, D]: acc [B, Hkv, S, GP, D] and
    m/l [B, Hkv, S, GP], S = ceil(L / SPLIT_KEYS) splits."""
    batch, heads, head_dim = q.shape
    kv_heads, pool_len = k.shape[1], k.shape[2]
    splits = -(-pool_len // SPLIT_KEYS)
    stats = (batch, kv_heads, splits, _group_rows(heads // kv_heads))
    return (*stats, head_dim), stats


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, D]; k/v [B, Hkv, L, D] (stride 1 on D); lengths [B] (int32 or int64).
    Returns the partials (acc, m, l) of `partial_shapes`, float32."""
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    if q.stride(2) != 1:  # the kernel reads q through its row and head strides
        q = q.contiguous()
    acc_shape, stats_shape = partial_shapes(q, k)
    batch, kv_heads, splits, group_rows = stats_shape
    acc = torch.empty(acc_shape, dtype=torch.float32, device=q.device)
    m = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    quantized = k_scale is not None
    ks = k_scale if quantized else lengths  # placeholders: never read when not quantized
    vs = v_scale if quantized else lengths
    ss = (ks.stride(0), ks.stride(1)) if quantized else (0, 0)
    _kernel()[(batch, kv_heads, splits)](
        q, k, v, ks, vs, lengths, acc, m, l_sum,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), ss[0], ss[1], head_dim**-0.5,
        splits, group=group, group_rows=group_rows, head_dim=head_dim, split_keys=SPLIT_KEYS, block=BLOCK,
        quantized=quantized, precision="ieee" if q.dtype == torch.float32 else "tf32")
    return acc, m, l_sum


def combine(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, group: int) -> torch.Tensor:
    """Merge split partials: acc [B, Hkv, S, GP, D], m/l [B, Hkv, S, GP] -> [B, Hkv, G, D] fp32.
    Split 0 always holds a key (lengths >= 1), so the max over splits is finite."""
    top = m.amax(2, keepdim=True)  # [B, Hkv, 1, GP]
    weight = torch.exp(m - top)  # empty splits: exp(-inf) = 0
    out = (acc * weight[..., None]).sum(2) / (l_sum * weight).sum(2)[..., None]
    return out[:, :, :group]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
              k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in torch ops: q [B, Hq, D]; k/v [B, Hkv, L, D]; lengths [B]."""
    batch, heads, head_dim = q.shape
    kv_heads, pool_len = k.shape[1], k.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k.to(q.dtype).transpose(-1, -2)).float() * head_dim**-0.5  # [B, Hkv, G, L]
    if k_scale is not None:
        scores = scores * k_scale.float()[:, :, None, :]
    visible = torch.arange(pool_len, device=q.device)[None] < lengths[:, None]  # [B, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if v_scale is not None:
        probs = probs * v_scale.float()[:, :, None, :]
    out = torch.matmul(probs.to(q.dtype), v.to(q.dtype))  # [B, Hkv, G, D]
    return out.reshape(batch, heads, head_dim)


@torch.library.custom_op("autoglm::row_decode_partials", mutates_args=())
def _row_decode_partials_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Only the launch: whatever else ran in here would be eager kernels Inductor cannot fuse.
    return _launch(q, k, v, lengths, k_scale, v_scale)


@_row_decode_partials_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc_shape, stats_shape = partial_shapes(q, k)
    return (q.new_empty(acc_shape, dtype=torch.float32), q.new_empty(stats_shape, dtype=torch.float32),
            q.new_empty(stats_shape, dtype=torch.float32))


def row_decode_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel through the custom op: the partials (acc, m, l) of `partial_shapes`, float32."""
    return _row_decode_partials_op(q, k, v, lengths, k_scale, v_scale)


def row_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row: q [B, Hq, D] attends over the first `lengths[b]` positions of its
    row's k/v [B, Hkv, L, D] (model dtype, or int8 codes with per-(token, head) `k_scale`/`v_scale`
    [B, Hkv, L]). Returns [B, Hq, D] in q's dtype. Every length must be in [1, L].
    The merge, cast and reshape after the kernel are plain ops: traced into the compiled layer,
    Inductor fuses them with its neighbours."""
    if not can_run(q):
        return reference(q, k, v, lengths, k_scale, v_scale)
    batch, heads, head_dim = q.shape
    acc, m, l_sum = row_decode_partials(q, k, v, lengths, k_scale, v_scale)
    return combine(acc, m, l_sum, heads // k.shape[1]).to(q.dtype).reshape(batch, heads, head_dim)
