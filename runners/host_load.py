"""Was the host visibly busy with someone else's work during a measured window?

A trial measured next to another job reads slower for reasons that are not its knobs. The
evidence is kept with the trial (`host_busy`); the number itself is left as measured.

- CPU: CPU time the whole machine spent during the window minus what this process and its
  descendants spent (the NVML sampler child included), in cores. Busy when others used at
  least `OTHER_CORES_BUSY` cores on average, or a quarter of the machine, whichever is more.
- CUDA: compute processes on our GPU other than this one (NVML's process list). NVML lists host
  PIDs in a container; when this process's PID is not in the list, one entry is taken as ours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

OTHER_CORES_BUSY = 0.5


def _busy_seconds(times: Any) -> float:
    # Everything but idle and iowait is work someone did.
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _own_seconds() -> float:
    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # a child that exited meanwhile
            continue
        total += t.user + t.system
    return total


@dataclass
class HostLoad:
    """Context manager around a window; `busy` holds the evidence when others were working."""

    device: str = "cpu"
    nvml: Any | None = None  # an NVML module (tests inject a fake one)
    busy: dict[str, Any] = field(default_factory=dict)
    _t0: float = 0.0
    _machine0: float = 0.0
    _own0: float = 0.0

    def __enter__(self) -> HostLoad:
        self._t0 = time.perf_counter()
        self._machine0 = _busy_seconds(psutil.cpu_times())
        self._own0 = _own_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        window_s = time.perf_counter() - self._t0
        if self.device.startswith("cuda"):
            self.busy = gpu_neighbours(self.device, self.nvml)
            return
        machine = _busy_seconds(psutil.cpu_times()) - self._machine0
        own = _own_seconds() - self._own0
        self.busy = cpu_neighbours(machine, own, window_s, psutil.cpu_count() or 1)


def cpu_neighbours(machine_s: float, own_s: float, window_s: float, cores: int) -> dict[str, Any]:
    """Evidence that other processes used the CPU during a window of `window_s`, else {}."""
    if window_s <= 0:
        return {}
    other_cores = max(0.0, machine_s - own_s) / window_s
    if other_cores < max(OTHER_CORES_BUSY, 0.25 * cores):
        return {}
    return {"other_cpu_cores": round(other_cores, 2), "cores": cores, "window_s": round(window_s, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def gpu_neighbours(device: str, nvml: Any | None = None) -> dict[str, Any]:
    """Evidence that other processes computed on our GPU, else {} (also when NVML is absent)."""
    from runners.measure.nvml import NvmlReader, load_nvml

    try:
        module = load_nvml(nvml)
    except Exception:  # noqa: BLE001 - NVML absent: no evidence either way
        return {}
    try:
        handle = NvmlReader.open(module, **_nvml_target(device, nvml)).handle
        procs = list(module.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception:  # noqa: BLE001 - NVML failing: no evidence either way
        return {}
    finally:
        shutdown = getattr(module, "nvmlShutdown", None)
        if callable(shutdown):
            try:
                shutdown()  # balances nvmlInit (reference-counted)
            except Exception:  # noqa: BLE001 - best effort
                pass
    mine = os.getpid()
    others = [p for p in procs if p.pid != mine]
    if len(others) == len(procs) and others:
        others = others[1:]  # PID namespace: our own entry is not recognisable; one of them is us
    if not others:
        return {}
    return {"other_gpu_processes": [{"pid": int(p.pid), "used_mib": (p.usedGpuMemory or 0) / 2**20}
                                    for p in others]}


def _nvml_target(device: str, nvml: Any | None) -> dict[str, Any]:
    """NVML numbers devices ignoring CUDA_VISIBLE_DEVICES: the UUID from torch links them."""
    if nvml is not None:  # an injected module (tests): its device 0
        return {"index": 0}
    import torch

    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
    if not uuid:
        return {"index": torch.device(device).index or 0}
    return {"uuid": uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"}
