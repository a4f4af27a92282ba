"""Decode steps and prefills of the slot engine (continuous batching) beside FastEngine's step.

    python -m benchmarks.slot_step [--preset glm-4-9b] [--batches 1,8,32] [--kv static,quantized]
                                   [--prompt 256] [--prefill 64,256,1024] [--group 8] [--json OUT]

Builds one model (random weights, bf16, compiled layer), then per batch size:
- `fast_ms`: FastEngine's captured static-batch step (as benchmarks/decode_roofline.py times it);
- `slot_graph_ms`: the slot engine's captured decode graph alone, same rows and prompt length;
- `slot_step_ms`: `SlotEngine.step()` as the scheduler calls it: host bookkeeping, the replay and
  one device sync (the one sync per iteration that the scheduler needs for token times).
Per prompt width: `prefill_ms` of one request's join (prefill graph + copy into its row + sync),
and `group_prefill_ms` of `--group` such requests joining together (one grouped prefill pass,
`engines/slots.py`, where the width and the `prefill_group_tokens` budget allow one), with
`per_request_ms` beside the single join's.
Also prints the KV bytes per token of each policy. Steps are timed with CUDA events (median).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Any

import torch

from runners.glm import ops
from runners.glm.engines.fast import FastEngine
from runners.glm.engines.kv_pool import GROUP_MAX_WIDTH, prefill_width
from runners.glm.fast_model import FastGlm
from runners.glm.model import build_model
from runners.measure.cuda_timer import cuda_seconds
from runners.workload import Request

STEPS = 32
NEW_TOKENS = 3 * STEPS + 16


def _prompts(count: int, width: int) -> list[list[int]]:
    return [[3 + (7 * r + i) % 1000 for i in range(width)] for r in range(count)]


def _event_ms(fn: Any, steps: int = STEPS, repeats: int = 3) -> float:
    if not torch.cuda.is_available():  # a CPU smoke run of this script
        return _wall_ms(fn, steps)
    return statistics.median(cuda_seconds(fn, steps) * 1e3 for _ in range(repeats))


def _wall_ms(fn: Any, steps: int = STEPS) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fast_step_ms(engine: FastEngine, batch: int, prompt: int) -> float:
    engine.prepare(batch, prompt + NEW_TOKENS, batches=[batch])
    slot = engine.start(_prompts(batch, prompt), NEW_TOKENS)
    return _event_ms(lambda: engine.step(slot))


def slot_rows(fast: FastEngine, kv: str, batches: list[int], prompt: int, prefill: list[int],
              length_step: int = 0, group: int = 8) -> list[dict[str, Any]]:
    engine = fast.slot_engine(kv, 8, 0, length_step)
    bank = {}
    engine.begin_trial(lambda r: bank[r.rid], None, "off", 0)
    longest = max([prompt, *prefill])
    engine.prepare(max(batches + [group]), longest + NEW_TOKENS + 3 * STEPS, longest)
    rows = []
    rid = 0
    for batch in batches:
        requests = []
        for prompt_ids in _prompts(batch, prompt):
            bank[rid] = prompt_ids
            requests.append(Request(rid, 0.0, len(prompt_ids), NEW_TOKENS))
            rid += 1
        engine.join(requests)
        need = max(engine.lengths) + 1
        attend = min(a for (b, a) in engine.decode_buckets() if b == batch and a >= need)
        d = engine._decode[(batch, attend)]
        # Replays alone advance the rows on the device only; the host lengths that pick the
        # bucket lag behind, which the pool's length (prompt + NEW_TOKENS + 3 * STEPS) absorbs.
        graph_ms = _event_ms(d.graph.replay if d.graph is not None else functools.partial(engine._decode_step, d))
        step_ms = _wall_ms(engine.step)
        engine.leave([r.rid for r in requests])
        rows.append({"kv": kv, "batch": batch, "attend": attend, "slot_graph_ms": graph_ms, "slot_step_ms": step_ms,
                     "kv_bytes_per_token": engine.pool.bytes_per_token()})
    for width in prefill:
        bank[rid] = _prompts(1, width)[0]
        request = Request(rid, 0.0, width, 2)
        rid += 1

        def join_leave(req: Request = request) -> None:
            engine.join([req])
            engine.leave([req.rid])
        single_ms = _wall_ms(join_leave, steps=8)
        rows.append({"kv": kv, "prefill_tokens": width, "prefill_ms": single_ms})
        if group < 2 or group * prefill_width(width) > engine.group_tokens or width > GROUP_MAX_WIDTH:
            continue
        members = []
        for prompt_ids in _prompts(group, width):
            bank[rid] = prompt_ids
            members.append(Request(rid, 0.0, width, 2))
            rid += 1

        def group_join_leave(reqs: list[Request] = members) -> None:
            engine.join(reqs)
            engine.leave([r.rid for r in reqs])
        passes = engine.work.counts["decode_steps"]
        group_join_leave()
        passes = engine.work.counts["decode_steps"] - passes  # prefill passes of one join: 1 when grouped
        group_ms = _wall_ms(group_join_leave, steps=8)
        rows.append({"kv": kv, "prefill_tokens": width, "group": group, "passes": passes,
                     "group_prefill_ms": group_ms, "per_request_ms": group_ms / group,
                     "single_request_ms": single_ms})
    rows.append({"kv": kv, "shape_misses": engine.shape_misses, "compile_s": engine.compile_s})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm-4-9b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--kv", default="static,quantized")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--prefill", default="64,256,1024")
    parser.add_argument("--group", type=int, default=8, help="requests joining together per grouped prefill")
    parser.add_argument("--json", default="")
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke run (eager, wall-clock times)")
    parser.add_argument("--int8-attention", default="reduction", choices=["reduction", "matmul"],
                        help="ops.INT8_DECODE_ATTENTION for the compiled int8-KV decode step")
    parser.add_argument("--length-step", type=int, default=0, help="the decode_length_step knob (0: one length)")
    args = parser.parse_args(argv)
    ops.INT8_DECODE_ATTENTION = args.int8_attention
    batches = [int(b) for b in args.batches.split(",")]
    prefill = [int(w) for w in args.prefill.split(",") if w]
    device = args.device
    cuda = device.startswith("cuda")
    model = FastGlm(build_model({"preset": args.preset}, torch.bfloat16 if cuda else torch.float32, device, seed=0))
    fast = FastEngine(model, device, compile_step=cuda)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        rows.append({"engine": "FastEngine", "batch": batch, "fast_ms": fast_step_ms(fast, batch, args.prompt)})
        print(rows[-1], flush=True)
    for kv in args.kv.split(","):
        for row in slot_rows(fast, kv, batches, args.prompt, prefill, args.length_step, args.group):
            rows.append(row)
            print(row, flush=True)
    if fast.compile_error:
        print("compile error:", fast.compile_error)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"preset": args.preset, "prompt": args.prompt, "int8_attention": args.int8_attention, "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
