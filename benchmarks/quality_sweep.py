"""Perplexity and KL of a trained reference under sparsity and quantisation, as a Markdown table.

    autoglm-tune make-reference --preset glm-small --device cuda ...   (docs/quality.md)
    python -m benchmarks.quality_sweep --model runs/reference/glm-small --device cuda --out runs/quality_sweep.md
    python -m benchmarks.quality_sweep --quick       # CPU: a tiny reference made on the spot, in seconds

Every row is one compression of the same dense model, through the functions a `glm-infer`
trial uses (`apply_sparsity`, `apply_quantization`; calibration from the reference's training
text), scored on the same held-out windows: perplexity, its change against the dense model,
KL(dense || compressed) and top-1 agreement. A row the device cannot run says why. (A trial
measures the same quantities through its serving engine's KV-cache path; here a full forward.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from runners.base import resolve_device
from runners.contract import InfeasibleConfig
from runners.glm.compress import (
    CALIBRATION_SEQUENCES,
    CALIBRATION_TOKENS,
    apply_quantization,
    apply_sparsity,
    prune_weights,
)
from runners.glm.model import build_model, resolve_dtype
from runners.glm.quality import (
    calibration_set,
    fidelity,
    log_probs,
    text_source,
    text_windows,
    token_nll,
    window_kl,
)

SPARSITIES = (0.3, 0.5, 0.7, 0.9)


def configs() -> list[tuple[str, dict[str, Any]]]:
    """(label, knobs) of every row, the dense model first."""
    rows: list[tuple[str, dict[str, Any]]] = [("dense", {})]
    for method in ("magnitude", "wanda"):
        rows += [(f"{method} unstructured {s:g}", {"sparsity": s, "sparsity_method": method}) for s in SPARSITIES]
        rows.append((f"{method} 2:4", {"sparsity": 0.5, "sparsity_kind": "2:4", "sparsity_method": method}))
    rows += [
        ("int8 weight-only", {"quant_bits": 8, "quant_scheme": "weight_only"}),
        ("int8 dynamic activation", {"quant_bits": 8, "quant_scheme": "dynamic_activation"}),
        ("int4 weight-only (group 128)", {"quant_bits": 4, "quant_scheme": "weight_only"}),
        ("fp8 (dyn. act. + weight)", {"quant_bits": 8, "quant_scheme": "fp8"}),
    ]
    return rows


@torch.inference_mode()
def chunked_log_probs(model: torch.nn.Module, ids: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """log_probs over ids [S, T] a few sequences at a time (logits are [S, T, vocab] float32)."""
    return torch.cat([log_probs(model, chunk) for chunk in ids.split(rows)])


def sweep(model_path: str, device: str, sequences: int, tokens: int, seed: int = 0) -> dict[str, Any]:
    """Every row of `configs()` on the held-out windows of the reference at `model_path`."""
    spec = {"path": model_path}
    device = resolve_device(device)
    dtype = resolve_dtype(spec, {}, device)
    source = text_source(spec, {})
    if not source.is_text:
        raise SystemExit(f"{model_path}: no held-out text (make it with autoglm-tune make-reference)")
    ids = text_windows(source.eval_ids, sequences, tokens, device, source.eval_description)
    dense = build_model(spec, dtype, device, seed)
    reference = chunked_log_probs(dense, ids)

    def calibration() -> tuple[torch.Tensor, str]:
        return calibration_set(spec, {}, int(dense.config.vocab_size), seed, device,
                               CALIBRATION_SEQUENCES, min(CALIBRATION_TOKENS, tokens))

    rows = []
    for label, knobs in configs():
        rows.append({"config": label, **measure(dense, knobs, device, calibration, reference, ids)})
    return {"model": model_path, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "eval": f"{ids.shape[0]} x {ids.shape[1]} tokens of the {source.eval_description}",
            "rows": rows}


def measure(dense: torch.nn.Module, knobs: dict[str, Any], device: str, calibration: Any,
            reference: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """One row. A 2:4 row whose kernels cannot run here (device, shape) is still scored with its
    masks on dense weights, and says so: the quality of a 2:4 mask does not depend on the kernel."""
    model, note = copy.deepcopy(dense), ""
    try:
        try:
            info = apply_sparsity(model, knobs, device, calibration)
        except InfeasibleConfig as exc:
            if knobs.get("sparsity_kind") != "2:4" or knobs.get("quant_bits", 16) != 16:
                raise
            model, note = copy.deepcopy(dense), f"masks on dense weights, no 2:4 kernel: {exc}"
            info = prune_weights(model, knobs, device, calibration)
        apply_quantization(model, knobs, device)
        candidate = chunked_log_probs(model, ids)
        quality = fidelity(reference, candidate, ids)
        window_nll = token_nll(candidate, ids).double().mean(1).tolist()  # [S]: each window's mean
        window_kls = window_kl(reference, candidate).tolist()  # [S]: each window's mean KL to dense
    except InfeasibleConfig as exc:
        return {"note": f"infeasible: {exc}"}
    finally:
        del model
    return {"sparsity": info["sparsity_measured"], "perplexity": quality.perplexity,
            "reference_perplexity": quality.reference_perplexity, "kl": quality.kl_divergence,
            "top1": quality.top1_agreement, "note": note, "window_nll": window_nll,
            "window_kl": window_kls}


def step_interval(lower: list[float], higher: list[float], reps: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """The mean change of a per-window quantity from one config to another (`higher` minus
    `lower`, values of the same windows: mean NLL, or mean KL to dense) and its 95 %
    paired-bootstrap interval over windows. Windows are of equal length, so the mean of the
    window means is the mean over every token (for NLL: the log-perplexity)."""
    diff = torch.tensor(higher, dtype=torch.float64) - torch.tensor(lower, dtype=torch.float64)  # [S]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (reps, len(diff)), generator=gen)  # [reps, S]
    means = diff[picks].mean(1)
    return float(diff.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def monotone_verdict(rows: list[dict[str, Any]]) -> str:
    """'yes' if perplexity never falls along `rows`; 'no' if it falls by more than the windows
    resolve (a step's whole 95 % interval below 0); else 'within noise', with each fall and its
    interval. Why: a pruned model can score a hair below the denser one on a few thousand
    tokens; whether that is the model or the sample is what the interval says."""
    steps = [step_interval(a["window_nll"], b["window_nll"]) for a, b in zip(rows, rows[1:], strict=False)]
    falls = [(mean, low, high) for mean, low, high in steps if mean < 0]
    if not falls:
        return "yes"
    if any(high < 0 for _, _, high in falls):
        return "no (a fall the windows resolve: " + ", ".join(
            f"{100 * mean:+.2f} % [{100 * low:+.2f}, {100 * high:+.2f}]" for mean, low, high in falls if high < 0) + ")"
    return "within noise (falls of " + ", ".join(
        f"{100 * mean:+.2f} % [95 %: {100 * low:+.2f}, {100 * high:+.2f}]" for mean, low, high in falls) + \
        " in log-perplexity, each interval containing 0)"


def better_verdict(candidate: dict[str, Any], other: dict[str, Any], metric: str = "perplexity") -> str:
    """Is `candidate`'s perplexity (metric="perplexity") or KL to the dense model (metric="kl")
    below `other`'s on the same windows? 'yes' / 'no' when the 95 % paired-bootstrap interval
    of the difference excludes 0, else 'within noise'; 'not measured' when a row lacks the
    per-window values (rows of JSON written before they were recorded)."""
    windows = {"perplexity": "window_nll", "kl": "window_kl"}[metric]
    if windows not in candidate or windows not in other:
        return "not measured"
    mean, low, high = step_interval(other[windows], candidate[windows])
    verdict = "yes" if high < 0 else "no" if low > 0 else "within noise"
    if metric == "kl":
        return (f"{verdict} ({candidate['kl']:.4f} vs {other['kl']:.4f} nats: {mean:+.4f} "
                f"[95 %: {low:+.4f}, {high:+.4f}])")
    return (f"{verdict} ({candidate['perplexity']:.3f} vs {other['perplexity']:.3f}: {100 * mean:+.2f} % "
            f"[95 %: {100 * low:+.2f}, {100 * high:+.2f}] in log-perplexity)")


def checks(result: dict[str, Any]) -> list[str]:
    """The issue's claims, each answered from the rows (or 'not measured')."""
    ppl = {r["config"]: r.get("perplexity") for r in result["rows"]}
    by_config = {r["config"]: r for r in result["rows"]}
    dense = ppl["dense"]
    lines = []
    for method in ("magnitude", "wanda"):
        series = [by_config["dense"]] + [by_config[f"{method} unstructured {s:g}"] for s in SPARSITIES]
        verdict = ("not measured" if any("window_nll" not in r for r in series) else monotone_verdict(series))
        lines.append(f"{method}: perplexity monotone in sparsity (0, {', '.join(f'{s:g}' for s in SPARSITIES)}): "
                     f"{verdict}")
    wanda, magnitude = by_config["wanda unstructured 0.5"], by_config["magnitude unstructured 0.5"]
    lines.append("wanda better than magnitude at 0.5: " + better_verdict(wanda, magnitude))
    lines.append("wanda better than magnitude at 0.5 in KL to dense: " + better_verdict(wanda, magnitude, "kl"))
    int8 = ppl["int8 weight-only"]
    lines.append("int8 weight-only within 1 % of dense perplexity: " + (
        "not measured" if int8 is None else f"{'yes' if abs(int8 / dense - 1) <= 0.01 else 'no'} "
                                            f"({100 * (int8 / dense - 1):+.2f} %)"))
    return lines


def markdown(result: dict[str, Any], meta: dict[str, Any] | None) -> str:
    lines = [f"Model `{result['model']}` ({result['dtype']}, {result['device']}); evaluation: {result['eval']}."]
    if meta:
        training = meta.get("training", {})
        lines.append(f"Reference: {meta['preset']} trained on {meta['corpus']['source']}, "
                     f"{training.get('tokens_seen', 0):,} tokens seen ({training.get('steps')} steps), "
                     f"final training loss {training.get('loss_last_20_steps', float('nan')):.3f}, held-out loss "
                     f"{training.get('heldout_loss')}, unigram entropy {meta['unigram_entropy_nats']:.3f} nats/token.")
    dense = result["rows"][0]["perplexity"]
    lines += ["", "| config | sparsity | perplexity | Δ vs dense | KL (nats) | top-1 | note |",
              "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "perplexity" not in row:
            lines.append(f"| {row['config']} | | | | | | {row['note']} |")
            continue
        lines.append(f"| {row['config']} | {row['sparsity']:.3f} | {row['perplexity']:.3f} | "
                     f"{100 * (row['perplexity'] / dense - 1):+.2f} % | {row['kl']:.4f} | {row['top1']:.3f} | "
                     f"{row['note']} |")
    return "\n".join(lines + [""] + [f"- {c}" for c in checks(result)]) + "\n"


def quick_reference(folder: Path) -> str:
    """A glm-tiny reference trained for a few seconds on CPU (stdlib text)."""
    from runners.reference import Options, make_reference

    out = folder / "glm-tiny"
    make_reference(Options("glm-tiny", out, None, 0.3, 0.05, 150, 0, 0.0, 150, 50,
                           {"micro_batch_size": 4, "seq_len": 64}, None, "cpu", 0, False))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a make-reference checkpoint folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--sequences", type=int, default=16, help="held-out windows (default 16)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--out", help="write the Markdown table here (and a .json beside it)")
    p.add_argument("--quick", action="store_true", help="CPU: make a tiny reference in a temp folder and sweep it")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            torch.set_num_threads(1)  # small CPU ops: extra threads only spin on shared cores
            args.model, args.device, args.sequences, args.tokens = quick_reference(Path(scratch)), "cpu", 4, 64
        if not args.model:
            p.error("give --model DIR (a make-reference checkpoint) or --quick")
        result = sweep(args.model, args.device, args.sequences, args.tokens)
        meta_file = Path(args.model) / "reference.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    table = markdown(result, meta)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
