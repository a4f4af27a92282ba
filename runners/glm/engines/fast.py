"""The fast decode path: static KV buffers, one compiled layer graph, CUDA-graph replay per step.

Design (numbers and reasoning in benchmarks/NOTES-issue3.md):
- Shapes are bucketed: batch padded to a power of two, cache length to a power of two
  (>= 256). Each (batch, length) bucket owns its KV buffers and one captured CUDA graph of the
  whole decode step (embedding, 40 layers, final norm, lm_head, greedy argmax, position
  update), so a step is one `graph.replay()` with no host round-trip.
- `torch.compile(layer_forward, fullgraph=True)`: the layer is a pure function of tensors,
  so one compiled graph per bucket serves every layer (compile time does not grow with
  depth, unlike compiling the unrolled model). CUDA graphs are captured by hand around it,
  which is what `mode="reduce-overhead"` would do, but once per bucket, up front.
- Compile and capture run in `prepare()` (set-up), never inside a measured window; their
  time is reported as `compile_s`.
- Prefill runs eagerly (its shape varies with the prompt) and writes the same buffers.
- Optional prefix cache: KV of shared prompt prefixes kept across requests (L1 device, L2
  host memory, LRU/LFU under a byte budget), so a hit skips those prefill tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.engines.base import (
    CAPABILITIES,
    PrefixLenFn,
    PromptFn,
    StaticBatchEngine,
    TrialPlan,
    error_line,
    warmup_stream,
)
from runners.glm.engines.compiled import batch_dynamic, chunk_dynamic, configure_inductor, shape_generic_compile
from runners.glm.engines.kv_pool import MIN_LENGTH_BUCKET, PREFILL_GROUP_TOKENS, bucket
from runners.glm.engines.slots import SlotEngine
from runners.glm.fast_model import FastGlm, LayerFn, attention_bias, head_forward, layer_forward, rms_norm
from runners.glm.model_cache import free_device_memory
from runners.glm.prefix_cache import TieredPrefixCache, engine_prefix_cache, prefix_counts
from runners.glm.work import WorkCounter
from runners.workload import Request


@dataclass
class DecodeSlot:
    """Static buffers of one (batch, length) bucket, and its captured step."""

    batch: int
    length: int
    k: list[torch.Tensor]  # per layer [B, Hkv, L, D]
    v: list[torch.Tensor]
    tok: torch.Tensor  # [B, 1] next input token
    rope_pos: torch.Tensor  # [B, 1] its rotary position (left padding shifts it)
    slot: torch.Tensor  # [1] cache slot it is written to (same for the whole batch)
    pad_len: torch.Tensor  # [B] left-padding width of each row
    logits: torch.Tensor  # [B, V] logits of the last step
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class FastEngine(StaticBatchEngine):
    """Engine protocol (`device`, `run_batch`, `counters`) over `FastGlm` with a static KV cache."""

    capabilities = CAPABILITIES["fast"]
    quality_first = False  # scores through its captured step, so it compiles first

    def __init__(self, model: FastGlm, device: str, compile_step: bool, graph_min_batch: int = 1,
                 inductor_options: dict[str, Any] | None = None, fused_attention: bool = False) -> None:
        self.model = model
        self.device = device
        self.use_graphs = device.startswith("cuda")
        # Buckets below this batch run the (compiled) step without CUDA graph capture: some
        # kernels cannot be captured at small M, and a failed capture poisons the process.
        self.graph_min_batch = graph_min_batch
        self.compiled = bool(compile_step and self.use_graphs)
        if compile_step and not self.use_graphs:
            raise InfeasibleConfig("compile=true captures the decode step in CUDA graphs; this device has "
                                   "none (on CPU the static-cache engine runs eager with compile=false)")
        self.compile_error = ""
        # fused_attention: one sequence's decode step attends through the `decode_attention` kernel
        self.fused_attention = fused_attention
        self._eager_layer_fn: LayerFn = (functools.partial(layer_forward, fused_attention=True) if fused_attention
                                         else layer_forward)
        self._layer_fn = self._eager_layer_fn
        self._head_fn: Callable[..., torch.Tensor] = head_forward
        if self.compiled:
            configure_inductor()
            options = inductor_options or None
            self._layer_fn = torch.compile(self._eager_layer_fn, fullgraph=True, dynamic=False, options=options)
            self._head_fn = torch.compile(head_forward, fullgraph=True, dynamic=False, options=options)
        self._inductor_options = inductor_options or None
        self._batched_fns: tuple[LayerFn, Callable[..., torch.Tensor]] | None = None
        self._prefill_fn: LayerFn | None = None
        self._slots: dict[tuple[int, int], DecodeSlot] = {}
        self._graph_pool: Any = None
        self.compile_s = 0.0
        # Buckets compiled/captured outside `prepare()` (inside a window they contaminate it).
        self.shape_misses = 0
        self._preparing = False
        self._slot_engine: Any = None
        self.pad_id = int(model.config.pad_token_id or 0)
        self.work = WorkCounter(model)
        self.begin_trial(lambda r: [], None, "off", 0)

    # --- per trial --------------------------------------------------------------------------
    def begin_trial(self, prompt_fn: PromptFn, prefix_len_fn: PrefixLenFn | None, prefix_policy: str,
                    prefix_budget_mib: float) -> None:
        """Fresh counters and an empty prefix cache; the compiled graphs are kept."""
        self.prompt_fn = prompt_fn
        self.prefix_len_fn = prefix_len_fn
        self.work.reset()
        self.prefix_cache: TieredPrefixCache[torch.Tensor] | None = engine_prefix_cache(
            prefix_policy, prefix_budget_mib, self.device)

    def counters(self) -> dict[str, float]:
        counts = self.work.snapshot()
        counts["shape_misses"] = float(self.shape_misses)
        counts.update(prefix_counts(self.prefix_cache))
        return counts

    # --- buckets, compile, capture -----------------------------------------------------------
    def prepare(self, max_batch: int, max_len: int, batches: Sequence[int] | None = None) -> float:
        """Compile and capture every batch bucket up to `max_batch` at `max_len`; returns seconds."""
        start = time.perf_counter()
        sizes = batches or [1 << i for i in range(bucket(max_batch).bit_length())]
        self._preparing = True
        try:
            for size in sizes:
                self._slot_for(size, max_len)
        finally:
            self._preparing = False
        return time.perf_counter() - start

    def slot_engine(self, kv_cache: str, kv_bits: int, prefill_chunk_tokens: int, decode_length_step: int = 0,
                    prefill_group_tokens: int = PREFILL_GROUP_TOKENS) -> Any:
        """The continuous-batching engine (`runners.glm.engines.slots.SlotEngine`) over this model,
        sharing its compiled layer and head and its CUDA graph memory pool. One is kept: a new
        KV policy or chunk size replaces it (and frees its pool)."""
        key = (kv_cache, int(kv_bits) if kv_cache == "quantized" else 0, int(prefill_chunk_tokens),
               int(decode_length_step), int(prefill_group_tokens))
        if self._slot_engine is None or self._slot_engine_key != key:
            if self._slot_engine is not None:
                # Free the old pool and graphs now, so the next trial's peak memory is its own.
                self._slot_engine = None
                free_device_memory()
            self._slot_engine = SlotEngine(self.model, self.device, self._layer_fn, self._head_fn,
                                           self._eager_layer_fn, head_forward, kv_cache, kv_bits,
                                           prefill_chunk_tokens, self.graph_min_batch, self._graph_pool,
                                           self._compile_failed, decode_length_step, self.batched_fns(),
                                           fused_batch1=self.fused_attention, prefill_fn=self.prefill_fn(),
                                           prefill_group_tokens=prefill_group_tokens)
            self._slot_engine_key = key
        return self._slot_engine

    def batched_fns(self) -> tuple[LayerFn, Callable[..., torch.Tensor]] | None:
        """Layer and head for the slot pool's multi-row decode: the layer compiled once with
        the batch dimension symbolic (`compiled.batch_dynamic`), the head eager. Batch 1 keeps
        its shape-specialised compile: there the matmuls become Inductor's bandwidth-tuned
        reductions (the roofline path). None when not compiled."""
        if not self.compiled:
            return None
        if self._batched_fns is None:
            # layer_forward(h, cos, sin, slots, bias, k_cache, v_cache, weights, ...): args 0-6
            # carry the batch. The head (final norm + lm_head GEMM of a few rows) runs eagerly
            # inside the step's CUDA graph: compiled, it was a second Inductor compile per model
            # variant for a few microseconds a step.
            layer = shape_generic_compile(self._eager_layer_fn, self._inductor_options)
            self._batched_fns = (batch_dynamic(layer, range(7)), head_forward)
        return self._batched_fns

    def prefill_fn(self) -> LayerFn | None:
        """The layer compiled once for the slot pool's prefill chunks, the chunk width symbolic
        (`compiled.chunk_dynamic`); None when not compiled."""
        if not self.compiled:
            return None
        if self._prefill_fn is None:
            self._prefill_fn = chunk_dynamic(shape_generic_compile(self._eager_layer_fn, self._inductor_options))
        return self._prefill_fn

    def _compile_failed(self, exc: BaseException) -> None:
        """A compiled step failed to build: record why and run eager from now on."""
        self.compile_error = error_line(exc)
        self.compiled = False
        self._layer_fn, self._head_fn = self._eager_layer_fn, head_forward

    def buckets(self) -> list[tuple[int, int]]:
        """(batch, length) buckets compiled and captured so far."""
        return list(self._slots)

    # --- TrialEngine -------------------------------------------------------------------------
    def prepare_trial(self, plan: TrialPlan) -> None:
        # The spec's bounds, not only this draw's: a later window (another rate, more requests)
        # draws other lengths from the same spec and must not meet a new bucket.
        max_batch, max_len = min(plan.batch_size, plan.requests), plan.max_prompt + plan.max_output
        self.release_unused(self._plan_buckets(max_batch, max_len, plan))
        self.prepare(max_batch, max_len)
        self.prepare(plan.eval_rows, plan.eval_tokens, batches=[plan.eval_rows])

    @staticmethod
    def _plan_buckets(max_batch: int, max_len: int, plan: TrialPlan) -> set[tuple[int, int]]:
        """The (batch, length) buckets `prepare_trial` captures for `plan`."""
        length = bucket(max_len, MIN_LENGTH_BUCKET)
        keys = {(1 << i, length) for i in range(bucket(max_batch).bit_length())}
        return keys | {(bucket(plan.eval_rows), bucket(plan.eval_tokens, MIN_LENGTH_BUCKET))}

    def release_unused(self, keep: set[tuple[int, int]]) -> None:
        """Free what earlier trials of this warm process left and this trial (served by this
        engine's own buckets) does not use: the slot pool and every bucket not in `keep`.

        A trial's peak memory is read from the whole process (NVML), so without this it depended
        on trial order: on the H200 a batch-16 trial read 20,904 MiB after a batch-32 trial and a
        continuous-batching one had run in the same process, and 19,824 MiB as a process's first.
        A later trial that needs a freed bucket captures it again in its own `prepare_trial`.
        """
        pool = self._slot_engine is not None
        self._slot_engine = None
        if self._drop_buckets(keep) or pool:
            free_device_memory()

    def release_buckets(self) -> None:
        """Free every bucket (KV buffers and graphs): the slot pool serves this trial."""
        if self._drop_buckets(set()):
            free_device_memory()

    def _drop_buckets(self, keep: set[tuple[int, int]]) -> bool:
        stale = [key for key in self._slots if key not in keep]
        for key in stale:
            del self._slots[key]
        if not any(slot.graph is not None for slot in self._slots.values()):
            # The graphs' private memory pool dies with its last graph; capturing into its old
            # handle then trips the caching allocator's `use_count > 0` assert (H200, 2026-12-01:
            # a batch-1 trial after a continuous one that had freed every bucket).
            self._graph_pool = None
        return bool(stale)

    def compile_seconds(self) -> float:
        return self.compile_s

    def compile_info(self, since_s: float) -> dict[str, Any]:
        return {"compile_s": self.compile_s - since_s, "compiled": self.compiled, "compile_error": self.compile_error,
                "buckets": sorted(self.buckets())}

    def pool_info(self) -> dict[str, Any] | None:
        return None

    def _slot_for(self, batch: int, length: int) -> DecodeSlot:
        key = (bucket(batch), bucket(length, MIN_LENGTH_BUCKET))
        slot = self._slots.get(key)
        if slot is None:
            if not self._preparing:
                self.shape_misses += 1
            t0 = time.perf_counter()
            slot = self._allocate(*key)
            if self.use_graphs:
                self._capture_or_refuse(slot, capture=slot.batch >= self.graph_min_batch)
            self._slots[key] = slot
            self.compile_s += time.perf_counter() - t0
        return slot

    @torch.inference_mode(False)  # normal tensors: updated both inside and outside inference mode
    def _allocate(self, batch: int, length: int) -> DecodeSlot:
        cfg, dims, dev = self.model.config, self.model.dims, self.model.device
        shape = (batch, dims.num_kv_heads, length, dims.head_dim)
        # Zeros, not empty: masked slots are multiplied by zero weights, and garbage NaN would survive.
        ks = [torch.zeros(shape, dtype=self.model.dtype, device=dev) for _ in range(cfg.num_hidden_layers)]
        vs = [torch.zeros(shape, dtype=self.model.dtype, device=dev) for _ in range(cfg.num_hidden_layers)]
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        logits = torch.zeros(batch, cfg.vocab_size, dtype=self.model.dtype, device=dev)
        return DecodeSlot(batch, length, ks, vs, zeros.clone(), zeros.clone(),
                          torch.zeros(1, dtype=torch.long, device=dev), zeros[:, 0].clone(), logits)

    @torch.inference_mode()
    def _decode_step(self, s: DecodeSlot) -> None:
        """One greedy step on the bucket's buffers; every update stays on the device."""
        bias = attention_bias(s.slot, s.pad_len, s.length, self.model.dtype)
        h = self.model.run_layers(s.tok, s.rope_pos, s.slot, bias, s.k, s.v, s.length, self._layer_fn)
        logits = self._head_fn(h, self.model.final_norm, self.model.lm_head.weight, self.model.dims.eps)
        s.logits.copy_(logits)
        s.tok.copy_(logits.argmax(-1, keepdim=True))
        s.rope_pos.add_(1)
        s.slot.add_(1)

    def _capture_or_refuse(self, s: DecodeSlot, capture: bool) -> None:
        """A decode step that cannot run or be captured for these knobs is a config fact
        (e.g. a kernel that rejects batch-1 shapes): report it as infeasible, with the reason."""
        try:
            self._capture(s, capture)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
            raise InfeasibleConfig(f"decode step for batch bucket {s.batch} cannot run/capture on "
                                   f"{self.device}: {error_line(exc)}") from exc

    def _capture(self, s: DecodeSlot, capture: bool = True) -> None:
        # Warm up on a side stream first (compiles, autotunes, allocates), as CUDA graph
        # capture requires; the garbage written to the buffers is overwritten by each prefill.
        stream = warmup_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_step(s)
        except Exception as exc:  # noqa: BLE001 - compile failed: report it and run eager
            if not self.compiled:
                raise
            self._compile_failed(exc)
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_step(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if not capture:
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_step(s)
        self._graph_pool = graph.pool()
        s.graph = graph

    def step(self, s: DecodeSlot) -> None:
        if s.graph is not None:
            s.graph.replay()
        else:
            self._decode_step(s)

    # --- serving -----------------------------------------------------------------------------
    def batch_steps(self, requests: Sequence[Request], prompts: list[list[int]], new_tokens: int) -> Any:
        prefix_lens = [self.prefix_len_fn(r) if self.prefix_len_fn else 0 for r in requests]
        return self.decode(prompts, new_tokens, prefix_lens)

    def decode(self, prompts: list[list[int]], new_tokens: int,
               prefix_lens: Sequence[int] | None = None) -> Any:
        """Greedy generation; yields each step's tokens [B, 1] (prefill's first)."""
        s = self.start(prompts, new_tokens, prefix_lens)
        rows = len(prompts)
        yield s.tok[:rows].clone()
        for _ in range(new_tokens - 1):
            self.step(s)
            yield s.tok[:rows].clone()

    @torch.inference_mode()
    def start(self, prompts: list[list[int]], new_tokens: int,
              prefix_lens: Sequence[int] | None = None) -> DecodeSlot:
        """Pick the bucket, prefill the prompts into it; its `tok` then holds the first token."""
        width = max(len(p) for p in prompts)
        s = self._slot_for(len(prompts), width + new_tokens)
        ids, pad = self._left_pad(prompts, s.batch)
        start = self._reuse_prefixes(s, prompts, pad, prefix_lens) if self.prefix_cache else 0
        self.prefill(s, ids, pad, start)
        if self.prefix_cache:
            self._store_prefixes(s, prompts, pad, prefix_lens)
        return s

    def _left_pad(self, prompts: list[list[int]], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, W] ids and [B] pad widths; rows past the real prompts are filler (one pad token)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        pad = torch.full((batch,), width - 1, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            pad[row] = width - len(prompt)
        return ids.to(self.model.device), pad.to(self.model.device)

    @torch.inference_mode()
    def prefill(self, s: DecodeSlot, ids: torch.Tensor, pad: torch.Tensor, start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Run slots [start, W) of the left-padded prompts eagerly; slots < start are already cached.

        Returns the logits of the last position, [B, V] (every computed position if `all_logits`).
        """
        width = ids.shape[1]
        positions = torch.arange(width, device=ids.device)
        rope_pos = (positions[None] - pad[:, None]).clamp(min=0)  # [B, W]
        slots = positions[start:]
        bias = attention_bias(slots, pad, width, self.model.dtype)
        h = self.model.run_layers(ids[:, start:], rope_pos[:, start:], slots, bias, s.k, s.v, width)
        h = rms_norm(h if all_logits else h[:, -1:], self.model.final_norm, self.model.dims.eps)
        logits = self.model.lm_head(h if all_logits else h[:, -1])
        last = logits[:, -1] if all_logits else logits
        s.tok.copy_(last.argmax(-1, keepdim=True))
        s.logits.copy_(last)
        s.rope_pos.copy_(rope_pos[:, -1:] + 1)
        s.slot.fill_(width)
        s.pad_len.copy_(pad)
        return logits

    # --- prefix cache ------------------------------------------------------------------------
    def _reuse_prefixes(self, s: DecodeSlot, prompts: list[list[int]], pad: torch.Tensor,
                        prefix_lens: Sequence[int] | None) -> int:
        """Copy cached prefix KV into the rows; returns the first slot prefill must compute.

        One batched prefill starts at the same slot for every row, so it can skip only what
        every row has cached: a miss in the batch limits what the hits save.
        """
        assert self.prefix_cache is not None
        width = max(len(p) for p in prompts)
        pads = pad.tolist()
        covered = []
        for row, prompt in enumerate(prompts):
            length = (prefix_lens or [0] * len(prompts))[row]
            hit = self.prefix_cache.lookup(tuple(prompt[:length])) if length > 0 else None
            if hit is not None:
                self._write_prefix(s, row, pads[row], hit)
            covered.append(pads[row] + (length if hit is not None else 0))
        start = min(min(covered), width - 1)  # the last prompt token always runs: its logits
        self.prefix_cache.stats.tokens_reused += sum(max(0, start - p) for p in pads[:len(prompts)])
        return start

    def _write_prefix(self, s: DecodeSlot, row: int, pad: int, kv: torch.Tensor) -> None:
        # kv: [layers, 2, Hkv, P, D]
        length = kv.shape[3]
        for layer in range(len(s.k)):
            s.k[layer][row, :, pad:pad + length] = kv[layer, 0]
            s.v[layer][row, :, pad:pad + length] = kv[layer, 1]

    def _store_prefixes(self, s: DecodeSlot, prompts: list[list[int]], pad: torch.Tensor,
                        prefix_lens: Sequence[int] | None) -> None:
        assert self.prefix_cache is not None
        pads = pad.tolist()
        for row, prompt in enumerate(prompts):
            length = (prefix_lens or [0] * len(prompts))[row]
            key = tuple(prompt[:length])
            if length <= 0 or key in self.prefix_cache.l1:
                continue
            p = pads[row]
            kv = torch.stack([torch.stack([k[row, :, p:p + length], v[row, :, p:p + length]])
                              for k, v in zip(s.k, s.v, strict=True)])
            self.prefix_cache.insert(key, kv, kv.numel() * kv.element_size())

    # --- quality through this engine's cache path --------------------------------------------
    @torch.inference_mode()
    def teacher_forced_log_probs(self, ids: torch.Tensor, prefill_tokens: int) -> torch.Tensor:
        """Log-probs [N, T, V] (float32): first `prefill_tokens` prefilled, the rest decoded
        one token at a time through the same step (graph) that serving uses."""
        rows, total = ids.shape
        s = self._slot_for(rows, total)
        filler = torch.full((s.batch - rows, prefill_tokens), self.pad_id, dtype=torch.long, device=ids.device)
        head = torch.cat([ids[:, :prefill_tokens], filler])
        pad = torch.zeros(s.batch, dtype=torch.long, device=ids.device)
        pad[rows:] = prefill_tokens - 1
        outputs = [self.prefill(s, head, pad, all_logits=True)[:rows].float()]
        for t in range(prefill_tokens, total):
            s.tok[:rows, 0] = ids[:, t]
            self.step(s)
            outputs.append(s.logits[:rows, None].to(torch.float32, copy=True))  # the buffer is reused
        return torch.log_softmax(torch.cat(outputs, dim=1), dim=-1)
