"""Runners: the GLM inference and training stacks, driven by plain configs.

Importing this package does not import torch; runner classes load on demand in the child
process that runs a trial.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from runners.contract import InfeasibleConfig, TrialConfig, TrialResult
from runners.registry import BUILTIN

if TYPE_CHECKING:
    from runners.base import Runner

# name -> "module:Class", read from the declarations (runners/registry.py).
RUNNERS: dict[str, str] = {name: spec.target for name, spec in BUILTIN.items()}


def load_runner(name: str) -> Runner:
    """A registered runner by name, or any `package.module:Class` target (plug-ins, tests)."""
    target = RUNNERS.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ValueError(f"unknown runner {name!r} (known: {', '.join(RUNNERS)})")
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["RUNNERS", "InfeasibleConfig", "TrialConfig", "TrialResult", "load_runner"]
