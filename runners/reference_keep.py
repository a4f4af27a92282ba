"""Which weights `make-reference` saves: those of the checkpoint with the lowest validation loss.

Why: a small corpus is over-fitted within minutes (H200, glm-small on the 10 MiB standard library:
held-out loss 3.77 at step 1000, 4.12 at step 1700), and an over-fitted dense reference makes
light pruning look like an improvement (its perplexity fell at 30 % sparsity). The validation
text is a split of its own, apart from the held-out text that trials and the quality sweep score,
so choosing the checkpoint does not tune the model to the evaluation set.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

KEEP = ("best", "last")


class BestCheckpoint:
    """The lowest-validation-loss weights seen so far (host copy, and `resume/best.pt` so a
    resumed run keeps choosing among all checkpoints)."""

    def __init__(self, out: Path, keep: str) -> None:
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
        self.path = out / "resume" / "best.pt"
        self.keep = keep
        self.step = 0
        self.loss = math.inf
        self.state: dict[str, Any] | None = None

    def restore(self) -> None:
        import torch

        if self.keep == "best" and self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.step, self.loss, self.state = int(saved["step"]), float(saved["loss"]), saved["model"]

    def offer(self, model: Any, step: int, loss: float) -> bool:
        """Keep `model`'s weights if `loss` (validation, at checkpoint `step`) is the lowest yet."""
        import torch

        if self.keep != "best" or not math.isfinite(loss) or loss >= self.loss:
            return False
        self.step, self.loss = step, loss
        self.state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "loss": loss, "model": self.state}, self.path.with_suffix(".pt.tmp"))
        os.replace(self.path.with_suffix(".pt.tmp"), self.path)
        return True

    def apply(self, model: Any, last_step: int) -> dict[str, Any]:
        """Load the kept weights into `model` (when they are not the last ones); what was kept."""
        if self.keep == "best" and self.state is not None and self.step != last_step:
            model.load_state_dict(self.state)
            return {"rule": "lowest validation loss", "step": self.step, "validation_loss": self.loss}
        if self.keep == "best" and self.state is not None:
            return {"rule": "lowest validation loss", "step": last_step, "validation_loss": self.loss}
        return {"rule": "last step" if self.keep == "last" else "last step (no validation text)",
                "step": last_step}
