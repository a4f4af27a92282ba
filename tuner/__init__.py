"""The tuner: space files, Optuna studies, trial launching, regression checks.

Knows Optuna; never imports torch (runners run in child processes).
"""

from __future__ import annotations

from tuner.errors import UsageError
from tuner.space import Space, SpaceError, load_space

__all__ = ["Space", "SpaceError", "UsageError", "load_space"]
