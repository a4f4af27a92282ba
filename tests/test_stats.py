"""Order-statistic confidence intervals: coverage at the stated rate, and the contract keys."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from runners.contract import METRICS
from runners.scheduler import RequestTiming
from runners.stats import ci_relative_width, latency_metrics, min_samples_for_ci, quantile_ci, serving_metrics


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
