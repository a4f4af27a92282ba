"""Rules that end a measured window as soon as its outcome is decided; torch-free.

A window that can only confirm what is already known costs device time and tells the tuner
nothing (issue 17: saturated trials ran 60 s past a 2 s constraint decided after a few
requests). While the window runs, `EarlyStop` checks:

- `constraint`: a latency-percentile constraint (`ttft_p99_ms <= 1000`, ...) whose
  distribution-free confidence interval lies entirely beyond its bound, and whose share of
  requests beyond the bound is surely above 1 - q by block means (requests of one window are
  correlated; the order-statistic interval alone assumes they are not). Requests still waiting
  count with the wait they have had so far (a lower bound of their TTFT and latency), so a
  growing queue decides `max` bounds early without biasing the test towards stopping.
- `over_saturation`: the offered rate is above the served rate, read from the trend of the
  number of waiting requests over time (a one-sided bound on the slope of block means > 0,
  a queue above a minimum and clearly larger at the end than at the start), not a threshold.
- `met` (capacity probes only): every bound's interval lies entirely inside it.

The hard window length (`max_duration_s`) lives in `runners.serving.WindowRule`.
Checks repeat during the window (every `check_interval_s` of window time, and every 10 % more
finished requests), so each uses a strict confidence (99.9 %) to keep the chance of a wrong
stop over all looks small.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from runners.scheduler import QueueState, RequestTiming
from runners.stats import quantile_ci, request_latencies_ms

LATENCY_METRIC = re.compile(r"^(ttft|tpot|latency)_p(\d+)_ms$")
CENSORED_BASES = ("ttft", "latency")  # a waiting request has had at least `now - arrival` of each
DEFAULT_CONFIDENCE = 0.999
DEFAULT_MIN_QUEUE = 32


@dataclass(frozen=True)
class Bound:
    """A latency-percentile constraint as the runner sees it: `{base}_p{q}_ms` <= max / >= min."""

    metric: str
    base: str  # ttft | tpot | latency
    q: float  # 0.99 for p99
    max: float | None = None
    min: float | None = None


def latency_bounds(constraints: Sequence[dict[str, Any]]) -> list[Bound]:
    """The constraints a window can decide: those on latency percentiles, with a bound."""
    out = []
    for c in constraints:
        match = LATENCY_METRIC.match(str(c.get("metric", "")))
        if match and (c.get("max") is not None or c.get("min") is not None):
            out.append(Bound(c["metric"], match.group(1), int(match.group(2)) / 100,
                             None if c.get("max") is None else float(c["max"]),
                             None if c.get("min") is None else float(c["min"])))
    return out


def slo_bounds(slo: dict[str, float]) -> list[Bound]:
    """The `slo:` section as p99 bounds (`ttft_ms` -> ttft_p99_ms <= ttft_ms), for capacity."""
    return [Bound(f"{key[:-3]}_p99_ms", key[:-3], 0.99, float(value)) for key, value in sorted(slo.items())]


@dataclass
class Decision:
    """Why a window ended early: `rule` names it, `evidence` holds the numbers that decided."""

    rule: str  # constraint | over_saturation | max_duration_s | met
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def exceedance_bounds(beyond: np.ndarray, blocks: int = 10, confidence: float = DEFAULT_CONFIDENCE
                      ) -> tuple[float, float, float] | None:
    """(fraction, low, high) of requests beyond a bound, with a one-sided `confidence` bound on
    each side from batch means: the requests in arrival order, cut into `blocks` consecutive
    blocks; Student t over the block fractions. Requests of one window are not independent (a
    burst makes many neighbours slow at once), which a binomial interval ignores and block
    means absorb. None with fewer than 2 requests per block."""
    if beyond.size < 2 * blocks:
        return None
    means = np.array([part.mean() for part in np.array_split(beyond.astype(float), blocks)])
    fraction = float(means.mean())
    margin = float(sps.t.ppf(confidence, blocks - 1) * means.std(ddof=1) / math.sqrt(blocks))
    return fraction, fraction - margin, fraction + margin


def constraint_broken(bounds: Sequence[Bound], samples: dict[str, np.ndarray], censored: dict[str, np.ndarray],
                      confidence: float = DEFAULT_CONFIDENCE) -> Decision | None:
    """The first bound that the data show broken, or None.

    `samples` are in arrival order. Broken (`max`): the percentile's order-statistic CI lies
    above `max` and the fraction of requests above `max` is, by block means, surely more than
    1 - q. For `max`, the finished requests' values plus the waiting requests' waits so far
    (each below its true value; `censored`, the latest arrivals) form a sample no larger than
    the true one, so the test stays conservative. A `min` bound uses finished requests only.
    """
    for bound in bounds:
        values = samples[bound.base]
        if bound.max is not None:
            sample = np.concatenate([values, censored.get(bound.base, np.zeros(0))])
            decided = _beyond(sample, bound, sample > bound.max, 1 - bound.q, "max", confidence)
            if decided is not None:
                return Decision("constraint", {**decided, "finished_requests": int(values.size),
                                               "waiting_requests": int(sample.size - values.size)})
        if bound.min is not None:
            decided = _beyond(values, bound, values < bound.min, bound.q, "min", confidence)
            if decided is not None:
                return Decision("constraint", {**decided, "finished_requests": int(values.size),
                                               "waiting_requests": 0})
    return None


def _beyond(sample: np.ndarray, bound: Bound, beyond: np.ndarray, allowed: float, side: str,
            confidence: float) -> dict[str, Any] | None:
    """Evidence that more than `allowed` of the requests lie beyond the bound, or None."""
    fractions = exceedance_bounds(beyond, confidence=confidence)
    if fractions is None or fractions[1] <= allowed:
        return None
    ci = quantile_ci(sample, bound.q, confidence)
    limit = getattr(bound, side)
    if side == "max" and (ci.low is None or ci.low <= limit):
        return None
    if side == "min" and (ci.high is None or ci.high >= limit):
        return None
    return {"metric": bound.metric, side: limit, "estimate": ci.value, "ci_low": ci.low, "ci_high": ci.high,
            "fraction_beyond": fractions[0], "fraction_beyond_low": fractions[1], "allowed_fraction": allowed,
            "confidence": confidence}


def constraints_met(bounds: Sequence[Bound], samples: dict[str, np.ndarray],
                    confidence: float = DEFAULT_CONFIDENCE) -> Decision | None:
    """Every bound surely met (a capacity probe that clearly passes), or None: the percentile's
    CI inside the bound, and the block-means bound on the fraction beyond it below 1 - q."""
    if not bounds:
        return None
    evidence = {}
    for bound in bounds:
        values = samples[bound.base]
        if values.size == 0:
            return None
        ci = quantile_ci(values, bound.q, confidence)
        checks = []
        if bound.max is not None:
            checks.append((ci.high is not None and ci.high <= bound.max, values > bound.max, 1 - bound.q))
        if bound.min is not None:
            checks.append((ci.low is not None and ci.low >= bound.min, values < bound.min, bound.q))
        for inside, beyond, allowed in checks:
            fractions = exceedance_bounds(beyond, confidence=confidence)
            if not inside or fractions is None or fractions[2] >= allowed:
                return None
        evidence[bound.metric] = {"estimate": ci.value, "ci_low": ci.low, "ci_high": ci.high,
                                  "max": bound.max, "min": bound.min, "samples": int(values.size)}
    return Decision("met", {"bounds": evidence, "confidence": confidence})


@dataclass
class SaturationTest:
    """Is the waiting queue growing without bound? (offered rate above served rate)

    The waiting count is a step function of time; it is read at `grid` evenly spaced times,
    averaged over `blocks` consecutive blocks (block means tame the strong autocorrelation of
    a queue), and the block means are regressed on time. Over-saturated when the slope's
    one-sided lower bound at `confidence` (Student t, blocks - 2 degrees of freedom) is above
    0, the queue now is at least `min_queue`, and the last block's mean is at least
    `growth_ratio` times the first's plus `min_queue / 2` (a stable queue's excursion seldom
    is both).
    """

    min_queue: int = DEFAULT_MIN_QUEUE
    confidence: float = DEFAULT_CONFIDENCE
    blocks: int = 8
    grid: int = 64
    growth_ratio: float = 2.0
    times: list[float] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)

    def add(self, now_s: float, waiting: int) -> None:
        if self.times and now_s < self.times[-1]:
            return  # a clock never runs backwards; ignore a stale reading
        self.times.append(now_s)
        self.queue.append(waiting)

    def decide(self) -> Decision | None:
        if len(self.times) < self.blocks or self.queue[-1] < self.min_queue:
            return None
        t = np.asarray(self.times)
        span = t[-1] - t[0]
        if span <= 0:
            return None
        grid = np.linspace(t[0], t[-1], self.grid)
        # The step function's value at each grid time: the last reading at or before it.
        level = np.asarray(self.queue, dtype=float)[np.searchsorted(t, grid, side="right") - 1]
        means = level.reshape(self.blocks, -1).mean(axis=1)
        centers = grid.reshape(self.blocks, -1).mean(axis=1)
        fit = sps.linregress(centers, means)
        dof = self.blocks - 2
        low = fit.slope - sps.t.ppf(self.confidence, dof) * fit.stderr
        grew = means[-1] >= self.growth_ratio * means[0] + self.min_queue / 2
        if not (low > 0 and grew):
            return None
        return Decision("over_saturation", {
            "queue_slope_per_s": float(fit.slope), "queue_slope_low_per_s": float(low),
            "confidence": self.confidence, "waiting_now": int(self.queue[-1]),
            "waiting_first_block": float(means[0]), "waiting_last_block": float(means[-1]),
            "span_s": float(span), "min_queue": self.min_queue})


@dataclass
class EarlyStop:
    """The window's decided-outcome rules; `WindowRule` calls `observe` and `decide`.

    `saturation=None` turns the queue test off (closed loop: the queue is bounded by the
    concurrency). `stop_when_met` also ends a window whose bounds are all clearly met
    (capacity probes). `total_requests`: once all have arrived the queue only drains, so the
    queue test stops reading it.
    """

    bounds: list[Bound] = field(default_factory=list)
    saturation: SaturationTest | None = field(default_factory=SaturationTest)
    stop_when_met: bool = False
    confidence: float = DEFAULT_CONFIDENCE
    check_interval_s: float = 1.0
    total_requests: int | None = None
    _state: QueueState | None = None
    _next_time: float = -math.inf
    _next_count: int = 0

    def observe(self, state: QueueState) -> None:
        self._state = state
        if self.saturation is None:
            return
        waiting = len(state.waiting_arrivals())
        arrived = state.finished + state.running + waiting
        if self.total_requests is None or arrived < self.total_requests:
            self.saturation.add(state.now_s, waiting)

    def decide(self, timings: Sequence[RequestTiming], now_s: float) -> Decision | None:
        """A decision, checked every `check_interval_s` and every 10 % more finished requests."""
        if now_s < self._next_time and len(timings) < self._next_count:
            return None
        self._next_time = now_s + self.check_interval_s
        self._next_count = int(len(timings) * 1.1) + 1
        if self.saturation is not None:
            decision = self.saturation.decide()
            if decision is not None:
                return decision
        if not self.bounds or not timings:
            return None
        samples = request_latencies_ms(sorted(timings, key=lambda t: t.arrival_s))
        broken = constraint_broken(self.bounds, samples, self._censored(now_s), self.confidence)
        if broken is not None or not self.stop_when_met:
            return broken
        return constraints_met(self.bounds, samples, self.confidence)

    def _censored(self, now_s: float) -> dict[str, np.ndarray]:
        if self._state is None:
            return {}
        waited = (now_s - np.asarray(self._state.waiting_arrivals(), dtype=float)) * 1e3
        return {base: waited for base in CENSORED_BASES}
