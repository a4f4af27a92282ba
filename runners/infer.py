"""The `glm-infer` runner: build the GLM stack with a trial's knobs, serve a load, measure."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from runners.artifacts import request_rows, write_rows
from runners.base import Runner, resolve_device
from runners.contract import TrialConfig, TrialResult
from runners.environment import describe
from runners.glm.compress import apply_quantization, apply_sparsity
from runners.glm.engine import HFEngine
from runners.glm.model import build_model, model_info, resolve_dtype
from runners.glm.quality import eval_batch, fidelity, log_probs
from runners.knobs import resolve_knobs
from runners.serving import ServeOutcome, serve
from runners.workload import Request

DEFAULT_WORKLOAD: dict[str, Any] = {
    "arrival": "poisson", "rate_rps": 8.0, "requests": 64, "warmup_requests": 4,
    "prompt_tokens": 32, "output_tokens": 16, "eval_sequences": 4, "eval_tokens": 64,
}


class PromptBank:
    """Deterministic prompt token ids per request; requests of one prefix group share a prefix."""

    def __init__(self, vocab_size: int, seed: int, shared_prefix_tokens: int) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self.shared_prefix_tokens = shared_prefix_tokens

    def _tokens(self, key: int, count: int) -> list[int]:
        rng = np.random.default_rng([self.seed, key])
        return rng.integers(3, self.vocab_size, size=count).tolist()

    def __call__(self, request: Request) -> list[int]:
        if request.prefix_group < 0 or self.shared_prefix_tokens == 0:
            return self._tokens(request.rid, request.prompt_tokens)
        shared = min(self.shared_prefix_tokens, request.prompt_tokens)
        prefix = self._tokens(-1 - request.prefix_group, shared)
        return prefix + self._tokens(request.rid, request.prompt_tokens - shared)


class GlmInferRunner(Runner):
    name = "glm-infer"

    def run(self, config: TrialConfig) -> TrialResult:
        t_setup = time.perf_counter()
        knobs = resolve_knobs(self.name, config.knobs)
        workload = {**DEFAULT_WORKLOAD, **config.workload}
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.model, knobs, device)
        model = build_model(config.model, dtype, device, config.seed, knobs["attn_implementation"])
        info: dict[str, Any] = {"model_before": dataclasses.asdict(model_info(model)),
                                "dtype": str(dtype).removeprefix("torch."), "device": device}

        eval_ids = eval_batch(model.config.vocab_size, int(workload["eval_sequences"]),
                              int(workload["eval_tokens"]), config.seed, device)
        reference = log_probs(model, eval_ids)
        info.update(apply_sparsity(model, knobs, device))
        apply_quantization(model, knobs, device)
        quality = fidelity(reference, log_probs(model, eval_ids))
        del reference
        info["model_after"] = dataclasses.asdict(model_info(model))

        prompts = PromptBank(model.config.vocab_size, config.seed, int(workload.get("shared_prefix_tokens", 0)))
        engine = HFEngine(model, device, knobs["kv_cache"], int(knobs["kv_bits"]), prompts)
        setup_s = info["setup_s"] = time.perf_counter() - t_setup  # build + compress + quality
        outcome = serve(engine, device, workload, knobs, config.seed, config.slo)

        metrics, unavailable = outcome.metrics, outcome.unavailable
        metrics["kl_divergence"] = quality.kl_divergence
        metrics["top1_agreement"] = quality.top1_agreement
        unavailable["perplexity"] = "needs real weights and a text file"
        info["engine_counters"] = engine.counters()
        metrics["setup_s"] = setup_s

        artifacts = self._write_artifacts(config, outcome)
        return TrialResult("ok", metrics, environment=describe(device), unavailable=unavailable,
                           artifacts=artifacts, info=info)

    @staticmethod
    def _write_artifacts(config: TrialConfig, outcome: ServeOutcome) -> dict[str, str]:
        if not config.artifact_dir:
            return {}
        folder = Path(config.artifact_dir)
        return {
            "requests": write_rows(folder / "requests.csv", request_rows(outcome.timings)),
            "timeline": write_rows(folder / "timeline.csv", outcome.samples),
        }
