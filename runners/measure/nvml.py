"""NVML readings of one GPU: a per-sample reader and the metrics derived from a timeline.

The NVML module is a parameter (default: `pynvml` from nvidia-ml-py), so tests inject a fake
one at this boundary. A field NVML cannot give (CPU, MIG, NotSupported, no energy counter)
is dropped from every row and its reason kept: the derived metric is then absent, never 0.
Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psutil

MIB = 1024 * 1024

# Row key -> unit, for the artifact's readers.
FIELDS: dict[str, str] = {
    "gpu_used_mib": "MiB",  # whole device, every process
    "process_used_mib": "MiB",  # this process
    "power_w": "W",  # nvmlDeviceGetPowerUsage: the driver's (averaged) board power
    "power_instant_w": "W",  # NVML_FI_DEV_POWER_INSTANT where the driver has it
    "energy_j": "J",  # cumulative energy counter since the driver loaded
    "sm_util_pct": "%",
    "mem_util_pct": "%",
    "sm_clock_mhz": "MHz",
    "mem_clock_mhz": "MHz",
    "temperature_c": "C",
}


class NvmlUnavailable(Exception):
    """NVML cannot be used at all here (not installed, no driver, no such device)."""


def load_nvml(nvml: Any | None = None) -> Any:
    """The injected module, else `pynvml`; initialised. Raises NvmlUnavailable with the reason."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise NvmlUnavailable("pynvml (nvidia-ml-py) is not installed") from None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError subclasses, or a missing library
        raise NvmlUnavailable(f"nvmlInit failed: {exc}") from None
    return nvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads one row of NVML fields for one device; remembers which fields failed and why."""

    def __init__(self, nvml: Any, handle: Any, pid: int | None = None) -> None:
        self.nvml = nvml
        self.handle = handle
        self.pid = os.getpid() if pid is None else pid
        self.unavailable: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self._readers: dict[str, Callable[[], float]] = {
            "gpu_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / MIB,
            "process_used_mib": self._process_mib,
            # NVML reports power in milliwatts and energy in millijoules.
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "power_instant_w": self._power_instant_w,
            "energy_j": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3,
            "sm_util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "mem_util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).memory),
            "sm_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
            "temperature_c": lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        }

    @classmethod
    def open(cls, nvml: Any, index: int | None = None, uuid: str | None = None,
             pid: int | None = None) -> NvmlReader:
        """A reader for the device with this UUID (preferred: immune to CUDA_VISIBLE_DEVICES
        renumbering), else this NVML index."""
        try:
            if uuid:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            else:
                handle = nvml.nvmlDeviceGetHandleByIndex(0 if index is None else index)
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotFound and kin
            raise NvmlUnavailable(f"no NVML handle for device uuid={uuid} index={index}: {exc}") from None
        return cls(nvml, handle, pid)

    def read(self) -> dict[str, float]:
        row: dict[str, float] = {}
        for name, reader in list(self._readers.items()):
            try:
                row[name] = float(reader())
            except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported, missing APIs, None
                # A field that fails once is not asked again: NotSupported does not come back,
                # and a failing call each tick would only add overhead.
                self.unavailable[name] = f"NVML {name}: {type(exc).__name__}: {exc}"
                del self._readers[name]
        return row

    def _process_mib(self) -> float:
        procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        mine = [p for p in procs if p.pid == self.pid]
        if not mine and len(procs) == 1:
            # In a container NVML lists host PIDs. This process holds a CUDA context on the
            # device, so it is in the list; when the list has one entry, that entry is it.
            mine = list(procs)
            self.notes["process_used_mib"] = (f"pid {self.pid} not in NVML's list (PID namespace); "
                                              f"the device's only compute process {procs[0].pid} taken as this one")
        if not mine:
            raise LookupError(f"pid {self.pid} not among NVML's {len(procs)} compute processes "
                              "(PID namespace?) and more than one process holds the device")
        used = mine[0].usedGpuMemory
        if used is None:
            raise LookupError("NVML does not report per-process memory here (usedGpuMemory N/A)")
        return used / MIB

    def _power_instant_w(self) -> float:
        (value,) = self.nvml.nvmlDeviceGetFieldValues(self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT])
        if value.nvmlReturn != 0:
            raise LookupError(f"field query returned {value.nvmlReturn}")
        return value.value.uiVal / 1e3


def _column(samples: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(s["t_s"], s[key]) for s in samples if key in s]
    if not rows:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(rows, dtype=float)
    return arr[:, 0], arr[:, 1]


def power_integral_j(samples: Sequence[dict[str, Any]], key: str) -> float | None:
    """Trapezoid integral of a power column (W) over the rows' `t_s` (s); None under 2 rows."""
    t, watts = _column(samples, key)
    if t.size < 2:
        return None
    return float(np.sum((watts[1:] + watts[:-1]) / 2 * np.diff(t)))


def summarize(samples: Sequence[dict[str, Any]], tokens: float | None,
              unavailable: dict[str, str]) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """`peak_memory_mib`, `mean_power_w`, `energy_j_per_tok` from a timeline of NVML rows.

    `unavailable` holds why fields are missing (from the reader). Energy per token comes from the
    energy counter's delta; the power integral is kept alongside as a cross-check (and used
    only when the counter is missing). Returns (metrics, unavailable metrics, info).
    """
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    info: dict[str, Any] = {}
    _, process = _column(samples, "process_used_mib")
    if process.size:
        metrics["peak_memory_mib"] = float(process.max())
    else:
        missing["peak_memory_mib"] = unavailable.get("process_used_mib", "no NVML process-memory samples")
    _, device_used = _column(samples, "gpu_used_mib")
    if device_used.size:
        info["nvml_device_used_peak_mib"] = float(device_used.max())

    # Instantaneous power tracks the counter best; the averaged reading lags by ~1 s.
    power_key = "power_instant_w" if _column(samples, "power_instant_w")[0].size >= 2 else "power_w"
    t, _ = _column(samples, power_key)
    integral = power_integral_j(samples, power_key)
    duration = float(t[-1] - t[0]) if t.size >= 2 else 0.0
    if integral is not None and duration > 0:
        metrics["mean_power_w"] = integral / duration
        info.update(power_source=power_key, energy_power_integral_j=integral, power_window_s=duration)
    else:
        missing["mean_power_w"] = unavailable.get(power_key, unavailable.get("power_w", "fewer than 2 power samples"))

    t_e, energy = _column(samples, "energy_j")
    counter = float(energy[-1] - energy[0]) if energy.size >= 2 else None
    if counter is not None:
        info.update(energy_counter_j=counter, energy_window_s=float(t_e[-1] - t_e[0]))
        if integral:
            info["energy_counter_vs_integral"] = counter / integral
    energy_j, source = (counter, "counter") if counter else (integral, power_key + " integral")
    if not tokens:
        missing["energy_j_per_tok"] = "no tokens generated in the window"
    elif energy_j:
        metrics["energy_j_per_tok"] = energy_j / tokens
        info["energy_source"] = source
    else:
        missing["energy_j_per_tok"] = unavailable.get("energy_j", "energy counter did not advance") + \
            "; " + missing.get("mean_power_w", "power integral unavailable")
    return metrics, missing, info


# --- out-of-process sampling --------------------------------------------------------------
# A sampling thread in the measured process shares the GIL with a launch-bound decode loop;
# a child process costs the measured process nothing between the handshake and the stop (it
# writes rows to a file). On an H200 both cost 0.7-0.9 % of glm-1b decode, equal within noise.

def sample_until_stopped(reader: NvmlReader | None, out: Any, interval_s: float, rss_pid: int | None,
                         stop: Callable[[float], bool], started: Callable[[], None] = lambda: None) -> None:
    """Write one JSON row per tick to `out` (ticks on an absolute grid from the first row, whose
    `t_s` is 0; `started()` right after it) until `stop(timeout)` says so; one last row after."""
    process = psutil.Process(rss_pid) if rss_pid else None
    t0 = time.monotonic()

    def row() -> dict[str, float]:
        r: dict[str, float] = {"t_s": time.monotonic() - t0}
        if process is not None:
            r["rss_mib"] = process.memory_info().rss / MIB
        if reader is not None:
            r.update(reader.read())
        return r

    out.write(json.dumps(row()) + "\n")
    started()
    tick = 1
    while not stop(max(t0 + tick * interval_s - time.monotonic(), 0.0)):
        out.write(json.dumps(row()) + "\n")
        # The next tick on the grid; ticks missed are skipped rather than sampled in a burst.
        tick = max(tick + 1, int((time.monotonic() - t0) / interval_s) + 1)
    out.write(json.dumps(row()) + "\n")


def _child_main(argv: list[str] | None = None) -> None:
    """`python -m runners.measure.nvml --rows FILE --pid PID [--uuid U | --index I] --interval S`:
    prints `ready` once sampling runs (times count from its first row), samples until stdin
    closes or says `stop`, then writes a final `{"unavailable", "notes", "error"}` line and
    prints `done`."""
    import argparse
    import select
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--uuid", default="")
    parser.add_argument("--index", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.025)
    parser.add_argument("--no-nvml", action="store_true", help="sample the RSS only (CPU devices)")
    args = parser.parse_args(argv)
    reader: NvmlReader | None = None
    error = "NVML not asked for" if args.no_nvml else ""
    try:
        if not args.no_nvml:
            reader = NvmlReader.open(load_nvml(), index=args.index, uuid=args.uuid or None, pid=args.pid)
    except NvmlUnavailable as exc:
        error = str(exc)

    def stop(timeout: float) -> bool:
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        return bool(ready)  # a "stop" line or EOF

    def ready() -> None:
        print("ready", flush=True)

    with open(args.rows, "w") as out:
        sample_until_stopped(reader, out, args.interval, args.pid, stop, ready)
        tail = {"unavailable": reader.unavailable if reader else {}, "notes": reader.notes if reader else {},
                "error": error}
        out.write(json.dumps(tail) + "\n")
    print("done", flush=True)


if __name__ == "__main__":
    _child_main()
