"""Capacity: the highest open-loop request rate whose p99 TTFT and p99 TPOT meet the SLO.

`workload: {mode: capacity}` measures, for one built engine and one set of knobs, a search
over the offered rate instead of one window: every probe is one `runners.serving.serve` window
at that rate (the same code path as a plain trial), ended as soon as its outcome is decided
(`runners.early_stop`: a bound's CI entirely beyond it or a growing queue fails it; every
bound's CI entirely inside passes it), else judged by its p99 point estimates at the end.
The search brackets the capacity between a passing and a failing rate and bisects on the
logarithm of the rate until the bracket is within `capacity_tolerance`.

Every probe reuses the workload's seed, so probes see the same requests with arrival times
scaled by the rate (common random numbers): the pass/fail verdict is then monotone in the
rate far more often than with fresh draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from runners.early_stop import Bound, slo_bounds
from runners.serving import ServeOutcome, serve

DEFAULT_MIN_RPS = 0.25
DEFAULT_MAX_RPS = 64.0
DEFAULT_TOLERANCE = 0.05
DEFAULT_PROBES = 10
DEFAULT_PROBE_S = 10.0  # the shortest arrival span of a probe


@dataclass
class Probe:
    """One window at `rate_rps` and its verdict; `how`: met | estimate | the stop rule."""

    rate_rps: float
    passed: bool
    how: str
    p99_ms: dict[str, float | None] = field(default_factory=dict)
    measured_requests: int = 0
    window_s: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)


def serve_workload(engine: Any, device: str, workload: dict[str, Any], knobs: dict[str, Any], seed: int,
                   slo: dict[str, float], constraints: Sequence[dict[str, Any]] = (), **serve_kwargs: Any
                   ) -> ServeOutcome:
    """One measured window, or with `mode: capacity` the capacity search over such windows."""
    if workload.get("mode", "window") != "capacity":
        return serve(engine, device, workload, knobs, seed, slo, constraints=constraints, **serve_kwargs)
    bounds = slo_bounds({k: v for k, v in slo.items() if k in ("ttft_ms", "tpot_ms")})

    def probe(probe_workload: dict[str, Any]) -> ServeOutcome:
        return serve(engine, device, probe_workload, knobs, seed, slo, bounds=bounds, stop_when_met=True,
                     **serve_kwargs)

    return find_capacity(probe, workload, bounds)


def find_capacity(probe: Callable[[dict[str, Any]], ServeOutcome], workload: dict[str, Any],
                  bounds: Sequence[Bound]) -> ServeOutcome:
    """Search the rate; the outcome of the highest passing probe, with `capacity_rps` and
    `capacity_tok_s` (its measured output throughput) and the search in `info["capacity"]`."""
    if not bounds:
        raise ValueError("mode: capacity needs slo ttft_ms and/or tpot_ms")
    low = float(workload.get("capacity_min_rps", DEFAULT_MIN_RPS))
    high = float(workload.get("capacity_max_rps", DEFAULT_MAX_RPS))
    tolerance = float(workload.get("capacity_tolerance", DEFAULT_TOLERANCE))
    budget = int(workload.get("capacity_probes", DEFAULT_PROBES))
    probes: list[Probe] = []
    outcomes: dict[float, ServeOutcome] = {}

    def run(rate: float) -> bool:
        # Warm-up once, before the first probe; later probes start on a warm engine.
        outcome = probe({**workload, "rate_rps": rate, "requests": probe_requests(workload, rate),
                         "warmup_requests": workload.get("warmup_requests", 0) if not probes else 0})
        verdict = judge(rate, outcome, bounds)
        probes.append(verdict)
        outcomes[rate] = outcome
        return verdict.passed

    best: float | None = None
    # The top of the range first: an overloaded probe is stopped within seconds.
    if run(high):
        best, failing = high, None
    elif run(low):
        best, failing = low, high
        while failing / best > 1 + tolerance and len(probes) < budget:
            mid = math.sqrt(best * failing)
            if run(mid):
                best = mid
            else:
                failing = mid
    else:
        failing = low
    return _report(outcomes, probes, best, failing, low, high, tolerance, bounds)


def probe_requests(workload: dict[str, Any], rate: float) -> int:
    """Requests of a probe at `rate`: `requests`, or more so that arrivals span at least
    `capacity_probe_s` (a short burst at a high rate is served within any SLO, a sustained rate
    is not), at most `max_requests` when set."""
    requests = int(workload["requests"])
    spanned = math.ceil(rate * float(workload.get("capacity_probe_s", DEFAULT_PROBE_S)))
    cap = int(workload.get("max_requests") or spanned)
    return max(requests, min(spanned, cap))


def judge(rate: float, outcome: ServeOutcome, bounds: Sequence[Bound]) -> Probe:
    """Pass or fail one probe: a decided window by its decision, else by its p99 estimates."""
    p99 = {b.metric: outcome.metrics.get(b.metric) for b in bounds}
    common = {"p99_ms": p99, "measured_requests": int(outcome.metrics.get("measured_requests", 0)),
              "window_s": float(outcome.info.get("window_s", 0.0))}
    stopped = outcome.info.get("stopped_early")
    if stopped and not _kept_up(stopped, bounds):
        return Probe(rate, False, stopped["rule"], evidence=stopped["evidence"], **common)
    if "decided" in outcome.info:
        return Probe(rate, True, "met", evidence=outcome.info["decided"]["evidence"], **common)
    # A bound without samples (TPOT of one-token outputs) cannot fail the probe.
    over = {m: v for m, v in p99.items() if v is not None and v > _max(bounds, m)}
    evidence = {"over": over} if over else {}
    if stopped:  # ran out of time at a low rate: judged on the requests it measured
        evidence["window_end"] = stopped
    return Probe(rate, not over, "estimate", evidence=evidence, **common)


def _kept_up(stopped: dict[str, Any], bounds: Sequence[Bound]) -> bool:
    """A probe at a low rate whose window ran out of time while the engine kept up: too few
    requests arrived, not too slow a server. Kept up: nearly all arrived requests finished, or
    no request still waiting to start had waited past the TTFT bound (a pool of two long-context
    rows leaves two of 16 requests unfinished at any cut, 0.875 of them measured)."""
    evidence = stopped["evidence"]
    arrived = evidence.get("arrived_requests")
    if stopped["rule"] != "max_duration_s" or not arrived:
        return False
    if evidence["measured_requests"] >= 0.9 * arrived:
        return True
    oldest_s = evidence.get("oldest_wait_s")
    ttft = [b.max for b in bounds if b.metric == "ttft_p99_ms" and b.max is not None]
    return oldest_s is not None and bool(ttft) and 1000.0 * oldest_s <= ttft[0]


def _max(bounds: Sequence[Bound], metric: str) -> float:
    return next(b.max for b in bounds if b.metric == metric and b.max is not None)


def _report(outcomes: dict[float, ServeOutcome], probes: list[Probe], best: float | None, failing: float | None,
            low: float, high: float, tolerance: float, bounds: Sequence[Bound]) -> ServeOutcome:
    search = {"capacity_rps": best, "failing_rps": failing, "min_rps": low, "max_rps": high,
              "tolerance": tolerance, "converged": best is not None and failing is not None
              and failing / best <= 1 + tolerance,
              "bounds": {b.metric: b.max for b in bounds}, "probes": [asdict(p) for p in probes]}
    if best is None:
        outcome = outcomes[low]
        why = (f"the SLO p99 bounds {search['bounds']} are not met even at capacity_min_rps={low:g} "
               f"({probes[-1].how}: {probes[-1].p99_ms})")
        outcome.unavailable.update(capacity_rps=why, capacity_tok_s=why)
    else:
        outcome = outcomes[best]
        # A passing probe that ran out of time at a low rate kept up with every arrival: its
        # stop is the search's business (judged on what it measured), not a cut-short trial.
        if "stopped_early" in outcome.info:
            search["best_window_end"] = outcome.info.pop("stopped_early")
            outcome.info.pop("partial", None)
        outcome.metrics["capacity_rps"] = best
        outcome.metrics["capacity_tok_s"] = outcome.metrics["throughput_tok_s"]
        if failing is None:
            search["note"] = f"capacity_max_rps={high:g} met the SLO: capacity is at least that"
    outcome.info["capacity"] = search
    return outcome
