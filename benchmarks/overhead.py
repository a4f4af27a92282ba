"""The harness's own cost: one config, decoded bare vs as the trial path times it.

- bare: `HFEngine.decode` with one synchronisation at the end (no per-step timestamps);
- sync_per_step: a device sync + clock read after every step (how run_batch used to time);
- run_batch: `HFEngine.run_batch`, the trial path (a CUDA event per step via `StepTimer`, one
  sync per batch, work counting);
- run_batch+thread_sampler / +process_sampler: the same inside `ResourceSampler` (NVML + RSS
  every 25 ms, allocator peaks), sampling from a thread or from a child process (the default
  on CUDA) — what a serving trial does.
Variants are interleaved round by round (order rotated) so drift hits all alike; the figure is
the ratio of median decode throughputs. Usage:

    python -m benchmarks.overhead --preset glm-1b --batch 16 --rounds 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from runners.base import resolve_device
from runners.glm.engines.hf import HFEngine
from runners.glm.model import build_model, resolve_dtype
from runners.infer import PromptBank
from runners.measure.monitor import ResourceSampler
from runners.scheduler import RealClock
from runners.workload import Request


def build_engine(preset: str, device: str, seed: int = 0) -> HFEngine:
    spec = {"preset": preset}
    model = build_model(spec, resolve_dtype(spec, {}, device), device, seed)
    return HFEngine(model, device, "dynamic", 4, PromptBank(model.config.vocab_size, seed, 0))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def variants(engine: HFEngine, requests: list[Request]) -> dict[str, Callable[[], float]]:
    """name -> a function that decodes the batch once and returns its wall seconds."""
    prompts = [engine.prompt_fn(r) for r in requests]
    new_tokens = requests[0].output_tokens
    device = engine.device

    def bare() -> float:
        t0 = time.perf_counter()
        for _ in engine.decode(prompts, new_tokens):
            pass
        _sync(device)
        return time.perf_counter() - t0

    def sync_per_step() -> float:
        t0 = time.perf_counter()
        for _ in engine.decode(prompts, new_tokens):
            _sync(device)
            time.perf_counter()
        return time.perf_counter() - t0

    def run_batch() -> float:
        t0 = time.perf_counter()
        engine.run_batch(requests, RealClock())
        return time.perf_counter() - t0

    def with_sampler(out_of_process: bool) -> Callable[[], float]:
        def run() -> float:
            with ResourceSampler(device, out_of_process=out_of_process) as sampler:
                seconds = run_batch()
            assert len(sampler.samples) >= 2
            return seconds
        return run

    return {"bare": bare, "sync_per_step": sync_per_step, "run_batch": run_batch,
            "run_batch+thread_sampler": with_sampler(False), "run_batch+process_sampler": with_sampler(True)}


def measure(engine: HFEngine, batch: int, prompt_tokens: int, output_tokens: int, rounds: int
            ) -> dict[str, Any]:
    requests = [Request(i, 0.0, prompt_tokens, output_tokens) for i in range(batch)]
    runs = variants(engine, requests)
    names = list(runs)
    for name in names:  # warm-up: allocator, kernels, NVML init
        runs[name]()
    tok_s: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            tok_s[name].append(batch * output_tokens / runs[name]())
    median = {name: statistics.median(v) for name, v in tok_s.items()}
    # Paired per round (same drift), then the median over rounds: robust to a slow round.
    overhead = {name: 1 - statistics.median(a / b for a, b in zip(tok_s[name], tok_s["bare"], strict=True))
                for name in names if name != "bare"}
    return {"tok_s": tok_s, "median_tok_s": median, "overhead_vs_bare": overhead,
            "round_cv_bare": statistics.stdev(tok_s["bare"]) / statistics.mean(tok_s["bare"])}


def engine_parser(doc: str, batch: int, output_tokens: int) -> argparse.ArgumentParser:
    """The options every engine benchmark takes: model, device, batch shape, JSON output."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default="glm-tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=output_tokens)
    parser.add_argument("--json", default="", help="also write the result to this file")
    return parser


def emit(result: dict, path: str, shown: dict | None = None) -> None:
    """Print the result (or its `shown` summary) and write the full result as JSON to `path`."""
    print(json.dumps(result if shown is None else shown, indent=2, default=str))
    if path:
        with open(path, "w") as handle:
            handle.write(json.dumps(result, indent=2, default=str))


def main() -> None:
    parser = engine_parser(__doc__, batch=8, output_tokens=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the round-to-round CV needs two rounds")
    device = resolve_device(args.device)
    engine = build_engine(args.preset, device)
    result = {"preset": args.preset, "device": device, "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
              **measure(engine, args.batch, args.prompt_tokens, args.output_tokens, args.rounds)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
