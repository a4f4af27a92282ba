"""Runners: the GLM inference and training stacks, driven by plain configs.

Importing this package does not import torch; runner classes load on demand in the child
process that runs a trial.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from runners.contract import InfeasibleConfig, TrialConfig, TrialResult

if TYPE_CHECKING:
    from runners.base import Runner

# Registered in one visible place: name -> "module:Class".
RUNNERS: dict[str, str] = {
    "glm-infer": "runners.infer:GlmInferRunner",
    "glm-train": "runners.train:GlmTrainRunner",
    "replay": "runners.replay:ReplayRunner",  # answers from a recorded table (torch-free)
}


def load_runner(name: str) -> Runner:
    """A registered runner by name, or any `package.module:Class` target (plug-ins, tests)."""
    target = RUNNERS.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ValueError(f"unknown runner {name!r} (known: {', '.join(RUNNERS)})")
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["RUNNERS", "InfeasibleConfig", "TrialConfig", "TrialResult", "load_runner"]
