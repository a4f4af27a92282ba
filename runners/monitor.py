"""Resource sampling around a measured window: a background thread as a context manager.

On CPU the memory figure is the process RSS; on CUDA the torch allocator peaks are read too.
Each sample is a plain dict so the timeline can be written to the trial artifact as is.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil

MIB = 1024 * 1024


class ResourceSampler:
    """Samples this process's memory every `interval_s` while the `with` block runs."""

    def __init__(self, device: str, interval_s: float = 0.025) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> ResourceSampler:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        # Event.wait doubles as the sleep, so stopping never waits a whole interval.
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        self.samples.append({"t_s": time.perf_counter() - self._t0,
                             "rss_mib": self._process.memory_info().rss / MIB})

    def summary(self) -> tuple[dict[str, float], dict[str, str]]:
        metrics: dict[str, float] = {}
        unavailable: dict[str, str] = {}
        if self.device.startswith("cuda"):
            import torch

            metrics["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
            metrics["torch_peak_reserved_mib"] = torch.cuda.max_memory_reserved(self.device) / MIB
            unavailable["peak_memory_mib"] = "NVML device-memory sampling is not wired into this sampler"
        else:
            metrics["peak_memory_mib"] = max(s["rss_mib"] for s in self.samples)
            for name in ("torch_peak_allocated_mib", "torch_peak_reserved_mib"):
                unavailable[name] = "the torch CUDA allocator exists only on CUDA devices"
        for name in ("mean_power_w", "energy_j_per_tok"):
            unavailable[name] = "power and energy come from NVML, which CPUs do not have" \
                if not self.device.startswith("cuda") else "NVML power sampling is not wired in"
        return metrics, unavailable
