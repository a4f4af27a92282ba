"""Drive an engine with the workload and turn what happened into contract metrics.

The measured window follows LoadGen's rules: warm-up requests run first, outside it; then at
least `requests` are measured, and the window goes on issuing requests (up to `max_requests`,
until `max_duration_s`) while the p99 confidence interval is wider than
`target_p99_ci_ratio` of p99. Requests already issued when it stops are still served.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runners.contract import InfeasibleConfig
from runners.monitor import ResourceSampler
from runners.scheduler import Engine, IterationEngine, RealClock, RequestTiming, run_continuous, run_dynamic
from runners.stats import ci_relative_width, request_latencies_ms, serving_metrics
from runners.workload import Request, make_requests


@dataclass
class ServeOutcome:
    timings: list[RequestTiming]
    samples: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # window, ceilings, cross-checks


@dataclass
class WindowRule:
    """When the measured window may end (LoadGen-style extension)."""

    min_requests: int
    max_duration_s: float = math.inf
    target_ci_ratio: float | None = None  # (p99 CI high - low) / p99
    metric: str = "latency"  # ttft | tpot | latency
    started_at: float = field(default_factory=time.perf_counter)
    reason: str = ""
    _next_check: int = 0

    @classmethod
    def from_workload(cls, workload: dict[str, Any]) -> WindowRule:
        target = workload.get("target_p99_ci_ratio")
        return cls(int(workload["requests"]), float(workload.get("max_duration_s") or math.inf),
                   None if target is None else float(target), str(workload.get("ci_metric", "latency")))

    def __call__(self, timings: Sequence[RequestTiming]) -> bool:
        if time.perf_counter() - self.started_at >= self.max_duration_s:
            self.reason = "max_duration_s reached"
            return True
        if len(timings) < self.min_requests:
            return False
        if self.target_ci_ratio is None:
            self.reason = "requests measured"
            return True
        if len(timings) < self._next_check:
            return False
        # The check runs inside the window: space checks geometrically (every 5 % more
        # requests) so its cost stays O(n log n) over the whole window.
        self._next_check = int(len(timings) * 1.05) + 1
        if ci_relative_width(request_latencies_ms(timings)[self.metric], 0.99) <= self.target_ci_ratio:
            self.reason = f"{self.metric} p99 CI within {self.target_ci_ratio:g} of p99"
            return True
        return False


def serve(engine: Engine, device: str, workload: dict[str, Any], knobs: dict[str, Any], seed: int,
          slo: dict[str, float], ceilings: Any | None = None, nvml: Any | None = None,
          sample_resources: bool = True, sample_interval_s: float = 0.025) -> ServeOutcome:
    """Warm up, then serve the measured requests inside the resource sampler.

    `ceilings`: a `runners.ceilings.Ceilings` (default: measured once per device and cached);
    `nvml`: an NVML module for the sampler (tests); `sample_resources=False` turns the NVML
    sampler off (overhead benchmarks; power/energy metrics then absent with that reason).
    """
    warmup = int(workload.get("warmup_requests", 0))
    rule = WindowRule.from_workload(workload)
    count = max(rule.min_requests, int(workload.get("max_requests") or 0))
    requests = make_requests(workload, warmup + count, seed)
    measured = _rebase(requests[warmup:])
    concurrency = int(workload.get("concurrency", 8)) if workload["arrival"] == "closed" else None
    run = _scheduler(engine, knobs)
    ceilings, ceilings_reason = _ceilings(device, ceilings)
    if warmup:
        # Warm-up (allocator, kernels, any compile) runs back to back, outside the window.
        for req in requests[:warmup]:
            req.arrival_s = 0.0
        run.serve(requests[:warmup], None, None)
    before = _counters(run.engine)
    # Garbage of model build and warm-up is collected now, not as a pause inside the window.
    gc.collect()
    with ResourceSampler(device, sample_interval_s, nvml=nvml, use_nvml=sample_resources) as sampler:
        t0 = time.perf_counter()
        rule.started_at = t0
        timings = run.serve(measured, concurrency, rule)
        window_s = time.perf_counter() - t0
    metrics, unavailable = serving_metrics(timings, slo)
    tokens = float(sum(t.output_tokens for t in timings))
    resources, resources_unavailable = sampler.summary(tokens)
    metrics.update(resources)
    unavailable.update(resources_unavailable)
    work = _delta(before, _counters(run.engine))
    efficiency, efficiency_unavailable = roofline(work, window_s, ceilings, ceilings_reason)
    metrics.update(efficiency)
    unavailable.update(efficiency_unavailable)
    info = {"window_s": window_s, "scheduler": run.name, "window_end": rule.reason or "all requests served",
            "issued_requests": count, "engine_work": work, **sampler.info}
    info.update(load_check(timings, metrics, concurrency is not None))
    if ceilings is not None:
        info["ceilings"] = {"copy_gb_s": ceilings.copy_bytes_per_s / 1e9,
                            "matmul_tflop_s": ceilings.matmul_flops_per_s / 1e12,
                            "device_name": ceilings.device_name, "driver": ceilings.driver}
    return ServeOutcome(timings, sampler.samples, metrics, unavailable, info)


def _rebase(requests: list[Request]) -> list[Request]:
    """Open-loop arrivals of the measured requests from 0, so the window opens with work."""
    if requests and not math.isnan(requests[0].arrival_s):
        first = requests[0].arrival_s
        for req in requests:
            req.arrival_s -= first
    return requests


@dataclass
class _Run:
    name: str
    engine: Any
    knobs: dict[str, Any]

    def serve(self, requests: list[Request], concurrency: int | None, stop: Any) -> list[RequestTiming]:
        batch_size = int(self.knobs["batch_size"])
        timeout_s = float(self.knobs["batch_timeout_ms"]) / 1e3
        if self.name == "continuous":
            # A slot pool admits at most its `max_sequences` (GPU rows, or more when offloaded).
            batch_size = min(batch_size, int(getattr(self.engine, "max_sequences", 0) or batch_size))
            return run_continuous(requests, self.engine, RealClock(), batch_size, timeout_s, concurrency, stop)
        return run_dynamic(requests, self.engine, RealClock(), batch_size, timeout_s, concurrency, stop)


def _scheduler(engine: Engine, knobs: dict[str, Any]) -> _Run:
    name = knobs.get("scheduler", "dynamic")
    if name == "dynamic":
        return _Run(name, engine, knobs)
    if name != "continuous":
        raise InfeasibleConfig(f"unknown scheduler {name!r}")
    return _Run(name, iteration_engine(engine, knobs), knobs)


def iteration_engine(engine: Any, knobs: dict[str, Any]) -> IterationEngine:
    """The engine itself when it batches per iteration (the fast engine's `SlotEngine`), else
    `ContinuousEngine` over its transformers model (engine=hf)."""
    if all(hasattr(engine, verb) for verb in ("join", "step", "leave")):
        return engine
    model = getattr(engine, "model", None)
    # ContinuousEngine drives a transformers causal LM (past_key_values, attention_mask);
    # another engine's own module cannot be driven that way.
    if not (hasattr(engine, "prompt_fn") and hasattr(model, "config") and hasattr(model, "generate")):
        raise InfeasibleConfig(f"scheduler=continuous: {type(engine).__name__} cannot add sequences between "
                               "steps and exposes no transformers model to batch per iteration")
    if knobs.get("kv_cache", "dynamic") != "dynamic":
        raise InfeasibleConfig(f"scheduler=continuous in transformers' loop runs on kv_cache=dynamic only, "
                               f"not {knobs['kv_cache']} (engine=fast batches every other policy per iteration)")
    from runners.continuous import ContinuousEngine

    return ContinuousEngine(engine.model, engine.device, engine.prompt_fn)


def _ceilings(device: str, given: Any | None) -> tuple[Any | None, str]:
    if given is not None:
        return given, ""
    try:
        from runners.ceilings import get_ceilings

        return get_ceilings(device), ""
    except Exception as exc:  # noqa: BLE001 - a ceiling we cannot measure leaves mbu/mfu absent
        return None, f"hardware ceilings could not be measured: {type(exc).__name__}: {exc}"


def _counters(engine: Any) -> dict[str, float] | None:
    counters = getattr(engine, "counters", None)
    return dict(counters()) if callable(counters) else None


def _delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    if before is None or after is None:
        return {}
    return {k: after[k] - before.get(k, 0.0) for k in after}


def roofline(work: dict[str, float], window_s: float, ceilings: Any | None, reason: str
             ) -> tuple[dict[str, float], dict[str, str]]:
    """`mbu` = bytes read / window / copy bandwidth; `mfu` = FLOPs / window / matmul rate."""
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    pairs = (("mbu", "bytes_read", "copy_bytes_per_s"), ("mfu", "flops", "matmul_flops_per_s"))
    for metric, counter, ceiling in pairs:
        if ceilings is None:
            unavailable[metric] = reason
        elif counter not in work:
            unavailable[metric] = f"the engine does not count {counter}"
        elif window_s <= 0:
            unavailable[metric] = "empty measured window"
        else:
            metrics[metric] = work[counter] / window_s / getattr(ceilings, ceiling)
    return metrics, unavailable


def load_check(timings: Sequence[RequestTiming], metrics: dict[str, float], closed: bool) -> dict[str, Any]:
    """Open loop: the offered rate and whether the stack kept up. An overloaded open-loop window
    has a queue that grows with time, so its latency percentiles describe the window's length
    rather than the configuration; the flag lets a reader (or a constraint) see that."""
    if closed or len(timings) < 2:
        return {}
    arrivals = sorted(t.arrival_s for t in timings)
    span = arrivals[-1] - arrivals[0]
    if span <= 0:
        return {}
    offered = (len(arrivals) - 1) / span
    return {"offered_rps": offered, "overloaded": metrics["request_throughput_rps"] < 0.9 * offered}
