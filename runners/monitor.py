"""Resource sampling around a measured window: a background thread as a context manager.

Every tick records this process's RSS and, on an NVIDIA GPU, one row of NVML readings (device
and process memory, power, energy counter, utilisation, clocks, temperature). On CUDA the torch
allocator peaks are reset on entry and read on exit. Each sample is a plain dict so the
timeline can be written to the trial artifact as is.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil

from runners.nvml import NvmlReader, NvmlUnavailable, load_nvml, summarize

MIB = 1024 * 1024


class ResourceSampler:
    """Samples resources every `interval_s` while the `with` block runs.

    `nvml`: an NVML module to use instead of `pynvml` (tests inject a fake one); passing one also
    samples NVML on a CPU `device`, for those tests. `use_nvml=False` turns NVML off (overhead
    benchmarks). `nvml_index` picks the NVML device where no CUDA device names it.
    """

    def __init__(self, device: str, interval_s: float = 0.025, nvml: Any | None = None,
                 use_nvml: bool = True, nvml_index: int | None = None) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.cuda = device.startswith("cuda")
        self._nvml_module = nvml
        self._use_nvml = use_nvml and (self.cuda or nvml is not None)
        self._nvml_index = nvml_index
        self._reader: NvmlReader | None = None
        self._nvml_reason = ""
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> ResourceSampler:
        self._open_nvml()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)  # the window's work is done before the last row
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._reader is not None:
            try:
                self._reader.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass

    def _open_nvml(self) -> None:
        if not self._use_nvml:
            self._nvml_reason = ("NVML sampling turned off" if self.cuda
                                 else "power, energy and device memory come from NVML, which CPUs do not have")
            return
        try:
            nvml = load_nvml(self._nvml_module)
            index, uuid = self._nvml_target()
            self._reader = NvmlReader.open(nvml, index=index, uuid=uuid)
        except NvmlUnavailable as exc:
            self._nvml_reason = str(exc)

    def _nvml_target(self) -> tuple[int | None, str | None]:
        """NVML index or UUID of this sampler's CUDA device; NVML numbers devices ignoring
        CUDA_VISIBLE_DEVICES, so the UUID from torch is the reliable link."""
        if not self.cuda or self._nvml_module is not None:
            return self._nvml_index, None
        import torch

        props = torch.cuda.get_device_properties(self.device)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            # torch prints the bare UUID; NVML wants the GPU-/MIG- prefix.
            return None, uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ordinal = torch.device(self.device).index or 0
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if ordinal < len(entries):
            entry = entries[ordinal]
            return (int(entry), None) if entry.isdigit() else (None, entry)
        return ordinal, None

    def _loop(self) -> None:
        # Event.wait doubles as the sleep, so stopping never waits a whole interval.
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        row: dict[str, Any] = {"t_s": time.perf_counter() - self._t0,
                               "rss_mib": self._process.memory_info().rss / MIB}
        if self._reader is not None:
            row.update(self._reader.read())
        self.samples.append(row)

    def summary(self, tokens: float | None = None) -> tuple[dict[str, float], dict[str, str]]:
        """Memory, power and energy metrics of the window; `tokens` (generated in the window)
        turns the energy into `energy_j_per_tok`. Fills `self.info` with cross-checks."""
        metrics: dict[str, float] = {}
        unavailable: dict[str, str] = {}
        if self.cuda:
            import torch

            metrics["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
            metrics["torch_peak_reserved_mib"] = torch.cuda.max_memory_reserved(self.device) / MIB
        else:
            for name in ("torch_peak_allocated_mib", "torch_peak_reserved_mib"):
                unavailable[name] = "the torch CUDA allocator exists only on CUDA devices"
        if self._reader is not None:
            nvml_metrics, nvml_missing, info = summarize(self.samples, tokens, self._reader.unavailable)
            metrics.update(nvml_metrics)
            unavailable.update(nvml_missing)
            self.info.update(info)
            self.info["nvml_unavailable_fields"] = dict(self._reader.unavailable)
            self.info.update({f"nvml_note_{k}": v for k, v in self._reader.notes.items()})
        else:
            for name in ("mean_power_w", "energy_j_per_tok"):
                unavailable[name] = self._nvml_reason
            if self.cuda:
                unavailable["peak_memory_mib"] = self._nvml_reason
        if not self.cuda and self._reader is None:
            # DESIGN.md: on CPU the memory figure is the process RSS peak.
            metrics["peak_memory_mib"] = max(s["rss_mib"] for s in self.samples)
        if "peak_memory_mib" in metrics and "torch_peak_reserved_mib" in metrics:
            # What the CUDA context, cuBLAS workspaces and kernels hold beyond torch's allocator.
            self.info["nvml_minus_torch_reserved_mib"] = (metrics["peak_memory_mib"]
                                                         - metrics["torch_peak_reserved_mib"])
        self.info["samples"] = len(self.samples)
        if len(self.samples) > 1:
            gaps = [b["t_s"] - a["t_s"] for a, b in zip(self.samples, self.samples[1:], strict=False)]
            self.info["sample_interval_median_s"] = sorted(gaps)[len(gaps) // 2]
        return metrics, unavailable
