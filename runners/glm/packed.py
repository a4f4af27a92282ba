"""The packed weight-only layouts (runners/glm/woq.py quantises into them and runs them):
plain data, so the model ops (runners/glm/ops.py) can dispatch on them without the kernels.

- int8: `qdata` [N, K] int8, symmetric per output row; `scale` [N] float32. w = q * scale.
- int4: `packed` [N, K/2] uint8, asymmetric per group of G input features; `scale`, `zero`
  [N, K/G] in the activation dtype (nibble order: see runners/glm/woq.py).
- `gated`: a SwiGLU MLP's gate_up rows stored as interleaved gate/up pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Weight(NamedTuple):
    qdata: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    gemv: str = "triton"
    gated: bool = False  # rows stored as interleaved gate/up pairs (see `interleave_gate_up`)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.qdata, self.scale


class Int4Weight(NamedTuple):
    packed: torch.Tensor  # [N, K/2] uint8
    scale: torch.Tensor  # [N, K/G]
    zero: torch.Tensor  # [N, K/G]
    gemv: str = "triton"
    gated: bool = False

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scale, self.zero


def interleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """[gate | up] along dim 0 (a SwiGLU MLP's fused gate_up weight) -> pairs g0, u0, g1, u1, ...:
    how a `gated` packed weight stores its rows, so the CUDA GEMV finds a pair in one warp and
    writes silu(gate) * up directly."""
    return rows.view(2, rows.shape[0] // 2, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def gate_up_order(out: torch.Tensor) -> torch.Tensor:
    """A gated weight's outputs (last dim, pair order) back in [gate | up] order."""
    return out.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
