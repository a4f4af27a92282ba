"""Continuous batching on the fast path: a fixed pool of KV rows ("slots") with per-row lengths.

How it works (the running batch changes between decode steps; `runners.scheduler.run_continuous`
drives it through `join`/`begin`+`advance`/`step`/`leave`):
- KV lives in one pool per K and V, [layers, R, Hkv, L, D] (int8 codes plus [layers, R, Hkv, L]
  scales for `kv_cache: quantized`). Every row holds one sequence from position 0: no left
  padding, so a row's length is its next write slot and its next rotary position.
- Rows are kept compact: the `n` decoding sequences are rows 0..n-1. A leaving row is filled by
  moving the last decoding row into it (one device copy of that row's valid positions), so a
  decode step only ever reads a prefix of the pool and no per-step gather is needed (a gather by
  an index tensor would copy every row's whole KV each step).
- A decode step of n rows runs the batch bucket b = next power of two >= n and the shortest
  length bucket l (`length_buckets`; by default only the pool's length) >= the longest row + 1:
  one CUDA graph per (b, l), captured in
  `prepare()` on the compiled layer (the same `fast_model.layer_forward` as `FastEngine`, with
  per-row write slots [b, 1]). Rows n..b-1 of a bucket are idle: their position is parked at the
  scratch slot L-1, which no sequence uses (the pool holds prompt + output + 1 positions), so
  the idle rows' writes land there and nothing valid is touched.
- Prefill runs in a staging row (the pool's last row, never a decoding row), one request at a
  time, in chunks of `prefill_chunk_tokens` (0: the whole prompt, in pieces of at most
  MAX_PREFILL_WIDTH) padded to a width bucket (`prefill_width`), each chunk a captured graph per
  (width, attend length) bucket, its ops eager inside the graph (see `_prefill_step`). When the
  prompt is done its first token exists; its KV is copied into row n (one device copy of its
  positions) and it joins the decode batch.
- Prefix cache: a hit copies the cached prefix KV into the staging row and prefill starts after
  it. Misses store their prefix once their prefill is done.
- `kv_cache: offloaded`: the GPU pool has `gpu_rows` decoding rows and up to `max_sequences`
  sequences are admitted. A prefill finishing with no free row preempts the sequence in the last
  decoding row: its KV goes to pinned host memory; it comes back (FIFO) when a row frees.
  A parked sequence keeps its last token and length, so it resumes with the same tokens.
- Nothing is compiled or captured in a measured window when `prepare()` saw the trial's shapes;
  any shape met later is captured on the spot and counted in `counters()["shape_misses"]`.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.fast_model import FastGlm, row_bias
from runners.glm.prefix_cache import TieredPrefixCache, engine_prefix_cache
from runners.glm.work import WorkCounter
from runners.measure.monitor import StepTimer
from runners.scheduler import Clock
from runners.workload import Request

MIN_LENGTH_BUCKET = 256  # as FastEngine: shortest attended length of a decode step
MIN_PREFILL_WIDTH = 16  # narrowest padded prefill piece
# Widest prefill chunk, chunked or not: the prefill attention materialises fp32 scores
# [Hq, W, A] (8.6 GB per layer at W = A = 8192 on glm-4-9b), and a captured graph keeps it.
# Longer prompts run in pieces of this width back to back; chunked prefill equals unchunked.
MAX_PREFILL_WIDTH = 1024
POLICIES = ("static", "quantized", "offloaded")

PromptFn = Callable[[Request], list[int]]
PrefixLenFn = Callable[[Request], int]


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
    """Padded width of a prefill piece: 16, 32, 64, then multiples of 64. Prefill pieces run
    eagerly inside CUDA graphs (no compile per width), so fine widths cost only a capture each,
    while powers of two would waste up to half of a piece's FLOPs on padding."""
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


def pool_rows(gpu_rows: int) -> int:
    """Rows a pool of `gpu_rows` decoding rows allocates: every decode bucket (a power of two
    >= the running rows) reads a prefix of the pool, and one more row stages prefills."""
    return max(bucket(gpu_rows), gpu_rows + 1)


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


@dataclass
class _PrefillShape:
    """Static inputs of one prefill chunk bucket (padded width, attend length) and its graph."""

    width: int
    attend: int
    ids: torch.Tensor  # [1, W]
    pos: torch.Tensor  # [1, W] absolute positions (pads parked at the scratch slot)
    last: torch.Tensor  # [1] index of the chunk's last real token
    graph: Any = None


@dataclass
class _Decode:
    batch: int
    length: int
    graph: Any = None


@dataclass
class _Prefill:
    request: Request
    prompt: list[int]
    prefix_len: int
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    reused: int = 0  # prompt positions taken from the prefix cache


@dataclass
class _Parked:
    rid: int
    length: int
    token: torch.Tensor  # [1, 1] on the device
    kv: tuple[torch.Tensor, ...]  # host copies of the row's positions [0, length)


class SlotEngine:
    """`runners.scheduler.IterationEngine` (and `Engine.run_batch`) over `FastGlm` with a KV slot pool."""

    def __init__(self, model: FastGlm, device: str, layer_fn: Callable[..., torch.Tensor],
                 head_fn: Callable[..., torch.Tensor], eager_layer_fn: Callable[..., torch.Tensor],
                 eager_head_fn: Callable[..., torch.Tensor], kv_cache: str = "static", kv_bits: int = 8,
                 prefill_chunk_tokens: int = 0, graph_min_batch: int = 1, graph_pool: Any = None,
                 compile_failed: Callable[[BaseException], None] | None = None, decode_length_step: int = 0,
                 batched_fns: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None) -> None:
        if kv_cache not in POLICIES:
            raise InfeasibleConfig(f"the slot engine keeps kv_cache in {list(POLICIES)}, not {kv_cache!r}")
        if kv_cache == "quantized" and kv_bits != 8:
            raise InfeasibleConfig(f"kv_cache=quantized on the fast engine stores int8 codes with per-(token, head) "
                                   f"scales: kv_bits=8 only, not {kv_bits} (engine=hf has quanto's 2/4-bit cache)")
        self.model = model
        self.device = device
        self.kv_cache = kv_cache
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.chunked = self.prefill_chunk_tokens > 0
        self.decode_length_step = int(decode_length_step)
        self.use_graphs = device.startswith("cuda")
        self.graph_min_batch = graph_min_batch
        self._graph_pool = graph_pool
        self._layer_fn, self._head_fn = layer_fn, head_fn
        self._eager_layer_fn, self._eager_head_fn = eager_layer_fn, eager_head_fn
        # Multi-row decode steps: one dynamic-shape compile for every bucket (FastEngine.batched_fns).
        self._batched_fns = batched_fns
        # decode_length_step 0: decode attention reads each row's own length through
        # `row_attention` (a Triton kernel on GPU); k > 1: masked matmuls over length buckets.
        self.row_attention = self.decode_length_step == 0
        self._on_compile_failed = compile_failed
        self.compile_error = ""
        self.pad_id = int(model.config.pad_token_id or 0)
        self.work = WorkCounter(model)
        self.pool: KvPool | None = None
        self.gpu_rows = 0  # decoding rows of the pool (the staging row is extra)
        self.max_sequences = 0  # admitted sequences: gpu_rows, or more when offloaded
        self._decode: dict[tuple[int, int], _Decode] = {}
        self._prefill_shapes: dict[tuple[int, int], _PrefillShape] = {}
        self.compile_s = 0.0
        self.shape_misses = 0
        self._preparing = False
        self.record_tokens = False
        self.generated: dict[int, list[int]] = {}
        self.begin_trial(lambda r: [], None, "off", 0)

    # --- per trial --------------------------------------------------------------------------
    def begin_trial(self, prompt_fn: PromptFn, prefix_len_fn: PrefixLenFn | None, prefix_policy: str,
                    prefix_budget_mib: float) -> None:
        """Fresh counters, an empty batch and prefix cache; the pool and graphs are kept."""
        self.prompt_fn = prompt_fn
        self.prefix_len_fn = prefix_len_fn
        self.work.reset()
        self.preemptions = 0
        self.prefix_cache: TieredPrefixCache[tuple[torch.Tensor, ...]] | None = engine_prefix_cache(
            prefix_policy, prefix_budget_mib, to_l1=lambda kv: tuple(t.to(self.device, non_blocking=True) for t in kv),
            to_l2=lambda kv: tuple(t.to("cpu") for t in kv))
        self._reset_batch()

    def _reset_batch(self) -> None:
        self.rows: list[int] = []  # rid of decoding row i
        self.lengths: list[int] = []  # its KV length (= next write slot), host side: no sync
        self._queue: deque[_Prefill] = deque()
        self._parked: deque[_Parked] = deque()
        if self.pool is not None:
            self._park_all()

    def counters(self) -> dict[str, float]:
        counts = self.work.snapshot()
        counts.update(shape_misses=float(self.shape_misses), preemptions=float(self.preemptions))
        if self.prefix_cache is not None:
            stats = self.prefix_cache.stats
            counts.update(prefix_lookups=float(stats.lookups), prefix_hits=float(stats.hits_l1 + stats.hits_l2),
                          prefix_tokens_reused=float(stats.tokens_reused))
        return counts

    @property
    def batch(self) -> int:
        return len(self.rows)

    # --- pool, buckets, capture ---------------------------------------------------------------
    def prepare(self, gpu_rows: int, max_len: int, max_prompt: int, prefix_lens: Sequence[int] = (),
                max_sequences: int | None = None) -> float:
        """Allocate the pool (`gpu_rows` decoding rows, positions for `max_len` tokens) and capture
        every decode bucket and every prefill chunk bucket that a prompt of up to `max_prompt`
        tokens (with any of `prefix_lens` cached) can reach. Returns seconds."""
        start = time.perf_counter()
        self._preparing = True
        try:
            length = self.pool_length(max_len)
            rows = pool_rows(gpu_rows)
            if self.pool is None or (self.pool.rows, self.pool.length) != (rows, length):
                self._new_pool(rows, length)
            self.gpu_rows = gpu_rows
            # MBU counts the KV bytes this pool really stores (int8 codes + scales when quantized).
            self.work.kv_bytes_per_token = self.pool.bytes_per_token()
            self.max_sequences = max(gpu_rows, int(max_sequences or gpu_rows))
            if self.kv_cache != "offloaded":
                self.max_sequences = gpu_rows
            for size in [1 << i for i in range(bucket(gpu_rows).bit_length())]:
                for attend in self._attend_lengths():
                    self._decode_for(size, attend)
            for shape in sorted(self.prefill_shapes(max_prompt, prefix_lens)):
                self._prefill_for(*shape)
        finally:
            self._preparing = False
        self._reset_batch()
        return time.perf_counter() - start

    def pool_length(self, max_len: int) -> int:
        """Positions per pool row for sequences of up to `max_len` tokens (+ 1: the scratch slot
        stays unused). Row attention reads each row's own length, so the pool need only round up
        to a split of the kernel; the masked path's length buckets halve, so a power of two."""
        if self.row_attention:
            return -(-(max_len + 1) // MIN_LENGTH_BUCKET) * MIN_LENGTH_BUCKET
        return bucket(max_len + 1, MIN_LENGTH_BUCKET)

    def rows_for_budget(self, budget_bytes: float, max_len: int) -> int:
        """Most decoding rows whose pool (staging row and bucket padding included) fits
        `budget_bytes` of device memory at `max_len` tokens per sequence; 0 if not one does.
        int8 KV stores about half the bytes per position, so about twice the rows fit."""
        row_bytes = self.pool_length(max_len) * KvPool.bytes_per_position(self.model, self.kv_cache == "quantized")
        rows = 0
        while pool_rows(rows + 1) * row_bytes <= budget_bytes:
            rows += 1
        return rows

    def prefill_shapes(self, max_prompt: int, prefix_lens: Sequence[int] = ()) -> set[tuple[int, int]]:
        """(padded width, attend length) of every chunk of every prompt length up to `max_prompt`."""
        assert self.pool is not None
        starts = {0} | {int(p) for p in prefix_lens if p > 0}
        shapes = set()
        for n in range(1, int(max_prompt) + 1):
            for s in starts:
                shapes |= {(w, a) for _, _, w, a in chunk_shapes(n, s, self.prefill_chunk_tokens, self.pool.length)}
        return shapes

    @torch.inference_mode(False)
    def _new_pool(self, rows: int, length: int) -> None:
        self.pool = None
        self._decode.clear()
        self._prefill_shapes.clear()
        # A fresh graph memory pool: the old graphs' private pool (sized for the old batch) is
        # only given back once nothing refers to it, and kept it would count in every later
        # trial's peak memory (issue 17: one config measured 24.0 and 27.8 GB by trial order).
        self._graph_pool = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.pool = KvPool(self.model, rows, length, self.kv_cache == "quantized")
        dev, vocab = self.model.device, self.model.config.vocab_size
        self.scratch = length - 1
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # next input token per row
        self.pos = torch.full((rows,), self.scratch, dtype=torch.long, device=dev)  # next write slot per row
        self.logits = torch.zeros(rows, vocab, dtype=self.model.dtype, device=dev)  # last step's logits
        self.prefill_logits = torch.zeros(1, vocab, dtype=self.model.dtype, device=dev)
        self._rope_max = int(self.model.cos_table.shape[0]) - 1

    @property
    def compiled(self) -> bool:
        return self._layer_fn is not self._eager_layer_fn

    def buckets(self) -> list[tuple[int, int]]:
        """(batch, attend length) decode buckets captured so far (prefill: `prefill_buckets`)."""
        return self.decode_buckets()

    def decode_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._decode)

    def prefill_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._prefill_shapes)

    def _miss(self) -> None:
        if not self._preparing:
            self.shape_misses += 1

    def _min_decode_rows(self) -> int:
        """Smallest decode bucket. With the dynamic-shape compile it is 2: torch.compile
        specialises a size-1 dimension, so a batch-1 bucket would cost a second compile (the
        batch-1 shape-specialised compile with its coordinate-descent tuning is FastEngine's
        roofline path, 25-40 s of set-up for glm-4-9b); an idle second row costs a batch-1 step
        next to nothing (the weights dominate its bytes)."""
        return 2 if self._batched_fns is not None else 1

    def _attend_lengths(self) -> list[int]:
        """Decode attend lengths: one, the pool's, when rows attend at their own lengths
        (`row_attention`); else the `decode_length_step` buckets."""
        assert self.pool is not None
        if self.row_attention:
            return [self.pool.length]
        return length_buckets(self.pool.length, self.decode_length_step)

    def _decode_for(self, batch: int, attend: int) -> _Decode:
        key = (max(bucket(batch), self._min_decode_rows()), attend)
        entry = self._decode.get(key)
        if entry is None:
            self._miss()
            t0 = time.perf_counter()
            entry = _Decode(*key)
            if self.use_graphs:
                entry.graph = self._capture(lambda: self._decode_step(entry), entry.batch >= self.graph_min_batch)
            self._decode[key] = entry
            self.compile_s += time.perf_counter() - t0
        return entry

    @torch.inference_mode(False)
    def _prefill_for(self, width: int, attend: int) -> _PrefillShape:
        shape = self._prefill_shapes.get((width, attend))
        if shape is None:
            self._miss()
            t0 = time.perf_counter()
            dev = self.model.device
            shape = _PrefillShape(width, attend, torch.full((1, width), self.pad_id, dtype=torch.long, device=dev),
                                  torch.full((1, width), self.scratch, dtype=torch.long, device=dev),
                                  torch.zeros(1, dtype=torch.long, device=dev))
            if self.use_graphs:
                shape.graph = self._capture(lambda: self._prefill_step(shape), width >= self.graph_min_batch)
            self._prefill_shapes[(width, attend)] = shape
            self.compile_s += time.perf_counter() - t0
        return shape

    def _capture(self, fn: Callable[[], None], capture: bool) -> Any:
        """Warm up (compile, autotune) on a side stream, then capture `fn` in a CUDA graph.
        The per-row state is saved and restored around it: a shape met inside a window must not
        disturb the running sequences (their KV beyond their length is garbage anyway)."""
        saved = (self.tok.clone(), self.pos.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            while True:
                try:
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            fn()
                    break
                except Exception as exc:  # noqa: BLE001 - compile failed: fall back a step, say why
                    self._compile_fallback(exc)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if not capture:
                return None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                fn()
            self._graph_pool = graph.pool()
            return graph
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise InfeasibleConfig(f"slot-engine step cannot run/capture on {self.device}: "
                                   f"{type(exc).__name__}: {text}") from exc
        finally:
            self.tok.copy_(saved[0])
            self.pos.copy_(saved[1])

    def _compile_fallback(self, exc: BaseException) -> None:
        """A compiled step failed to build. The dynamic-shape multi-row compile falls back to
        per-bucket compiles; a failing per-bucket compile to eager (recorded, and the owner told);
        an eager step that fails is the config's failure (re-raised)."""
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if self._batched_fns is not None:
            self.compile_error = f"dynamic-shape decode compile failed, compiling per bucket: {reason}"
            self._batched_fns = None
            return
        if self._layer_fn is self._eager_layer_fn:
            raise exc
        self.compile_error = reason
        if self._on_compile_failed is not None:
            self._on_compile_failed(exc)
        self._layer_fn, self._head_fn = self._eager_layer_fn, self._eager_head_fn

    # --- the device steps (what the graphs hold) ----------------------------------------------
    @torch.inference_mode()
    def _decode_step(self, d: _Decode) -> None:
        """One greedy step of rows [0, d.batch) attending over d.length positions."""
        assert self.pool is not None
        b = d.batch
        pos = self.pos[:b]  # [b]
        ks, vs = self.pool.views(0, b)
        rope = pos.clamp(max=self._rope_max)[:, None]
        layer_fn, head_fn = (self._layer_fn, self._head_fn) if b == 1 or self._batched_fns is None \
            else self._batched_fns
        if self.row_attention:
            # Row b attends its positions [0, pos + 1); an idle row (parked on the scratch slot)
            # reads one position, so idle rows of a bucket move no KV.
            lengths = torch.where(pos == self.scratch, 1, pos + 1)  # [b]
            h = self.model.run_layers(self.tok[:b], rope, pos[:, None], None, ks, vs, d.length, layer_fn,
                                      lengths=lengths)
        else:
            # Batch 1 writes through a [1] slot list: exactly FastEngine's batch-1 layer graph
            # (and the fused decode attention kernel where enabled). More rows: per-row slots.
            slots = pos if b == 1 else pos[:, None]
            bias = row_bias(pos[:, None], d.length, self.model.dtype)  # [b, 1, 1, 1, l]
            h = self.model.run_layers(self.tok[:b], rope, slots, bias, ks, vs, d.length, layer_fn)
        logits = head_fn(h, self.model.final_norm, self.model.lm_head.weight, self.model.dims.eps)
        self.logits[:b].copy_(logits)
        self.tok[:b].copy_(logits.argmax(-1, keepdim=True))
        # Idle rows stay on the scratch slot; a live row never reaches it.
        self.pos[:b].add_(1).clamp_(max=self.scratch)

    @torch.inference_mode()
    def _prefill_step(self, s: _PrefillShape) -> None:
        """One prefill chunk into the staging row; the logits of its last real token.

        The layers run eagerly (captured in a CUDA graph on GPU), not compiled: with W >= 16
        tokens the matmuls are cuBLAS GEMMs at the matmul rate and the unfused elementwise ops
        move a few MB, while every (width, attend) bucket compiled would add an Inductor compile
        to set-up. The head (one position, one GEMV) runs eagerly too: compiled it would be a
        batch-1 compile of its own.
        """
        assert self.pool is not None
        bias = row_bias(s.pos, s.attend, self.model.dtype)  # [1, 1, 1, W, A]
        ks, vs = self.pool.views(self.pool.rows - 1, 1)
        rope = s.pos.clamp(max=self._rope_max)
        h = self.model.run_layers(s.ids, rope, s.pos[0], bias, ks, vs, s.attend, self._eager_layer_fn)
        last = h.index_select(1, s.last)  # [1, 1, H]
        logits = self._eager_head_fn(last, self.model.final_norm, self.model.lm_head.weight, self.model.dims.eps)
        self.prefill_logits.copy_(logits)

    def _run(self, graph: Any, fn: Callable[[], None]) -> None:
        if graph is not None:
            graph.replay()
        else:
            fn()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    # --- IterationEngine ----------------------------------------------------------------------
    def join(self, requests: Sequence[Request]) -> None:
        """Prefill `requests` (every chunk) and add them to the running batch."""
        self.begin(requests)
        while self._queue:
            self._advance()
        self._sync()

    def begin(self, requests: Sequence[Request]) -> None:
        """Queue `requests` for prefill; `advance` then runs one chunk at a time."""
        self._need_pool()
        for req in requests:
            prompt = self.prompt_fn(req)
            if len(prompt) + req.output_tokens >= self.pool.length:  # type: ignore[union-attr]
                raise InfeasibleConfig(f"request {req.rid}: prompt {len(prompt)} + output {req.output_tokens} "
                                       f"tokens exceed the prepared KV length {self.pool.length - 1}")  # type: ignore[union-attr]
            plen = self.prefix_len_fn(req) if self.prefix_len_fn else 0
            self._queue.append(_Prefill(req, prompt, plen))

    def advance(self) -> list[int]:
        """One prefill chunk of the oldest queued request; returns the rids that joined."""
        joined = self._advance()
        self._sync()
        return joined

    @property
    def prefilling(self) -> int:
        return len(self._queue)

    @torch.inference_mode()
    def _advance(self) -> list[int]:
        assert self.pool is not None
        p = self._queue[0]
        if not p.chunks:
            start = self._reuse_prefix(p) if self.prefix_cache is not None else 0
            p.chunks = chunk_shapes(len(p.prompt), start, self.prefill_chunk_tokens, self.pool.length)
        offset, width, padded, attend = p.chunks.pop(0)
        shape = self._prefill_for(padded, attend)
        ids = torch.full((1, padded), self.pad_id, dtype=torch.long)
        ids[0, :width] = torch.tensor(p.prompt[offset:offset + width], dtype=torch.long)
        pos = torch.full((1, padded), self.scratch, dtype=torch.long)
        pos[0, :width] = torch.arange(offset, offset + width)
        shape.ids.copy_(ids, non_blocking=True)
        shape.pos.copy_(pos, non_blocking=True)
        shape.last.fill_(width - 1)
        self._run(shape.graph, lambda: self._prefill_step(shape))
        self.work.add_forward(width, 0, cache_positions=attend)
        if p.chunks:
            return []
        self._queue.popleft()
        if self.prefix_cache is not None:
            self._store_prefix(p)
        self.work.counts["tokens"] += 1
        row = self._free_row()
        self.pool.move(self.pool.rows - 1, row, len(p.prompt))
        self.tok[row].copy_(self.prefill_logits[0].argmax(-1, keepdim=True))
        self.pos[row].fill_(len(p.prompt))
        self.rows.append(p.request.rid)
        self.lengths.append(len(p.prompt))
        if self.record_tokens:
            self.generated.setdefault(p.request.rid, []).append(int(self.tok[row, 0]))
        return [p.request.rid]

    def step(self) -> list[int]:
        """One decode step of every running row; returns the rids that gained a token."""
        self._step()
        self._sync()
        return list(self.rows)

    @torch.inference_mode()
    def _step(self) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        assert self.pool is not None
        need = max(self.lengths) + 1  # the step writes at each row's length and attends up to it
        attend = next(a for a in self._attend_lengths() if a >= need)
        d = self._decode_for(n, attend)
        self._run(d.graph, lambda: self._decode_step(d))
        # KV positions read: each row's own (row attention), or the whole bucket per row.
        read = sum(self.lengths) + n if self.row_attention else n * attend
        self.work.add_forward(n, n, cache_positions=read)
        self.lengths = [length + 1 for length in self.lengths]
        if self.record_tokens:
            for rid, token in zip(self.rows, self.tok[:n, 0].tolist(), strict=True):
                self.generated[rid].append(token)

    @torch.inference_mode()
    def leave(self, rids: Sequence[int]) -> None:
        """Free the rows of these sequences (the last rows move into the holes), then resume
        parked sequences into free rows, oldest first."""
        gone = set(rids)
        self._queue = deque(p for p in self._queue if p.request.rid not in gone)
        self._parked = deque(p for p in self._parked if p.rid not in gone)
        for rid in [r for r in self.rows if r in gone]:
            self._drop_row(self.rows.index(rid))
        while self._parked and len(self.rows) < self.gpu_rows:
            self._resume(self._parked.popleft())

    def _drop_row(self, row: int) -> None:
        assert self.pool is not None
        last = len(self.rows) - 1
        if row != last:
            self.pool.move(last, row, self.lengths[last])
            self.tok[row].copy_(self.tok[last])
            self.pos[row].copy_(self.pos[last])
            self.rows[row], self.lengths[row] = self.rows[last], self.lengths[last]
        self.pos[last].fill_(self.scratch)
        self.rows.pop()
        self.lengths.pop()

    def _free_row(self) -> int:
        """Row n for a joining sequence; offloaded: preempt the newest running one if none is free."""
        if len(self.rows) >= self.gpu_rows:
            if self.kv_cache != "offloaded":
                raise RuntimeError(f"slot pool full: {len(self.rows)} rows of {self.gpu_rows}")
            self._park(len(self.rows) - 1)
        return len(self.rows)

    def _park(self, row: int) -> None:
        """Preempt the sequence in `row`: its KV to pinned host memory; it keeps its place in line."""
        assert self.pool is not None
        length = self.lengths[row]
        # Pinned, so the copies are DMA transfers that do not stall the stream (on CPU, where the
        # selection refuses offloaded for trials, the engine still runs it for tests: plain copies).
        pin = self.device.startswith("cuda")
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
                     for t in self.pool.read(row, length))
        self._parked.append(_Parked(self.rows[row], length, self.tok[row:row + 1].clone(), host))
        self.preemptions += 1
        self._drop_row(row)

    def _resume(self, parked: _Parked) -> None:
        assert self.pool is not None
        row = len(self.rows)
        self.pool.write(row, parked.kv)
        self.tok[row:row + 1].copy_(parked.token)
        self.pos[row].fill_(parked.length)
        self.rows.append(parked.rid)
        self.lengths.append(parked.length)

    def _park_all(self) -> None:
        """An empty batch: every row idle on the scratch slot."""
        self.pos.fill_(self.scratch)

    def _need_pool(self) -> None:
        if self.pool is None:
            raise RuntimeError("SlotEngine.prepare() must run before serving")

    # --- prefix cache -------------------------------------------------------------------------
    def _reuse_prefix(self, p: _Prefill) -> int:
        assert self.prefix_cache is not None and self.pool is not None
        if p.prefix_len <= 0:
            return 0
        hit = self.prefix_cache.lookup(tuple(p.prompt[:p.prefix_len]))
        if hit is None:
            return 0
        self.pool.write(self.pool.rows - 1, hit)
        p.reused = min(p.prefix_len, len(p.prompt) - 1)
        self.prefix_cache.stats.tokens_reused += p.reused
        return p.reused

    def _store_prefix(self, p: _Prefill) -> None:
        assert self.prefix_cache is not None and self.pool is not None
        key = tuple(p.prompt[:p.prefix_len])
        if p.prefix_len <= 0 or p.reused or key in self.prefix_cache.l1:
            return
        kv = self.pool.read(self.pool.rows - 1, p.prefix_len)
        self.prefix_cache.insert(key, kv, sum(t.numel() * t.element_size() for t in kv))

    # --- static batching on the same pool (scheduler: dynamic) --------------------------------
    def run_batch(self, requests: Sequence[Request], clock: Clock) -> list[float]:
        """`Engine.run_batch`: the whole batch joins, decodes to its longest output, leaves.
        One sync per batch (per-step events), as FastEngine."""
        if len(requests) > self.gpu_rows:
            raise RuntimeError(f"batch of {len(requests)} exceeds the slot pool ({self.gpu_rows} rows)")
        timer = StepTimer(self.device, clock).start()
        self.begin(requests)
        while self._queue:
            self._advance()
        timer.mark()
        for _ in range(max(r.output_tokens for r in requests) - 1):
            self._step()
            timer.mark()
        times = timer.times()
        self.leave([r.rid for r in requests])
        return times

    # --- quality through this cache ------------------------------------------------------------
    @torch.inference_mode()
    def teacher_forced_log_probs(self, ids: torch.Tensor, prefill_tokens: int) -> torch.Tensor:
        """Log-probs [N, T, V] (float32) through this KV policy (eager, on a pool of its own so
        the serving pool and graphs are untouched): the first `prefill_tokens` prefilled, then one
        token at a time through per-row decode steps."""
        rows, total = ids.shape
        pool = KvPool(self.model, rows, bucket(total, MIN_LENGTH_BUCKET), self.kv_cache == "quantized")
        length = pool.length
        ks, vs = pool.views(0, rows)
        pos = torch.arange(prefill_tokens, device=ids.device)
        bias = row_bias(pos, length, self.model.dtype).expand(rows, -1, -1, -1, -1)
        h = self.model.run_layers(ids[:, :prefill_tokens], pos[None].expand(rows, -1), pos, bias, ks, vs, length,
                                  self._eager_layer_fn)
        outputs = [self._all_logits(h)]
        for t in range(prefill_tokens, total):
            slot = torch.full((rows, 1), t, dtype=torch.long, device=ids.device)
            h = self.model.run_layers(ids[:, t:t + 1], slot, slot, row_bias(slot, length, self.model.dtype), ks, vs,
                                      length, self._eager_layer_fn)
            outputs.append(self._all_logits(h))
        return torch.log_softmax(torch.cat(outputs, dim=1), dim=-1)

    def _all_logits(self, h: torch.Tensor) -> torch.Tensor:
        from runners.glm.fast_model import rms_norm

        return self.model.lm_head(rms_norm(h, self.model.final_norm, self.model.dims.eps)).float()
