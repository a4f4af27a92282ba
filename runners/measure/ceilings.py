"""Measured hardware ceilings (copy bandwidth, matmul rate), once per device, cached on disk.

MBU and MFU divide what a trial achieved by these figures, so they are measured on the very
device and driver, never taken from a spec sheet (DESIGN.md: "never hard-coded"). The cache is
one JSON file keyed by device name + driver; a new driver or a different GPU measures again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CACHE_ENV = "AUTOGLM_TUNE_CACHE"
CACHE_FILE = "ceilings.json"


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # large device-to-device copy, bytes read + bytes written
    matmul_flops_per_s: float  # large square matmul, bf16 on CUDA, fp32 on CPU
    device_name: str
    driver: str
    measured_at: str  # ISO-8601 UTC
    matmul_dtype: str = ""
    copy_mib: float = 0.0  # size of the buffer copied
    matmul_n: int = 0  # n of the n x n x n matmul

    @property
    def key(self) -> str:
        return cache_key(self.device_name, self.driver)


def cache_key(device_name: str, driver: str) -> str:
    return f"{device_name} | {driver}"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autoglm-tune")


def get_ceilings(device: str, cache_dir: Path | None = None, refresh: bool = False) -> Ceilings:
    """The ceilings of `device` ("cpu", "cuda", "cuda:K"): from the cache, else measured and cached."""
    import torch

    device = "cuda:0" if device == "cuda" else device
    name, driver = identify(device)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / CACHE_FILE
    cached = _read_cache(path)
    key = cache_key(name, driver)
    if not refresh and key in cached:
        return Ceilings(**cached[key])
    with torch.inference_mode():
        ceilings = measure(device, name, driver)
    cached[key] = dataclasses.asdict(ceilings)
    _write_cache(path, cached)
    return ceilings


def lookup_ceilings(device: str, given: Ceilings | None = None) -> tuple[Ceilings | None, str]:
    """The ceilings a trial divides by, and why they are absent: `given` (a test's or a
    benchmark's), else `get_ceilings`. The one error rule: a ceiling that cannot be measured
    (out of memory under a tight `memory_limit_mib`, no driver, ...) leaves MBU / MFU absent
    with the reason; the trial goes on."""
    if given is not None:
        return given, ""
    try:
        return get_ceilings(device), ""
    except Exception as exc:  # noqa: BLE001 - see the rule above
        first_line = (str(exc).splitlines() or [""])[0][:200]
        return None, f"hardware ceilings could not be measured: {type(exc).__name__}: {first_line}"


def identify(device: str) -> tuple[str, str]:
    """(device name, driver) — the cache key. On CPU the "driver" is what sets the matmul rate:
    the torch build and its thread count."""
    import torch

    if device.startswith("cuda"):
        from runners.measure.environment import _nvidia_driver

        return torch.cuda.get_device_name(device), f"nvidia {_nvidia_driver() or 'unknown'}"
    return _cpu_name(), f"torch {torch.__version__} threads {torch.get_num_threads()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(device: str, name: str = "", driver: str = "") -> Ceilings:
    """Measure copy bandwidth and matmul rate now (seconds on a GPU, a few seconds on a CPU)."""
    import torch

    cuda = device.startswith("cuda")
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    matmul_n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    copy_rate = _copy_rate(device, copy_bytes)
    flop_rate = _matmul_rate(device, matmul_n, dtype)
    if cuda:
        # Hand the buffers back: left cached, they would count in the trial's torch reserved peak.
        torch.cuda.empty_cache()
    return Ceilings(
        copy_bytes_per_s=copy_rate, matmul_flops_per_s=flop_rate,
        device_name=name or identify(device)[0], driver=driver or identify(device)[1],
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        matmul_dtype=str(dtype).removeprefix("torch."), copy_mib=copy_bytes / 2**20, matmul_n=matmul_n)


def _copy_rate(device: str, nbytes: int) -> float:
    import torch

    try:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    except torch.OutOfMemoryError:
        # A trial's model may already fill the GPU: a quarter the size still defeats L2 caching.
        nbytes //= 4
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _best_time(device, lambda: dst.copy_(src))
    return 2 * nbytes / seconds  # every byte is read once and written once


def _matmul_rate(device: str, n: int, dtype: Any) -> float:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _best_time(device, lambda: torch.matmul(a, b, out=out))
    return 2 * n**3 / seconds


def _best_time(device: str, fn: Callable[[], Any], warmup: int = 3, repeats: int = 10) -> float:
    """Fastest of `repeats` timed calls: a ceiling is the best the device does, not the typical.
    CUDA events time the device alone, so launch latency of the host does not count."""
    import torch

    if not device.startswith("cuda"):
        warmup, repeats = 1, 5  # a CPU figure in a second or two; it varies more than that anyway

    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        from runners.measure.cuda_timer import cuda_seconds

        torch.cuda.synchronize(device)
        return min(cuda_seconds(fn) for _ in range(repeats))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again rather than fail a trial
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename so that parallel trial processes never read half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
