"""`make-reference`: a trained reference GLM and its tokenizer, made offline from local text.

    python -m runners.reference --preset glm-small --out runs/reference/glm-small
    (the tuner's `autoglm-tune make-reference ...` runs exactly this in a child process)

1. Corpus: the user's files (`--text FILE|DIR ...`) or, by default, the `.py` sources of the
   running Python's standard library (code, comments and docstrings: English prose and code
   that every machine with Python has, offline, under one licence, identical for one Python
   version). Documents (files; blocks of ~8 KiB when there are few files) are taken in the order
   of the SHA-256 of their names (deterministic, and a size cap samples the whole library rather
   than its first letters) up to `--max-mb`.
2. Split: the `--heldout-fraction` of documents with the smallest name hashes is held out; it
   is never seen by the tokenizer, the training or pruning calibration.
3. A byte-level BPE tokenizer (`tokenizers`) trained on the training documents, with the
   preset's vocabulary size (fewer entries if the corpus runs out of merges); ids 0/1/2 are
   <pad>/<bos>/<eos>, as in the presets' configs.
4. The preset's GLM trained with the project's training step (`runners.train.TrainStep`:
   AMP, torch.compile, activation checkpointing by the `glm-train` knobs) and loop
   (`run_loop`), with AdamW, linear warm-up + cosine decay and gradient clipping at 1.0, on
   seeded random windows of the training tokens. Progress and the loss curve are printed, next
   to the corpus's unigram entropy (the loss of a model that ignores context).
5. Saved: a transformers checkpoint directory (config.json, model.safetensors, tokenizer files)
   that `model: {path: DIR}` loads, plus `text/` (train and held-out token ids, held-out text),
   `loss_curve.csv`, `reference.json` (corpus, split, tokens seen, losses). `resume/state.pt` every
   `--checkpoint-every` steps: `--resume` continues from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.contract import InfeasibleConfig
from runners.corpus import (  # noqa: F401 - re-exported: the corpus steps were part of this module
    EOS_ID,
    SPECIAL_TOKENS,
    Document,
    ReferenceError,
    cap_documents,
    file_documents,
    split_documents,
    stdlib_documents,
    token_stream,
    train_tokenizer,
    unigram_entropy,
)
from runners.presets import PRESETS
from runners.reference_keep import BestCheckpoint

PEAK_LR = {"glm-tiny": 3e-3, "glm-small": 6e-4}  # others: 3e-4
CPU_KNOBS = {"micro_batch_size": 8, "seq_len": 128}
CUDA_KNOBS = {"micro_batch_size": 32, "seq_len": 512, "amp_dtype": "bfloat16", "fused_optimizer": True}
HELDOUT_EVAL_WINDOWS = 16


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def make_step(model: Any, plan: Any, device: str, peak_lr: float, total_steps: int) -> Any:
    """`runners.train.TrainStep` with a learning-rate schedule and gradient clipping."""
    import torch

    from runners.train import TrainStep

    class ScheduledStep(TrainStep):
        def __init__(self) -> None:
            super().__init__(model, plan, device)
            for group in self.optimizer.param_groups:
                group["lr"] = peak_lr
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total_steps))
            self.params = [p for p in model.parameters() if p.requires_grad]

        def apply(self) -> None:
            self.scaler.unscale_(self.optimizer)  # no-op unless float16 loss scaling is on
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            super().apply()
            self.schedule.step()

    return ScheduledStep()


def random_batches(stream: Any, rows: int, seq_len: int, seed: int, first_step: int) -> Any:
    """[rows, seq_len] windows at seeded random offsets; step k's batch depends only on (seed, k),
    so a resumed run reads the same batches as an uninterrupted one."""
    import torch

    span = torch.arange(seq_len, device=stream.device)
    step = first_step
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, stream.numel() - seq_len, (rows,), generator=gen).to(stream.device)
        yield stream[starts[:, None] + span]  # [rows, seq_len]
        step += 1


@dataclass
class Options:
    preset: str
    out: Path
    text: list[str] | None
    max_mb: float
    heldout_fraction: float
    steps: int
    stop_at: int
    max_minutes: float
    checkpoint_every: int
    log_every: int
    knobs: dict[str, Any]
    lr: float | None
    device: str
    seed: int
    resume: bool
    validation_fraction: float = 0.02  # documents (apart from the held-out ones) that pick the checkpoint
    keep: str = "best"  # best: the checkpoint of lowest validation loss; last: the final weights


def make_reference(opts: Options) -> dict[str, Any]:
    """Build (or resume) the reference in `opts.out`; returns its `reference.json` content."""
    if opts.resume:
        meta = _load_meta(opts.out)
    else:
        _check_fresh(opts.out)
        meta = prepare_corpus(opts)
    return train(opts, meta)


def _check_fresh(out: Path) -> None:
    # A folder whose run died before its first checkpoint holds nothing to keep: start it afresh.
    if (out / "resume" / "state.pt").exists() or (out / "model.safetensors").exists():
        raise ReferenceError(f"--out {out} already holds a reference; pass --resume to continue it, "
                             "or choose another folder")


def _load_meta(out: Path) -> dict[str, Any]:
    if not (out / "resume" / "state.pt").is_file():
        raise ReferenceError(f"--resume: {out}/resume/state.pt does not exist (nothing to resume)")
    return json.loads((out / "reference.json").read_text())


def prepare_corpus(opts: Options) -> dict[str, Any]:
    """Corpus -> split -> tokenizer -> token ids in `opts.out/text/`; the metadata written so far."""
    import numpy as np

    t0 = time.perf_counter()
    max_bytes = int(opts.max_mb * 2**20)
    docs, described = file_documents(opts.text) if opts.text else stdlib_documents(max_bytes)
    docs = cap_documents(docs, max_bytes)
    train_docs, heldout_docs = split_documents(docs, opts.heldout_fraction)
    train_docs, validation_docs = split_documents(train_docs, opts.validation_fraction)
    shape = PRESETS[opts.preset]
    tokenizer = train_tokenizer([d.text for d in train_docs], shape["vocab_size"], shape["max_position_embeddings"])
    train_ids, heldout_ids = token_stream(tokenizer, train_docs), token_stream(tokenizer, heldout_docs)
    folder = opts.out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(opts.out)
    np.save(folder / "train_ids.npy", train_ids)
    np.save(folder / "heldout_ids.npy", heldout_ids)
    np.save(folder / "validation_ids.npy", token_stream(tokenizer, validation_docs))
    (folder / "heldout.txt").write_text("".join(d.text for d in heldout_docs), encoding="utf-8")
    corpus_hash = hashlib.sha256("".join(d.digest for d in docs).encode()).hexdigest()
    meta = {
        "preset": opts.preset,
        "corpus": {"source": described, "documents": len(docs), "bytes": sum(len(d.text.encode()) for d in docs),
                   "max_mb": opts.max_mb, "names_sha256": corpus_hash, "python": platform.python_version()},
        "split": {"rule": f"the {opts.heldout_fraction:g} of documents with the smallest SHA-256 of their name",
                  "validation": f"then the {opts.validation_fraction:g} of the rest, likewise (picks the checkpoint)",
                  "train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                  "validation_documents": len(validation_docs),
                  "train_tokens": int(train_ids.size), "heldout_tokens": int(heldout_ids.size)},
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "bytes_per_token": round(sum(len(d.text.encode()) for d in train_docs) / train_ids.size, 3)},
        "unigram_entropy_nats": unigram_entropy(train_ids),
        "seed": opts.seed,
    }
    _write_json(opts.out / "reference.json", meta)
    print(f"corpus: {described}; {len(docs)} documents, {meta['corpus']['bytes'] / 2**20:.1f} MiB; "
          f"held out {len(heldout_docs)} ({heldout_ids.size:,} tokens); tokenizer {len(tokenizer)} entries, "
          f"{train_ids.size:,} training tokens; unigram entropy {meta['unigram_entropy_nats']:.3f} nats/token "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return meta


def train(opts: Options, meta: dict[str, Any]) -> dict[str, Any]:
    """Train the preset on the saved training ids (resuming if asked) and save the checkpoint."""
    import numpy as np
    import torch

    from runners.base import resolve_device
    from runners.glm.model import build_model
    from runners.registry import resolve_knobs
    from runners.train import enable_checkpointing, run_loop
    from runners.train_plan import make_plan

    device = resolve_device(opts.device)
    if opts.resume:  # the saved setup, so the resumed steps are the ones the first run would have taken
        setup = meta["setup"]
    else:
        defaults = CUDA_KNOBS if device.startswith("cuda") else CPU_KNOBS
        setup = meta["setup"] = {"knobs": resolve_knobs("glm-train", {**defaults, **opts.knobs}),
                                 "peak_lr": opts.lr or PEAK_LR.get(opts.preset, 3e-4), "seed": opts.seed}
        _write_json(opts.out / "reference.json", meta)
    knobs, peak_lr, seed = setup["knobs"], setup["peak_lr"], setup["seed"]
    plan = make_plan(knobs, {"preset": opts.preset}, device)
    if plan.seq_len > PRESETS[opts.preset]["max_position_embeddings"]:
        raise ReferenceError(f"seq_len={plan.seq_len} exceeds {opts.preset}'s max_position_embeddings")
    model = build_model({"preset": opts.preset}, plan.weight_dtype, device, opts.seed).train()
    enable_checkpointing(model, plan.checkpoint_every)
    step = make_step(model, plan, device, peak_lr, opts.steps)
    stream = torch.from_numpy(np.load(opts.out / "text" / "train_ids.npy").astype(np.int64)).to(device)
    heldout = np.load(opts.out / "text" / "heldout_ids.npy")
    validation_file = opts.out / "text" / "validation_ids.npy"  # absent in references made before it
    validation = np.load(validation_file) if validation_file.is_file() else None
    best = BestCheckpoint(opts.out, opts.keep if validation is not None else "last")
    if opts.resume:
        best.restore()
    if stream.numel() <= plan.seq_len:
        raise ReferenceError(f"{stream.numel()} training tokens, fewer than seq_len={plan.seq_len}: give more text")
    done, curve, elapsed = _restore(opts.out, model, step) if opts.resume else (0, [], 0.0)
    entropy = meta["unigram_entropy_nats"]
    data = random_batches(stream, plan.sequences_per_step, plan.seq_len, seed, done)
    last = min(opts.steps, opts.stop_at or opts.steps)
    print(f"training {opts.preset} on {device}: steps {done}->{last} of {opts.steps}, {plan.tokens_per_step:,} "
          f"tokens/step, peak lr {peak_lr:g}, knobs {_train_knobs(knobs)}", flush=True)
    t_start, stopped = time.perf_counter() - elapsed, ""
    while done < last:
        chunk = _next_boundary(done, opts.log_every, opts.checkpoint_every, last) - done
        outcome = run_loop(step, data, 0, chunk, device)
        tokens_s = plan.tokens_per_step * chunk / outcome.window_s
        for loss in outcome.losses:
            done += 1
            curve.append({"step": done, "tokens_seen": done * plan.tokens_per_step, "loss": round(loss, 5),
                          "lr": step.schedule.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - t_start, 2),
                          "heldout_loss": "", "validation_loss": ""})
        timed_out = opts.max_minutes and time.perf_counter() - t_start >= opts.max_minutes * 60
        checkpoint = done % opts.checkpoint_every == 0 or done == last or timed_out
        if checkpoint:
            curve[-1]["heldout_loss"] = round(heldout_loss(model, heldout, plan, device), 5)
            if validation is not None:
                curve[-1]["validation_loss"] = round(heldout_loss(model, validation, plan, device), 5)
                best.offer(model, done, curve[-1]["validation_loss"])
        _print_progress(curve[-1], opts.steps, entropy, tokens_s)
        if checkpoint:
            _save_state(opts.out, model, step, done, curve, time.perf_counter() - t_start)
        if timed_out:
            stopped = f"--max-minutes {opts.max_minutes:g} reached at step {done}"
            break
    if not stopped:
        stopped = "finished" if done >= opts.steps else f"--stop-at {last}: resume with --resume"
    kept = best.apply(model, done)
    return _finish(opts, meta, model, curve, knobs, peak_lr, device, stopped, kept)


def _train_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in knobs.items() if v not in (None, 0) and k != "memory_limit_mib"}


def _next_boundary(done: int, log_every: int, checkpoint_every: int, last: int) -> int:
    return min(last, (done // log_every + 1) * log_every, (done // checkpoint_every + 1) * checkpoint_every)


def heldout_loss(model: Any, heldout: Any, plan: Any, device: str) -> float:
    """Mean next-token loss of the model on evenly spaced held-out windows (the same every time)."""
    import torch

    from runners.glm.quality import text_windows

    tokens = min(plan.seq_len, len(heldout))
    if tokens < 2:
        return float("nan")
    windows = text_windows(heldout, HELDOUT_EVAL_WINDOWS, tokens, device, "the held-out text")
    autocast = torch.autocast(torch.device(device).type, dtype=plan.amp_dtype, enabled=plan.amp_dtype is not None)
    with torch.no_grad(), autocast:
        losses = [model(input_ids=chunk, labels=chunk, use_cache=False).loss.float()
                  for chunk in windows.split(plan.micro_batch_size)]
    return float(torch.stack(losses).mean())


def _print_progress(row: dict[str, Any], total: int, entropy: float, tokens_s: float) -> None:
    held = f"  held-out {row['heldout_loss']:.3f}" if row["heldout_loss"] != "" else ""
    print(f"step {row['step']:>6}/{total}  loss {row['loss']:.3f}{held}  (unigram entropy {entropy:.3f} nats/token)  "
          f"tokens {row['tokens_seen'] / 1e6:.2f}M  {tokens_s / 1e3:.1f}k tok/s  lr {row['lr']:.2e}  "
          f"{row['elapsed_s']:.0f} s", flush=True)


def _save_state(out: Path, model: Any, step: Any, done: int, curve: list[dict[str, Any]], elapsed: float) -> None:
    """Weights, optimizer, schedule and loss-scaler state, written atomically; and the loss curve."""
    import torch

    from runners.measure.artifacts import write_rows

    folder = out / "resume"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": done, "elapsed_s": elapsed, "model": model.state_dict(), "optimizer": step.optimizer.state_dict(),
             "schedule": step.schedule.state_dict(), "scaler": step.scaler.state_dict()}
    torch.save(state, folder / "state.pt.tmp")
    os.replace(folder / "state.pt.tmp", folder / "state.pt")
    write_rows(out / "loss_curve.csv", curve)


def _restore(out: Path, model: Any, step: Any) -> tuple[int, list[dict[str, Any]], float]:
    """The checkpointed step count, loss curve up to it (later rows were not checkpointed) and time."""
    import csv

    import torch

    state = torch.load(out / "resume" / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.schedule.load_state_dict(state["schedule"])
    step.scaler.load_state_dict(state["scaler"])
    with (out / "loss_curve.csv").open() as handle:
        curve = [row for row in csv.DictReader(handle) if int(row["step"]) <= state["step"]]
    for row in curve:
        row.update({k: (float(v) if k not in ("step", "tokens_seen") else int(v)) if v != "" else ""
                    for k, v in row.items()})
    print(f"resumed from {out}/resume/state.pt at step {state['step']}", flush=True)
    return int(state["step"]), curve, float(state["elapsed_s"])


def _finish(opts: Options, meta: dict[str, Any], model: Any, curve: list[dict[str, Any]], knobs: dict[str, Any],
            peak_lr: float, device: str, stopped: str, kept: dict[str, Any]) -> dict[str, Any]:
    """Save the transformers checkpoint (the `kept` weights) and the training summary."""
    model.save_pretrained(opts.out)
    last = curve[-1] if curve else {}
    tail = [row["loss"] for row in curve[-20:]]
    meta["training"] = {
        "steps": last.get("step", 0), "planned_steps": opts.steps, "tokens_seen": last.get("tokens_seen", 0),
        "loss_last_20_steps": sum(tail) / len(tail) if tail else None,
        "heldout_loss": next((r["heldout_loss"] for r in reversed(curve)
                              if r["heldout_loss"] != "" and int(r["step"]) <= kept["step"]), None),
        "kept": kept,
        "unigram_entropy_nats": meta["unigram_entropy_nats"], "peak_lr": peak_lr, "device": device,
        "knobs": _train_knobs(knobs), "elapsed_s": last.get("elapsed_s", 0.0), "stopped": stopped,
    }
    _write_json(opts.out / "reference.json", meta)
    held = meta["training"]["heldout_loss"]
    print(f"saved {opts.out} (model: {{path: {opts.out}}}): {meta['training']['steps']} steps, "
          f"{meta['training']['tokens_seen']:,} tokens seen, held-out loss {held} vs unigram entropy "
          f"{meta['unigram_entropy_nats']:.3f} nats/token; {stopped}; weights of step {kept['step']} "
          f"({kept['rule']})", flush=True)
    return meta


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 run-time failure, 2 usage error, 130 interrupted (resume from the last checkpoint)."""
    from runners.reference_cli import options, parser

    args = parser().parse_args(argv)
    try:
        opts = options(args)
        if opts.resume and (opts.out / "reference.json").is_file():
            saved = json.loads((opts.out / "reference.json").read_text()).get("preset")
            if saved != opts.preset:
                raise ReferenceError(f"--resume: {opts.out} holds a {saved} reference, not {opts.preset}")
        make_reference(opts)
    except (ReferenceError, InfeasibleConfig) as exc:
        print(f"make-reference: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make-reference: interrupted; run again with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
