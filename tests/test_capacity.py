"""The capacity search on a fake engine with a known service time, in simulated time: it finds
the analytic capacity (D/D/1 and M/D/1 queues) within 5 %, and reports what it could not find."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq

from runners.capacity import find_capacity, serve_workload
from runners.early_stop import Bound, slo_bounds
from runners.serving import serve
from tests.test_early_stop import CEIL, ServiceEngine
from tests.test_scheduler import FakeClock

SERVICE_S = 0.01  # one request at a time, 10 ms each: at most 100 req/s


def md1_wait_cdf(t: float, rho: float) -> float:
    """P(wait <= t) of an M/D/1 queue with service time 1 and load rho (Erlang's formula)."""
    total = 0.0
    for k in range(int(math.floor(t)) + 1):
        x = rho * (k - t)
        total += x**k / math.factorial(k) * math.exp(-x)
    return (1 - rho) * total


def md1_ttft_ms(rho: float, q: float) -> float:
    """Quantile q of wait + service, in ms, for SERVICE_S."""
    wait = brentq(lambda t: md1_wait_cdf(t, rho) - q, 0.0, 25.0)
    return (wait + 1.0) * SERVICE_S * 1e3


def _search(workload, slo, engine=None):
    engine = engine or ServiceEngine(SERVICE_S)
    return serve_workload(engine, "cpu", workload, {"batch_size": 1, "batch_timeout_ms": 0.0}, 0, slo,
                          ceilings=CEIL, sample_resources=False, clock_factory=FakeClock)


def _workload(arrival, requests, **extra):
    return {"mode": "capacity", "arrival": arrival, "requests": requests, "warmup_requests": 0,
            "prompt_tokens": 8, "output_tokens": 1, "capacity_min_rps": 10.0, "capacity_max_rps": 400.0,
            "capacity_tolerance": 0.02, "capacity_probes": 12, "max_duration_s": 1e6, **extra}


def test_md1_formula_matches_known_values():
    assert md1_wait_cdf(0.0, 0.8) == pytest.approx(0.2)  # P(no wait) = 1 - rho
    assert md1_ttft_ms(0.5, 0.99) == pytest.approx((3.336 + 1) * 10, rel=1e-3)  # Lindley simulation: 3.341


def test_deterministic_arrivals_find_the_service_rate():
    # D/D/1: below 100 req/s nobody waits (TTFT = 10 ms); above it the queue grows every request.
    outcome = _search(_workload("constant", 600), {"ttft_ms": 50.0})
    capacity = outcome.metrics["capacity_rps"]
    assert capacity == pytest.approx(1 / SERVICE_S, rel=0.05) and capacity <= 1 / SERVICE_S * 1.02
    search = outcome.info["capacity"]
    assert search["converged"] and search["failing_rps"] / capacity <= 1.02 + 1e-9
    assert outcome.metrics["capacity_tok_s"] == pytest.approx(outcome.metrics["throughput_tok_s"])
    assert outcome.metrics["ttft_p99_ms"] <= 50.0
    failed = [p for p in search["probes"] if not p["passed"]]
    assert failed and all(p["rate_rps"] > 1 / SERVICE_S for p in failed)
    assert "stopped_early" not in outcome.info  # the probes' stops are the search's, not the trial's


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_arrivals_find_the_md1_capacity(seed):
    # M/D/1: with the SLO at the p90 TTFT of load 0.75, the capacity is 75 req/s. (p90 rather than
    # p99: a 2000-request window of a queue scatters its p99 by ~10 % across seeds, its p90 by ~5 %.)
    bound = Bound("ttft_p90_ms", "ttft", 0.9, max=md1_ttft_ms(0.75, 0.9))
    engine = ServiceEngine(SERVICE_S)

    def probe(workload):
        return serve(engine, "cpu", workload, {"batch_size": 1, "batch_timeout_ms": 0.0}, seed, {}, ceilings=CEIL,
                     sample_resources=False, bounds=[bound], stop_when_met=True, clock_factory=FakeClock)

    outcome = find_capacity(probe, _workload("poisson", 2000, capacity_min_rps=20.0, capacity_max_rps=200.0), [bound])
    assert outcome.metrics["capacity_rps"] == pytest.approx(0.75 / SERVICE_S, rel=0.05)
    probes = outcome.info["capacity"]["probes"]
    assert probes[0]["rate_rps"] == 200.0 and probes[0]["how"] in ("over_saturation", "constraint")
    assert probes[0]["measured_requests"] < 200  # the overloaded probe was stopped early


def test_capacity_below_the_range_is_absent_with_its_reason():
    outcome = _search(_workload("poisson", 400, capacity_min_rps=50.0), {"ttft_ms": 5.0})  # below service time
    assert "capacity_rps" not in outcome.metrics
    assert "not met even at capacity_min_rps=50" in outcome.unavailable["capacity_rps"]
    assert [p["rate_rps"] for p in outcome.info["capacity"]["probes"]] == [400.0, 50.0]


def test_capacity_above_the_range_says_it_is_a_lower_bound():
    outcome = _search(_workload("poisson", 400, capacity_max_rps=20.0), {"ttft_ms": 500.0})
    assert outcome.metrics["capacity_rps"] == 20.0
    assert "at least" in outcome.info["capacity"]["note"]


def test_a_plain_window_is_one_serve_and_capacity_needs_bounds():
    plain = _search({**_workload("poisson", 50), "mode": "window", "rate_rps": 20.0}, {"ttft_ms": 50.0})
    assert "capacity" not in plain.info and plain.metrics["measured_requests"] == 50
    with pytest.raises(ValueError, match="slo"):
        find_capacity(lambda w: None, _workload("poisson", 10), slo_bounds({}))


def test_a_low_rate_probe_that_runs_out_of_time_is_judged_on_what_it_measured():
    # 1 req/s for 400 requests would take 400 s; the 30 s window measures ~30 and kept up with them.
    outcome = _search(_workload("constant", 400, capacity_max_rps=1000.0, capacity_min_rps=1.0,
                                max_duration_s=30.0), {"ttft_ms": 50.0})
    low = next(p for p in outcome.info["capacity"]["probes"] if p["rate_rps"] == 1.0)
    assert low["passed"] and low["how"] == "estimate" and low["measured_requests"] <= 31
    assert outcome.metrics["capacity_rps"] == pytest.approx(1 / SERVICE_S, rel=0.05)


def test_a_capacity_found_by_a_probe_that_ran_out_of_time_is_not_a_cut_short_trial():
    # Service 0.5 s: capacity ~2 req/s, where 400 requests outlast the 30 s window; the passing
    # probe ends on max_duration_s having kept up, and the tuner must not read it as stopped early.
    engine = ServiceEngine(0.5)
    outcome = _search(_workload("constant", 400, capacity_max_rps=8.0, capacity_min_rps=0.5,
                                max_duration_s=30.0, capacity_tolerance=0.1), {"ttft_ms": 2000.0}, engine)
    assert outcome.metrics["capacity_rps"] == pytest.approx(2.0, rel=0.1)
    assert "stopped_early" not in outcome.info and "partial" not in outcome.info
    assert outcome.info["capacity"]["best_window_end"]["rule"] == "max_duration_s"


@pytest.mark.parametrize("oldest_wait_s, passed", [(0.4, True), (3.5, False), (None, False)])
def test_a_cut_probe_with_requests_in_service_is_judged_by_how_long_the_waiting_ones_waited(oldest_wait_s, passed):
    # The H200 long-context probe: 0.3 req/s on a pool of two rows, cut at 40 s with 16 arrived
    # and 14 finished (0.875 < 0.9). The two unfinished ones were in service or had just arrived:
    # no hidden TTFT beyond the 3 s bound, so the probe is judged on the 14. A request that had
    # already waited 3.5 s to start would have broken the bound; an old record without the wait
    # cannot tell, so it fails as before.
    from runners.capacity import judge
    from runners.serving import ServeOutcome

    evidence = {"max_duration_s": 40.0, "measured_requests": 14, "arrived_requests": 16, "requests": 24}
    if oldest_wait_s is not None:
        evidence["oldest_wait_s"] = oldest_wait_s
    outcome = ServeOutcome([], [], metrics={"ttft_p99_ms": 1475.0, "tpot_p99_ms": 9.9, "measured_requests": 14},
                           info={"window_s": 44.8, "stopped_early": {"rule": "max_duration_s", "evidence": evidence}})
    probe = judge(0.3, outcome, slo_bounds({"ttft_ms": 3000.0, "tpot_ms": 50.0}))
    assert probe.passed is passed and probe.how == ("estimate" if passed else "max_duration_s")


def test_space_keys_of_capacity_and_the_window():
    from tuner.space import SpaceError, validate

    base = {"objectives": [{"metric": "capacity_rps"}], "slo": {"ttft_ms": 1000, "tpot_ms": 50}}
    space = validate({**base, "workload": {"mode": "capacity", "capacity_min_rps": 1, "capacity_max_rps": 64,
                                           "ci_metric": "ttft", "early_stop": True}}, "c.yaml", "c")
    assert space.workload["mode"] == "capacity" and space.objectives[0].direction == "maximize"
    refusals = [({"workload": {"mode": "capacity"}, "slo": {}}, "needs ttft_ms"),
                ({"workload": {"mode": "capacity", "arrival": "closed"}}, "open-loop"),
                ({"workload": {"mode": "fastest"}}, "workload.mode"),
                ({"workload": {"ci_metric": "p99"}}, "workload.ci_metric"),
                ({"workload": {"capacity_min_rps": 8, "capacity_max_rps": 4}}, "capacity_min_rps"),
                ({"workload": {"rate_rps": 0.5, "requests": 200}}, "beyond the default max_duration_s")]
    for extra, message in refusals:
        with pytest.raises(SpaceError, match=message):
            validate({**base, **extra}, "c.yaml", "c")
