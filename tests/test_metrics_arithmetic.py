"""Percentiles, throughput and goodput on known samples."""

from __future__ import annotations

import pytest

from runners.scheduler import RequestTiming
from runners.stats import quantile_ci, serving_metrics


def timing(rid, arrival, first, finish, out):
    return RequestTiming(rid, arrival, arrival, first, finish, 8, out, 0, 1)


def test_known_window_gives_known_metrics():
    # 4 requests, 10 tokens each, window 0..2 s -> 20 tok/s, 2 req/s.
    timings = [timing(i, 0.5 * i, 0.5 * i + 0.1, 0.5 * i + 0.5, 10) for i in range(4)]
    m, _ = serving_metrics(timings)
    assert m["throughput_tok_s"] == pytest.approx(40 / 2.0)
    assert m["request_throughput_rps"] == pytest.approx(2.0)
    assert m["ttft_p50_ms"] == pytest.approx(100.0)
    assert m["latency_p99_ms"] == pytest.approx(500.0)
    assert m["tpot_p50_ms"] == pytest.approx(400.0 / 9)
    assert m["measured_requests"] == 4


def test_percentile_interpolates_like_numpy():
    samples = list(range(1, 101))  # 1..100
    assert quantile_ci(samples, 0.5).value == pytest.approx(50.5)
    assert quantile_ci(samples, 0.99).value == pytest.approx(99.01)


def test_p99_interval_brackets_the_estimate_and_needs_enough_samples():
    many = [float(i) for i in range(1000)]
    ci = quantile_ci(many, 0.99)
    assert ci.low <= ci.value <= ci.high
    few = [float(i) for i in range(50)]
    assert quantile_ci(few, 0.99).high is None  # 50 samples cannot bound p99 from above


def test_goodput_counts_only_requests_meeting_slos():
    timings = [timing(0, 0.0, 0.1, 1.0, 10), timing(1, 0.0, 0.9, 2.0, 10)]
    m, _ = serving_metrics(timings, {"ttft_ms": 500})
    assert m["goodput_rps"] == pytest.approx(1 / 2.0)
    _, unavailable = serving_metrics(timings)
    assert "goodput_rps" in unavailable
