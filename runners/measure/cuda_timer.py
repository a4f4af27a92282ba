"""The one CUDA-event timer: device seconds between two recorded events on the current stream.

CUDA events time the device alone, so the host's launch latency does not count; `seconds`
waits for the end event only (not the whole device). Used by the ceilings, the weight-only
kernel autotuner, the training step timer and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CudaSpan:
    """`with CudaSpan() as span: work()` then `span.seconds()`; `record()` marks more points
    (`seconds_to(event)`) on one reference, as `monitor.StepTimer` does per step."""

    def __init__(self) -> None:
        self.start: Any = None
        self.end: Any = None

    def begin(self, wait: bool = False) -> CudaSpan:
        """Record the start; `wait` until the device reaches it (a host clock can then be read
        against it)."""
        self.start = self.record()
        if wait:
            self.start.synchronize()
        return self

    def __enter__(self) -> CudaSpan:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end = self.record()

    @staticmethod
    def record() -> Any:
        """A timing event recorded now on the current stream."""
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_to(self, event: Any) -> float:
        """Device seconds from the span's start to `event` (waits for `event`)."""
        event.synchronize()
        return self.start.elapsed_time(event) / 1e3

    def seconds(self) -> float:
        """Device seconds from start to end (waits for the end event)."""
        return self.seconds_to(self.end)


def cuda_seconds(fn: Callable[[], Any], calls: int = 1) -> float:
    """Device seconds per call of `calls` back-to-back calls of `fn`, timed by CUDA events."""
    with CudaSpan() as span:
        for _ in range(calls):
            fn()
    return span.seconds() / calls
