"""What an engine did, counted as the roofline needs it, and the left padding engines share."""

from __future__ import annotations

import torch

from runners.glm.model import model_info


class WorkCounter:
    """Cumulative decode steps, generated tokens, bytes read from device memory and matmul FLOPs.

    Each forward pass reads all non-embedding weights once plus the K/V of every cached position
    it attends over; matmul FLOPs are 2 x params per token processed (prefill tokens included).
    Serving divides the window's delta by measured ceilings to get MBU and MFU.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        info = model_info(model)
        self.weight_bytes_per_step = info.decode_weight_bytes
        self.kv_bytes_per_token = info.kv_bytes_per_token
        self.flops_per_token = 2 * (info.params - model.get_input_embeddings().weight.numel())
        self.reset()

    def reset(self) -> None:
        self.counts = {"decode_steps": 0.0, "tokens": 0.0, "bytes_read": 0.0, "flops": 0.0}

    def snapshot(self) -> dict[str, float]:
        return dict(self.counts)

    def add_forward(self, tokens_processed: int, tokens_generated: int, cache_positions: int) -> None:
        """One forward pass over the running batch."""
        c = self.counts
        c["decode_steps"] += 1
        c["tokens"] += tokens_generated
        c["bytes_read"] += self.weight_bytes_per_step + cache_positions * self.kv_bytes_per_token
        c["flops"] += self.flops_per_token * tokens_processed

    def add_batch(self, batch: int, prompt_len: int, new_tokens: int) -> None:
        """A static batch run to completion: a prefill then `new_tokens - 1` decode steps."""
        kv_positions = batch * (prompt_len * new_tokens + new_tokens * (new_tokens - 1) // 2)
        c = self.counts
        c["decode_steps"] += new_tokens
        c["tokens"] += batch * new_tokens
        c["bytes_read"] += new_tokens * self.weight_bytes_per_step + kv_positions * self.kv_bytes_per_token
        c["flops"] += self.flops_per_token * batch * (prompt_len + new_tokens - 1)


def left_pad(prompts: list[list[int]], pad_id: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, right-aligned: [rows, longest]; extra rows are all padding."""
    width = max(len(p) for p in prompts)
    rows = rows or len(prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask
