"""A small training-stack study on one GPU: glm-4-9b layer shape, fewer layers, tuned by the CLI.

    python benchmarks/train_study.py --out DIR [--trials 14] [--timeout-min 7] [--num-layers 4]

Writes DIR/train_memory_gpu.yaml (search_spaces/train_memory.yaml with the GPU changes its
header comment names), runs `python -m tuner` on it, then `python -m tuner report`, and
summarises every trial (DIR/summary.md, DIR/trials.json): the baseline (runner defaults:
micro-batch 1, fp32, no compile), the best feasible config by tokens/s, the speed-up factor and
its MFU. `--direct` skips the tuner and measures a fixed handful of configs, each in its own
`python -m runners.child` process (OOM there is an infeasible result, as in a study).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.knobs import TRAIN_KNOBS  # noqa: E402 - after the path fix-up, torch-free

# The runner's defaults, seq_len aside (a workload choice, fixed per study).
BASELINE = {name: knob.default for name, knob in TRAIN_KNOBS.items()
            if name not in ("dtype", "memory_limit_mib", "seq_len")}

# --direct: the baseline, then the usual levers one by one and together.
DIRECT_CONFIGS: list[dict[str, Any]] = [
    {},
    {"amp_dtype": "bfloat16"},
    {"amp_dtype": "bfloat16", "micro_batch_size": 8},
    {"amp_dtype": "bfloat16", "micro_batch_size": 8, "fused_optimizer": True},
    {"amp_dtype": "bfloat16", "micro_batch_size": 8, "fused_optimizer": True, "compile": True},
    {"amp_dtype": "bfloat16", "micro_batch_size": 16, "grad_checkpointing": "on", "fused_optimizer": True},
]


def gpu_space(args: argparse.Namespace) -> dict[str, Any]:
    """The bundled CPU space, resized for one GPU as its header comment describes."""
    space = yaml.safe_load((ROOT / "search_spaces" / "train_memory.yaml").read_text())
    space["study"] = args.study
    space["device"] = "cuda"
    space["model"] = {"preset": args.preset, "num_layers": args.num_layers}
    space["workload"] = {"train_steps": args.train_steps, "warmup_steps": 3, "seed": 0}
    space["params"].update({
        "micro_batch_size": {"type": "int", "low": 1, "high": 16, "log": True},
        "grad_accum_steps": {"type": "categorical", "choices": [1, 2]},
        "grad_checkpointing": {"type": "categorical", "choices": ["off", "on", "every_2", "offload"]},
        "amp_dtype": {"type": "categorical", "choices": ["float32", "bfloat16", "float16"]},
        "optimizer": {"type": "categorical", "choices": ["adamw", "adamw_8bit", "adamw_cpu_offload"]},
        "compile": {"type": "categorical", "choices": [False, True]},
    })
    space["fixed"] = {"seq_len": args.seq_len}
    space["constraints"] = [{"metric": "train_peak_memory_mib", "max": args.memory_cap_mib}]
    space["search"] = {"sampler": "auto", "trials": args.trials, "timeout_min": args.timeout_min, "seed": 0,
                       "trial_timeout_s": 300}
    return space


def run_tuner(args: argparse.Namespace, out: Path) -> None:
    space_file = out / "train_memory_gpu.yaml"
    space_file.write_text(yaml.safe_dump(gpu_space(args), sort_keys=False))
    journal = out / "study.journal"
    cmd = [sys.executable, "-m", "tuner", "--space", str(space_file), "--trials", str(args.trials),
           "--device", args.device, "--out", str(out / "study"), "--storage", str(journal)]
    print("+", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, cwd=ROOT, check=False, timeout=args.tuner_timeout_s)
    except subprocess.TimeoutExpired:
        # The finished trials' results are on disk; a resumed run would redo only the rest.
        print(f"tuner stopped after {args.tuner_timeout_s} s; summarising the finished trials", flush=True)
    report = [sys.executable, "-m", "tuner", "report", "--study", args.study, "--storage", str(journal),
              "--out", str(out / "report")]
    print("+", " ".join(report), flush=True)
    subprocess.run(report, cwd=ROOT, check=False)


def run_direct(args: argparse.Namespace, out: Path) -> None:
    from runners.contract import TrialConfig

    model = {"preset": args.preset, "num_layers": args.num_layers}
    for number, knobs in enumerate(DIRECT_CONFIGS):
        folder = out / "study" / f"trial_{number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        config = TrialConfig("glm-train", model, args.device, {"train_steps": args.train_steps, "warmup_steps": 3},
                             {"seq_len": args.seq_len, **knobs}, artifact_dir=str(folder), trial_number=number)
        (folder / "config.json").write_text(config.to_json())
        print(f"[direct {number}] {knobs}", flush=True)
        subprocess.run([sys.executable, "-m", "runners.child", str(folder / "config.json"),
                        str(folder / "result.json")], cwd=ROOT, check=False)


# ---------------------------------------------------------------- summary


def load_trials(study_dir: Path) -> list[dict[str, Any]]:
    trials = []
    for folder in sorted(study_dir.glob("trial_*")):
        config = json.loads((folder / "config.json").read_text())
        result_file = folder / "result.json"
        result = (json.loads(result_file.read_text()) if result_file.exists()
                  else {"status": "fail", "reason": "no result (runner crashed, hung or was killed; see the study log)"})
        trials.append({"trial": folder.name, "knobs": config["knobs"], **result})
    return trials


def is_baseline(knobs: dict[str, Any]) -> bool:
    return all(knobs.get(k, v) == v for k, v in BASELINE.items())


def summarize(trials: list[dict[str, Any]], cap_mib: float) -> tuple[str, dict[str, Any]]:
    ok = [t for t in trials if t["status"] == "ok"]
    feasible = [t for t in ok if t["metrics"].get("train_peak_memory_mib", float("inf")) <= cap_mib]
    baseline = next((t for t in ok if is_baseline(t["knobs"])), None)
    best = max(feasible, key=lambda t: t["metrics"]["train_tokens_s"], default=None)
    lines = ["| trial | knobs (vs default) | status | tok/s | step ms (p50/p90) | peak MiB | "
             "torch alloc MiB | MFU | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for t in trials:
        diff = {k: v for k, v in t["knobs"].items() if k in BASELINE and BASELINE[k] != v}
        label = ", ".join(f"{k}={v}" for k, v in diff.items()) or "default"
        m = t.get("metrics", {})
        if t["status"] != "ok":
            lines.append(f"| {t['trial']} | {label} | {t['status']}: {t.get('reason', '')[:90]} | | | | | | |")
            continue
        lines.append(f"| {t['trial']} | {label} | ok | {m['train_tokens_s']:.0f} | {m['train_step_ms']:.1f} "
                     f"({m['train_step_p50_ms']:.1f}/{m['train_step_p90_ms']:.1f}) | "
                     f"{m.get('train_peak_memory_mib', float('nan')):.0f} | "
                     f"{m.get('torch_peak_allocated_mib', float('nan')):.0f} | {m.get('train_mfu', float('nan')):.3f} | "
                     f"{m['train_loss']:.3f} |")
    headline: dict[str, Any] = {"trials": len(trials), "ok": len(ok), "feasible": len(feasible), "cap_mib": cap_mib}
    if baseline and best:
        factor = best["metrics"]["train_tokens_s"] / baseline["metrics"]["train_tokens_s"]
        headline.update({"baseline": baseline["trial"], "best": best["trial"], "speedup": factor,
                         "baseline_tokens_s": baseline["metrics"]["train_tokens_s"],
                         "best_tokens_s": best["metrics"]["train_tokens_s"],
                         "baseline_mfu": baseline["metrics"].get("train_mfu"), "best_mfu": best["metrics"].get("train_mfu"),
                         "best_knobs": best["knobs"]})
        lines.append(f"\nBest feasible {best['trial']} ({best['knobs']}) vs baseline {baseline['trial']}: "
                     f"{factor:.2f}x tokens/s, MFU {best['metrics'].get('train_mfu', float('nan')):.3f} "
                     f"vs {baseline['metrics'].get('train_mfu', float('nan')):.3f}.")
    return "\n".join(lines), headline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", default="train_memory_gpu")
    p.add_argument("--trials", type=int, default=14)
    p.add_argument("--timeout-min", type=float, default=7.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="glm-4-9b", help="glm-tiny for a CPU smoke run")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--memory-cap-mib", type=float, default=60000)
    p.add_argument("--tuner-timeout-s", type=float, default=None, help="kill the study after this long")
    p.add_argument("--direct", action="store_true", help="measure DIRECT_CONFIGS without the tuner")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (run_direct if args.direct else run_tuner)(args, args.out)
    table, headline = summarize(load_trials(args.out / "study"), args.memory_cap_mib)
    env = next((t.get("environment") for t in load_trials(args.out / "study") if t.get("environment")), {})
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "trials.json").write_text(json.dumps({"headline": headline, "environment": env,
                                                      "trials": load_trials(args.out / "study")}, indent=1))
    print(table)
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
