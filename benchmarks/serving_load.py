"""Serving under load: latency vs offered rate and `capacity_rps` at the SLO, per config, in one run.

    python -m benchmarks.serving_load --model glm-4-9b --device cuda --out /tmp/serving_load
    python -m benchmarks.serving_load --configs fast_continuous,hf --out DIR     # a subset
    python -m benchmarks.serving_load --configs hf --no-curve --out DIR          # capacity only
    python -m benchmarks.serving_load --quick --out /tmp/serving_load_quick      # CPU, glm-tiny, minutes

Every point is a trial of the `glm-infer` runner (`GlmInferRunner.run`, in this process so the
built model is reused across the points of one config): a curve point is a plain window at one
Poisson rate (stopped early once decided, as in a study), the capacity is `workload: {mode:
capacity}`, the same code path as a tuner objective `capacity_rps`. A config whose knobs this
build lacks, or that cannot run on the device, is a row `infeasible: <reason>`.

Beside each workload it prints the analytic ceiling: per request, the prefill FLOPs at the
measured matmul rate plus the decode bytes (weights shared by `--ceiling-batch` sequences, and
the request's own KV reads) at the measured copy bandwidth (`runners.measure.ceilings`).
Writes `curve.csv`, `capacity.csv`, `ceilings.csv` and `summary.md` to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runners.contract import InfeasibleConfig, TrialConfig, TrialResult
from runners.knobs import INFER_KNOBS
from runners.workload import make_requests


@dataclass(frozen=True)
class Config:
    name: str
    knobs: dict[str, Any]
    workload: str = "chat"
    note: str = ""


def configs(gpu: bool, batch: int, long_kv_mib: float = 2048.0) -> list[Config]:
    """The configs the issue compares. `engine` and `prefill_chunk_tokens` are knobs of the
    continuous-batching fast engine; a build without them reports those rows infeasible."""
    compiled = {"compile": gpu}
    fast_cont = {"kv_cache": "static", "scheduler": "continuous", "batch_size": batch, "batch_timeout_ms": 2.0,
                 **compiled}
    return [
        Config("hf", {"engine": "hf", "kv_cache": "dynamic", "scheduler": "dynamic", "batch_size": min(batch, 32),
                      "batch_timeout_ms": 10.0}, note="transformers' own loop, the untuned baseline"),
        Config("fast_dynamic", {"kv_cache": "static", "scheduler": "dynamic", "batch_size": min(batch, 32),
                                "batch_timeout_ms": 10.0, **compiled}, note="static batching on the fast engine"),
        Config("fast_continuous", {"engine": "fast", **fast_cont}, note="iteration-level batching"),
        Config("fast_continuous_chunked", {"engine": "fast", **fast_cont, "prefill_chunk_tokens": 256},
               note="chunked prefill mixed with decode"),
        Config("int8_weights", {**fast_cont, "quant_bits": 8, "quant_scheme": "weight_only"}),
        Config("int4_weights", {**fast_cont, "quant_bits": 4, "quant_scheme": "weight_only"}),
        Config("kv_int8", {**fast_cont, "kv_cache": "quantized", "kv_bits": 8}, note="quantized KV cache"),
        Config("shared_no_prefix_cache", fast_cont, "shared_prefix", note="the prefix cache's baseline"),
        Config("prefix_cache", {**fast_cont, "prefix_cache": "lru", "prefix_cache_mib": 1024}, "shared_prefix"),
        # A GPU KV pool of 16 rows for a load that wants more: joins beyond it preempt to host memory.
        Config("offloaded_small_pool", {**fast_cont, "kv_cache": "offloaded", "kv_slots": 16},
               note="16 GPU rows, the rest parked in pinned host memory"),
        # Long prompts under one KV memory budget: int8 KV fits about twice the rows of bf16 KV.
        Config("long_kv_bf16", {**fast_cont, "prefill_chunk_tokens": 512, "kv_memory_mib": long_kv_mib}, "long",
               note=f"KV pool {long_kv_mib:g} MiB"),
        Config("long_kv_int8", {**fast_cont, "prefill_chunk_tokens": 512, "kv_memory_mib": long_kv_mib,
                                "kv_cache": "quantized", "kv_bits": 8}, "long", note=f"KV pool {long_kv_mib:g} MiB"),
    ]


def workloads(quick: bool) -> dict[str, dict[str, Any]]:
    """Chat (the issue's must-show load) and a shared-system-prompt variant of it."""
    if quick:  # glm-tiny on a CPU: short requests
        chat = {"prompt_tokens": {"dist": "lognormal", "mean": 32, "sigma": 0.5, "min": 8, "max": 96},
                "output_tokens": {"dist": "lognormal", "mean": 12, "sigma": 0.6, "min": 2, "max": 32}}
        shared = {"prompt_tokens": {"dist": "lognormal", "mean": 64, "sigma": 0.3, "min": 40, "max": 128},
                  "output_tokens": chat["output_tokens"], "shared_prefix_tokens": 32, "shared_prefix_groups": 2}
    else:
        chat = {"prompt_tokens": {"dist": "lognormal", "mean": 256, "sigma": 0.5, "min": 64, "max": 1024},
                "output_tokens": {"dist": "lognormal", "mean": 96, "sigma": 0.6, "min": 16, "max": 256}}
        shared = {"prompt_tokens": {"dist": "lognormal", "mean": 640, "sigma": 0.2, "min": 544, "max": 1024},
                  "output_tokens": chat["output_tokens"], "shared_prefix_tokens": 512, "shared_prefix_groups": 4}
        # Outputs of ~256 tokens: with ~64 a long request spends ~0.5 s decoding against ~0.2 s
        # prefilling (glm-4-9b, H200), few sequences are ever resident, and capacity is set by
        # prefill FLOPs whatever the KV pool holds; with ~256 the resident sequences outgrow a
        # bf16 pool first, which is the regime a KV policy is chosen for.
        long = {"prompt_tokens": {"dist": "lognormal", "mean": 6000, "sigma": 0.2, "min": 4096, "max": 8192},
                "output_tokens": {"dist": "lognormal", "mean": 256, "sigma": 0.4, "min": 128, "max": 512}}
    if quick:
        long = {"prompt_tokens": {"dist": "lognormal", "mean": 200, "sigma": 0.2, "min": 128, "max": 256},
                "output_tokens": chat["output_tokens"]}
    return {"chat": {"arrival": "poisson", **chat}, "shared_prefix": {"arrival": "poisson", **shared},
            "long": {"arrival": "poisson", **long}}


# ---------------------------------------------------------------- trials


def unknown_knobs(knobs: dict[str, Any]) -> str:
    """Why this build cannot take these knobs, or ''."""
    missing = sorted(set(knobs) - set(INFER_KNOBS))
    if missing:
        return f"knob(s) {missing} not in this build"
    for name, value in knobs.items():
        problem = INFER_KNOBS[name].check(value)
        if problem:
            return f"{name}: {problem}"
    return ""


def run_trial(runner: Any, args: argparse.Namespace, knobs: dict[str, Any], workload: dict[str, Any]
              ) -> tuple[TrialResult | None, str]:
    """(result, '') or (None, 'infeasible: reason' / 'error: ...'); never raises for a config."""
    import torch

    ttft = args.long_slo_ttft_ms if workload.get("name") == "long" else args.slo_ttft_ms
    workload = {k: v for k, v in workload.items() if k != "name"}
    config = TrialConfig("glm-infer", model_spec(args.model), args.device, workload, knobs, seed=args.seed,
                         slo={"ttft_ms": ttft, "tpot_ms": args.slo_tpot_ms})
    try:
        return runner.run(config), ""
    except InfeasibleConfig as exc:
        return None, f"infeasible: {exc}"
    except torch.OutOfMemoryError as exc:
        return None, f"infeasible: out of memory ({str(exc).splitlines()[0][:200]})"
    except Exception as exc:  # noqa: BLE001 - one broken config must not end the benchmark
        return None, f"error: {type(exc).__name__}: {exc}"[:500]


def model_spec(model: str) -> dict[str, Any]:
    return {"path": model} if Path(model).exists() else {"preset": model}


def curve_point(config: Config, rate: float, result: TrialResult | None, why: str) -> dict[str, Any]:
    row: dict[str, Any] = {"config": config.name, "workload": config.workload, "rate_rps": rate}
    if result is None:
        return {**row, "status": why}
    m = result.metrics
    serving = result.info.get("serving", {})
    stopped = result.info.get("stopped_early")
    row.update({key: m.get(key) for key in CURVE_METRICS})
    row.update(status="stopped early: " + stopped["rule"] if stopped else "ok",
               window_end=serving.get("window_end"), offered_rps=serving.get("offered_rps"))
    return row


CURVE_METRICS = ("request_throughput_rps", "throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                 "tpot_p99_ms", "goodput_rps", "mbu", "measured_requests")


def capacity_row(config: Config, result: TrialResult | None, why: str, ceiling: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"config": config.name, "workload": config.workload, "note": config.note,
                           "ceiling_rps": ceiling["ceiling_rps"]}
    if result is None:
        return {**row, "status": why}
    m = result.metrics
    search = result.info.get("serving", {}).get("capacity", {})
    capacity = m.get("capacity_rps")
    row.update(capacity_rps=capacity, capacity_tok_s=m.get("capacity_tok_s"),
               of_ceiling=None if capacity is None else capacity / ceiling["ceiling_rps"],
               ttft_p99_ms=m.get("ttft_p99_ms"), tpot_p99_ms=m.get("tpot_p99_ms"), mbu=m.get("mbu"),
               probes=len(search.get("probes", [])), converged=search.get("converged"),
               setup_s=m.get("setup_s"),
               status="ok" if capacity is not None else "no capacity: " + result.unavailable.get("capacity_rps", "?"))
    return row


# ---------------------------------------------------------------- the analytic ceiling


def model_shape(spec: dict[str, Any]) -> dict[str, float]:
    """Parameter counts and KV bytes per token of the model, counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from runners.glm.model import model_config

    cfg = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"linear_params": float(linear), "params": float(total), "layers": float(cfg.num_hidden_layers),
            "heads": float(cfg.num_attention_heads), "kv_heads": float(cfg.num_key_value_heads),
            "head_dim": float(head_dim)}


def analytic_ceiling(shape: dict[str, float], workload: dict[str, Any], matmul_flops_per_s: float,
                     copy_bytes_per_s: float, batch: int, dtype_bytes: float = 2.0, samples: int = 4000
                     ) -> dict[str, float]:
    """Requests per second no server can beat on this device, for this workload's lengths.

    Per request: prefill = 2 x linear params x prompt + causal attention 2 x layers x heads x
    head_dim x prompt^2 FLOPs, at the matmul rate; decode = per generated token the weights
    shared by `batch` running sequences plus this sequence's KV (2 x layers x kv heads x head_dim
    x context x dtype bytes), at the copy bandwidth. Means over the workload's sampled lengths.
    """
    requests = make_requests({**workload, "arrival": "constant", "rate_rps": 1.0}, samples, 0)
    prompt = np.array([r.prompt_tokens for r in requests], dtype=float)
    output = np.array([r.output_tokens for r in requests], dtype=float)
    layers, heads, kv_heads, head_dim = shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    prefill_flops = 2 * shape["linear_params"] * prompt + 2 * layers * heads * head_dim * prompt**2
    kv_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    context_sum = output * prompt + output * (output - 1) / 2  # KV positions read over the decode steps
    decode_bytes = output * shape["params"] * dtype_bytes / batch + kv_per_token * context_sum
    prefill_s = float(prefill_flops.mean()) / matmul_flops_per_s
    decode_s = float(decode_bytes.mean()) / copy_bytes_per_s
    return {"prefill_ms": prefill_s * 1e3, "decode_ms": decode_s * 1e3, "ceiling_rps": 1.0 / (prefill_s + decode_s),
            "mean_prompt_tokens": float(prompt.mean()), "mean_output_tokens": float(output.mean()),
            "ceiling_batch": float(batch)}


# ---------------------------------------------------------------- output


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary(args: argparse.Namespace, env: dict[str, Any], ceilings: dict[str, dict[str, float]],
            capacity: list[dict[str, Any]], curve: list[dict[str, Any]], measured: dict[str, Any]) -> str:
    parts = [f"# Serving load: {args.model} on {env.get('device_name')} ({args.device})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, torchao {env.get('torchao')}, driver {env.get('driver')}; measured "
             f"ceilings: matmul {measured['matmul_tflop_s']:.1f} TFLOP/s, copy {measured['copy_gb_s']:.0f} GB/s.",
             f"SLO: TTFT p99 <= {args.slo_ttft_ms:g} ms, TPOT p99 <= {args.slo_tpot_ms:g} ms; seed {args.seed}.",
             "", "## Analytic ceilings", "",
             markdown_table([{"workload": w, **c} for w, c in ceilings.items()],
                            ["workload", "mean_prompt_tokens", "mean_output_tokens", "prefill_ms", "decode_ms",
                             "ceiling_batch", "ceiling_rps"]),
             "", "## Capacity at the SLO", "",
             markdown_table(capacity, ["config", "workload", "capacity_rps", "capacity_tok_s", "ceiling_rps",
                                       "of_ceiling", "ttft_p99_ms", "tpot_p99_ms", "mbu", "probes", "status",
                                       "note"]),
             "", "## Latency vs offered rate", "",
             markdown_table(curve, ["config", "workload", "rate_rps", "request_throughput_rps", "throughput_tok_s",
                                    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "mbu", "status"])]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="glm-4-9b", help="preset name or local checkpoint folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, help="folder for curve.csv, capacity.csv, summary.md")
    parser.add_argument("--configs", default="", help="comma-separated names (default: all)")
    parser.add_argument("--rates", default="2,4,8,16,24,32,48", help="offered rates of the curve (req/s)")
    parser.add_argument("--no-curve", action="store_true", help="capacity only")
    parser.add_argument("--no-capacity", action="store_true", help="the latency curve only")
    parser.add_argument("--point-s", type=float, default=15.0, help="arrival span of one curve point (s)")
    parser.add_argument("--min-requests", type=int, default=64, help="fewest requests of one curve point")
    parser.add_argument("--probe-requests", type=int, default=400, help="fewest requests of one capacity probe")
    parser.add_argument("--probe-s", type=float, default=10.0, help="shortest arrival span of one capacity probe")
    parser.add_argument("--max-duration-s", type=float, default=40.0, help="hard length of one window")
    parser.add_argument("--capacity-range", default="1,128", help="min,max rate of the capacity search")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative bracket of the capacity")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--long-slo-ttft-ms", type=float, default=3000.0,
                        help="TTFT p99 bound of the long-prompt workload (prompts of 4k-8k tokens)")
    parser.add_argument("--long-kv-mib", type=float, default=2048.0,
                        help="KV memory budget (kv_memory_mib) of the long-prompt configs")
    parser.add_argument("--batch", type=int, default=64, help="batch_size of the fast configs (max running)")
    parser.add_argument("--ceiling-batch", type=int, default=64, help="sequences sharing a weight read (ceiling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="glm-tiny on CPU, small budget (a smoke test)")
    if "--quick" in argv:  # its own defaults; flags given still win
        # A shared 2-core machine serves glm-tiny at a few req/s with TPOT ~100 ms: a loose SLO.
        parser.set_defaults(model="glm-tiny", device="cpu", rates="4,32", point_s=3.0, min_requests=12,
                            probe_requests=24, probe_s=4.0, max_duration_s=10.0, capacity_range="1,256",
                            tolerance=0.3, slo_ttft_ms=5000.0, slo_tpot_ms=500.0, batch=8, ceiling_batch=8)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from runners.base import resolve_device
    from runners.infer import GlmInferRunner
    from runners.measure.ceilings import get_ceilings
    from runners.measure.environment import describe

    args.device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in configs(args.device.startswith("cuda"), args.batch, args.long_kv_mib)
              if not args.configs or c.name in args.configs.split(",")]
    if args.configs and len(chosen) != len(args.configs.split(",")):
        known = ", ".join(c.name for c in configs(True, args.batch))
        print(f"unknown config in --configs {args.configs!r}; known: {known}", file=sys.stderr)
        return 2
    loads = workloads(args.quick)
    ceil = get_ceilings(args.device)
    measured = {"matmul_tflop_s": ceil.matmul_flops_per_s / 1e12, "copy_gb_s": ceil.copy_bytes_per_s / 1e9}
    shape = model_shape(model_spec(args.model))
    ceilings = {name: analytic_ceiling(shape, w, ceil.matmul_flops_per_s, ceil.copy_bytes_per_s, args.ceiling_batch)
                for name, w in loads.items() if any(c.workload == name for c in chosen)}
    for name, c in ceilings.items():
        print(f"ceiling {name}: prefill {c['prefill_ms']:.2f} ms + decode {c['decode_ms']:.2f} ms per request "
              f"-> {c['ceiling_rps']:.1f} req/s")
    runner = GlmInferRunner()
    low, high = (float(x) for x in args.capacity_range.split(","))
    rates = [] if args.no_curve else [float(r) for r in args.rates.split(",")]
    curve: list[dict[str, Any]] = []
    capacity: list[dict[str, Any]] = []
    for config in chosen:
        base = {**loads[config.workload], "warmup_requests": 8 if not args.quick else 2, "eval_sequences": 2,
                "eval_tokens": 32, "max_duration_s": args.max_duration_s, "name": config.workload}
        refused = unknown_knobs(config.knobs)
        for rate in rates:
            requests = max(args.min_requests, int(math.ceil(rate * args.point_s)))
            result, why = (None, f"infeasible: {refused}") if refused else run_trial(
                runner, args, config.knobs, {**base, "rate_rps": rate, "requests": requests})
            curve.append(curve_point(config, rate, result, why))
            print(json.dumps(curve[-1], default=str), flush=True)
            if why.startswith("infeasible"):
                refused = why.removeprefix("infeasible: ")  # the other rates cannot run either
        if args.no_capacity:
            continue
        result, why = (None, f"infeasible: {refused}") if refused else run_trial(
            runner, args, config.knobs, {**base, "mode": "capacity", "requests": args.probe_requests,
                                         "capacity_min_rps": low, "capacity_max_rps": high,
                                         "capacity_tolerance": args.tolerance, "capacity_probe_s": args.probe_s})
        capacity.append(capacity_row(config, result, why, ceilings[config.workload]))
        print(json.dumps(capacity[-1], default=str), flush=True)
    for name, rows in (("curve.csv", curve), ("capacity.csv", capacity)):
        if rows:
            write_csv(out / name, rows)
    write_csv(out / "ceilings.csv", [{"workload": w, **c} for w, c in ceilings.items()])
    text = summary(args, describe(args.device), ceilings, capacity, curve, measured)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
