"""Latency statistics: percentiles with distribution-free confidence intervals, and a batch-means
interval for throughput; torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from runners.scheduler import RequestTiming

PERCENTILES = (50, 90, 99)
# Throughput's batch-means interval splits the window into at most this many equal time slices.
THROUGHPUT_SLICES = 10


@dataclass(frozen=True)
class QuantileCI:
    """A sample quantile and its order-statistic interval; bounds None when the data cannot
    bound it (too few samples for that side at this confidence)."""

    value: float
    low: float | None
    high: float | None


def quantile_ci(samples: Sequence[float], q: float, confidence: float = 0.95) -> QuantileCI:
    """Sample quantile (linear interpolation) with a distribution-free CI from order statistics.

    For sorted samples x_(1..n), P(x_(l) <= true quantile < x_(u)) = B(u-1) - B(l-1) with
    B the Binomial(n, q) CDF; choose the tightest symmetric ranks reaching `confidence`.
    """
    x = np.sort(np.asarray(samples, dtype=float))
    n = x.size
    if n == 0:
        raise ValueError("no samples")
    value = float(np.quantile(x, q))
    alpha = 1.0 - confidence
    # Lower rank: the largest l with P(Bin <= l-1) <= alpha/2; upper: smallest u with
    # P(Bin <= u-1) >= 1 - alpha/2.
    lower_rank = int(sps.binom.ppf(alpha / 2, n, q))  # count below -> 1-based rank l
    upper_rank = int(sps.binom.ppf(1 - alpha / 2, n, q)) + 1
    low = float(x[lower_rank - 1]) if lower_rank >= 1 and sps.binom.cdf(lower_rank - 1, n, q) <= alpha / 2 else None
    high = float(x[upper_rank - 1]) if upper_rank <= n else None
    return QuantileCI(value, low, high)


def latency_metrics(name: str, samples_ms: Sequence[float], confidence: float = 0.95
                    ) -> tuple[dict[str, float], dict[str, str]]:
    """`{name}_p50_ms`, p90, p99, each with its CI bounds; unavailable bounds with their reason."""
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if len(samples_ms) == 0:
        for p in PERCENTILES:
            unavailable[f"{name}_p{p}_ms"] = "no samples"
        return metrics, unavailable
    for p in PERCENTILES:
        ci = quantile_ci(samples_ms, p / 100, confidence)
        metrics[f"{name}_p{p}_ms"] = ci.value
        for side, bound in (("low", ci.low), ("high", ci.high)):
            key = f"{name}_p{p}_ms_ci_{side}"
            if bound is None:
                unavailable[key] = (f"{len(samples_ms)} samples cannot bound p{p} at "
                                    f"{confidence:.0%} on this side; measure more requests")
            else:
                metrics[key] = bound
    return metrics, unavailable


def min_samples_for_ci(q: float, confidence: float = 0.95) -> int:
    """Fewest samples whose largest order statistic bounds quantile `q` from above:
    1 - q**n >= 1 - alpha/2 (n = 368 for p99 at 95 %)."""
    alpha = 1.0 - confidence
    return int(np.ceil(np.log(alpha / 2) / np.log(q)))


def ci_relative_width(samples: Sequence[float], q: float, confidence: float = 0.95) -> float:
    """(high - low) / value of the quantile's CI; inf while a bound does not exist yet."""
    if len(samples) == 0:
        return float("inf")
    ci = quantile_ci(samples, q, confidence)
    if ci.low is None or ci.high is None or ci.value <= 0:
        return float("inf")
    return (ci.high - ci.low) / ci.value


def per_request_ms(timings: Sequence[RequestTiming]) -> dict[str, np.ndarray]:
    """ttft, tpot and end-to-end latency of each request in ms, one entry per request (tpot NaN
    for a one-token request: it needs two tokens). The one place these are derived."""
    arrival = np.array([t.arrival_s for t in timings], dtype=float)
    first = np.array([t.first_token_s for t in timings], dtype=float)
    finish = np.array([t.finish_s for t in timings], dtype=float)
    out_tokens = np.array([t.output_tokens for t in timings])
    multi = out_tokens > 1
    tpot = np.full(len(timings), np.nan)
    tpot[multi] = (finish[multi] - first[multi]) / (out_tokens[multi] - 1) * 1e3
    return {"ttft": (first - arrival) * 1e3, "tpot": tpot, "latency": (finish - arrival) * 1e3}


def request_latencies_ms(timings: Sequence[RequestTiming]) -> dict[str, np.ndarray]:
    """Per-request ttft, tpot (requests of 2+ tokens) and end-to-end latency in ms."""
    each = per_request_ms(timings)
    return {**each, "tpot": each["tpot"][~np.isnan(each["tpot"])]}


def slice_tokens(timings: Sequence[RequestTiming], edges: np.ndarray) -> np.ndarray:
    """Output tokens emitted in each time slice [edges[k], edges[k+1]] (K = len(edges) - 1).

    Per-token times are not recorded, only first_token_s and finish_s: a request's first token
    counts at first_token_s and its other tokens are spread at a uniform rate over
    (first_token_s, finish_s], so a slice gets the share of that span it overlaps (fractional
    counts). A request that emitted them all at once (finish == first) counts them at first_token_s.
    """
    first = np.array([t.first_token_s for t in timings], dtype=float)  # (R,)
    finish = np.array([t.finish_s for t in timings], dtype=float)  # (R,)
    rest = np.array([t.output_tokens for t in timings], dtype=float) - 1.0  # (R,) tokens after the first
    span = finish - first
    spread = span > 0
    at_first = np.where(spread, 1.0, rest + 1.0)  # (R,) tokens counted at first_token_s
    counts = np.histogram(first, bins=edges, weights=at_first)[0]  # (K,)
    lo, hi = edges[:-1][None, :], edges[1:][None, :]  # (1, K)
    overlap = np.clip(np.minimum(hi, finish[spread, None]) - np.maximum(lo, first[spread, None]), 0.0, None)  # (R', K)
    return counts + (rest[spread, None] * overlap / span[spread, None]).sum(axis=0)


def throughput_ci(timings: Sequence[RequestTiming], confidence: float = 0.95
                  ) -> tuple[tuple[float, float] | None, str]:
    """A t-interval of output tokens/s by batch means over the window [first arrival, last finish].

    The window is cut into K equal slices and the rate of each is its tokens (`slice_tokens`) over
    the slice length; their mean is exactly the window's `throughput_tok_s`, and the interval is
    mean ± t(K-1) · sd / sqrt(K), the lower end held at 0 (a rate). K = THROUGHPUT_SLICES, fewer
    when the window holds fewer median service times (start to finish) or fewer requests than
    that: a slice shorter than one request's service shares most of its requests with its
    neighbours, and batch means need batches that are nearly independent. Returns (None, why)
    when fewer than 2 slices (or fewer than 2 slices with tokens) remain: one batch of requests
    cannot say how much its rate varies.
    """
    arrival = np.array([t.arrival_s for t in timings], dtype=float)
    finish = np.array([t.finish_s for t in timings], dtype=float)
    start, end = float(arrival.min()), float(finish.max())
    window_s = end - start
    if window_s <= 0:
        return None, "the window has no length"
    # Service time (start to finish), not end-to-end latency: time queued emits no tokens, so it
    # does not tie one slice's tokens to the next.
    service_s = float(np.median(finish - np.array([t.start_s for t in timings], dtype=float)))
    generations = int(window_s // service_s) if service_s > 0 else len(timings)
    k = min(THROUGHPUT_SLICES, len(timings), generations)
    if k < 2:
        return None, (f"the {window_s:.3g} s window holds {len(timings)} requests of median service time "
                      f"{service_s:.3g} s: fewer than 2 slices of one service time each; measure more requests")
    rates = slice_tokens(timings, np.linspace(start, end, k + 1)) / (window_s / k)  # (K,) tok/s
    if np.count_nonzero(rates) < 2:
        return None, f"fewer than 2 of the window's {k} slices emitted tokens"
    mean = float(rates.mean())
    half = float(sps.t.ppf(0.5 + confidence / 2, k - 1) * rates.std(ddof=1) / np.sqrt(k))
    return (max(0.0, mean - half), mean + half), ""


def serving_metrics(timings: Sequence[RequestTiming], slo: dict[str, float] | None = None
                    ) -> tuple[dict[str, float], dict[str, str]]:
    """Contract metrics from per-request timings of the measured window."""
    if not timings:
        raise ValueError("no measured requests")
    arrival = np.array([t.arrival_s for t in timings])
    finish = np.array([t.finish_s for t in timings])
    out_tokens = np.array([t.output_tokens for t in timings])
    each = per_request_ms(timings)
    window_s = float(finish.max() - arrival.min())
    metrics: dict[str, float] = {
        "throughput_tok_s": float(out_tokens.sum()) / window_s,
        "request_throughput_rps": len(timings) / window_s,
        "measured_requests": float(len(timings)),
    }
    unavailable: dict[str, str] = {}
    ci, why = throughput_ci(timings)
    if ci is None:
        unavailable["throughput_tok_s_ci_low"] = unavailable["throughput_tok_s_ci_high"] = why
    else:
        metrics["throughput_tok_s_ci_low"], metrics["throughput_tok_s_ci_high"] = ci
    for name, samples in request_latencies_ms(timings).items():
        m, u = latency_metrics(name, samples)
        metrics.update(m)
        unavailable.update(u)
    if slo:
        ok = np.ones(len(timings), dtype=bool)
        for name in ("ttft", "tpot", "latency"):
            if f"{name}_ms" in slo:  # a one-token request has no tpot: it meets a tpot bound
                ok &= np.nan_to_num(each[name], nan=0.0) <= slo[f"{name}_ms"]
        metrics["goodput_rps"] = float(ok.sum()) / window_s
    else:
        unavailable["goodput_rps"] = "no `slo` section in the space file"
    return metrics, unavailable
