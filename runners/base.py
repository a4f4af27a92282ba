"""The runner contract: a trial config in, a trial result out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from runners.contract import TrialConfig, TrialResult


class Runner(ABC):
    """One backend of the harness. Called in a child process, once per trial.

    `run` returns a result for a config that ran, raises `InfeasibleConfig` for a
    deterministic config failure, and lets anything else propagate (the trial then FAILs).
    """

    name: str

    @abstractmethod
    def run(self, config: TrialConfig) -> TrialResult: ...


def resolve_device(device: str) -> str:
    """`auto` is CUDA when present, else CPU; `cuda` means the current CUDA device."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        from runners.contract import InfeasibleConfig

        if not torch.cuda.is_available():
            raise InfeasibleConfig(f"device {device} asked for, but this machine has no usable CUDA GPU")
        return "cuda:0" if device == "cuda" else device
    return device
