"""Order-statistic confidence intervals and throughput's batch-means interval: coverage at the
stated rate, and the contract keys."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from runners.contract import METRICS
from runners.scheduler import RequestTiming
from runners.stats import (
    ci_relative_width,
    latency_metrics,
    min_samples_for_ci,
    quantile_ci,
    serving_metrics,
    slice_tokens,
    throughput_ci,
)


@pytest.mark.parametrize("q, n", [(0.5, 200), (0.9, 300), (0.99, 1000)])
def test_quantile_ci_covers_true_quantile_at_stated_rate(q, n):
    dist = sps.lognorm(s=0.8, scale=50.0)  # skewed, like latencies
    true = dist.ppf(q)
    covered = 0
    for seed in range(100):
        sample = dist.rvs(size=n, random_state=np.random.default_rng(seed))
        ci = quantile_ci(sample, q, 0.95)
        assert ci.low is not None and ci.high is not None
        covered += ci.low <= true <= ci.high
    assert covered >= 93, f"p{q * 100:g} coverage {covered}/100 at 95 %"


def test_quantile_ci_is_not_trivially_wide():
    sample = np.random.default_rng(0).exponential(1.0, size=2000)
    ci = quantile_ci(sample, 0.99, 0.95)
    assert ci.low < ci.value < ci.high
    assert (ci.high - ci.low) / ci.value < 0.3  # bounded by neighbouring order statistics
    # the interval from the exact binomial ranks holds at least the confidence asked
    x = np.sort(sample)
    lo_rank = int(np.searchsorted(x, ci.low)) + 1
    hi_rank = int(np.searchsorted(x, ci.high)) + 1
    coverage = sps.binom.cdf(hi_rank - 1, x.size, 0.99) - sps.binom.cdf(lo_rank - 1, x.size, 0.99)
    assert coverage >= 0.95


def test_p99_needs_368_samples_for_an_upper_bound():
    assert min_samples_for_ci(0.99, 0.95) == 368  # 0.99**n <= 0.025
    rng = np.random.default_rng(1)
    assert quantile_ci(rng.random(367), 0.99).high is None
    assert quantile_ci(rng.random(368), 0.99).high is not None
    assert ci_relative_width(rng.random(100), 0.99) == float("inf")


def test_latency_metrics_give_every_percentile_with_ci_in_contract():
    samples = np.random.default_rng(2).lognormal(3, 0.5, size=500)
    metrics, missing = latency_metrics("ttft", samples)
    for p in (50, 90, 99):
        assert metrics[f"ttft_p{p}_ms_ci_low"] <= metrics[f"ttft_p{p}_ms"] <= metrics[f"ttft_p{p}_ms_ci_high"]
    assert missing == {}
    assert set(metrics) <= set(METRICS)


def test_missing_ci_bound_is_absent_with_reason():
    metrics, missing = latency_metrics("latency", [10.0, 11.0, 12.0])
    assert "latency_p99_ms" in metrics
    assert "latency_p99_ms_ci_high" not in metrics
    assert "measure more requests" in missing["latency_p99_ms_ci_high"]


def test_serving_metrics_goodput_counts_requests_within_slo():
    timings = [RequestTiming(i, 0.0, 0.0, 0.1 * (i + 1), 0.1 * (i + 1) + 1.0, 8, 11, 0, 4) for i in range(4)]
    metrics, _ = serving_metrics(timings, {"ttft_ms": 250})
    window = timings[-1].finish_s
    assert metrics["goodput_rps"] == pytest.approx(2 / window)
    assert metrics["tpot_p50_ms"] == pytest.approx(100.0)
    assert metrics["throughput_tok_s"] == pytest.approx(44 / window)


def _stream(gaps_s, latency_s=0.5, tokens=20, ttft_s=0.05) -> list[RequestTiming]:
    """Requests arriving `gaps_s` apart, each served at once in `latency_s` with `tokens` tokens."""
    arrivals = np.concatenate([[0.0], np.cumsum(gaps_s)[:-1]])
    return [RequestTiming(i, a, a, a + ttft_s, a + latency_s, 8, tokens, 0, 1) for i, a in enumerate(arrivals)]


def test_slice_tokens_counts_the_first_token_then_spreads_the_rest():
    # 11 tokens: the first at 1.0 s, the other 10 evenly over (1.0, 2.0]; 4 tokens at once at 2.5 s.
    timings = [RequestTiming(0, 0.0, 0.0, 1.0, 2.0, 8, 11, 0, 1), RequestTiming(1, 2.0, 2.0, 2.5, 2.5, 8, 4, 0, 1)]
    assert slice_tokens(timings, np.array([0.0, 1.5, 3.0])) == pytest.approx([1 + 5, 5 + 4])


def test_steady_stream_gives_a_narrow_throughput_ci_around_its_rate():
    # 10 req/s x 20 tokens = 200 tok/s; only the first slice (the 0.5 s ramp-up) is short of it.
    metrics, unavailable = serving_metrics(_stream([0.1] * 200))
    low, high, rate = metrics["throughput_tok_s_ci_low"], metrics["throughput_tok_s_ci_high"], metrics["throughput_tok_s"]
    assert low <= 200.0 <= high and low < rate < high
    assert (low + high) / 2 == pytest.approx(rate)  # the mean slice rate is the window's rate
    assert (high - low) / rate < 0.08
    assert "throughput_tok_s_ci_low" not in unavailable
    assert set(metrics) <= set(METRICS)


def test_a_rate_that_halves_midway_gives_a_wide_throughput_ci():
    # 200 tok/s for 10 s, then 100 tok/s for 10 s: slice rates of 200 and 100, sd ~53 over 10 slices.
    metrics, _ = serving_metrics(_stream([0.1] * 100 + [0.2] * 50))
    low, high, rate = metrics["throughput_tok_s_ci_low"], metrics["throughput_tok_s_ci_high"], metrics["throughput_tok_s"]
    assert low < 150.0 < high
    assert (high - low) / rate > 0.4


def test_poisson_throughput_ci_covers_the_offered_rate_at_about_95_percent():
    # 64 Poisson requests at 40 req/s, 64 tokens each, 47 ms each: the H200 quality_tradeoff load.
    covered = 0
    for seed in range(100):
        gaps = np.random.default_rng(seed).exponential(1 / 40, size=64)
        ci, _ = throughput_ci(_stream(gaps, latency_s=0.047, tokens=64, ttft_s=0.005))
        assert ci is not None
        covered += ci[0] <= 40 * 64 <= ci[1]
    assert covered >= 88, f"coverage {covered}/100 at 95 %"


def test_a_window_of_one_request_generation_has_no_throughput_ci():
    # Three requests served side by side: the window is one latency long, a single batch.
    metrics, unavailable = serving_metrics(_stream([0.0, 0.0, 0.0]))
    assert "throughput_tok_s" in metrics
    assert "throughput_tok_s_ci_low" not in metrics and "throughput_tok_s_ci_high" not in metrics
    assert "fewer than 2 slices" in unavailable["throughput_tok_s_ci_low"]
    assert unavailable["throughput_tok_s_ci_high"] == unavailable["throughput_tok_s_ci_low"]
