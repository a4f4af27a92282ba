"""The `glm-infer` runner: build the GLM stack with a trial's knobs, serve a load, measure."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runners import progress_report
from runners.base import Runner, resolve_device
from runners.capacity import serve_workload
from runners.compile_watch import measure_clean
from runners.contract import METRICS, QUALITY_METRICS, TrialConfig, TrialResult
from runners.glm import compress, woq
from runners.glm.compress import CALIBRATION_SEQUENCES, CALIBRATION_TOKENS, apply_quantization, apply_sparsity
from runners.glm.engines.base import TrialEngine, TrialPlan, select_engine
from runners.glm.engines.build import build_fast_engine, trial_engine
from runners.glm.engines.fast import FastEngine
from runners.glm.fast_model import FastGlm
from runners.glm.model import build_model, model_config, model_info, resolve_dtype
from runners.glm.model_cache import (
    BASES,
    MODELS,
    REFERENCES,
    base_key,
    derive_model,
    keep_weights,
    load_reference,
    model_key,
    store_reference,
)
from runners.glm.quality import Fidelity, calibration_set, eval_batch, fidelity, log_probs, text_source, text_windows
from runners.knobs import INFER_KNOBS, quality_knobs
from runners.measure.artifacts import request_rows, write_rows
from runners.measure.environment import describe
from runners.registry import resolve_knobs, resolve_workload
from runners.serving import ServeOutcome
from runners.workload import Request, make_requests


def quality_decided(constraints: Any, quality: Fidelity) -> dict[str, Any] | None:
    """The first quality constraint (KL, top-1, perplexity: known after set-up) this stack
    breaks, as a `stopped_early` decision; None if every one is met or none is set."""
    values = {"kl_divergence": quality.kl_divergence, "top1_agreement": quality.top1_agreement,
              "perplexity": quality.perplexity}
    for c in constraints or ():
        value = values.get(c.get("metric", "")) if isinstance(c, dict) else None
        if value is None:
            continue
        high, low = c.get("max"), c.get("min")
        if (high is not None and value > float(high)) or (low is not None and value < float(low)):
            bound = f"<= {high}" if high is not None and value > float(high) else f">= {low}"
            return {"rule": "constraint", "metric": c["metric"], "value": float(value), "bound": bound,
                    "when": "set-up, before the window", "elapsed_s": 0.0}
    return None


def skipped_window(decision: dict[str, Any]) -> ServeOutcome:
    """The outcome of a window not served because set-up already decided the trial."""
    why = (f"window not served: {decision['metric']} = {decision['value']:.4g} breaks its bound "
           f"{decision['bound']}, known after set-up")
    window = {name: why for name in METRICS if name not in QUALITY_METRICS and not name.startswith(("setup_", "train_"))}
    return ServeOutcome([], [], {}, window, {"stopped_early": decision, "partial": True})


def _length_bound(spec: Any, drawn: list[int]) -> int:
    """The longest length a workload's spec allows (its `max`), else the longest drawn."""
    if isinstance(spec, int):
        return spec
    bounds = []
    if isinstance(spec, dict):
        bounds = [int(spec[k]) for k in ("max",) if spec.get(k) is not None]
        if spec.get("dist") == "uniform":
            bounds.append(int(spec["high"]))
    return min(bounds) if bounds else max(drawn)


def eval_set(config: TrialConfig, workload: dict[str, Any], device: str) -> torch.Tensor:
    """The evaluation token ids of this trial, [sequences, tokens]: windows of held-out text
    when the model has a tokenizer and text (runners/glm/quality.py), else fixed seeded ids."""
    source = text_source(config.model, workload)
    if source.is_text:
        return text_windows(source.eval_ids, int(workload["eval_sequences"]), int(workload["eval_tokens"]),
                            device, source.eval_description)
    vocab = int(model_config(config.model).vocab_size)
    return eval_batch(vocab, int(workload["eval_sequences"]), int(workload["eval_tokens"]), config.seed, device)


def reference_key(config: TrialConfig, dtype: Any, device: str, eval_ids: torch.Tensor) -> str:
    """The reference log-probs depend on the model, its dtype and the evaluation set only."""
    return json.dumps({"model": config.model, "dtype": str(dtype), "device": device, "seed": config.seed,
                       "eval": list(eval_ids.shape), "eval_text": text_source(config.model, config.workload).eval_description},
                      sort_keys=True, default=str)


SETUP_PHASES = ("build", "compress", "compile", "quality")


class SetupClock:
    """Seconds of set-up per phase, stored as `setup_<phase>_s`; `setup_s` is the whole set-up.

    build: the base model (built, or derived from kept weights) and its fast-path conversion;
    compress: sparsity and quantisation; compile: engine creation, compile and graph capture of
    every bucket; quality: the reference log-probs (when not cached) and the KL / top-1 pass.
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(SETUP_PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"setup_{name}_s": seconds for name, seconds in self.seconds.items()}


def keeps_base(model_spec: dict[str, Any], device: str) -> bool:
    """Whether keeping the base weights beats building them again: a checkpoint is loaded from
    disk, and random init on CPU is slower than a copy; seeded random init on a GPU (0.2 s for
    glm-4-9b on the H200) is faster than copying 18 GB back from host memory."""
    return "path" in model_spec or not device.startswith("cuda")


def base_model(model_spec: dict[str, Any], dtype: Any, device: str, seed: int, attn: str) -> tuple[Any, str]:
    """The unquantised model, fresh for compression in place: derived from the kept base weights
    when this process has them ("derived"), else built and, if it fits, kept ("built")."""
    key = base_key(model_spec, str(dtype), device, seed, attn)
    kept = BASES.get(key)
    if kept is not None:
        return derive_model(kept, device), "derived"
    BASES.clear()  # another model's base: its host memory is needed more by this one
    model = build_model(model_spec, dtype, device, seed, attn)
    if keeps_base(model_spec, device):
        kept = keep_weights(model)
        if kept is not None:
            BASES.put(key, kept)
    return model, "built"


def reference_log_probs(key: str, plain_model: Callable[[], Any], eval_ids: torch.Tensor) -> torch.Tensor:
    """The unoptimised model's log-probs on the eval set: from memory, else from the on-disk
    cache, else computed on `plain_model()` and kept in both."""
    reference = REFERENCES.get(key)
    if reference is None:
        reference = load_reference(key)
        if reference is None:
            reference = log_probs(plain_model(), eval_ids).cpu()
            store_reference(key, reference)
        REFERENCES.put(key, reference)
    return reference


class PromptBank:
    """Deterministic prompt token ids per request; requests of one prefix group share a prefix.

    With `text` (a 1-D token stream) each prompt is a seeded window of that text, else random ids.
    """

    def __init__(self, vocab_size: int, seed: int, shared_prefix_tokens: int, text: Any = None) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self.shared_prefix_tokens = shared_prefix_tokens
        self.text = text

    def _tokens(self, stream: int, key: int, count: int) -> list[int]:
        # Separate seed streams for per-request tokens (0) and group prefixes (1).
        rng = np.random.default_rng([self.seed, stream, key])
        if self.text is not None and len(self.text) > count:
            start = int(rng.integers(0, len(self.text) - count))
            return [int(t) for t in self.text[start:start + count]]
        return rng.integers(3, self.vocab_size, size=count).tolist()

    def __call__(self, request: Request) -> list[int]:
        if request.prefix_group < 0 or self.shared_prefix_tokens == 0:
            return self._tokens(0, request.rid, request.prompt_tokens)
        shared = min(self.shared_prefix_tokens, request.prompt_tokens)
        prefix = self._tokens(1, request.prefix_group, shared)
        return prefix + self._tokens(0, request.rid, request.prompt_tokens - shared)


def prefix_length(shared_prefix_tokens: int) -> Callable[[Request], int]:
    """How many leading prompt tokens of a request are its group's shared prefix."""
    def length(request: Request) -> int:
        if request.prefix_group < 0:
            return 0
        return min(shared_prefix_tokens, request.prompt_tokens)
    return length


def trial_plan(knobs: dict[str, Any], workload: dict[str, Any], seed: int, eval_ids: Any) -> TrialPlan:
    """The shapes this trial can reach: the spec's length bounds, not only this draw's (a later
    window, at another rate or with more requests, draws other lengths from the same spec)."""
    count = int(workload.get("warmup_requests", 0)) + max(int(workload["requests"]), int(workload.get("max_requests") or 0))
    requests = make_requests(workload, count, seed)
    shared = int(workload.get("shared_prefix_tokens", 0))
    return TrialPlan(
        batch_size=int(knobs["batch_size"]), requests=count,
        max_prompt=_length_bound(workload.get("prompt_tokens", 32), [r.prompt_tokens for r in requests]),
        max_output=_length_bound(workload.get("output_tokens", 16), [r.output_tokens for r in requests]),
        eval_rows=int(eval_ids.shape[0]), eval_tokens=int(eval_ids.shape[1]), kv_slots=int(knobs.get("kv_slots", 0)),
        kv_memory_mib=float(knobs.get("kv_memory_mib", 0)),
        prefix_lens=(shared,) if shared and knobs["prefix_cache"] != "off" else ())


@dataclass
class BuiltModel:
    """A compressed model ready to serve, as kept in the process-wide model cache."""

    model: Any
    info: dict[str, Any]
    fast_engine: FastEngine | None = None
    quality: dict[str, Fidelity] = field(default_factory=dict)  # per KV policy


class GlmInferRunner(Runner):
    name = "glm-infer"

    def run(self, config: TrialConfig) -> TrialResult:
        t_setup = time.perf_counter()
        progress_report.start(config.artifact_dir)
        progress_report.report_phase("build")
        clock = SetupClock()
        knobs = resolve_knobs(self.name, config.knobs)
        workload = resolve_workload(self.name, config.workload)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.model, knobs, device)
        kind = select_engine(knobs, device)
        compress.refuse_sparsity_knobs(knobs, device)  # before any model is built or derived
        eval_ids = eval_set(config, workload, device)
        key = model_key(config.model, str(dtype), device, config.seed, knobs, kind)
        built = MODELS.get(key)
        reused = built is not None
        if built is None:
            MODELS.clear()  # free the previous model before building the next one
            built = self._build(config, knobs, dtype, device, kind, eval_ids, clock)
            MODELS.put(key, built)
        info: dict[str, Any] = {**built.info, "model_reused": reused, "engine": kind,
                                "dtype": str(dtype).removeprefix("torch."), "device": device}

        text = text_source(config.model, workload)
        info.update(eval_set=text.eval_description, prompts=text.eval_description if text.is_text else "random ids")
        engine = self._engine(built, knobs, device, kind, workload, config.seed, text.eval_ids)
        compiled_before = engine.compile_seconds()
        # An engine that scores quality eagerly (the slot pool, on a pool of its own) goes first: a
        # stack that breaks a quality bound needs neither its graphs nor its window. FastEngine
        # scores through its captured step, so it compiles first.
        decides = workload.get("early_stop", True)
        quality_first = engine.quality_first
        quality = self._quality_phase(built, engine, knobs, config, dtype, eval_ids, clock) if quality_first else None
        broken = quality_decided(config.constraints, quality) if quality is not None and decides else None
        if broken is None:
            with clock.phase("compile"):
                progress_report.report_phase("compile")
                woq.warm_up(built.model, dtype)  # packed int8/int4 kernels autotune per shape
                self._prepare(engine, knobs, workload, config.seed, eval_ids)
        if quality is None:
            quality = self._quality_phase(built, engine, knobs, config, dtype, eval_ids, clock)
            broken = quality_decided(config.constraints, quality) if decides else None
        # This trial's compile + capture time (buckets captured by earlier trials are reused).
        info.update(engine.compile_info(compiled_before))
        setup_s = info["setup_s"] = time.perf_counter() - t_setup  # build + compress + compile + quality
        progress_report.report_phase("measure")
        # A window that compiled is measured again; a second one that compiles too is `contaminated`.
        # A window stopped once decided carries `stopped_early` (the tuner makes the trial infeasible).
        if broken is not None:
            # The trial is infeasible whatever its window would show: measuring it is waste.
            outcome = skipped_window(broken)
        else:
            outcome = measure_clean(lambda: serve_workload(engine, device, workload, knobs, config.seed,
                                                           config.slo, config.constraints),
                                    lambda served: served.info)
        for flag in ("contaminated", "remeasured", "host_busy", "stopped_early"):
            if flag in outcome.info:
                info[flag] = outcome.info[flag]

        metrics, unavailable = outcome.metrics, outcome.unavailable
        metrics["kl_divergence"] = quality.kl_divergence
        metrics["top1_agreement"] = quality.top1_agreement
        if quality.perplexity is not None:
            metrics["perplexity"] = quality.perplexity
            info["reference_perplexity"] = quality.reference_perplexity
        else:
            unavailable["perplexity"] = ("the evaluation set is random token ids: give a checkpoint with a tokenizer "
                                         "(model.path) and text (workload.eval_text, or make-reference's held-out text)")
        self._prefix_metrics(engine, outcome, metrics, unavailable, info)
        info["engine_counters"] = engine.counters()
        info["serving"] = outcome.info
        pool = engine.pool_info()
        if pool is not None:
            info["kv_pool"] = pool
        metrics["setup_s"] = setup_s
        metrics.update(clock.metrics())

        artifacts = self._write_artifacts(config, outcome)
        return TrialResult("ok", metrics, environment=describe(device), unavailable=unavailable,
                           artifacts=artifacts, info=info)

    @staticmethod
    def _build(config: TrialConfig, knobs: dict[str, Any], dtype: Any, device: str, kind: str,
               eval_ids: Any, clock: SetupClock) -> BuiltModel:
        """Derive (or build) the base, take the reference (if not cached), convert, compress."""
        with clock.phase("build"):
            model, origin = base_model(config.model, dtype, device, config.seed, knobs["attn_implementation"])
        with clock.phase("quality"):
            reference_log_probs(reference_key(config, dtype, device, eval_ids), lambda: model, eval_ids)
        info: dict[str, Any] = {"model_before": dataclasses.asdict(model_info(model)), "base_model": origin}
        with clock.phase("build"):
            if kind == "fast":
                model = FastGlm(model)
        with clock.phase("compress"):
            info.update(apply_sparsity(model, knobs, device, lambda: calibration_set(
                config.model, config.workload, int(model.config.vocab_size), config.seed, device,
                CALIBRATION_SEQUENCES, CALIBRATION_TOKENS)))
            apply_quantization(model, knobs, device)
        info["model_after"] = dataclasses.asdict(model_info(model))
        fast = None
        with clock.phase("compile"):
            if kind == "fast":
                fast = build_fast_engine(model, device, knobs)
        return BuiltModel(model, info, fast)

    @staticmethod
    def _engine(built: BuiltModel, knobs: dict[str, Any], device: str, kind: str,
                workload: dict[str, Any], seed: int, text: Any = None) -> TrialEngine:
        """The engine serving this trial: transformers' loop, `FastEngine` (static KV, static
        batches) or its slot pool (`SlotEngine`: continuous batching, or a non-static KV policy)."""
        shared = int(workload.get("shared_prefix_tokens", 0))
        prompts = PromptBank(built.model.config.vocab_size, seed, shared, text)
        return trial_engine(built.model, built.fast_engine, knobs, device, prompts, prefix_length(shared))

    @staticmethod
    def _prepare(engine: TrialEngine, knobs: dict[str, Any], workload: dict[str, Any], seed: int,
                 eval_ids: Any) -> None:
        """Compile/capture every bucket the trial can hit, before any measured window."""
        engine.prepare_trial(trial_plan(knobs, workload, seed, eval_ids))

    def _quality_phase(self, built: BuiltModel, engine: TrialEngine, knobs: dict[str, Any], config: TrialConfig,
                       dtype: Any, eval_ids: Any, clock: SetupClock) -> Fidelity:
        with clock.phase("quality"):
            progress_report.report_phase("quality")
            return self._quality(built, engine, knobs, config, dtype, eval_ids)

    @staticmethod
    def _quality(built: BuiltModel, engine: TrialEngine, knobs: dict[str, Any], config: TrialConfig,
                 dtype: Any, eval_ids: Any) -> Fidelity:
        """KL / top-1 of this stack (weights and KV path) vs the unoptimised reference."""
        # The built model fixes the rebuilding knobs; the rest of `quality_knobs` (the KV policy) keys
        # the score, the same key the sampler reads (tuner/gp_search.py).
        kv_key = repr([(n, v) for n, v in quality_knobs(INFER_KNOBS, knobs) or () if not INFER_KNOBS[n].rebuilds])
        if kv_key not in built.quality:
            device = str(eval_ids.device)
            # Evicted from memory and absent on disk: the model is already compressed, so take a
            # fresh base (derived from the kept weights where this process has them).
            reference = reference_log_probs(
                reference_key(config, dtype, device, eval_ids),
                lambda: base_model(config.model, dtype, device, config.seed, knobs["attn_implementation"])[0],
                eval_ids)
            prefill = max(1, eval_ids.shape[1] // 2)
            candidate = engine.teacher_forced_log_probs(eval_ids, prefill)
            text = text_source(config.model, config.workload).is_text
            built.quality[kv_key] = fidelity(reference, candidate.cpu(), eval_ids.cpu() if text else None)
        return built.quality[kv_key]

    @staticmethod
    def _prefix_metrics(engine: TrialEngine, outcome: ServeOutcome, metrics: dict[str, float],
                        unavailable: dict[str, str], info: dict[str, Any]) -> None:
        """`prefix_hit_rate` over the measured window (warm-up lookups excluded)."""
        cache = getattr(engine, "prefix_cache", None)
        if cache is None:
            unavailable["prefix_hit_rate"] = "prefix_cache is off"
            return
        work = outcome.info.get("engine_work", {})
        lookups = work.get("prefix_lookups", 0.0)
        if lookups:
            metrics["prefix_hit_rate"] = work["prefix_hits"] / lookups
        else:
            unavailable["prefix_hit_rate"] = "no request in the window has a shared prefix"
        info["prefix_cache"] = {**dataclasses.asdict(cache.stats), "window_lookups": lookups,
                                "window_tokens_reused": work.get("prefix_tokens_reused", 0.0),
                                "l1_bytes": cache.l1.used_bytes, "l2_bytes": cache.l2.used_bytes}

    @staticmethod
    def _write_artifacts(config: TrialConfig, outcome: ServeOutcome) -> dict[str, str]:
        if not config.artifact_dir:
            return {}
        folder = Path(config.artifact_dir)
        return {
            "requests": write_rows(folder / "requests.csv", request_rows(outcome.timings)),
            "timeline": write_rows(folder / "timeline.csv", outcome.samples),
        }
