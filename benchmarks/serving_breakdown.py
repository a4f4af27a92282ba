"""Where a serving window's time goes: prefill vs decode steps of the slot pool, per trial.

    python -m benchmarks.serving_breakdown OUT.json chat,cap64,kv8,mbu     # glm-4-9b on cuda:0
    BREAKDOWN_PRESET=glm-tiny BREAKDOWN_DEVICE=cpu python -m benchmarks.serving_breakdown OUT.json mbu,kv8

Runs trials of the `glm-infer` runner in this process (the model is built once) on the issue-16
chat load and wraps the slot engine's `join`, `advance` and `step` (each ends in a device sync,
so their wall time is the device's) to sum the time spent prefilling and decoding, per running
batch size, next to the trial's metrics and set-up split. Warm-up requests are included.
Labels: chat (24 and 32 req/s), cap64 / cap128 (capacity search at batch 64 / 128), mbu (12
req/s), kv8 (int8 KV at 24 req/s), masked (decode_length_step 2), long (capacity of 4k-8k-token
prompts under a 2 GiB KV budget, bf16 vs int8 KV). BENCHMARKS.md, "Serving under load, second
pass", has a run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

from runners.contract import InfeasibleConfig, TrialConfig
from runners.glm.engines import slots as se
from runners.infer import GlmInferRunner

TIMES: dict[str, list[float]] = defaultdict(list)


def wrap(name):
    orig = getattr(se.SlotEngine, name)

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        out = orig(self, *a, **k)
        TIMES[name + ("" if name != "step" else f"_b{len(self.rows)}")].append(time.perf_counter() - t0)
        if name == "join":
            TIMES["join_requests"].append(len(a[0]))
        return out
    setattr(se.SlotEngine, name, timed)


for n in ("join", "step", "advance"):
    wrap(n)

CHAT = {"arrival": "poisson", "prompt_tokens": {"dist": "lognormal", "mean": 256, "sigma": 0.5, "min": 64, "max": 1024},
        "output_tokens": {"dist": "lognormal", "mean": 96, "sigma": 0.6, "min": 16, "max": 256},
        "warmup_requests": 8, "eval_sequences": 2, "eval_tokens": 32, "max_duration_s": 40}
# The long-context load of benchmarks/serving_load.py (its comment says why outputs of ~256).
LONG = {**CHAT, "prompt_tokens": {"dist": "lognormal", "mean": 6000, "sigma": 0.2, "min": 4096, "max": 8192},
        "output_tokens": {"dist": "lognormal", "mean": 256, "sigma": 0.4, "min": 128, "max": 512}}
BASE = {"engine": "fast", "kv_cache": "static", "scheduler": "continuous", "batch_size": 64,
        "batch_timeout_ms": 2.0, "compile": os.environ.get("BREAKDOWN_DEVICE", "cuda:0") != "cpu"}
runner = GlmInferRunner()
OUT = sys.argv[1]
rows = []


def run(label, knobs, workload, slo_ttft=1000.0):
    TIMES.clear()
    cfg = TrialConfig("glm-infer", {"preset": os.environ.get("BREAKDOWN_PRESET", "glm-4-9b")},
                      os.environ.get("BREAKDOWN_DEVICE", "cuda:0"), workload, {**BASE, **knobs}, seed=0,
                      slo={"ttft_ms": slo_ttft, "tpot_ms": 50.0})
    t0 = time.perf_counter()
    try:
        r = runner.run(cfg)
    except InfeasibleConfig as exc:
        print(label, "INFEASIBLE", exc, flush=True)
        return
    wall = time.perf_counter() - t0
    m = r.metrics
    keys = ["capacity_rps", "capacity_tok_s", "throughput_tok_s", "request_throughput_rps", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "mbu", "kl_divergence", "peak_memory_mib", "setup_s",
            "setup_build_s", "setup_compress_s", "setup_compile_s", "setup_quality_s", "measured_requests"]
    row = {"label": label, "wall_s": round(wall, 1), **{k: round(m[k], 4) for k in keys if k in m}}
    row["compile_error"] = r.info.get("compile_error", "")
    row["kv_pool"] = r.info.get("kv_pool")
    row["stopped"] = (r.info.get("stopped_early") or {}).get("rule")
    row["misses"] = r.info.get("serving", {}).get("engine_work", {}).get("shape_misses")
    row["window_s"] = r.info.get("serving", {}).get("window_s")
    cap = r.info.get("serving", {}).get("capacity")
    if cap:
        row["probes"] = [(round(p.get("rate_rps", 0), 2), p.get("passed"), p.get("how"),
                          {k: None if v is None else round(v) for k, v in p.get("p99_ms", {}).items()},
                          round(p.get("window_s", 0), 1)) for p in cap.get("probes", [])]
    br = {}
    for k, v in TIMES.items():
        if k == "join_requests":
            br[k] = sum(v)
        else:
            br[k] = (len(v), round(sum(v), 2), round(1e3 * sum(v) / max(1, len(v)), 2))
    row["breakdown"] = dict(sorted(br.items()))
    rows.append(row)
    print(json.dumps(row, default=str), flush=True)
    with open(OUT, "w") as fh:
        json.dump(rows, fh, indent=1, default=str)


which = sys.argv[2].split(",")
if "chat" in which:
    run("chat 24rps b64", {}, {**CHAT, "rate_rps": 24, "requests": 360})
    run("chat 32rps b64", {}, {**CHAT, "rate_rps": 32, "requests": 400})
if "cap64" in which:
    run("capacity b64", {}, {**CHAT, "mode": "capacity", "requests": 300, "capacity_min_rps": 16,
                             "capacity_max_rps": 64, "capacity_tolerance": 0.05, "capacity_probe_s": 8})
if "cap128" in which:
    run("capacity b128", {"batch_size": 128}, {**CHAT, "mode": "capacity", "requests": 300, "capacity_min_rps": 16,
                                                "capacity_max_rps": 64, "capacity_tolerance": 0.05,
                                                "capacity_probe_s": 8})
if "mbu" in which:
    run("chat 12rps b64", {}, {**CHAT, "rate_rps": 12, "requests": 240})
if "kv8" in which:
    run("chat 24rps b64 kv int8", {"kv_cache": "quantized", "kv_bits": 8}, {**CHAT, "rate_rps": 24, "requests": 360})
if "masked" in which:
    run("chat 24rps b64 masked(step2)", {"decode_length_step": 2}, {**CHAT, "rate_rps": 24, "requests": 360})
for lab, kv in (("long bf16", {}), ("long int8", {"kv_cache": "quantized", "kv_bits": 8})):
    if "long" in which:
        run("capacity " + lab, {"prefill_chunk_tokens": 512, "kv_memory_mib": 2048, **kv},
            {**LONG, "mode": "capacity", "requests": 60, "capacity_min_rps": 0.25, "capacity_max_rps": 8,
             "capacity_tolerance": 0.1, "capacity_probe_s": 10}, slo_ttft=3000.0)
print("done", flush=True)
