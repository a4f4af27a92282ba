"""Fidelity to the unoptimised model (teacher-forced next-token KL, top-1 agreement) and, when
the model has a tokenizer and text, perplexity on held-out text.

Where the evaluation tokens come from (`text_source`):
- `workload.eval_text: FILE`, tokenized with the checkpoint's tokenizer (`model.path`);
- else the held-out token ids a `make-reference` checkpoint keeps (`text/heldout_ids.npy`);
- else seeded random token ids (KL and top-1 stay well defined; perplexity is unavailable).

Calibration tokens for activation-aware pruning come from training text only, never from the
evaluation text: the checkpoint's `text/train_ids.npy`, else `workload.calibration_text`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runners.contract import InfeasibleConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Written by `make-reference` (runners/reference.py) next to the weights.
HELDOUT_IDS = "text/heldout_ids.npy"
TRAIN_IDS = "text/train_ids.npy"


def eval_batch(vocab_size: int, sequences: int, tokens: int, seed: int, device: str) -> torch.Tensor:
    """A fixed, seeded evaluation set of token ids, [sequences, tokens]."""
    gen = torch.Generator().manual_seed(seed)
    # Skip the few special ids at the bottom of the vocabulary.
    return torch.randint(3, vocab_size, (sequences, tokens), generator=gen).to(device)


@torch.inference_mode()
def log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32, [sequences, tokens, vocab]."""
    return torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)


@dataclass(frozen=True)
class Fidelity:
    kl_divergence: float
    top1_agreement: float
    perplexity: float | None = None  # of the candidate, on the evaluation text
    reference_perplexity: float | None = None  # of the unoptimised model, same tokens


def token_nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood [S, T-1]: logp [S, T, V] predicts ids [S, T] shifted by one."""
    target = ids[:, 1:].to(logp.device)  # [S, T-1]
    return -logp[:, :-1].gather(-1, target[..., None]).squeeze(-1)


def perplexity(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) over every window's tokens."""
    return math.exp(float(token_nll(logp, ids).double().mean()))


def window_kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Each window's mean over positions of KL(reference || candidate), float64 [sequences]:
    reference and candidate are log-probabilities [sequences, tokens, vocab]. Per window so a
    comparison of two candidates can be paired over windows; windows are of equal length, so
    the mean of these is the mean over every position."""
    kl = (reference.exp() * (reference - candidate)).sum(-1)  # [sequences, tokens]
    return kl.double().mean(1)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor | None = None) -> Fidelity:
    """Mean over positions of KL(reference || candidate) and argmax agreement; with the token
    ids of real text, the perplexity of both on those same tokens."""
    kl = window_kl(reference, candidate)  # [sequences]
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float()
    ppl = ref_ppl = None
    if ids is not None:
        ppl, ref_ppl = perplexity(candidate, ids), perplexity(reference, ids)
    # Tiny negative KL values are float rounding around zero.
    return Fidelity(max(float(kl.mean()), 0.0), float(agree.mean()), ppl, ref_ppl)


# ---------------------------------------------------------------- text


@dataclass(frozen=True)
class TextSource:
    """The token streams of one model + workload: evaluation text and calibration (training) text."""

    eval_ids: np.ndarray | None  # 1-D token ids of the evaluation text; None = random ids
    eval_description: str
    calibration_ids: np.ndarray | None  # 1-D token ids of training text; None = none known
    calibration_description: str

    @property
    def is_text(self) -> bool:
        return self.eval_ids is not None


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def text_source(model_spec: dict[str, Any], workload: dict[str, Any]) -> TextSource:
    """Where this model's evaluation and calibration tokens come from (cached per files)."""
    return _text_source(model_spec.get("path"), workload.get("eval_text"), workload.get("calibration_text"))


@functools.lru_cache(maxsize=8)
def _text_source(path: str | None, eval_text: str | None, calibration_text: str | None) -> TextSource:
    tokenizer = load_tokenizer(path) if path and has_tokenizer(path) else None
    for key, file in (("workload.eval_text", eval_text), ("workload.calibration_text", calibration_text)):
        if file and tokenizer is None:
            raise InfeasibleConfig(f"{key} needs a tokenizer: model.path must be a checkpoint with "
                                   f"tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if eval_text:
        eval_ids, described = tokenize_file(tokenizer, eval_text, "workload.eval_text"), f"text of {eval_text}"
    elif path and (Path(path) / HELDOUT_IDS).is_file():
        eval_ids, described = _load_ids(Path(path) / HELDOUT_IDS), f"held-out text of the reference ({HELDOUT_IDS})"
    else:
        eval_ids, described = None, "seeded random token ids (no tokenizer and text)"
    if path and (Path(path) / TRAIN_IDS).is_file():
        calib, calib_described = _load_ids(Path(path) / TRAIN_IDS), f"training text of the reference ({TRAIN_IDS})"
    elif calibration_text:
        calib = tokenize_file(tokenizer, calibration_text, "workload.calibration_text")
        calib_described = f"text of {calibration_text}"
    else:
        calib, calib_described = None, ""
    return TextSource(eval_ids, described, calib, calib_described)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize_file(tokenizer: Any, file: str | Path, key: str) -> np.ndarray:
    """All token ids of a UTF-8 text file, one stream (no special tokens added)."""
    try:
        text = Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InfeasibleConfig(f"{key}: cannot read {file}: {exc.strerror}") from None
    if not text.strip():
        raise InfeasibleConfig(f"{key}: {file} holds no text")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _load_ids(file: Path) -> np.ndarray:
    return np.load(file, mmap_mode="r")


def text_windows(stream: np.ndarray, sequences: int, tokens: int, device: str, what: str) -> torch.Tensor:
    """`sequences` non-overlapping windows of `tokens` ids spread evenly over `stream`,
    [sequences', tokens] (fewer rows when the text is short)."""
    rows = min(sequences, len(stream) // tokens)
    if rows < 1:
        raise InfeasibleConfig(f"{what} has {len(stream)} tokens, fewer than eval_tokens={tokens}")
    starts = np.linspace(0, len(stream) - tokens, rows).astype(np.int64)
    windows = np.stack([np.asarray(stream[s:s + tokens]) for s in starts])
    return torch.from_numpy(windows.astype(np.int64)).to(device)


def random_windows(stream: np.ndarray, sequences: int, tokens: int, seed: int, device: str) -> torch.Tensor:
    """`sequences` seeded random windows of `tokens` ids of `stream`, [sequences, tokens]."""
    if len(stream) <= tokens:
        raise InfeasibleConfig(f"calibration text has {len(stream)} tokens, fewer than {tokens + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - tokens, size=sequences)
    windows = np.stack([np.asarray(stream[s:s + tokens]) for s in starts])
    return torch.from_numpy(windows.astype(np.int64)).to(device)


def calibration_set(model_spec: dict[str, Any], workload: dict[str, Any], vocab_size: int, seed: int,
                    device: str, sequences: int, tokens: int) -> tuple[torch.Tensor, str]:
    """Calibration token ids [sequences, tokens] for activation-aware pruning, and where they
    come from: training text when known, else seeded random ids (and the description says so)."""
    source = text_source(model_spec, workload)
    if source.calibration_ids is not None:
        return (random_windows(source.calibration_ids, sequences, tokens, seed, device),
                f"{sequences}x{tokens} tokens of the {source.calibration_description}")
    # A different seed stream than the evaluation ids, so calibration never sees them.
    ids = eval_batch(vocab_size, sequences, tokens, seed + 7919, device)
    return ids, (f"{sequences}x{tokens} seeded random token ids: no training text (model.path has no "
                 f"{TRAIN_IDS} and workload.calibration_text is not set)")
