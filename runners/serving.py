"""Drive an engine with the workload and turn what happened into contract metrics.

The measured window follows LoadGen's rules: warm-up requests run first, outside it; then at
least `requests` are measured, and the window goes on issuing requests (up to `max_requests`)
while the p99 confidence interval is wider than `target_p99_ci_ratio` of p99. Requests already
issued when it stops are still served. It ends at once, partial, when its outcome is decided
(`runners.early_stop`) or it reaches `max_duration_s` (default 120 s).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runners.compile_watch import CompileWatch
from runners.contract import DEFAULT_MAX_DURATION_S, InfeasibleConfig
from runners.early_stop import DEFAULT_MIN_QUEUE, Bound, Decision, EarlyStop, SaturationTest, latency_bounds
from runners.host_load import HostLoad
from runners.measure.ceilings import lookup_ceilings
from runners.measure.monitor import ResourceSampler
from runners.progress_report import report_requests
from runners.scheduler import (
    Clock,
    Engine,
    IterationEngine,
    OffersIterationEngine,
    QueueState,
    RealClock,
    RequestTiming,
    run_continuous,
    run_dynamic,
)
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
    """When the measured window may end (LoadGen-style extension, plus early stop).

    It ends normally once `min_requests` are measured (and, with `target_ci_ratio`, the p99 CI
    is narrow enough); requests already issued are then still served. It ends early, dropping
    waiting and running requests (`abandon`), when `early` decides the outcome or the window
    reaches `max_duration_s`; `stopped_early` then holds the decision (a `met` decision of a
    capacity probe is a normal end and is not `stopped_early`).
    """

    min_requests: int
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    target_ci_ratio: float | None = None  # (p99 CI high - low) / p99
    metric: str = "latency"  # ttft | tpot | latency
    early: EarlyStop | None = None
    clock: Callable[[], float] = time.perf_counter
    started_at: float = field(default_factory=time.perf_counter)
    reason: str = ""
    abandon: bool = False
    stopped_early: dict[str, Any] | None = None
    measured_at_stop: int | None = None  # requests finished when it ended the window (the rest drained)
    decision: Decision | None = None
    _next_check: int = 0
    _arrived: int | None = None  # requests arrived by the last `observe`
    _oldest_wait_s: float | None = None  # longest wait of an arrived, unstarted request then

    @classmethod
    def from_workload(cls, workload: dict[str, Any], early: EarlyStop | None = None) -> WindowRule:
        target = workload.get("target_p99_ci_ratio")
        return cls(int(workload["requests"]), float(workload.get("max_duration_s") or DEFAULT_MAX_DURATION_S),
                   None if target is None else float(target), str(workload.get("ci_metric", "latency")), early)

    def observe(self, state: QueueState) -> None:
        """The scheduler's queue, just before each `__call__` (early stop reads it)."""
        waiting = state.waiting_arrivals()
        self._arrived = state.finished + state.running + len(waiting)
        self._oldest_wait_s = state.now_s - min(waiting) if waiting else 0.0
        if self.early is not None:
            self.early.observe(state)

    def __call__(self, timings: Sequence[RequestTiming]) -> bool:
        report_requests(len(timings), self.min_requests)  # asked after every batch: live progress
        ends = self._ends(timings)
        if ends and self.measured_at_stop is None:
            self.measured_at_stop = len(timings)
        return ends

    def _ends(self, timings: Sequence[RequestTiming]) -> bool:
        elapsed = self.clock() - self.started_at
        if elapsed >= self.max_duration_s:
            self.reason = "max_duration_s reached"
            self.abandon = True  # a hard length: nothing is served past it
            if len(timings) < self.min_requests:
                self._decided(Decision("max_duration_s", {"max_duration_s": self.max_duration_s,
                                                          "measured_requests": len(timings),
                                                          "arrived_requests": self._arrived,
                                                          "oldest_wait_s": self._oldest_wait_s,
                                                          "requests": self.min_requests}))
            return True
        if self.early is not None:
            decision = self.early.decide(timings, elapsed)
            # Requests of one window are not independent (a queue carries over), so "clearly
            # met" ends a probe only once its minimum is measured; "clearly broken" may end it at once.
            if decision is not None and (decision.rule != "met" or len(timings) >= self.min_requests):
                self._decided(decision)
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

    def _decided(self, decision: Decision) -> None:
        self.decision = decision
        self.abandon = True
        self.reason = f"early stop: {decision.rule}"
        if decision.rule != "met":
            self.stopped_early = decision.as_dict()


def serve(engine: Engine, device: str, workload: dict[str, Any], knobs: dict[str, Any], seed: int,
          slo: dict[str, float], ceilings: Any | None = None, nvml: Any | None = None,
          sample_resources: bool = True, sample_interval_s: float = 0.025,
          constraints: Sequence[dict[str, Any]] = (), bounds: Sequence[Bound] | None = None,
          stop_when_met: bool = False, clock_factory: Callable[[], Clock] = RealClock) -> ServeOutcome:
    """Warm up, then serve the measured requests inside the resource sampler.

    `ceilings`: a `runners.measure.ceilings.Ceilings` (default: measured once per device and cached);
    `nvml`: an NVML module for the sampler (tests); `sample_resources=False` turns the NVML
    sampler off (overhead benchmarks; power/energy metrics then absent with that reason).
    `constraints`: the study's `[{metric, max|min}]`; latency-percentile ones can stop the window
    early (`runners.early_stop`), as `bounds` do (capacity probes, with `stop_when_met`).
    `clock_factory`: a new clock per phase (warm-up, window); tests pass a simulated one.
    """
    warmup = int(workload.get("warmup_requests", 0))
    count = max(int(workload["requests"]), int(workload.get("max_requests") or 0))
    concurrency = int(workload.get("concurrency", 8)) if workload["arrival"] == "closed" else None
    early = early_stop_rules(workload, knobs, latency_bounds(constraints) if bounds is None else list(bounds),
                             count, concurrency is not None, stop_when_met)
    rule = WindowRule.from_workload(workload, early)
    requests = make_requests(workload, warmup + count, seed)
    measured = _rebase(requests[warmup:])
    run = _scheduler(engine, knobs)
    ceilings, ceilings_reason = lookup_ceilings(device, ceilings)
    if warmup:
        # Warm-up (allocator, kernels, any compile) runs back to back, outside the window.
        for req in requests[:warmup]:
            req.arrival_s = 0.0
        run.serve(requests[:warmup], None, None, clock_factory())
    before = _counters(run.engine)
    # Garbage of model build and warm-up is collected now, not as a pause inside the window.
    gc.collect()
    with (ResourceSampler(device, sample_interval_s, nvml=nvml, use_nvml=sample_resources) as sampler,
          CompileWatch(run.engine) as compile_watch, HostLoad(device, nvml) as host):
        clock = clock_factory()
        rule.clock, rule.started_at = clock.now, clock.now()
        timings = run.serve(measured, concurrency, rule, clock)
        window_s = clock.now() - rule.started_at
    if not timings:
        raise InfeasibleConfig(f"no request finished in the measured window ({rule.reason or 'no reason'}); "
                               f"{_stop_summary(rule.stopped_early)}")
    metrics, unavailable = serving_metrics(timings, slo)
    tokens = float(sum(t.output_tokens for t in timings))
    resources, resources_unavailable = sampler.summary(tokens)
    metrics.update(resources)
    unavailable.update(resources_unavailable)
    work = _delta(before, _counters(run.engine))
    efficiency, efficiency_unavailable = roofline(work, window_s, ceilings, ceilings_reason)
    metrics.update(efficiency)
    unavailable.update(efficiency_unavailable)
    info = {"window_s": window_s, "scheduler": run.name, "window_end": _window_end(rule, timings),
            "issued_requests": count, "engine_work": work, **sampler.info}
    if rule.measured_at_stop is not None:
        info["requests_at_window_end"] = rule.measured_at_stop
    if rule.stopped_early is not None:
        # Metrics of a stopped window describe the requests that finished before the stop only.
        info.update(stopped_early=rule.stopped_early, partial=True, abandoned_requests=count - len(timings))
    if rule.decision is not None and rule.decision.rule == "met":
        info["decided"] = rule.decision.as_dict()
    info.update(load_check(timings, metrics, concurrency is not None))
    info["compile_events"] = compile_watch.events  # {} = nothing compiled/captured/autotuned in the window
    if host.busy:
        info["host_busy"] = host.busy  # other processes on this GPU / CPU during the window
    if ceilings is not None:
        info["ceilings"] = {"copy_gb_s": ceilings.copy_bytes_per_s / 1e9,
                            "matmul_tflop_s": ceilings.matmul_flops_per_s / 1e12,
                            "device_name": ceilings.device_name, "driver": ceilings.driver}
    return ServeOutcome(timings, sampler.samples, metrics, unavailable, info)


def early_stop_rules(workload: dict[str, Any], knobs: dict[str, Any], bounds: list[Bound], count: int,
                     closed: bool, stop_when_met: bool = False) -> EarlyStop | None:
    """The window's early-stop rules; None with `early_stop: false` in the workload.

    The queue test needs an open loop (a closed loop's queue is bounded by its concurrency); a
    dynamic batcher's queue fills to `batch_size` by design, so its minimum is above that. The
    continuous scheduler admits a waiting request at the next step while a slot is free, so its
    queue only builds once every slot is busy: the default minimum. (With 2 x batch_size there,
    a 10 s capacity probe of batch 64 with every slot busy never reached the minimum and passed on
    its p99s: 45 req/s offered, 38 req/s finished, TTFT p99 700 ms against 47 ms at 32 req/s;
    H200, BENCHMARKS.md, fourth pass.)
    """
    if not workload.get("early_stop", True):
        return None
    return EarlyStop(bounds, None if closed else saturation_test(knobs), stop_when_met, total_requests=count)


def saturation_test(knobs: dict[str, Any]) -> SaturationTest:
    """The queue test of an open-loop window under these knobs' scheduler (see above)."""
    if knobs.get("scheduler", "dynamic") == "continuous":
        return SaturationTest(min_queue=DEFAULT_MIN_QUEUE)
    return SaturationTest(min_queue=max(DEFAULT_MIN_QUEUE, 2 * int(knobs["batch_size"])))


def _stop_summary(stopped: dict[str, Any] | None) -> str:
    if not stopped:
        return "nothing stopped it early"
    return f"stopped early by {stopped['rule']}: {stopped['evidence']}"


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

    def serve(self, requests: list[Request], concurrency: int | None, stop: Any, clock: Clock) -> list[RequestTiming]:
        batch_size = int(self.knobs["batch_size"])
        timeout_s = float(self.knobs["batch_timeout_ms"]) / 1e3
        if self.name == "continuous":
            # A slot pool admits at most its `max_sequences` (GPU rows, or more when offloaded).
            batch_size = min(batch_size, int(getattr(self.engine, "max_sequences", 0) or batch_size))
            return run_continuous(requests, self.engine, clock, batch_size, timeout_s, concurrency, stop)
        return run_dynamic(requests, self.engine, clock, batch_size, timeout_s, concurrency, stop)


def _scheduler(engine: Engine, knobs: dict[str, Any]) -> _Run:
    name = knobs.get("scheduler", "dynamic")
    if name == "dynamic":
        return _Run(name, engine, knobs)
    if name != "continuous":
        raise InfeasibleConfig(f"unknown scheduler {name!r}")
    return _Run(name, iteration_engine(engine, knobs), knobs)


def iteration_engine(engine: Any, knobs: dict[str, Any]) -> IterationEngine:
    """The engine itself when it batches per iteration (the fast engine's slot pool), else the
    per-iteration engine it offers through `iteration_engine(knobs)` (transformers' loop offers
    `ContinuousEngine`). Serving takes engines; it never builds one."""
    if isinstance(engine, IterationEngine):
        return engine
    if not isinstance(engine, OffersIterationEngine):
        raise InfeasibleConfig(f"scheduler=continuous: {type(engine).__name__} cannot add sequences between "
                               "steps and offers no engine that batches per iteration")
    return engine.iteration_engine(knobs)


def _counters(engine: Any) -> dict[str, float] | None:
    counters = getattr(engine, "counters", None)
    return dict(counters()) if callable(counters) else None


def _delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    if before is None or after is None:
        return {}
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _window_end(rule: WindowRule, timings: Sequence[RequestTiming]) -> str:
    """Why the window ended. A window ended by its p99 CI still serves the requests issued before
    the check (LoadGen's rule). They drain with fewer co-runners and a partial last batch, often
    slower than the window's p99; when they widen the CI past the target, this also gives the CI
    width over every measured request, the width the metrics report."""
    reason = rule.reason or "all requests served"
    if rule.target_ci_ratio is None or not reason.startswith(f"{rule.metric} p99 CI within"):
        return reason
    drained = len(timings) - (rule.measured_at_stop or len(timings))
    width = ci_relative_width(request_latencies_ms(timings)[rule.metric], 0.99)
    if drained <= 0 or width <= rule.target_ci_ratio:
        return reason
    return (f"{reason} at {rule.measured_at_stop} requests; {width:.2g} with the {drained} requests "
            f"issued before that and served after")


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
    rather than the configuration; the flag lets a reader (or a constraint) see that.

    Kept up is judged on the departure rate against the arrival rate, each over the interior of
    its own times (`interior_rate`): a stack that keeps up finishes requests as fast as they
    arrive, one latency later. Whole spans are biased at both ends: `request_throughput_rps`
    divides by the window, drain included (10 s of arrivals of 1.5 s requests that never queue
    give 10 / 11.5 = 0.87 of the offered rate), and the span of all finishes ends with the
    longest request of the last few seconds (outputs of 16-256 tokens at 16 ms a token widen a
    10 s span by 1-2 s, 0.86 of the offered rate with no queue at all). Overloaded: served below
    offered by more than `overload_margin` (10 %, more for a short window)."""
    if closed or len(timings) < 2:
        return {}
    offered = interior_rate([t.arrival_s for t in timings])
    if offered is None:
        return {}
    served = interior_rate([t.finish_s for t in timings])
    if served is None:  # every request finished at one instant (one batch): nothing fell behind
        return {"offered_rps": offered, "served_rps": None, "overloaded": False}
    return {"offered_rps": offered, "served_rps": served,
            "overloaded": served < (1.0 - overload_margin(len(timings))) * offered}


def overload_margin(requests: int) -> float:
    """How far below the offered rate the served rate must fall to call a window overloaded:
    0.1, or more for a window too short to resolve 10 %. Both rates are over k interior events
    (`interior_rate`), so their ratio scatters by about 1 / sqrt(k): simulated keep-up windows
    (two servers at 86 % load, Poisson arrivals) read below 0.9 in 34 % of 20-request windows
    and 5 % of 100-request ones; 1.2 / sqrt(k) keeps false flags near 5 % at every length."""
    low, high = _interior(requests)
    return max(0.1, 1.2 / math.sqrt(max(1, high - low)))


def interior_rate(times: Sequence[float]) -> float | None:
    """Events per second between the 10 % and 90 % quantiles of `times` (the whole span below
    20 events); None when that span is empty. The interior of the finishes is shifted from the
    interior of the arrivals by about one latency, so the two rates agree when nothing queues,
    however spread the latencies; a growing queue stretches the finishes."""
    ordered = sorted(times)
    low, high = _interior(len(ordered))
    span = ordered[high] - ordered[low]
    return (high - low) / span if span > 0 else None


def _interior(count: int, trim: float = 0.1) -> tuple[int, int]:
    """Ranks of the interior's first and last of `count` sorted times."""
    low = int(trim * count) if count >= 20 else 0
    return low, count - 1 - low
