"""Batch-1 decode attention for one new token in one CUDA kernel (`decode_attention.cu`), compiled at run time.

Between the qkv projection and o_proj, `fast_model.layer_forward` runs 5-7 small kernels per
layer (qkv bias add, rope, two cache writes, QK^T, softmax, PV). At batch 1 with one new token
they move little data (K/V of a 256-slot bucket is 256 KB per layer), so the time goes to
launches and the latency of each step. `decode_attention` does all of it in one launch for one
sequence: split over KV heads and chunks of the cache (flash-decoding), tensor-core MMAs for the
scores and P V, the chunks combined in the same kernel (see the .cu). NVRTC (through
`torch.cuda._compile_kernel`, as `woq_cuda`) compiles it once per shape and device: no CUDA
toolkit or build step.

The layer calls `decode_attention`, a custom op that updates the caches in place, so it can sit
inside the compiled layer and be captured in a CUDA graph. Where `can_run` says no (CPU, float32,
several tokens or sequences, other head shapes) it runs `reference`: fast_model's own torch ops,
which are also what the tests compare the kernel with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from runners.glm.kernels import cuda_launch
from runners.glm.kernels.kernel_cache import compile_kernel
from runners.glm.ops import grouped_attention, split_heads

_SOURCE = Path(__file__).with_name("decode_attention.cu")
HEAD_DIMS = (32, 64, 128)
MAX_GROUP = 16  # query heads per KV head: the 16 rows of the kernel's MMAs
MAX_SPLITS = 64  # blocks per KV head (kMaxSplits in the .cu)
TILE = 16  # keys per warp step
_DTYPES = (torch.bfloat16, torch.float16)


class Plan(NamedTuple):
    warps: int  # warps per block
    splits: int  # blocks per KV head
    keys_per_split: int  # consecutive keys per block, a multiple of TILE


def plan(attend_len: int) -> Plan:
    """How one attend_len is split (static per attend_len, so fixed per compiled step). Chosen
    from every plan timed on an H200 (benchmarks/decode_attention.py, BENCHMARKS.md): 8 warps
    beat 4 at every length and split; up to 16 tiles (256 keys) one block per KV head, which
    skips the combine (L=256: 7.4 us per layer vs 8.3 with 4 splits); longer, about sqrt(tiles)
    tiles per block and as many blocks, so a block's own work and the combine (the last block
    reads every block's partial) grow together (L=1024: 8 x 128 keys, 9.0 us; L=4096: 16 x 256,
    13.0 us; both the fastest of all plans)."""
    tiles = -(-attend_len // TILE)
    per_split = max(4, tiles) if tiles <= 16 else math.isqrt(tiles - 1) + 1  # ceil(sqrt(tiles))
    splits = -(-tiles // per_split)
    if splits > MAX_SPLITS:
        per_split = -(-tiles // MAX_SPLITS)
        splits = -(-tiles // per_split)
    return Plan(8, splits, TILE * per_split)


class Macros(NamedTuple):
    head_dim: int
    group: int
    rotary: int
    warps: int
    fp16: bool


@functools.cache
def _kernel(macros: Macros, device: int) -> Callable[..., None]:
    defines = (f"#define HEAD_DIM {macros.head_dim}\n#define GROUP {macros.group}\n#define ROTARY {macros.rotary}\n"
               f"#define WARPS {macros.warps}\n#define X_FP16 {int(macros.fp16)}\n"
               f"#define SCALE {macros.head_dim ** -0.5!r}f\n")
    with torch.cuda.device(device):  # the module is loaded into this device's context
        return compile_kernel(defines + _SOURCE.read_text(), "decode_attention", nvcc_options=["-std=c++17"])


@functools.cache
def _capable(device: int) -> bool:
    # mma.sync m16n8k16 with bf16 operands needs sm_80.
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def _workspace(device: int, kv_heads: int, splits: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block partial results and the per-KV-head tickets (zero; the kernel leaves them zero).
    One set per shape, shared by every layer: the layers' launches are ordered on one stream.
    Allocated at the first call, so warm up before a CUDA-graph capture (the engine does)."""
    part = -(-head_dim // 64) * 1024 + 32  # kPart in the .cu
    work = torch.empty(kv_heads * splits * part, dtype=torch.float32, device=f"cuda:{device}")
    return work, torch.zeros(kv_heads, dtype=torch.int32, device=f"cuda:{device}")


def compile_error() -> str | None:
    """Why the kernel cannot run here (None when it can): no GPU, too old a GPU, no NVRTC. The
    glm-4-9b variant is compiled and cached on the way."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    device = torch.cuda.current_device()
    if not _capable(device):
        return "the decode attention kernel needs compute capability 8.0+ (bf16 tensor-core MMA)"
    try:
        _kernel(Macros(128, 16, 64, 4, False), device)
    except Exception as exc:  # noqa: BLE001 - NVRTC/driver errors come as several types
        return f"NVRTC could not compile the decode attention kernel: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    return None


def _is(t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> bool:
    return tuple(t.shape) == shape and t.dtype == like.dtype and t.device == like.device and t.is_contiguous()


def can_run(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
            slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
            attend_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these arguments (see `decode_attention`): CUDA sm_80+, bf16/fp16,
    one sequence and one token, a supported head shape, contiguous tensors, and 16-byte aligned
    qkv / bias / caches (read and written in 16-byte chunks)."""
    if not (qkv.is_cuda and qkv.dtype in _DTYPES and _capable(qkv.device.index)):
        return False
    group, rest = divmod(num_heads, num_kv_heads)
    rotary = cos.shape[-1]
    if rest or not 1 <= group <= MAX_GROUP or head_dim not in HEAD_DIMS or rotary % 2 or not 2 <= rotary <= head_dim:
        return False
    width = (num_heads + 2 * num_kv_heads) * head_dim
    cache_shape = (1, num_kv_heads, k_cache.shape[2] if k_cache.dim() == 4 else -1, head_dim)
    shapes_ok = (_is(qkv, (1, 1, width), qkv) and (bias_qkv is None or _is(bias_qkv, (width,), qkv))
                 and _is(cos, (1, 1, rotary), qkv) and _is(sin, (1, 1, rotary), qkv)
                 and _is(k_cache, cache_shape, qkv) and _is(v_cache, cache_shape, qkv)
                 and _is(bias, (1, 1, 1, 1, attend_len), qkv)
                 and slots.dtype == torch.int64 and slots.numel() == 1 and slots.device == qkv.device)
    if not shapes_ok or not 1 <= attend_len <= cache_shape[2]:
        return False
    return all(t.data_ptr() % 16 == 0 for t in (qkv, bias_qkv, k_cache, v_cache) if t is not None)


def run_kernel(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
               attend_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
               chosen: Plan | None = None) -> torch.Tensor:
    """The kernel on arguments `can_run` accepted; `chosen` forces a split (tests)."""
    split = chosen or plan(attend_len)
    if split.warps not in (4, 8) or not 1 <= split.splits <= MAX_SPLITS or split.keys_per_split % TILE \
            or not (split.splits - 1) * split.keys_per_split < attend_len <= split.splits * split.keys_per_split:
        raise ValueError(f"{split} does not split attend_len {attend_len}")
    device = qkv.device.index
    out = torch.empty((1, 1, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    # One split needs no workspace; the kernel then never touches these pointers.
    work, tickets = _workspace(device, num_kv_heads, split.splits, head_dim) if split.splits > 1 else (out, out)
    macros = Macros(head_dim, num_heads // num_kv_heads, cos.shape[-1], split.warps, qkv.dtype == torch.float16)
    args = [qkv, qkv if bias_qkv is None else bias_qkv, int(bias_qkv is not None), cos, sin, slots, k_cache,
            v_cache, bias, out, work, tickets, attend_len, k_cache.shape[2], split.keys_per_split]
    with torch.cuda.device(device):  # the current stream and device are the tensors'
        cuda_launch.launch(_kernel(macros, device), (num_kv_heads, split.splits, 1), (32 * split.warps, 1, 1),
                           args, device)
    return out


def reference(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
              attend_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The torch ops of fast_model.layer_forward that the kernel replaces (any batch and length)."""
    batch, seq, _ = qkv.shape
    q, k, v = split_heads(qkv, bias_qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    k_cache[:, :, slots] = k
    v_cache[:, :, slots] = v
    attn = grouped_attention(q, k_cache, v_cache, bias, attend_len)
    return attn.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)


@torch.library.custom_op("autoglm::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                         attend_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    args = (qkv, bias_qkv, cos, sin, slots, k_cache, v_cache, bias, attend_len, num_heads, num_kv_heads, head_dim)
    return run_kernel(*args) if can_run(*args) else reference(*args)


@_decode_attention_op.register_fake
def _(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
      k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor, attend_len: int, num_heads: int,
      num_kv_heads: int, head_dim: int) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads * head_dim))


def decode_attention(qkv: torch.Tensor, bias_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                     attend_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Attention output [B, S, Hq * D] of the fused projection `qkv` [B, S, (Hq + 2 Hkv) * D]
    (q, k, v heads in that order; `bias_qkv` [(Hq + 2 Hkv) * D] or None added first), with rope
    (`cos`/`sin` [B, S, rotary], transformers' GLM convention) on q and k; writes k and v into
    `k_cache`/`v_cache` [B, Hkv, L, D] at `slots` [S] and attends over the first `attend_len`
    slots with the additive mask `bias` [B, 1, 1, S, attend_len].

    One CUDA kernel for B = S = 1 (see `can_run`), fast_model's torch ops otherwise. The kernel
    computes in fp32 and rounds once where the torch ops round after each op, so results agree
    to the activation dtype's rounding, not bit for bit."""
    return _decode_attention_op(qkv, bias_qkv, cos, sin, slots, k_cache, v_cache, bias, attend_len, num_heads,
                                num_kv_heads, head_dim)
