"""Shapes and storage of the fast engines' KV: power-of-two buckets, the slot pool's decode
lengths and prefill chunk widths, and `KvPool` (K and V of every layer for a fixed set of rows,
plain or int8 codes + scales). Shared by `engines/fast.py` (bucketed static batches) and
`engines/slots.py` (the continuous-batching pool)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from runners.glm.fast_model import FastGlm
from runners.knobs import INFER_KNOBS

MIN_LENGTH_BUCKET = 256  # shortest attended length of a decode step (both fast engines)
MIN_PREFILL_WIDTH = 16  # narrowest padded prefill piece
# Widest prefill chunk, chunked or not: the prefill attention materialises fp32 scores
# [Hq, W, A] (8.6 GB per layer at W = A = 8192 on glm-4-9b), and a captured graph keeps it.
# Longer prompts run in pieces of this width back to back; chunked prefill equals unchunked.
MAX_PREFILL_WIDTH = 1024

def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def length_buckets(length: int, step: int = 0) -> list[int]:
    """Decode attend lengths of a pool of `length` positions, ascending: step 0 = one, the pool's
    length L; step k > 1 = L, L/k, L/k^2, ... (>= 256). The `decode_length_step` knob (k > 1
    decodes through masked matmuls over these buckets; 0 through `row_attention`, each row at its
    own length, one graph per batch bucket).

    Each length is one more compiled + captured decode graph per batch bucket, and compile time
    is set-up time (issue 17: 112 s for one trial's new batch buckets of glm-4-9b). Shorter
    lengths read less KV padding per step, but the longest running row picks the length, so at
    large batches it is mostly the top one or next to it; at small batches the KV is a few
    percent of the weight bytes a step reads (glm-4-9b: 40 KB per position, 18 GB of weights).
    """
    out, size = [length], length // step if step > 1 else 0
    while size >= MIN_LENGTH_BUCKET:
        out.append(size)
        size //= step
    return sorted(out)


PREFILL_WIDTH_STEP = 64  # prefill widths above this are padded to a multiple of it


def prefill_width(tokens: int) -> int:
    """Padded width of a prefill piece: 16, 32, 64, then multiples of 64. Prefill pieces run one
    width-dynamic compile (or eager ops) inside a CUDA graph per width, so fine widths cost only
    a capture each, while powers of two would waste up to half of a piece's FLOPs on padding."""
    if tokens <= PREFILL_WIDTH_STEP:
        return bucket(tokens, MIN_PREFILL_WIDTH)
    return -(-tokens // PREFILL_WIDTH_STEP) * PREFILL_WIDTH_STEP


def chunk_shapes(prompt_len: int, start: int, chunk: int, pool_len: int) -> list[tuple[int, int, int, int]]:
    """(offset, real width, padded width, attend length) of each prefill chunk of a prompt whose
    first `start` positions are already cached; `chunk` 0 = the rest in one piece (of at most
    MAX_PREFILL_WIDTH tokens)."""
    out = []
    offset = min(start, prompt_len - 1)  # the last prompt token always runs: its logits
    limit = MAX_PREFILL_WIDTH if chunk <= 0 else min(chunk, MAX_PREFILL_WIDTH)
    while offset < prompt_len:
        width = min(limit, prompt_len - offset)
        padded = prefill_width(width)
        attend = min(bucket(offset + padded, MIN_LENGTH_BUCKET), pool_len)
        out.append((offset, width, padded, attend))
        offset += width
    return out


# Prefill groups (`engines/slots.py`): queued requests whose whole remaining prompt is one piece
# of at most GROUP_MAX_WIDTH tokens prefill together, one row each, in one pass of at most
# `prefill_group_tokens` padded tokens (default PREFILL_GROUP_TOKENS; chunked prefill: at most
# the chunk size too, so the running batch still waits at most one chunk's worth of prefill).
# Why only short pieces: a pass of a few dozen tokens reads all the weights for little arithmetic
# (glm-4-9b on an H200: ~10 ms at 16 tokens, ~15 at 256, eager), so prefilled one by one, most of
# a short prompt's prefill is that fixed cost, while at a few hundred tokens the matmuls dominate
# and every member is padded to the widest. The cap also bounds the captured shapes (row buckets x
# these widths x attend lengths) and the padding a group carries.
GROUP_MAX_WIDTH = 256
PREFILL_GROUP_TOKENS: int = INFER_KNOBS["prefill_group_tokens"].default  # declared once, with the knob


def group_budget(chunk: int, group_tokens: int = PREFILL_GROUP_TOKENS) -> int:
    """Padded tokens one prefill pass may hold: `group_tokens`, and at most the chunk when chunked
    (under 32 no group forms: two rows of the narrowest piece, 16 tokens, do not fit)."""
    return min(group_tokens, chunk) if chunk > 0 else group_tokens


def group_shapes(pieces: set[tuple[int, int]], rows: int, budget: int) -> set[tuple[int, int, int]]:
    """(rows, padded width, attend length) of every prefill group a pool of `rows` rows can run,
    given the single-row pieces `pieces` ((padded width, attend length) of every chunk a prompt
    reaches): each row bucket of 2 or more (`decode_batch`) x each groupable width x each attend
    length (a group pads to its widest piece and attends its longest), within `budget` tokens."""
    widths = {w for w, _ in pieces if w <= GROUP_MAX_WIDTH}
    attends = {a for w, a in pieces if w <= GROUP_MAX_WIDTH}
    sizes = {decode_batch(n, rows, 2) for n in range(2, rows + 1)}
    return {(k, w, a) for k in sizes for w in widths for a in attends if k * w <= budget}


def pool_rows(gpu_rows: int, shared_staging: bool = True) -> int:
    """Rows a pool of `gpu_rows` decoding rows allocates: exactly those when prefill stages in the
    last decoding row (`shared_staging`), one more (a staging row no sequence decodes in) when not
    (`kv_cache: offloaded`, see `engines/slots.py`)."""
    return gpu_rows if shared_staging else gpu_rows + 1


def decode_batch(running: int, rows: int, minimum: int = 1) -> int:
    """Rows a decode step of `running` sequences runs on a pool of `rows` rows: the next power of
    two (at least `minimum`), capped at the pool, so the top bucket may be no power of two (5 rows:
    1, 2, 4, 5). A bucket reads the prefix [0, bucket) of the pool, never beyond it."""
    return min(bucket(running, minimum), rows)


def decode_batches(gpu_rows: int, rows: int, minimum: int = 1) -> list[int]:
    """Every decode bucket that 1..`gpu_rows` running sequences reach on a pool of `rows` rows."""
    return sorted({decode_batch(n, rows, minimum) for n in range(1, gpu_rows + 1)})


class KvPool:
    """K and V of `rows` sequences x `length` positions for every layer, plain or int8 + scales."""

    @staticmethod
    def bytes_per_position(model: FastGlm, quantized: bool) -> int:
        """Device bytes of one position of one sequence, all layers, K and V."""
        cfg, dims = model.config, model.dims
        per_head = dims.head_dim + model.dtype.itemsize if quantized else dims.head_dim * model.dtype.itemsize
        return 2 * cfg.num_hidden_layers * dims.num_kv_heads * per_head

    def __init__(self, model: FastGlm, rows: int, length: int, quantized: bool) -> None:
        cfg, dims = model.config, model.dims
        shape = (cfg.num_hidden_layers, rows, dims.num_kv_heads, length, dims.head_dim)
        self.rows, self.length, self.quantized = rows, length, quantized
        dtype = torch.int8 if quantized else model.dtype
        # Zeros, not empty: masked positions meet zero weights, and garbage NaN would survive.
        self.parts = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(2)]
        if quantized:
            self.parts += [torch.zeros(shape[:-1], dtype=model.dtype, device=model.device) for _ in range(2)]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def bytes_per_token(self) -> float:
        """Device bytes of one position of one sequence, all layers, K and V."""
        return self.nbytes() / (self.rows * self.length)

    def views(self, first: int, count: int) -> tuple[list[Any], list[Any]]:
        """Per-layer caches of rows [first, first + count): tensors, or (codes, scales) tuples."""
        layers = self.parts[0].shape[0]
        rows = slice(first, first + count)
        if not self.quantized:
            return ([self.parts[0][i, rows] for i in range(layers)], [self.parts[1][i, rows] for i in range(layers)])
        k, v, ks, vs = self.parts
        return ([(k[i, rows], ks[i, rows]) for i in range(layers)], [(v[i, rows], vs[i, rows]) for i in range(layers)])

    def read(self, row: int, length: int) -> tuple[torch.Tensor, ...]:
        """Copies of positions [0, length) of one row: one tensor per part, [layers, Hkv, length(, D)]."""
        return tuple(p[:, row, :, :length].clone() for p in self.parts)

    def write(self, row: int, parts: Sequence[torch.Tensor], offset: int = 0) -> None:
        for dst, src in zip(self.parts, parts, strict=True):
            dst[:, row, :, offset:offset + src.shape[2]].copy_(src, non_blocking=True)

    def move(self, src: int, dst: int, length: int) -> None:
        for p in self.parts:
            p[:, dst, :, :length].copy_(p[:, src, :, :length])
