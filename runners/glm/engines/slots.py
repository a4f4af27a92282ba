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
- A pool of R rows decodes R sequences. A decode step of n rows runs the batch bucket
  b = min(next power of two >= n, R) (`decode_batch`: the top bucket is R itself, e.g. 1, 2, 4, 5
  for R = 5) and the shortest length bucket l (`length_buckets`; by default only the pool's
  length) >= the longest row + 1: one CUDA graph per (b, l), captured in `prepare()` on the
  compiled layer (the same `fast_model.layer_forward` as `FastEngine`, with per-row write slots
  [b, 1]; the multi-row compile is dynamic in the batch, so R costs a capture, not a compile).
  Rows n..b-1 of a bucket are idle: their position is parked at the scratch slot L-1, which no
  sequence uses (the pool holds prompt + output + 1 positions), so the idle rows' writes land
  there and nothing valid is touched.
- Prefill runs in the staging row, the pool's last (R-1: the captured prefill graphs hold a
  fixed view of it), in chunks of `prefill_chunk_tokens` (0: the whole prompt, in pieces of at
  most MAX_PREFILL_WIDTH) padded to a width bucket (`prefill_width`), each chunk a captured
  graph per (width, attend length) bucket (see `_prefill_step`). Row R-1 is also the last
  decoding row: a prefill starts only while fewer than R sequences decode (at most R sequences
  run or prefill: the scheduler admits at most `max_sequences`, and `begin` refuses more), so
  R-1 is idle then; a decode step whose bucket covers it writes only its scratch slot. When the
  prompt is done its first token exists and it joins as row n: if n is R-1 its KV is already
  there, else it is copied into row n (one device copy of its positions). While R-1 decodes no
  prefill starts; any leave frees it again (the last row fills the hole).
- Prefill groups: when the oldest queued request and the ones behind it each have one short
  piece left (at most GROUP_MAX_WIDTH tokens: a chat prompt, not a long document), up to one
  per free row prefill in one pass, within a token budget (`kv_pool.group_budget`: the chunk
  size when chunked), as one captured graph per (row bucket, width, attend length). Member i of
  k takes row R-k+i, the last k rows, which are free while n + k <= R; the rows of a wider row
  bucket before them stay idle on their scratch slot, as in a decode step, even where they
  decode. The members then join oldest first as rows n, n+1, ...: each copy goes to a row at or
  below its own and above the rows of the members still waiting. A long prompt, or one that
  has started its chunks, prefills alone in the staging row as above.
- Prefix cache: a hit copies the cached prefix KV into the row its prefill writes (the staging
  row, or its row in a group) and prefill starts after it. Misses store their prefix once their
  prefill is done; two misses of one prefix in the same group both prefill it.
- `kv_cache: offloaded`: the GPU pool has `gpu_rows` decoding rows and up to `max_sequences`
  sequences are admitted. A prefill finishing with no free row preempts the sequence in the last
  decoding row: its KV goes to pinned host memory; it comes back (FIFO) when a row frees.
  A parked sequence keeps its last token and length, so it resumes with the same tokens.
  Offloaded keeps a staging row of its own (R + 1 rows): its prefills start while every GPU row
  decodes, and the preempted sequence keeps decoding until the prefill is done; a shared row
  would park it for the whole prefill and bar resumes from row R-1 while one is in flight.
- Nothing is compiled or captured in a measured window when `prepare()` saw the trial's shapes;
  any shape met later is captured on the spot and counted in `counters()["shape_misses"]`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.engines.base import CAPABILITIES, PrefixLenFn, PromptFn, TrialPlan
from runners.glm.engines.kv_pool import (
    GROUP_MAX_WIDTH,
    chunk_shapes,
    decode_batch,
    decode_batches,
    pool_rows,
)
from runners.glm.engines.slot_steps import SlotSteps
from runners.glm.prefix_cache import TieredPrefixCache, engine_prefix_cache, prefix_counts
from runners.measure.monitor import StepTimer
from runners.scheduler import Clock
from runners.workload import Request


@dataclass
class _Prefill:
    request: Request
    prompt: list[int]
    prefix_len: int
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)  # the pieces still to run
    started: bool = False  # a piece has run (in the staging row: it stays there)
    hit: tuple[torch.Tensor, ...] | None = None  # cached prefix KV, written to its row at its first piece
    reused: int = 0  # prompt positions taken from the prefix cache

    @property
    def one_piece(self) -> bool:
        """Not started, and the rest of its prompt is one piece narrow enough for a group."""
        return not self.started and len(self.chunks) == 1 and self.chunks[0][2] <= GROUP_MAX_WIDTH


@dataclass
class _Parked:
    rid: int
    length: int
    token: torch.Tensor  # [1, 1] on the device
    kv: tuple[torch.Tensor, ...]  # host copies of the row's positions [0, length)


class SlotEngine(SlotSteps):
    """`runners.scheduler.IterationEngine` (and `Engine.run_batch`) over `FastGlm` with a KV slot pool:
    the sequences' bookkeeping (join, chunked prefill, leave, preemption, prefix reuse) over the
    pool and captured steps of `SlotSteps`."""

    capabilities = CAPABILITIES["fast"]
    # Quality is scored eagerly on a pool of its own, so it goes before the compile phase.
    quality_first = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of `SlotSteps` (model, its layer and head functions, KV policy, ...)."""
        super().__init__(*args, **kwargs)
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
            prefix_policy, prefix_budget_mib, self.device)
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
        counts.update(prefix_counts(self.prefix_cache))
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
            rows = pool_rows(gpu_rows, self.shared_staging)
            if self.pool is None or (self.pool.rows, self.pool.length) != (rows, length):
                self._new_pool(rows, length)
            self.gpu_rows = gpu_rows
            # MBU counts the KV bytes this pool really stores (int8 codes + scales when quantized).
            self.work.kv_bytes_per_token = self.pool.bytes_per_token()
            self.max_sequences = max(gpu_rows, int(max_sequences or gpu_rows))
            if self.kv_cache != "offloaded":
                self.max_sequences = gpu_rows
            for size in decode_batches(gpu_rows, rows, self._min_decode_rows()):
                for attend in self._attend_lengths():
                    self._decode_for(size, attend)
            self.group_rows = self.max_group_rows()
            for shape in sorted(self.prefill_shapes(max_prompt, prefix_lens)):
                self._prefill_for(1, *shape)
            for shape in sorted(self.prefill_group_shapes(max_prompt, prefix_lens)):
                self._prefill_for(*shape)
        finally:
            self._preparing = False
        self._reset_batch()
        return time.perf_counter() - start

    # --- TrialEngine ---------------------------------------------------------------------------
    def prepare_trial(self, plan: TrialPlan) -> None:
        """The pool for the plan's rows (`kv_slots`, capped by `kv_memory_mib`) and every shape."""
        rows = min(plan.kv_slots or plan.batch_size, plan.batch_size)
        max_len = plan.max_prompt + plan.max_output
        if plan.kv_memory_mib:
            rows = min(rows, self.rows_for_budget(plan.kv_memory_mib * 2**20, max_len))
            if rows < 1:
                raise InfeasibleConfig(f"kv_memory_mib={plan.kv_memory_mib:g} holds no KV slot pool row for sequences "
                                       f"of {max_len} tokens (kv_cache={self.kv_cache})")
        self.prepare(rows, max_len, plan.max_prompt, plan.prefix_lens, max_sequences=plan.batch_size)

    def compile_seconds(self) -> float:
        return self.compile_s

    def compile_info(self, since_s: float) -> dict[str, Any]:
        return {"compile_s": self.compile_s - since_s, "compiled": self.compiled, "compile_error": self.compile_error,
                "buckets": sorted(self.buckets()), "prefill_buckets": self.prefill_buckets()}

    def pool_info(self) -> dict[str, Any] | None:
        if self.pool is None:
            return None
        # gpu_rows decode; rows are allocated (one more when offloaded: its staging row).
        return {"gpu_rows": self.gpu_rows, "rows": self.pool.rows, "max_sequences": self.max_sequences,
                "positions": self.pool.length, "bytes": self.pool.nbytes()}

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
        admitted = len(self.rows) + len(self._parked) + len(self._queue) + len(requests)
        if admitted > self.max_sequences:
            raise RuntimeError(f"slot pool over-admitted: {len(self.rows) + len(self._parked)} running + "
                               f"{len(self._queue)} in prefill + {len(requests)} joining > max_sequences="
                               f"{self.max_sequences} (the scheduler admits at most max_sequences)")
        for req in requests:
            prompt = self.prompt_fn(req)
            if len(prompt) + req.output_tokens >= self.pool.length:  # type: ignore[union-attr]
                raise InfeasibleConfig(f"request {req.rid}: prompt {len(prompt)} + output {req.output_tokens} "
                                       f"tokens exceed the prepared KV length {self.pool.length - 1}")  # type: ignore[union-attr]
            plen = self.prefix_len_fn(req) if self.prefix_len_fn else 0
            self._queue.append(_Prefill(req, prompt, plen))

    def advance(self) -> list[int]:
        """One prefill pass (`_advance`); returns the rids that joined."""
        joined = self._advance()
        self._sync()
        return joined

    @property
    def prefilling(self) -> int:
        return len(self._queue)

    @torch.inference_mode()
    def _advance(self) -> list[int]:
        """One prefill pass: the next chunk of the oldest queued request in the staging row, or,
        when it and the requests behind it each have one short piece left, a group of them
        (`_group`), one row each. Returns the rids whose prompt is done (they joined the batch)."""
        assert self.pool is not None
        group = self._group()
        rows = 1 if len(group) == 1 else decode_batch(len(group), self.group_rows, 2)
        if len(self.rows) + len(group) > self.pool.rows:
            raise RuntimeError(f"a prefill would overwrite decoding row {self.pool.rows - len(group)}")
        pieces = [p.chunks.pop(0) for p in group]
        width, attend = max(piece[2] for piece in pieces), max(piece[3] for piece in pieces)
        shape = self._prefill_for(rows, width, attend)
        # Members take the pool's last len(group) rows, oldest first (free: at most pool.rows
        # sequences decode or prefill); a wider row bucket's first rows stay idle on the scratch slot.
        first = rows - len(group)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        pos = torch.full((rows, width), self.scratch, dtype=torch.long)
        last = torch.zeros(rows, dtype=torch.long)
        for i, (p, (offset, real, _, _)) in enumerate(zip(group, pieces, strict=True)):
            ids[first + i, :real] = torch.tensor(p.prompt[offset:offset + real], dtype=torch.long)
            pos[first + i, :real] = torch.arange(offset, offset + real)
            last[first + i] = real - 1
            if p.hit is not None:
                self.pool.write(self._home(len(group), i), p.hit)
                p.hit = None
            p.started = True
        shape.ids.copy_(ids, non_blocking=True)
        shape.pos.copy_(pos, non_blocking=True)
        shape.last.copy_(last, non_blocking=True)
        self._run(shape.graph, lambda: self._prefill_step(shape))
        self.work.add_forward(sum(piece[1] for piece in pieces), 0, cache_positions=len(group) * attend)
        if group[0].chunks:  # a multi-piece prompt (alone in the staging row) continues next pass
            return []
        homes = [self._home(len(group), i) for i in range(len(group))]
        return [self._join_prefilled(self._queue.popleft(), home, first + i) for i, home in enumerate(homes)]

    def _home(self, members: int, i: int) -> int:
        """The row member i of a prefill pass of `members` writes: the pool's last `members` rows
        (one member: the staging row)."""
        assert self.pool is not None
        return self.pool.rows - members + i

    def _group(self) -> list[_Prefill]:
        """The requests of the next prefill pass, oldest first: the oldest queued alone, unless
        it and the ones behind it each have one short piece left (`_Prefill.one_piece`); then as
        many of those as fit the free rows and `group_tokens` padded tokens (the row bucket
        times the widest piece). Why: prefilled one by one, 32 chat prompts of 64 tokens each read
        all the weights 32 times, and a request's TTFT waited for every prefill queued before it
        (glm-4-9b on an H200: TTFT p50 351 ms against the static batch's 88)."""
        assert self.pool is not None
        group = [self._plan(self._queue[0])]
        if not group[0].one_piece:
            return group
        free = min(self.group_rows, self.pool.rows - len(self.rows))
        width = group[0].chunks[0][2]
        for p in itertools.islice(self._queue, 1, None):
            if len(group) >= free or not self._plan(p).one_piece:
                break
            wider = max(width, p.chunks[0][2])
            if decode_batch(len(group) + 1, self.group_rows, 2) * wider > self.group_tokens:
                break
            group.append(p)
            width = wider
        return group

    def _plan(self, p: _Prefill) -> _Prefill:
        """Lay out `p`'s pieces once, after its prefix-cache lookup (the hit's KV is written to
        its row when its first piece runs)."""
        assert self.pool is not None
        if not p.chunks:  # not laid out yet: a queued prompt always has a piece left
            start = self._reuse_prefix(p) if self.prefix_cache is not None else 0
            p.chunks = chunk_shapes(len(p.prompt), start, self.prefill_chunk_tokens, self.pool.length)
        return p

    def _join_prefilled(self, p: _Prefill, home: int, logits_row: int) -> int:
        """`p`'s prompt is done in row `home`: its first token from `prefill_logits[logits_row]`,
        and it joins the batch as row n (its KV copied down unless `home` is row n). Members of a
        pass join oldest first, each into a row at or below its home and above every home not yet
        copied, so no copy overwrites a member still waiting."""
        assert self.pool is not None
        if self.prefix_cache is not None:
            self._store_prefix(p, home)
        self.work.counts["tokens"] += 1
        row = self._free_row()
        if row != home:  # a join into its home row itself: its KV is already there
            self.pool.move(home, row, len(p.prompt))
        self.tok[row].copy_(self.prefill_logits[logits_row].argmax(-1, keepdim=True))
        self.pos[row].fill_(len(p.prompt))
        self.rows.append(p.request.rid)
        self.lengths.append(len(p.prompt))
        if self.record_tokens:
            self.generated.setdefault(p.request.rid, []).append(int(self.tok[row, 0]))
        return p.request.rid

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
        """The prompt positions a prefix-cache hit covers (its KV kept in `p.hit`); 0 on a miss."""
        assert self.prefix_cache is not None and self.pool is not None
        if p.prefix_len <= 0:
            return 0
        hit = self.prefix_cache.lookup(tuple(p.prompt[:p.prefix_len]))
        if hit is None:
            return 0
        p.hit = hit
        p.reused = min(p.prefix_len, len(p.prompt) - 1)
        self.prefix_cache.stats.tokens_reused += p.reused
        return p.reused

    def _store_prefix(self, p: _Prefill, row: int) -> None:
        assert self.prefix_cache is not None and self.pool is not None
        key = tuple(p.prompt[:p.prefix_len])
        if p.prefix_len <= 0 or p.reused or key in self.prefix_cache.l1:
            return
        kv = self.pool.read(row, p.prefix_len)
        self.prefix_cache.insert(key, kv, sum(t.numel() * t.element_size() for t in kv))

    # --- static batching on the same pool (scheduler: dynamic) --------------------------------
    def run_batch(self, requests: Sequence[Request], clock: Clock) -> list[float]:
        """`Engine.run_batch`: the whole batch joins, decodes to its longest output, leaves.
        One sync per batch (per-step events), as FastEngine."""
        if len(self.rows) + len(requests) > self.gpu_rows:
            raise RuntimeError(f"batch of {len(requests)} exceeds the slot pool ({self.gpu_rows} rows, "
                               f"{len(self.rows)} busy)")
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
