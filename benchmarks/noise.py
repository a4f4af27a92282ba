"""Repeatability: one config served N times in one process; coefficient of variation of the
throughput and of p99 latency, plus each repeat's memory and energy cross-checks. Usage:

    python -m benchmarks.noise --preset glm-1b --batch 16 --repeats 5 --json out.json
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from benchmarks.overhead import build_engine, emit, engine_parser
from runners.base import resolve_device
from runners.serving import serve

CHECKS = ("peak_memory_mib", "torch_peak_reserved_mib", "torch_peak_allocated_mib", "mean_power_w",
          "energy_j_per_tok", "mbu", "mfu", "measured_requests")
INFO = ("window_s", "nvml_minus_torch_reserved_mib", "nvml_device_used_peak_mib", "energy_counter_j",
        "energy_power_integral_j", "energy_counter_vs_integral", "power_source", "sample_interval_median_s",
        "samples", "nvml_unavailable_fields", "nvml_note_process_used_mib", "ceilings")


def cv(values: list[float]) -> float:
    """Sample coefficient of variation (ddof=1)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.std(ddof=1) / arr.mean())


def repeat(engine: Any, device: str, workload: dict[str, Any], knobs: dict[str, Any], repeats: int
           ) -> dict[str, Any]:
    runs = []
    for i in range(repeats):
        # Same seed every time: identical requests, so what varies is the system alone.
        outcome = serve(engine, device, workload, knobs, seed=0, slo={})
        m = outcome.metrics
        row = {"throughput_tok_s": m["throughput_tok_s"], "latency_p99_ms": m["latency_p99_ms"],
               "latency_p99_ms_ci_low": m.get("latency_p99_ms_ci_low"),
               "latency_p99_ms_ci_high": m.get("latency_p99_ms_ci_high"),
               "tpot_p50_ms": m["tpot_p50_ms"], "ttft_p99_ms": m["ttft_p99_ms"],
               **{k: m.get(k) for k in CHECKS}, **{k: outcome.info.get(k) for k in INFO},
               "unavailable": {k: v for k, v in outcome.unavailable.items() if k in CHECKS}}
        print(f"repeat {i}: {json.dumps(row, default=str)}", flush=True)
        runs.append(row)
    return {"runs": runs,
            "cv_throughput": cv([r["throughput_tok_s"] for r in runs]),
            "cv_latency_p99": cv([r["latency_p99_ms"] for r in runs]),
            "cv_tpot_p50": cv([r["tpot_p50_ms"] for r in runs])}


def main() -> None:
    parser = engine_parser(__doc__, batch=8, output_tokens=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--scheduler", default="dynamic", choices=("dynamic", "continuous"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    engine = build_engine(args.preset, device)
    # Closed loop at concurrency = batch: the engine is always busy, as in a throughput test.
    workload = {"arrival": "closed", "concurrency": args.batch, "requests": args.requests,
                "warmup_requests": args.batch, "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens}
    knobs = {"batch_size": args.batch, "batch_timeout_ms": 5.0, "scheduler": args.scheduler,
             "kv_cache": "dynamic"}
    result = {"preset": args.preset, "device": device, "workload": workload, "knobs": knobs,
              **repeat(engine, device, workload, knobs, args.repeats)}
    emit(result, args.json, shown={k: v for k, v in result.items() if k != "runs"})


if __name__ == "__main__":
    main()
