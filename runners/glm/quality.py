"""Fidelity to the unoptimised model: teacher-forced next-token KL and top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> Fidelity:
    """Mean over positions of KL(reference || candidate), and argmax agreement."""
    kl = (reference.exp() * (reference - candidate)).sum(-1)  # [sequences, tokens]
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float()
    # Tiny negative KL values are float rounding around zero.
    return Fidelity(max(float(kl.mean()), 0.0), float(agree.mean()))
