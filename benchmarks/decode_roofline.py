"""Decode speed of the reference GLM stack against the memory-bandwidth roofline.

    python -m benchmarks.decode_roofline [--preset glm-4-9b] [--configs bf16,int8,...] [--json OUT]

For each config: build the model (random weights, seeded), compress it, compile and capture the
decode step (time reported apart, as compile_s), prefill a 128-token prompt, then time decode
steps with CUDA events. Prints ms/step, tok/s and MBU = bytes per step / time / measured copy
bandwidth, where bytes per step = stored weight bytes read by decode (all but the embedding;
torchao/2:4 tensors counted by their real storage) + the live KV of every row.
Ratios against bf16 come from the same run; a `+attn` config (decode_attention=cuda) is compared
with `bf16+attn`, the same attention path.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from runners.contract import InfeasibleConfig
from runners.glm.compress import apply_quantization, apply_sparsity
from runners.glm.engines.build import graph_min_batch, inductor_options
from runners.glm.engines.fast import FastEngine
from runners.glm.engines.hf import HFEngine
from runners.glm.fast_model import FastGlm
from runners.glm.kernels import cuda_launch
from runners.glm.model import build_model, model_info
from runners.measure.cuda_timer import cuda_seconds

PROMPT_TOKENS = 128

# name -> (knobs, engine): "fast" = static KV + compiled layer + CUDA graphs; "fast-eager" = the
# same without torch.compile (eager ops, still graph-captured); "hf" = transformers' eager loop.
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "bf16": ({}, "fast"),
    "int8": ({"quant_bits": 8}, "fast"),
    "int8+head": ({"quant_bits": 8, "quantize_lm_head": True}, "fast"),
    "int4": ({"quant_bits": 4}, "fast"),
    "int4+head": ({"quant_bits": 4, "quantize_lm_head": True}, "fast"),
    "int4+head-g256": ({"quant_bits": 4, "quantize_lm_head": True, "quant_group_size": 256}, "fast"),
    # quant_kernel=triton: our packed layout + Triton GEMV (runners/glm/woq*.py), same bits.
    "int8-tr": ({"quant_bits": 8, "quant_kernel": "triton"}, "fast"),
    "int8-tr+head": ({"quant_bits": 8, "quant_kernel": "triton", "quantize_lm_head": True}, "fast"),
    "int4-tr": ({"quant_bits": 4, "quant_kernel": "triton"}, "fast"),
    "int4-tr+head": ({"quant_bits": 4, "quant_kernel": "triton", "quantize_lm_head": True}, "fast"),
    "int4-tr+head-g64": ({"quant_bits": 4, "quant_kernel": "triton", "quantize_lm_head": True,
                          "quant_group_size": 64}, "fast"),
    # quant_kernel=cuda: same layout, hand-written CUDA GEMV at batch 1 (runners/glm/kernels/woq_gemv.cu).
    "int8-cu": ({"quant_bits": 8, "quant_kernel": "cuda"}, "fast"),
    "int8-cu+head": ({"quant_bits": 8, "quant_kernel": "cuda", "quantize_lm_head": True}, "fast"),
    "int4-cu": ({"quant_bits": 4, "quant_kernel": "cuda"}, "fast"),
    "int4-cu+head": ({"quant_bits": 4, "quant_kernel": "cuda", "quantize_lm_head": True}, "fast"),
    # decode_attention=cuda: bias, rope, cache write and attention in one kernel (decode_attention.cu).
    "bf16+attn": ({"decode_attention": "cuda"}, "fast"),
    "int8-cu+head+attn": ({"quant_bits": 8, "quant_kernel": "cuda", "quantize_lm_head": True,
                           "decode_attention": "cuda"}, "fast"),
    "int4-cu+head+attn": ({"quant_bits": 4, "quant_kernel": "cuda", "quantize_lm_head": True,
                           "decode_attention": "cuda"}, "fast"),
    # The same two without programmatic dependent launch of the captured GEMVs (what PDL gives).
    "int8-cu+head-nopdl": ({"quant_bits": 8, "quant_kernel": "cuda", "quantize_lm_head": True}, "fast"),
    "int4-cu+head-nopdl": ({"quant_bits": 4, "quant_kernel": "cuda", "quantize_lm_head": True}, "fast"),
    "int8dyn": ({"quant_bits": 8, "quant_scheme": "dynamic_activation"}, "fast"),
    "fp8": ({"quant_bits": 8, "quant_scheme": "fp8"}, "fast"),
    "2:4": ({"sparsity": 0.5, "sparsity_kind": "2:4"}, "fast"),
    "fp8+2:4": ({"quant_bits": 8, "quant_scheme": "fp8", "sparsity": 0.5, "sparsity_kind": "2:4"}, "fast"),
    "bf16-eager": ({}, "fast-eager"),
    "int8-eager": ({"quant_bits": 8}, "fast-eager"),
    "hf-dynamic": ({"kv_cache": "dynamic"}, "hf"),
    "hf-offloaded": ({"kv_cache": "offloaded"}, "hf"),
    "hf-quantized4": ({"kv_cache": "quantized", "kv_bits": 4}, "hf"),
}


@dataclass
class Row:
    config: str
    batch: int
    ms_per_step: float = float("nan")
    tok_s: float = float("nan")
    bytes_per_step: float = float("nan")
    mbu: float = float("nan")
    compile_s: float = float("nan")
    speedup_vs_bf16: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def copy_bandwidth(device: str) -> tuple[float, str]:
    """Bytes/s of a large device-to-device copy (read + written), as runners.measure.ceilings measures it."""
    from runners.measure.ceilings import get_ceilings

    return get_ceilings(device).copy_bytes_per_s, "runners.measure.ceilings"


def build(preset: str, knobs: dict[str, Any], kind: str, device: str) -> torch.nn.Module:
    model = build_model({"preset": preset}, torch.bfloat16, device, seed=0)
    if kind.startswith("fast"):
        model = FastGlm(model)
    apply_sparsity(model, knobs, device)
    apply_quantization(model, knobs, device)
    return model


def profile_steps(engine: FastEngine, slot: Any, steps: int = 5, top: int = 24) -> dict[str, Any]:
    """Kernel time per decode step by kernel name (CUPTI sees the kernels inside graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(slot)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            entry = totals.setdefault(event.name[:90], [0.0, 0])
            entry[0] += event.device_time_total / steps / 1e3  # ms per step
            entry[1] += 1 / steps
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    kernel_ms = sum(v[0] for v in totals.values())
    kernels = sum(v[1] for v in totals.values())
    print(f"  profile: {kernels:.0f} kernels/step, {kernel_ms:.3f} ms kernel time/step")
    for name, (ms, count) in ranked[:top]:
        print(f"    {ms:7.3f} ms {count:5.0f}x  {name}")
    return {"kernels_per_step": kernels, "kernel_ms_per_step": kernel_ms,
            "top": [(n, round(v[0], 4), v[1]) for n, v in ranked[:top]]}


PROFILE: set[str] = set()  # "config:batch" items to profile after timing
PROFILE_NAME = [""]  # the config being measured


def time_fast(engine: FastEngine, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """Median ms per replayed decode step, and the compile+capture seconds of its bucket."""
    new_tokens = 8 + steps * repeats  # 128 + 104 fits the 256-slot length bucket
    compile_s = engine.prepare(batch, PROMPT_TOKENS + new_tokens, batches=[batch])
    prompts = [[3 + (7 * r + i) % 1000 for i in range(PROMPT_TOKENS)] for r in range(batch)]
    slot = engine.start(prompts, new_tokens)
    for _ in range(8):
        engine.step(slot)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step(slot)
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.1:  # pathological config: time fewer steps, same method
        steps = 4
    per_step = [cuda_seconds(lambda: engine.step(slot), steps) * 1e3 for _ in range(repeats)]
    if f"{PROFILE_NAME[0]}:{batch}" in PROFILE:
        profile_steps(engine, slot)
    return statistics.median(per_step), compile_s


def time_hf(engine: HFEngine, batch: int, steps: int) -> float:
    """Median ms between decode steps of transformers' eager loop (host-synchronised per step)."""
    prompts = [[3 + (7 * r + i) % 1000 for i in range(PROMPT_TOKENS)] for r in range(batch)]
    stamps = []
    for _ in engine.decode(prompts, steps + 1):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # skip prefill
    return statistics.median(gaps) * 1e3


def measure(name: str, batch: int, preset: str, device: str, bandwidth: float, steps: int,
            repeats: int) -> Row:
    knobs, kind = CONFIGS[name]
    PROFILE_NAME[0] = name
    cuda_launch.use_pdl = not name.endswith("-nopdl")
    row = Row(name, batch)
    try:
        model = build(preset, knobs, kind, device)
    except InfeasibleConfig as exc:
        row.note = f"infeasible: {exc}"
        return row
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA state poisoned by an earlier config
        row.note = f"error while building: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    info = model_info(model)
    try:
        if kind.startswith("fast"):
            full_knobs = {"quant_bits": 16, "quant_scheme": "weight_only", "quant_kernel": "torchao", **knobs}
            engine = FastEngine(model, device, compile_step=kind == "fast", graph_min_batch=graph_min_batch(full_knobs),
                                inductor_options=inductor_options(full_knobs),
                                fused_attention=knobs.get("decode_attention") == "cuda")
            row.ms_per_step, row.compile_s = time_fast(engine, batch, steps, repeats)
            if engine.compile_error:
                row.note = f"compile failed, eager graph: {engine.compile_error}"
            if batch < engine.graph_min_batch:
                row.note += f"no CUDA graph below batch {engine.graph_min_batch}"
            live = PROMPT_TOKENS + 8 + steps * repeats // 2
        else:
            engine = HFEngine(model, device, knobs["kv_cache"], int(knobs.get("kv_bits", 4)), lambda r: [])
            row.ms_per_step = time_hf(engine, batch, steps=16)
            live = PROMPT_TOKENS + 8
    except InfeasibleConfig as exc:
        row.note = f"infeasible: {exc}"
        return row
    except Exception as exc:  # noqa: BLE001 - a config that breaks is a finding, not a crash
        row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return row
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    row.bytes_per_step = info.decode_weight_bytes + batch * live * info.kv_bytes_per_token
    row.tok_s = batch * 1e3 / row.ms_per_step
    row.mbu = row.bytes_per_step / (row.ms_per_step / 1e3) / bandwidth
    row.extra = {"decode_weight_bytes": info.decode_weight_bytes, "kv_bytes_per_token": info.kv_bytes_per_token,
                 "live_kv_tokens_per_row": live}
    return row


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for pkg in ("transformers", "torchao", "optimum-quanto"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def print_table(rows: list[Row], bandwidth: float) -> None:
    print(f"\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written)")
    print(f"{'config':<14}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'GB/step':>9}{'MBU':>7}"
          f"{'vs bf16':>9}{'compile s':>11}  note")
    for r in rows:
        print(f"{r.config:<14}{r.batch:>6}{r.ms_per_step:>10.2f}{r.tok_s:>10.0f}{r.bytes_per_step / 1e9:>9.2f}"
              f"{r.mbu:>7.2f}{r.speedup_vs_bf16:>9.2f}{r.compile_s:>11.1f}  {r.note}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="glm-4-9b")
    parser.add_argument("--configs", default="bf16:1,bf16:32,int8:1,int4:1,int4+head:1")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new config after this")
    parser.add_argument("--json", default="")
    parser.add_argument("--profile", default="", help="config:batch items to profile, comma-separated")
    args = parser.parse_args(argv)
    PROFILE.update(p for p in args.profile.split(",") if p)
    device = "cuda:0"
    bandwidth, source = copy_bandwidth(device)
    meta = {**versions(), "copy_bytes_per_s": bandwidth, "bandwidth_source": source, "preset": args.preset}
    print(json.dumps(meta), flush=True)
    rows: list[Row] = []
    t0 = time.perf_counter()
    for item in args.configs.split(","):
        name, _, batch = item.rpartition(":")
        if time.perf_counter() - t0 > args.budget_s:
            rows.append(Row(name, int(batch), note="skipped: time budget"))
            continue
        row = measure(name, int(batch), args.preset, device, bandwidth, args.steps, args.repeats)
        # Against bf16 with the same attention path: a +attn config against bf16+attn.
        base_name = "bf16+attn" if name.endswith("+attn") else "bf16"
        base = next((r for r in rows if r.config == base_name and r.batch == row.batch), None)
        if base is not None:
            row.speedup_vs_bf16 = base.ms_per_step / row.ms_per_step
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    print_table(rows, bandwidth)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
