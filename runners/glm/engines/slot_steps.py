"""The slot pool's device side: the KV pool, the decode and prefill-chunk steps, their buckets,
compile and CUDA-graph capture, and teacher-forced log-probs through the same KV policy.
`engines/slots.py` (`SlotEngine`) builds the sequences'
bookkeeping on it; the module docstring there says how the pool works."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.engines.base import error_line, warmup_stream
from runners.glm.engines.kv_pool import (
    MIN_LENGTH_BUCKET,
    PREFILL_GROUP_TOKENS,
    KvPool,
    bucket,
    chunk_shapes,
    decode_batch,
    group_budget,
    group_shapes,
    length_buckets,
)
from runners.glm.fast_model import FastGlm, rms_norm, row_bias
from runners.glm.model_cache import free_device_memory
from runners.glm.work import WorkCounter

POLICIES = ("static", "quantized", "offloaded")


@dataclass
class _PrefillShape:
    """Static inputs of one prefill bucket (rows, padded width, attend length) and its graph: one
    chunk in the staging row (rows 1), or a group of pieces in the pool's last `rows` rows."""

    rows: int
    width: int
    attend: int
    ids: torch.Tensor  # [rows, W]
    pos: torch.Tensor  # [rows, W] absolute positions (pads, and idle rows, parked at the scratch slot)
    last: torch.Tensor  # [rows] index of each row's last real token
    graph: Any = None


@dataclass
class _Decode:
    batch: int
    length: int
    graph: Any = None


class SlotSteps:
    """The pool, buckets and captured steps a `SlotEngine` runs its sequences on."""

    def __init__(self, model: FastGlm, device: str, layer_fn: Callable[..., torch.Tensor],
                 head_fn: Callable[..., torch.Tensor], eager_layer_fn: Callable[..., torch.Tensor],
                 eager_head_fn: Callable[..., torch.Tensor], kv_cache: str = "static", kv_bits: int = 8,
                 prefill_chunk_tokens: int = 0, graph_min_batch: int = 1, graph_pool: Any = None,
                 compile_failed: Callable[[BaseException], None] | None = None, decode_length_step: int = 0,
                 batched_fns: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None,
                 fused_batch1: bool = False, prefill_fn: Callable[..., torch.Tensor] | None = None,
                 prefill_group_tokens: int = PREFILL_GROUP_TOKENS) -> None:
        if kv_cache not in POLICIES:
            raise InfeasibleConfig(f"the slot engine keeps kv_cache in {list(POLICIES)}, not {kv_cache!r}")
        if kv_cache == "quantized" and kv_bits != 8:
            raise InfeasibleConfig(f"kv_cache=quantized on the fast engine stores int8 codes with per-(token, head) "
                                   f"scales: kv_bits=8 only, not {kv_bits} (engine=hf has quanto's 2/4-bit cache)")
        self.model = model
        self.device = device
        self.kv_cache = kv_cache
        # Prefill stages in the last decoding row (a pool of R rows decodes R sequences), except
        # offloaded, which keeps a staging row of its own (`engines/slots.py` says why).
        self.shared_staging = kv_cache != "offloaded"
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.chunked = self.prefill_chunk_tokens > 0
        self.prefill_group_tokens = int(prefill_group_tokens)  # 0: one prompt per prefill pass
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
        # decode_attention=cuda: a single running row decodes through FastEngine's batch-1 step and
        # its fused CUDA attention kernel (what that knob asks for), at the cost of its own compile.
        self.fused_batch1 = fused_batch1
        # Prefill chunks: one compile with the chunk width symbolic (FastEngine.prefill_fn), or
        # eager ops inside the chunk's CUDA graph when not compiled.
        self._prefill_fn = prefill_fn
        self._on_compile_failed = compile_failed
        self.compile_error = ""
        self.pad_id = int(model.config.pad_token_id or 0)
        self.work = WorkCounter(model)
        self.pool: KvPool | None = None
        self.gpu_rows = 0  # decoding rows of the pool (offloaded: plus its staging row)
        self.max_sequences = 0  # admitted sequences: gpu_rows, or more when offloaded
        # Rows a prefill group may span (`max_group_rows`), fixed by `prepare` with the shapes it
        # captures: a prefill compile that falls back to eager later must not ask for new ones.
        self.group_rows = 1
        self._decode: dict[tuple[int, int], _Decode] = {}
        self._prefill_shapes: dict[tuple[int, int, int], _PrefillShape] = {}
        self.compile_s = 0.0
        self.shape_misses = 0
        self._preparing = False

    # --- pool, buckets, capture ---------------------------------------------------------------
    def pool_length(self, max_len: int) -> int:
        """Positions per pool row for sequences of up to `max_len` tokens (+ 1: the scratch slot
        stays unused). Row attention reads each row's own length, so the pool need only round up
        to a split of the kernel; the masked path's length buckets halve, so a power of two."""
        if self.row_attention:
            return -(-(max_len + 1) // MIN_LENGTH_BUCKET) * MIN_LENGTH_BUCKET
        return bucket(max_len + 1, MIN_LENGTH_BUCKET)

    def rows_for_budget(self, budget_bytes: float, max_len: int) -> int:
        """Most decoding rows whose pool fits `budget_bytes` of device memory at `max_len` tokens
        per sequence: floor(budget / one row's bytes), less offloaded's own staging row; 0 if not
        one does. int8 KV stores about half the bytes per position, so about twice the rows fit."""
        row_bytes = self.pool_length(max_len) * KvPool.bytes_per_position(self.model, self.kv_cache == "quantized")
        return max(0, int(budget_bytes // row_bytes) - (0 if self.shared_staging else 1))

    @property
    def staging_row(self) -> int:
        """The row prefill chunks write (the captured prefill graphs hold a view of it): the pool's
        last, which is the last decoding row unless offloaded."""
        assert self.pool is not None
        return self.pool.rows - 1

    def prefill_shapes(self, max_prompt: int, prefix_lens: Sequence[int] = ()) -> set[tuple[int, int]]:
        """(padded width, attend length) of every chunk of every prompt length up to `max_prompt`."""
        assert self.pool is not None
        starts = {0} | {int(p) for p in prefix_lens if p > 0}
        shapes = set()
        for n in range(1, int(max_prompt) + 1):
            for s in starts:
                shapes |= {(w, a) for _, _, w, a in chunk_shapes(n, s, self.prefill_chunk_tokens, self.pool.length)}
        return shapes

    @property
    def group_tokens(self) -> int:
        """Padded tokens one prefill pass may hold (`kv_pool.group_budget`)."""
        return group_budget(self.prefill_chunk_tokens, self.prefill_group_tokens)

    def prefill_group_shapes(self, max_prompt: int, prefix_lens: Sequence[int] = ()) -> set[tuple[int, int, int]]:
        """(rows, padded width, attend length) of every prefill group these prompts can form."""
        assert self.pool is not None
        return group_shapes(self.prefill_shapes(max_prompt, prefix_lens), self.group_rows, self.group_tokens)

    def max_group_rows(self) -> int:
        """Rows a prefill group may span: the pool's, or one fewer with the prefill compiled. Why:
        a group over the whole pool views layer 0's KV at storage offset 0, a value Dynamo
        specialises (every other view starts further in), so it would cost one more compile of
        the layer (~20 s of set-up for glm-4-9b) for a pass only full-pool joins reach."""
        assert self.pool is not None
        return self.pool.rows - (1 if self._prefill_fn is not None else 0)

    @torch.inference_mode(False)
    def _new_pool(self, rows: int, length: int) -> None:
        self.pool = None
        self._decode.clear()
        self._prefill_shapes.clear()
        # A fresh graph memory pool: the old graphs' private pool (sized for the old batch) is
        # only given back once nothing refers to it, and kept it would count in every later
        # trial's peak memory (issue 17: one config measured 24.0 and 27.8 GB by trial order).
        self._graph_pool = None
        free_device_memory()
        self.pool = KvPool(self.model, rows, length, self.kv_cache == "quantized")
        dev, vocab = self.model.device, self.model.config.vocab_size
        self.scratch = length - 1
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # next input token per row
        self.pos = torch.full((rows,), self.scratch, dtype=torch.long, device=dev)  # next write slot per row
        self.logits = torch.zeros(rows, vocab, dtype=self.model.dtype, device=dev)  # last step's logits
        self.prefill_logits = torch.zeros(rows, vocab, dtype=self.model.dtype, device=dev)  # row i of a pass
        self._rope_max = int(self.model.cos_table.shape[0]) - 1

    @property
    def compiled(self) -> bool:
        return self._layer_fn is not self._eager_layer_fn

    def buckets(self) -> list[tuple[int, int]]:
        """(batch, attend length) decode buckets captured so far (prefill: `prefill_buckets`)."""
        return self.decode_buckets()

    def decode_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._decode)

    def prefill_buckets(self) -> list[tuple[int, int, int]]:
        """(rows, padded width, attend length) prefill buckets captured so far."""
        return sorted(self._prefill_shapes)

    def _miss(self) -> None:
        if not self._preparing:
            self.shape_misses += 1

    def _min_decode_rows(self) -> int:
        """Smallest decode bucket. With the dynamic-shape compile it is 2: torch.compile
        specialises a size-1 dimension, so a batch-1 bucket would cost a second compile (the
        batch-1 shape-specialised compile with its coordinate-descent tuning is FastEngine's
        roofline path, 25-40 s of set-up for glm-4-9b); an idle second row costs a batch-1 step
        next to nothing (the weights dominate its bytes). A pool of one row has no second row:
        it decodes in bucket 1 (`decode_batch` caps at the pool), through that batch-1 compile."""
        return 2 if self._batched_fns is not None and not self.fused_batch1 else 1

    def _attend_lengths(self) -> list[int]:
        """Decode attend lengths: one, the pool's, when rows attend at their own lengths
        (`row_attention`); else the `decode_length_step` buckets."""
        assert self.pool is not None
        if self.row_attention:
            return [self.pool.length]
        return length_buckets(self.pool.length, self.decode_length_step)

    def _decode_for(self, batch: int, attend: int) -> _Decode:
        assert self.pool is not None
        key = (decode_batch(batch, self.pool.rows, self._min_decode_rows()), attend)
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
    def _prefill_for(self, rows: int, width: int, attend: int) -> _PrefillShape:
        shape = self._prefill_shapes.get((rows, width, attend))
        if shape is None:
            self._miss()
            t0 = time.perf_counter()
            dev = self.model.device
            shape = _PrefillShape(rows, width, attend,
                                  torch.full((rows, width), self.pad_id, dtype=torch.long, device=dev),
                                  torch.full((rows, width), self.scratch, dtype=torch.long, device=dev),
                                  torch.zeros(rows, dtype=torch.long, device=dev))
            if self.use_graphs:
                shape.graph = self._capture(lambda: self._prefill_step(shape), rows * width >= self.graph_min_batch,
                                            self._prefill_compile_fallback)
            self._prefill_shapes[(rows, width, attend)] = shape
            self.compile_s += time.perf_counter() - t0
        return shape

    def _capture(self, fn: Callable[[], None], capture: bool,
                 fallback: Callable[[BaseException], None] | None = None) -> Any:
        """Warm up (compile, autotune) on a side stream, then capture `fn` in a CUDA graph.
        The per-row state is saved and restored around it: a shape met inside a window must not
        disturb the running sequences (their KV beyond their length is garbage anyway)."""
        saved = (self.tok.clone(), self.pos.clone())
        stream = warmup_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            while True:
                try:
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            fn()
                    break
                except Exception as exc:  # noqa: BLE001 - compile failed: fall back a step, say why
                    (fallback or self._compile_fallback)(exc)
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
            raise InfeasibleConfig(f"slot-engine step cannot run/capture on {self.device}: "
                                   f"{error_line(exc)}") from exc
        finally:
            self.tok.copy_(saved[0])
            self.pos.copy_(saved[1])

    def _compile_fallback(self, exc: BaseException) -> None:
        """A compiled step failed to build. The dynamic-shape multi-row compile falls back to
        per-bucket compiles; a failing per-bucket compile to eager (recorded, and the owner told);
        an eager step that fails is the config's failure (re-raised)."""
        reason = error_line(exc)
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

    def _prefill_compile_fallback(self, exc: BaseException) -> None:
        """The compiled prefill failed to build: prefill eagerly (inside the graphs) from now on,
        and say why; an eager prefill that fails is the config's failure."""
        if self._prefill_fn is None:
            raise exc
        self.compile_error = f"prefill compile failed, prefilling eagerly: {error_line(exc)}"
        self._prefill_fn = None

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
        if self.row_attention and not (b == 1 and self.fused_batch1):
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
        """One prefill pass into the pool's last `s.rows` rows (rows 1: a chunk in the staging
        row); the logits of each row's last real token into `prefill_logits[:s.rows]`. A decode
        step between chunks may cover the staging row (its bucket reaches the pool's last row) but
        writes only its scratch slot, where its position is parked while no sequence decodes there;
        likewise a group's idle rows (a row bucket wider than the group) are parked there.

        The layers run through the prefill compile (one graph for every width bucket, and one
        more for every group's row bucket, see `FastEngine.prefill_fn`) or, not compiled, eagerly;
        on GPU either is captured in the bucket's CUDA graph. The head (one position per row, a
        GEMV or a small GEMM) runs eagerly: compiled it would be a compile of its own.
        """
        assert self.pool is not None
        bias = row_bias(s.pos, s.attend, self.model.dtype)  # [rows, 1, 1, W, A]
        ks, vs = self.pool.views(self.pool.rows - s.rows, s.rows)
        rope = s.pos.clamp(max=self._rope_max)  # [rows, W]
        slots = s.pos[0] if s.rows == 1 else s.pos  # [W], or [rows, W]: each row writes its own
        h = self.model.run_layers(s.ids, rope, slots, bias, ks, vs, s.attend, self._prefill_fn or self._eager_layer_fn)
        last = h.gather(1, s.last.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))  # [rows, 1, H]
        logits = self._eager_head_fn(last, self.model.final_norm, self.model.lm_head.weight, self.model.dims.eps)
        self.prefill_logits[:s.rows].copy_(logits)

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
        return self.model.lm_head(rms_norm(h, self.model.final_norm, self.model.dims.eps)).float()

    def _run(self, graph: Any, fn: Callable[[], None]) -> None:
        if graph is not None:
            graph.replay()
        else:
            fn()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
