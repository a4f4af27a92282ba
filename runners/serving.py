"""Drive an engine with the workload and turn what happened into contract metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runners.monitor import ResourceSampler
from runners.scheduler import Engine, RealClock, RequestTiming, run_dynamic
from runners.stats import serving_metrics
from runners.workload import make_requests


@dataclass
class ServeOutcome:
    timings: list[RequestTiming]
    samples: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def serve(engine: Engine, device: str, workload: dict[str, Any], knobs: dict[str, Any], seed: int,
          slo: dict[str, float]) -> ServeOutcome:
    """Warm up, then serve the measured requests inside the resource sampler."""
    warmup = int(workload.get("warmup_requests", 0))
    count = int(workload["requests"])
    requests = make_requests(workload, warmup + count, seed)
    batch_size = int(knobs["batch_size"])
    timeout_s = float(knobs["batch_timeout_ms"]) / 1e3
    concurrency = int(workload.get("concurrency", 8)) if workload["arrival"] == "closed" else None
    if knobs.get("scheduler", "dynamic") != "dynamic":
        from runners.contract import InfeasibleConfig

        raise InfeasibleConfig(f"scheduler={knobs['scheduler']} is not available in this build")
    if warmup:
        # Warm-up (allocator, kernels, any compile) runs back to back, outside the window.
        for req in requests[:warmup]:
            req.arrival_s = 0.0
        run_dynamic(requests[:warmup], engine, RealClock(), batch_size, timeout_s)
    with ResourceSampler(device) as sampler:
        timings = run_dynamic(requests[warmup:], engine, RealClock(), batch_size, timeout_s, concurrency)
    metrics, unavailable = serving_metrics(timings, slo)
    memory, memory_unavailable = sampler.summary()
    metrics.update(memory)
    unavailable.update(memory_unavailable)
    for name in ("mbu", "mfu"):
        unavailable.setdefault(name, "measured hardware ceilings are not available to this runner yet")
    return ServeOutcome(timings, sampler.samples, metrics, unavailable)
