"""Triton kernels for the packed int8 / int4 weights of `woq.py` (CUDA only; imported lazily).

Two shapes of work:
- one activation row (batch-1 decode, the case the quantisation knobs exist for): a GEMV that
  streams the weight once, each program owning BLOCK_N output rows and walking K. Decode at
  batch 1 is bound by how fast the weight bytes arrive, so what matters is wide loads and cheap
  dequantisation, not FLOPs.
- several rows (batched decode, prefill): a tiled matmul that dequantises a weight tile to the
  activation dtype in registers and feeds tensor cores (`tl.dot`).

`FAST_CVT` (autotuned) converts small integers to float32 with an integer add into the mantissa
of a float constant and one float subtract, instead of the int-to-float conversion instruction
(a fraction of the ALU rate). On the H200 it won the tuning for every int8 shape and lost for
most int4 shapes (BENCHMARKS.md).

Every launcher picks its tiling with `triton.autotune`, keyed by the weight shape (and a
power-of-two bucket of the row count), so `woq.warm_up` can tune every shape during set-up.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Shorter timing per candidate than Triton's default (25 + 100 ms): 40 layers share 5 shapes,
# and tuning happens in the trial's set-up time.
_BENCH = functools.partial(triton.testing.do_bench, warmup=5, rep=25)


def _gemv_configs(pairs: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "FAST_CVT": cvt}, num_warps=w, num_stages=3)
            for n, k, w in pairs for cvt in (0, 1)]


_INT8_GEMV = _gemv_configs([(8, 512, 4), (8, 1024, 8), (16, 512, 8), (16, 1024, 8), (32, 512, 8), (8, 2048, 8),
                             (32, 1024, 16)])
# (BLOCK_N, GROUPS per iteration, warps); GROUPS is capped to the group count by _prune_int4.
_INT4_GEMV = [triton.Config({"BLOCK_N": n, "GROUPS": g, "FAST_CVT": cvt}, num_warps=w, num_stages=2)
              for n, g, w in [(4, 8, 4), (8, 4, 4), (8, 8, 4), (16, 4, 4), (16, 8, 8), (32, 4, 8)]
              for cvt in (0, 1)]
_MM = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
       for m, n, w, s in [(16, 64, 4, 3), (16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3),
                          (64, 128, 8, 3), (128, 128, 8, 3)]]


def _prune_mm(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # A row tile taller than the (bucketed) row count only multiplies padding.
    rows = max(16, int(named_args["M_KEY"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows]
    return kept or configs[:1]


def _prune_int4(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # More groups per iteration than a row has would only be masked off.
    groups = int(named_args["K"]) // int(named_args["GROUP"])
    kept = [c for c in configs if c.kwargs["GROUPS"] <= max(groups, 1)]
    return kept or configs[:1]


def row_bucket(rows: int) -> int:
    """Autotuning key for the row count: the next power of two, capped (prefill shapes vary)."""
    return min(1 << (max(rows, 1) - 1).bit_length(), 256)


@triton.jit
def _small_int_to_f32(v, BIAS_BITS: tl.constexpr, BIAS: tl.constexpr, FAST_CVT: tl.constexpr):
    # BIAS_BITS is the float32 bit pattern of BIAS (2**23 for unsigned, 1.5 * 2**23 for signed
    # values): adding v to it lands v in the mantissa exactly, then BIAS is subtracted.
    if FAST_CVT:
        return (v.to(tl.int32) + BIAS_BITS).to(tl.float32, bitcast=True) - BIAS
    return v.to(tl.float32)


@triton.autotune(configs=_INT8_GEMV, key=["N", "K"], do_bench=_BENCH)
@triton.jit
def _int8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST_CVT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Software prefetch: the next tile's loads are issued before this tile is used, so two
    # tiles per thread are in flight (Triton does not pipeline loads outside tl.dot loops).
    x_next = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    w_next = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0)
    for k0 in range(0, K, BLOCK_K):
        x, w = x_next, w_next
        k = k0 + BLOCK_K + cols
        k_ok = k < K
        x_next = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        w_next = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        acc += _small_int_to_f32(w, 0x4B400000, 12582912.0, FAST_CVT) * x.to(tl.float32)[None, :]
    scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * scale).to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.autotune(configs=_INT4_GEMV, key=["N", "K", "GROUP"], do_bench=_BENCH,
                 prune_configs_by={"early_config_prune": _prune_int4})
@triton.jit
def _int4_gemv(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, N, K,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, FAST_CVT: tl.constexpr):
    # Tile [BLOCK_N rows, GROUPS groups, GROUP/2 bytes]; each group is reduced over its bytes,
    # then scaled once. (One group per iteration measured 2-3x slower on the H200: too little
    # work per loop trip.)
    HALF: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    half = tl.arange(0, HALF)
    g_idx = tl.arange(0, GROUPS)
    groups = K // GROUP
    span = tl.arange(0, GROUPS * HALF)
    p_rows = p_ptr + rows.to(tl.int64)[:, None] * (K // 2)
    sz_rows = s_ptr + rows.to(tl.int64)[:, None] * groups
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * groups
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    # The GROUPS groups of a row are contiguous bytes: one wide 2-D load, viewed as 3-D below;
    # the next iteration's bytes are requested before this one's are used (two tiles in flight).
    p_next = tl.load(p_rows + span[None, :], mask=row_ok[:, None] & (span < K // 2)[None, :], other=0)
    for g0 in range(0, groups, GROUPS):
        g = g0 + g_idx
        g_ok = g < groups
        packed = tl.reshape(p_next, (BLOCK_N, GROUPS, HALF))
        cols = tl.max_contiguous(tl.multiple_of((g0 + GROUPS) * HALF + span, 16), 16)
        p_next = tl.load(p_rows + cols[None, :], mask=row_ok[:, None] & (cols < K // 2)[None, :], other=0)
        x_off = g[:, None] * GROUP + half[None, :]  # [GROUPS, HALF]
        x_lo = tl.load(x_ptr + x_off, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + x_off + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
        lo = _small_int_to_f32(packed & 0xF, 0x4B000000, 8388608.0, FAST_CVT)
        hi = _small_int_to_f32(packed >> 4, 0x4B000000, 8388608.0, FAST_CVT)
        dot = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        x_sum = tl.sum(x_lo + x_hi, axis=1)  # [GROUPS]
        ok = row_ok[:, None] & g_ok[None, :]
        scale = tl.load(sz_rows + g[None, :], mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(z_rows + g[None, :], mask=ok, other=0.0).to(tl.float32)
        # sum_j (q_j - zero) * scale * x_j, with the zero point taken out of the inner loop
        acc += scale * (dot - zero * x_sum[None, :])
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.autotune(configs=[triton.Config({**c.kwargs, "BLOCK_K": bk}, num_warps=c.num_warps, num_stages=c.num_stages)
                          for c in _MM for bk in (64, 128)],
                 key=["M_KEY", "N", "K"], prune_configs_by={"early_config_prune": _prune_mm}, do_bench=_BENCH)
@triton.jit
def _int8_mm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, M_KEY,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # Loaded [BLOCK_N, BLOCK_K] (K contiguous: wide loads), transposed in registers for the dot.
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, (acc * scale[None, :]).to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_MM, key=["M_KEY", "N", "K", "GROUP"], prune_configs_by={"early_config_prune": _prune_mm},
                 do_bench=_BENCH)
@triton.jit
def _int4_mm(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_KEY,
             GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, HALF)
    m_ok, n_ok = rm < M, rn < N
    groups = K // GROUP
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    p_rows = p_ptr + rn.to(tl.int64)[:, None] * (K // 2)
    sz_cols = rn.to(tl.int64) * groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        x_lo = tl.load(x_rows + g * GROUP + half[None, :], mask=m_ok[:, None], other=0.0)
        x_hi = tl.load(x_rows + g * GROUP + HALF + half[None, :], mask=m_ok[:, None], other=0.0)
        packed = tl.trans(tl.load(p_rows + g * HALF + half[None, :], mask=n_ok[:, None], other=0))  # [HALF, BLOCK_N]
        part = tl.dot(x_lo, (packed & 0xF).to(x_lo.dtype))
        part = tl.dot(x_hi, (packed >> 4).to(x_hi.dtype), part)
        x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
        scale = tl.load(s_ptr + sz_cols + g, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + sz_cols + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += scale[None, :] * (part - zero[None, :] * x_sum[:, None])
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16, contiguous) @ dequant(qdata [N, K])^T -> [M, N]."""
    rows, k = x.shape
    n = qdata.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 1:
        _int8_gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, qdata, scale, out, n, k)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]))  # noqa: E731
        _int8_mm[grid](x, qdata, scale, out, rows, n, k, row_bucket(rows))
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16, contiguous) @ dequant(packed [N, K/2])^T -> [M, N]."""
    rows, k = x.shape
    n = packed.shape[0]
    group = k // scale.shape[1]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 1:
        _int4_gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, packed, scale, zero, out, n, k, group)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]))  # noqa: E731
        _int4_mm[grid](x, packed, scale, zero, out, rows, n, k, row_bucket(rows), group)
    return out


def best_configs() -> dict[str, dict[str, str]]:
    """The tiling autotuning chose per kernel and key (for benchmark notes)."""
    kernels = {"int8_gemv": _int8_gemv, "int4_gemv": _int4_gemv, "int8_mm": _int8_mm, "int4_mm": _int4_mm}
    return {name: {str(key): str(cfg) for key, cfg in kernel.cache.items()} for name, kernel in kernels.items()}
