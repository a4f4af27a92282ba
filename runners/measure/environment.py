"""What a trial ran on: device, driver and library versions, host and process."""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "optimum_quanto": _version("optimum-quanto"),
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "device_memory_mib": props.total_memory // (1024 * 1024),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        })
        env["driver"] = _nvidia_driver()
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["driver"] = None
    return env


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or unusable: the driver stays unknown
        return None
