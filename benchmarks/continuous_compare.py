"""Continuous batching: the stack's own `ContinuousEngine` vs transformers' `generate_batch`
(paged attention, CUDA graphs) on the same requests, all queued at t=0. Usage:

    python -m benchmarks.continuous_compare --preset glm-1b --requests 64 --batch 32
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.overhead import build_engine, emit, engine_parser
from runners.base import resolve_device
from runners.glm.engines.continuous import ContinuousEngine
from runners.scheduler import RealClock, run_continuous
from runners.workload import Request


def ours(engine: Any, requests: list[Request], max_batch: int) -> float:
    iteration = ContinuousEngine(engine.model, engine.device, engine.prompt_fn)
    for r in requests:
        r.arrival_s = 0.0
    t0 = time.perf_counter()
    timings = run_continuous(requests, iteration, RealClock(), max_batch, 0.0)
    seconds = time.perf_counter() - t0
    return sum(t.output_tokens for t in timings) / seconds


def transformers_cb(engine: Any, requests: list[Request]) -> tuple[float, float]:
    """(first call tok/s, second call tok/s): the first call captures graphs / warms up."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=requests[0].output_tokens, eos_token_id=-1, do_sample=False)
    inputs = [engine.prompt_fn(r) for r in requests]
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = engine.model.generate_batch(inputs, generation_config=config)
        if engine.device.startswith("cuda"):
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.generated_tokens) for o in out.values())
        rates.append(tokens / seconds)
    return rates[0], rates[1]


def main() -> None:
    parser = engine_parser(__doc__, batch=32, output_tokens=32)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    device = resolve_device(args.device)
    engine = build_engine(args.preset, device)

    def make() -> list[Request]:
        return [Request(i, 0.0, args.prompt_tokens, args.output_tokens) for i in range(args.requests)]

    ours(engine, make()[: args.batch], args.batch)  # warm-up
    result: dict[str, Any] = {"preset": args.preset, "requests": args.requests, "batch": args.batch,
                              "ours_tok_s": ours(engine, make(), args.batch)}
    try:
        first, second = transformers_cb(engine, make())
        result.update(transformers_first_tok_s=first, transformers_tok_s=second)
    except Exception as exc:  # noqa: BLE001 - report why transformers' manager did not run here
        result["transformers_error"] = f"{type(exc).__name__}: {exc}"[:500]
    emit(result, args.json)


if __name__ == "__main__":
    main()
