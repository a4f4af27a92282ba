"""Batch-1 decode attention: the fused kernel (`decode_attention=cuda`) per split plan against the
torch ops it replaces (compiled by Inductor, as the fast path runs them), glm-4-9b shape.

    python -m benchmarks.decode_attention [--lengths 256,1024,4096] [--json OUT]

For each cache length, `--layers` layers (each with its own K/V cache, as in decode) run in turn
inside one captured CUDA graph; the replay time / layers is the time per layer. The kernel is
timed for every plan that splits the length (blocks per KV head x keys per block, 4 or 8 warps)
and for the plan `decode_attention.plan` picks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.decode_roofline import versions
from runners.glm.fast_model import attention_bias
from runners.glm.kernels import decode_attention as da
from runners.glm.kernels import woq_cuda
from runners.presets import PRESETS

SHAPE = PRESETS["glm-4-9b"]


def _inputs(length: int, layers: int) -> dict[str, Any]:
    heads, kv_heads, head_dim = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    dev, dtype = "cuda", torch.bfloat16
    width = (heads + 2 * kv_heads) * head_dim
    slot = length - 1  # the newest slot of a full bucket: every key is visible
    angles = torch.rand(1, 1, head_dim // 2, device=dev) * 6.3
    return {
        "qkv": torch.randn(1, 1, width, device=dev, dtype=dtype),
        "bias_qkv": torch.randn(width, device=dev, dtype=dtype) * 0.1,
        "cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype),
        "slots": torch.tensor([slot], device=dev),
        "caches": [(torch.randn(1, kv_heads, length, head_dim, device=dev, dtype=dtype),
                    torch.randn(1, kv_heads, length, head_dim, device=dev, dtype=dtype)) for _ in range(layers)],
        "bias": attention_bias(torch.tensor([slot], device=dev), torch.zeros(1, dtype=torch.long, device=dev),
                               length, dtype),
        "dims": (heads, kv_heads, head_dim),
    }


def _per_layer_seconds(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], caches: list) -> float:
    for k, v in caches:  # compile, plan and allocate outside the capture
        call(k, v)

    def issue() -> None:
        for k, v in caches:
            call(k, v)

    return woq_cuda.graph_seconds(issue, replays=20) / len(caches)


def _plans(length: int) -> list[da.Plan]:
    tiles = -(-length // da.TILE)
    plans = set()
    for splits in range(1, min(tiles, da.MAX_SPLITS) + 1):
        per_split = -(-tiles // splits)
        if -(-tiles // per_split) == splits:
            plans.update(da.Plan(warps, splits, da.TILE * per_split) for warps in (4, 8))
    return sorted(plans, key=lambda p: (p.splits, p.warps))


def measure(length: int, layers: int) -> dict[str, Any]:
    inp = _inputs(length, layers)
    common = (inp["qkv"], inp["bias_qkv"], inp["cos"], inp["sin"], inp["slots"])
    compiled = torch.compile(da.reference, fullgraph=True, dynamic=False)
    result: dict[str, Any] = {"torch_compiled_us": 1e6 * _per_layer_seconds(
        lambda k, v: compiled(*common, k, v, inp["bias"], length, *inp["dims"]), inp["caches"])}
    chosen = da.plan(length)
    kernel_us = {}
    for p in _plans(length):
        kernel_us[f"{p.splits}x{p.keys_per_split}/{p.warps}w"] = 1e6 * _per_layer_seconds(
            lambda k, v, p=p: da.run_kernel(*common, k, v, inp["bias"], length, *inp["dims"], chosen=p),
            inp["caches"])
    result["kernel_us"] = kernel_us
    result["chosen_plan"] = f"{chosen.splits}x{chosen.keys_per_split}/{chosen.warps}w"
    result["best_plan"] = min(kernel_us, key=kernel_us.__getitem__)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if da.compile_error():
        print(f"cannot run: {da.compile_error()}")
        return 1
    report = {"meta": versions(), "rows": {}}
    for length in (int(x) for x in args.lengths.split(",")):
        row = report["rows"][length] = measure(length, args.layers)
        best = row["kernel_us"][row["best_plan"]]
        chosen = row["kernel_us"][row["chosen_plan"]]
        print(f"L={length:>6}: torch ops (compiled) {row['torch_compiled_us']:7.2f} us/layer; kernel chosen "
              f"{row['chosen_plan']} {chosen:6.2f} us, best {row['best_plan']} {best:6.2f} us", flush=True)
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in row["kernel_us"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
