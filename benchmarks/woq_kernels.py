"""Weight bandwidth of the packed int8/int4 kernels (Triton, and at one row the CUDA GEMVs) against
bf16 cuBLAS, per glm-4-9b linear shape.

    python -m benchmarks.woq_kernels [--rows 1,32] [--json OUT]

For each shape, `--layers` distinct weights (as many as the model has layers, so the weights
stream from HBM as in decode, not from the 50 MB L2) are multiplied in turn inside one captured
CUDA graph; the replay time / layers is the time per call. Prints GB/s of weight bytes read
(data + scales) and that as a fraction of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from benchmarks.decode_roofline import copy_bandwidth, versions
from runners.glm import woq
from runners.glm.kernels import woq_cuda

# (name, out_features, in_features) of glm-4-9b's per-layer linears and its output projection
SHAPES = [("qkv", 4608, 4096), ("o_proj", 4096, 4096), ("gate_up", 27392, 4096), ("down", 4096, 13696),
          ("lm_head", 151552, 4096),
          # not a model shape: 0.5 MB of bf16, so its time is the per-call floor of each kernel
          # (launch, first bytes, last block) that every GEMV of a decode step pays
          ("floor", 64, 4096)]


def time_calls(fn_per_layer: list[Any], x: torch.Tensor, replays: int = 20) -> float:
    """Seconds per call: all layers' calls captured in one CUDA graph, replayed."""
    for fn in fn_per_layer:  # autotune / warm up outside the capture
        fn(x)

    def issue() -> None:
        for fn in fn_per_layer:
            fn(x)

    return woq_cuda.graph_seconds(issue, replays) / len(fn_per_layer)


def measure_shape(out_features: int, in_features: int, rows: int, layers: int) -> dict[str, Any]:
    dense = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
             for _ in range(layers)]
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    variants: dict[str, list[Any]] = {"bf16": dense}
    variants["int8"] = [woq.quantize_int8(w) for w in dense]
    variants["int4-g128"] = [woq.quantize_int4(w, 128) for w in dense]
    if rows == 1:  # the CUDA GEMVs (quant_kernel: cuda) take one row; more rows run the Triton matmul
        variants["int8-cuda"] = [w._replace(gemv="cuda") for w in variants["int8"]]
        variants["int4-g128-cuda"] = [w._replace(gemv="cuda") for w in variants["int4-g128"]]
    result: dict[str, Any] = {}
    for name, weights in variants.items():
        first = weights[0]
        nbytes = sum(t.numel() * t.element_size() for t in (first.tensors() if isinstance(first, tuple) else [first]))
        # woq.linear is F.linear for a dense weight and our kernels for a packed one.
        seconds = time_calls([lambda inp, w=w: woq.linear(inp, w) for w in weights], x)
        result[name] = {"us": seconds * 1e6, "weight_bytes": nbytes, "bytes_per_s": nbytes / seconds}
    del variants
    del dense
    torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1", help="activation rows (batch), comma-separated")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    bandwidth, source = copy_bandwidth("cuda:0")
    meta = {**versions(), "copy_bytes_per_s": bandwidth, "bandwidth_source": source}
    print(json.dumps(meta), flush=True)
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name, n, k in SHAPES:
            layers = args.layers if name != "lm_head" else 4
            res = measure_shape(n, k, rows, layers)
            line = "  ".join(f"{v}: {r['us']:7.1f} us {r['bytes_per_s'] / 1e12:5.2f} TB/s "
                             f"({r['bytes_per_s'] / bandwidth:4.2f})" for v, r in res.items())
            print(f"M={rows:<4} {name:<8} {n:>6}x{k:<6} {line}", flush=True)
            rows_out.append({"rows": rows, "shape": name, "n": n, "k": k, **res})
    from runners.glm.kernels import woq_triton

    tuned = {**woq_triton.best_configs(), "cuda_gemv": woq_cuda.chosen_variants()}
    print(json.dumps(tuned, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows_out, "tuned": tuned}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
