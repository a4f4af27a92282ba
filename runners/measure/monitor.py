"""Resource sampling around a measured window: a background thread as a context manager.

Every tick records this process's RSS and, on an NVIDIA GPU, one row of NVML readings (device
and process memory, power, energy counter, utilisation, clocks, temperature). On CUDA the torch
allocator peaks are reset on entry and read on exit. Each sample is a plain dict so the
timeline can be written to the trial artifact as is.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from runners.measure.cuda_timer import CudaSpan
from runners.measure.nvml import NvmlReader, NvmlUnavailable, load_nvml, summarize

MIB = 1024 * 1024


class ResourceSampler:
    """Samples resources every `interval_s` while the `with` block runs.

    `nvml`: an NVML module to use instead of `pynvml` (tests inject a fake one); passing one also
    samples NVML on a CPU `device`, for those tests. `use_nvml=False` turns NVML off (overhead
    benchmarks). `nvml_index` picks the NVML device where no CUDA device names it.
    `out_of_process` (default: on CUDA with the real pynvml) samples from a child process
    (`python -m runners.measure.nvml`) instead of a thread, so the measured process pays nothing.
    """

    def __init__(self, device: str, interval_s: float = 0.025, nvml: Any | None = None,
                 use_nvml: bool = True, nvml_index: int | None = None,
                 out_of_process: bool | None = None) -> None:
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
        self._nvml_ok = False  # NVML rows were sampled (in this process or the child)
        self._field_reasons: dict[str, str] = {}
        self._notes: dict[str, str] = {}
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._t0 = 0.0
        if out_of_process is None:
            out_of_process = self._use_nvml and self.cuda and nvml is None
        self._child: _ChildSampler | None = _ChildSampler(interval_s) if out_of_process else None

    def __enter__(self) -> ResourceSampler:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._child is not None:
            index, uuid = self._nvml_target() if self._use_nvml else (None, None)
            self._child.start(index, uuid, self._use_nvml)
            return self
        self._open_nvml()
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)  # the window's work is done before the last row
        if self._child is not None:
            self.samples = self._child.stop()
            self._nvml_ok = self._use_nvml and not self._child.error
            if not self._nvml_ok:
                self._open_nvml_reason(self._child.error)
            self._field_reasons, self._notes = self._child.unavailable, self._child.notes
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._reader is not None:
            self._nvml_ok = True
            self._field_reasons, self._notes = self._reader.unavailable, self._reader.notes
            try:
                self._reader.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass

    def _open_nvml_reason(self, error: str) -> None:
        if not self._use_nvml:
            self._nvml_reason = ("NVML sampling turned off" if self.cuda
                                 else "power, energy and device memory come from NVML, which CPUs do not have")
        else:
            self._nvml_reason = error

    def _open_nvml(self) -> None:
        if not self._use_nvml:
            self._open_nvml_reason("")
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
        # Event.wait doubles as the sleep, so stopping never waits a whole interval. Ticks sit
        # on an absolute grid: sleeping a full interval after each (slow) NVML read drifted
        # to 31.5 ms on an H200.
        tick = 1
        while not self._stop.wait(max(self._t0 + tick * self.interval_s - time.perf_counter(), 0.0)):
            self._sample()
            tick = max(tick + 1, int((time.perf_counter() - self._t0) / self.interval_s) + 1)

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
        if self._nvml_ok:
            nvml_metrics, nvml_missing, info = summarize(self.samples, tokens, self._field_reasons)
            metrics.update(nvml_metrics)
            unavailable.update(nvml_missing)
            self.info.update(info)
            self.info["nvml_unavailable_fields"] = dict(self._field_reasons)
            self.info.update({f"nvml_note_{k}": v for k, v in self._notes.items()})
        else:
            for name in ("mean_power_w", "energy_j_per_tok"):
                unavailable[name] = self._nvml_reason
            if self.cuda:
                unavailable["peak_memory_mib"] = self._nvml_reason
        if not self.cuda and not self._nvml_ok:
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


class _ChildSampler:
    """Runs `python -m runners.measure.nvml` for the window; rows come back through a file."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.error = ""
        self.unavailable: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="autoglm-nvml-")
        self._rows = Path(self._dir.name) / "rows.jsonl"

    def start(self, index: int | None, uuid: str | None, nvml: bool = True) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "runners.measure.nvml", "--rows", str(self._rows), "--pid", str(os.getpid()),
               "--interval", str(self.interval_s)]
        cmd += ["--uuid", uuid] if uuid else ["--index", str(index or 0)]
        cmd += [] if nvml else ["--no-nvml"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        # The window opens once the child samples: its first row is the window's start.
        if self._proc.stdout is None or self._proc.stdout.readline().strip() != "ready":
            self.error = f"NVML sampler process failed to start: {self._stderr()}"

    def stop(self) -> list[dict[str, Any]]:
        proc = self._proc
        if proc is None:
            return []
        try:
            if proc.stdin is not None:
                proc.stdin.write("stop\n")
                proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            self.error = self.error or "NVML sampler process did not stop"
        rows = []
        for line in self._rows.read_text().splitlines() if self._rows.exists() else []:
            record = json.loads(line)
            if "t_s" in record:
                rows.append(record)
            else:
                self.unavailable, self.notes = record["unavailable"], record["notes"]
                self.error = self.error or record["error"]
        self._dir.cleanup()
        if not rows and not self.error:
            self.error = f"NVML sampler process wrote no rows: {self._stderr()}"
        return rows

    def _stderr(self) -> str:
        if self._proc is None or self._proc.stderr is None:
            return ""
        try:
            self._proc.wait(timeout=5)
            return self._proc.stderr.read()[-500:]
        except subprocess.TimeoutExpired:
            return "(no exit)"


class StepTimer:
    """Per-step completion times on `clock` without a host sync per step.

    On CUDA each `mark()` records an event on the current stream (a few µs, no wait); `times()`
    synchronises once and maps the events onto the clock through a reference event taken by
    `start()`. A sync per step would stall the host's kernel launches behind the device and
    cost a launch-bound decode loop ~2 % (measured on an H200, glm-1b, batch 16). On CPU the
    clock is read directly.
    """

    def __init__(self, device: str, clock: Any) -> None:
        self.device = device
        self.clock = clock
        self.cuda = device.startswith("cuda")
        self._events: list[Any] = []
        self._cpu_times: list[float] = []
        self._span: CudaSpan | None = None
        self._t_ref = 0.0

    def start(self) -> StepTimer:
        self._events, self._cpu_times = [], []
        self._t_ref = self.clock.now()
        if self.cuda:
            self._span = CudaSpan().begin(wait=True)
            self._t_ref = self.clock.now()
        return self

    def mark(self) -> None:
        if self.cuda:
            self._events.append(CudaSpan.record())
        else:
            self._cpu_times.append(self.clock.now())

    def times(self) -> list[float]:
        if not self.cuda:
            return list(self._cpu_times)
        if not self._events:
            return []
        self._events[-1].synchronize()  # the last one done, every earlier one is too
        return [self._t_ref + self._span.seconds_to(e) for e in self._events]

    def durations_ms(self) -> list[float]:
        """Milliseconds between consecutive marks, the first counted from `start()`."""
        marks = [self._t_ref, *self.times()]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
