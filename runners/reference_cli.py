"""The command line of `make-reference` (runners/reference.py): flags, `--knob` parsing, options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runners.corpus import ReferenceError
from runners.presets import PRESETS
from runners.reference import Options
from runners.reference_keep import KEEP


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoglm-tune make-reference",
        description="Train a byte-level BPE tokenizer and a GLM preset on local text; save a transformers "
                    "checkpoint (with tokenizer and held-out text) that `model: {path: DIR}` loads.")
    p.add_argument("--preset", default="glm-small", choices=sorted(PRESETS), help="model shape (default glm-small)")
    p.add_argument("--out", help="checkpoint folder (default runs/reference/<preset>)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="training text files or folders "
                   "(default: this Python's standard library .py sources)")
    p.add_argument("--max-mb", type=float, default=48.0, help="corpus size cap in MiB (default 48)")
    p.add_argument("--heldout-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    p.add_argument("--validation-fraction", type=float, default=0.02,
                   help="share of the other documents that picks the saved checkpoint (default 0.02)")
    p.add_argument("--keep", choices=KEEP, default="best",
                   help="best: save the checkpoint of lowest validation loss (default); last: the final weights")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (default 2000)")
    p.add_argument("--stop-at", type=int, default=0, help="stop (checkpointed) after this step; --resume goes on")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (checkpointed) after this long; 0 = no cap")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="a glm-train knob (micro_batch_size, seq_len, amp_dtype, compile, grad_checkpointing, ...), "
                        "e.g. a tuned trial's; repeatable")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 tiny, 6e-4 small, 3e-4 larger)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(with its saved knobs, lr and seed; --steps, --stop-at, --max-minutes from this command)")
    return p


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from runners.knobs import TRAIN_KNOBS

    knobs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in TRAIN_KNOBS or name == "memory_limit_mib":
            known = ", ".join(k for k in TRAIN_KNOBS if k != "memory_limit_mib")
            raise ReferenceError(f"--knob {pair}: expected NAME=VALUE with NAME one of {known}")
        value = yaml.safe_load(text)
        problem = TRAIN_KNOBS[name].check(value)
        if problem:
            raise ReferenceError(f"--knob {name}: {problem}")
        knobs[name] = value
    if knobs.get("optimizer") == "adamw_cpu_offload":
        raise ReferenceError("--knob optimizer=adamw_cpu_offload: its host-side optimizer takes no LR schedule")
    return knobs


def options(args: argparse.Namespace) -> Options:
    for name in ("steps", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ReferenceError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.heldout_fraction < 1 or not 0 < args.validation_fraction < 1 or args.max_mb <= 0:
        raise ReferenceError("--heldout-fraction and --validation-fraction must be in (0, 1) and --max-mb > 0")
    out = Path(args.out or Path("runs") / "reference" / args.preset)
    return Options(args.preset, out, args.text, args.max_mb, args.heldout_fraction, args.steps, args.stop_at,
                   args.max_minutes, args.checkpoint_every, args.log_every, parse_knobs(args.knob), args.lr,
                   args.device, args.seed, args.resume, args.validation_fraction, args.keep)
