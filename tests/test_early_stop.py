"""Early stop of a measured window on synthetic request streams in simulated time: a saturated
queue stops, a noisy but stable one does not, a constraint barely met does not stop, one
clearly broken stops early, and the hard window length holds."""

from __future__ import annotations

import numpy as np
import pytest

from runners.early_stop import (
    Bound,
    EarlyStop,
    SaturationTest,
    constraint_broken,
    constraints_met,
    latency_bounds,
    slo_bounds,
)
from runners.measure.ceilings import Ceilings
from runners.scheduler import run_continuous, run_dynamic
from runners.serving import WindowRule, serve
from runners.workload import make_requests
from tests.test_scheduler import FakeClock, FakeIterationEngine

CEIL = Ceilings(1e12, 1e12, "fake", "fake", "now")


class ServiceEngine:
    """One batch at a time; each request costs `service_s` (lognormal jitter `cv`); tokens all
    exist when the batch ends. Advances the clock it is given: no real time passes."""

    device = "cpu"

    def __init__(self, service_s: float, cv: float = 0.0, seed: int = 0) -> None:
        self.service_s, self.cv = service_s, cv
        self.rng = np.random.default_rng(seed)
        self.batches = 0

    def counters(self) -> dict[str, float]:
        return {"batches": float(self.batches)}

    def run_batch(self, requests, clock):
        self.batches += 1
        jitter = self.rng.lognormal(-self.cv**2 / 2, self.cv, size=len(requests)) if self.cv else np.ones(len(requests))
        clock.t += float(self.service_s * jitter.sum())
        return [clock.t] * max(r.output_tokens for r in requests)


def _window(workload, early, seed=0, service_s=0.01, cv=0.0):
    """Serve `workload` one request at a time with `early`; (timings, rule, end time)."""
    requests = make_requests(workload, int(workload["requests"]), seed)
    clock = FakeClock()
    rule = WindowRule(int(workload["requests"]), max_duration_s=1e9, early=early, clock=clock.now, started_at=0.0)
    timings = run_dynamic(requests, ServiceEngine(service_s, cv, seed), clock, 1, 0.0, None, rule)
    return timings, rule, clock.t


def _poisson(rate_rps, requests):
    return {"arrival": "poisson", "rate_rps": rate_rps, "requests": requests, "prompt_tokens": 8,
            "output_tokens": 1}


# ---------------------------------------------------------------- over-saturation


def test_saturated_queue_stops_soon_with_its_growth_rate():
    # 200 req/s offered, 100 req/s served: the queue grows at ~100 requests per second.
    timings, rule, end = _window(_poisson(200.0, 20000), EarlyStop(total_requests=20000))
    assert rule.stopped_early is not None and rule.stopped_early["rule"] == "over_saturation"
    evidence = rule.stopped_early["evidence"]
    assert evidence["queue_slope_per_s"] == pytest.approx(100.0, rel=0.35)
    assert evidence["queue_slope_low_per_s"] > 0 and evidence["waiting_now"] >= 32
    assert end < 5.0  # the offered stream would have lasted 100 s
    assert len(timings) < 500  # waiting requests were dropped, not served


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_but_stable_queue_does_not_stop(seed):
    # 80 % load with jittered service times: the queue comes and goes but does not grow.
    timings, rule, _ = _window(_poisson(80.0, 6000), EarlyStop(total_requests=6000), seed=seed, cv=0.5)
    assert rule.stopped_early is None, rule.stopped_early
    assert len(timings) == 6000 and rule.reason == "requests measured"


def test_bursty_stable_queue_does_not_stop():
    workload = {**_poisson(60.0, 5000), "arrival": "gamma", "burstiness": 3.0}
    timings, rule, _ = _window(workload, EarlyStop(total_requests=5000), cv=0.3)
    assert rule.stopped_early is None, rule.stopped_early


def test_continuous_scheduler_reads_a_queue_that_grows_past_a_few_dozen():
    # Every slot busy and ~7 arrivals/s more than finish: 70 waiting after 10 s. The continuous
    # scheduler's queue test decides it; a dynamic batcher's (minimum 2 x batch_size) cannot.
    from runners.serving import saturation_test

    continuous = saturation_test({"scheduler": "continuous", "batch_size": 64})
    dynamic = saturation_test({"scheduler": "dynamic", "batch_size": 64})
    assert (continuous.min_queue, dynamic.min_queue) == (32, 128)
    rng = np.random.default_rng(0)
    for step in range(101):  # a reading every 0.1 s
        now = step * 0.1
        waiting = max(0, int(7 * now + rng.normal(0, 3)))
        continuous.add(now, waiting)
        dynamic.add(now, waiting)
    decision = continuous.decide()
    assert decision is not None and decision.rule == "over_saturation"
    assert decision.evidence["queue_slope_per_s"] == pytest.approx(7, rel=0.2)
    assert dynamic.decide() is None


def test_saturation_test_needs_growth_not_just_a_long_queue():
    steady = SaturationTest(min_queue=8)
    for i in range(200):  # a queue that sits at 40 +- 3
        steady.add(i * 0.1, 40 + (i * 7) % 7 - 3)
    assert steady.decide() is None
    growing = SaturationTest(min_queue=8)
    for i in range(200):
        growing.add(i * 0.1, 1 + i // 2)
    decision = growing.decide()
    assert decision is not None and decision.evidence["queue_slope_per_s"] == pytest.approx(5.0, rel=0.05)


# ---------------------------------------------------------------- constraints


def _looks(samples_ms, bound, start=10):
    """Run the constraint test at every 10 % more samples, like a window does; the first
    sample count that decides, or None."""
    n = start
    while n <= len(samples_ms):
        decision = constraint_broken([bound], {bound.base: samples_ms[:n]}, {})
        if decision is not None:
            return n, decision
        n = int(n * 1.1) + 1
    return None


def _lognormal_with_p99(p99_ms, n, seed):
    sigma = 0.5
    median = p99_ms / np.exp(2.3263 * sigma)  # the 99 % point of a lognormal
    return np.random.default_rng(seed).lognormal(np.log(median), sigma, size=n)


@pytest.mark.parametrize("seed", range(5))
def test_constraint_barely_met_does_not_stop(seed):
    bound = Bound("ttft_p99_ms", "ttft", 0.99, max=1000.0)
    samples = _lognormal_with_p99(950.0, 5000, seed)  # true p99 5 % under the bound
    assert _looks(samples, bound) is None


def test_constraint_clearly_broken_stops_early_with_evidence():
    bound = Bound("ttft_p99_ms", "ttft", 0.99, max=1000.0)
    samples = _lognormal_with_p99(2000.0, 5000, 0)  # true p99 twice the bound
    n, decision = _looks(samples, bound)
    assert n < 1000  # long before the window's 5000 requests
    assert decision.rule == "constraint" and decision.evidence["metric"] == "ttft_p99_ms"
    assert decision.evidence["ci_low"] > 1000.0 and decision.evidence["max"] == 1000.0


def test_waiting_requests_count_as_lower_bounds_of_ttft():
    bound = Bound("ttft_p99_ms", "ttft", 0.99, max=1000.0)
    finished = np.full(30, 100.0)  # the few that finished were quick
    assert constraint_broken([bound], {"ttft": finished}, {}) is None
    waiting = np.full(300, 5000.0)  # but 300 have already waited 5 s
    decision = constraint_broken([bound], {"ttft": finished}, {"ttft": waiting})
    assert decision is not None and decision.evidence["waiting_requests"] == 300


def test_min_bound_and_met_decisions():
    low = Bound("tpot_p50_ms", "tpot", 0.5, min=10.0)
    assert constraint_broken([low], {"tpot": np.full(50, 2.0)}, {}).evidence["min"] == 10.0
    assert constraint_broken([low], {"tpot": np.full(50, 20.0)}, {}) is None
    upper = Bound("ttft_p99_ms", "ttft", 0.99, max=1000.0)
    assert constraints_met([upper], {"ttft": np.full(100, 10.0)}) is None  # p99 has no upper CI bound yet
    assert constraints_met([upper], {"ttft": np.full(2000, 10.0)}).rule == "met"


def test_bounds_from_constraints_and_slo():
    bounds = latency_bounds([{"metric": "ttft_p99_ms", "max": 2000.0}, {"metric": "kl_divergence", "max": 0.1},
                             {"metric": "latency_p50_ms", "min": 1.0}])
    assert [(b.metric, b.base, b.q, b.max, b.min) for b in bounds] == [
        ("ttft_p99_ms", "ttft", 0.99, 2000.0, None), ("latency_p50_ms", "latency", 0.5, None, 1.0)]
    assert [(b.metric, b.max) for b in slo_bounds({"tpot_ms": 50.0, "ttft_ms": 1000.0})] == [
        ("tpot_p99_ms", 50.0), ("ttft_p99_ms", 1000.0)]


# ---------------------------------------------------------------- serve(): partial results, hard length


def _serve(engine, workload, constraints=(), knobs=None):
    knobs = knobs or {"batch_size": 1, "batch_timeout_ms": 0.0}
    return serve(engine, "cpu", workload, knobs, 0, {}, ceilings=CEIL, sample_resources=False,
                 constraints=constraints, clock_factory=FakeClock)


def test_overloaded_window_is_partial_and_stops_within_15_s_of_being_decided():
    # 20 req/s offered to a 10 req/s server; TTFT p99 <= 2 s is broken within seconds.
    workload = {**_poisson(20.0, 2000), "warmup_requests": 0}
    outcome = _serve(ServiceEngine(0.1), workload, [{"metric": "ttft_p99_ms", "max": 2000.0}])
    stopped = outcome.info["stopped_early"]
    assert stopped["rule"] in ("constraint", "over_saturation")
    assert outcome.info["partial"] is True and outcome.info["abandoned_requests"] > 1000
    # A queue of 32+ exists after ~3.2 s and TTFTs pass 2 s after ~4 s: the window ends well within 15 s of that.
    assert outcome.info["window_s"] < 4.0 + 15.0
    assert outcome.metrics["measured_requests"] == len(outcome.timings) < 200


def test_constraint_met_window_runs_to_its_end():
    workload = {**_poisson(5.0, 300), "warmup_requests": 0}
    outcome = _serve(ServiceEngine(0.1), workload, [{"metric": "ttft_p99_ms", "max": 2000.0}])
    assert "stopped_early" not in outcome.info and "partial" not in outcome.info
    assert outcome.metrics["measured_requests"] == 300


def test_hard_window_length_stops_a_window_that_cannot_finish():
    workload = {**_poisson(5.0, 3000), "warmup_requests": 0, "max_duration_s": 30.0, "early_stop": False}
    outcome = _serve(ServiceEngine(0.1), workload)
    assert outcome.info["stopped_early"]["rule"] == "max_duration_s"
    assert 0.0 <= outcome.info["stopped_early"]["evidence"]["oldest_wait_s"] < 0.5  # 5 req/s, 0.1 s each: no queue
    assert 30.0 <= outcome.info["window_s"] < 30.5  # plus at most one batch
    default = {**_poisson(5.0, 3000), "warmup_requests": 0, "early_stop": False}  # 600 s of arrivals
    outcome = _serve(ServiceEngine(0.1), default)
    assert 120.0 <= outcome.info["window_s"] < 120.5  # the default hard length


def test_continuous_scheduler_drops_running_sequences_when_stopped():
    clock = FakeClock()
    engine = FakeIterationEngine(clock, prefill_s=0.01, step_s=0.01)
    workload = {**_poisson(400.0, 4000), "output_tokens": 20}
    requests = make_requests(workload, 4000, 0)
    rule = WindowRule(4000, max_duration_s=1e9, early=EarlyStop(total_requests=4000), clock=clock.now,
                      started_at=0.0)
    timings = run_continuous(requests, engine, clock, 8, 0.0, None, rule)
    assert rule.stopped_early["rule"] == "over_saturation"
    assert engine.running == [] and len(timings) < 1000 and clock.t < 5.0


# ---------------------------------------------------------------- the tuner's record


def test_stopped_trial_is_complete_infeasible_and_never_on_the_front(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from runners.contract import TrialResult
    from tuner.launcher import LaunchOutcome
    from tuner.space import validate
    from tuner.study import tell_outcome, trial_config

    space = validate({"study": "s", "params": {"batch_size": {"type": "int", "low": 1, "high": 8}},
                      "objectives": [{"metric": "throughput_tok_s"}],
                      "constraints": [{"metric": "ttft_p99_ms", "max": 2000}]}, "s.yaml", "s")
    assert trial_config(space, {"batch_size": 2}, 0, tmp_path).constraints == [{"metric": "ttft_p99_ms", "max": 2000.0}]
    study = optuna.create_study(directions=["maximize"])
    stopped = {"rule": "constraint", "evidence": {"metric": "ttft_p99_ms", "ci_low": 9000.0}}
    for throughput, info in ((900.0, {"stopped_early": stopped}), (100.0, {})):
        trial = study.ask(space.distributions())
        result = TrialResult("ok", {"throughput_tok_s": throughput, "ttft_p99_ms": 500.0}, info=info)
        tell_outcome(study, trial, space, LaunchOutcome("ok", result))
    fast, slow = study.trials
    # Told the worst value (an infeasible trial never ranks as best anywhere); the partial value is kept.
    assert fast.state == TrialState.COMPLETE and fast.values == [float("-inf")]
    assert fast.user_attrs["metrics"]["throughput_tok_s"] == 900.0
    assert fast.user_attrs["stopped_early"] == stopped
    assert fast.user_attrs["infeasible_reason"] == "window stopped early: constraint"
    assert fast.constraints["stopped_early"] == 1.0 and slow.constraints["stopped_early"] == 0.0
    # Both trials carry the same constraints: samplers refuse a study whose trials differ.
    assert set(fast.constraints) == set(slow.constraints)
    assert [t.number for t in study.best_trials] == [slow.number]


# ---------------------------------------------------------------- the real runner


@pytest.mark.parametrize("device, preset, rate", [
    pytest.param("cpu", "glm-tiny", 400.0, marks=pytest.mark.slow),
    pytest.param("cuda", "glm-1b", 2000.0, marks=pytest.mark.gpu),
])
def test_overloaded_trial_of_the_real_runner_stops_within_15_s(device, preset, rate):
    from runners.contract import TrialConfig
    from runners.infer import GlmInferRunner

    workload = {"arrival": "poisson", "rate_rps": rate, "requests": 4000, "warmup_requests": 2,
                "prompt_tokens": 64, "output_tokens": 16}
    config = TrialConfig("glm-infer", {"preset": preset}, device, workload, {"batch_size": 4},
                         constraints=[{"metric": "ttft_p99_ms", "max": 50.0}])
    result = GlmInferRunner().run(config)
    serving = result.info["serving"]
    assert result.info["stopped_early"]["rule"] in ("constraint", "over_saturation")
    assert serving["partial"] is True and serving["window_s"] < 15.0
    assert result.metrics["measured_requests"] < 4000


def test_quality_constraint_broken_in_set_up_serves_no_window():
    """KL is known after set-up: a trial that breaks a quality bound is decided before its
    window, which is then not served (the window's metrics say why); with early_stop off it is."""
    from runners.contract import TrialConfig
    from runners.infer import GlmInferRunner

    workload = {"arrival": "poisson", "rate_rps": 50.0, "requests": 400, "prompt_tokens": 16, "output_tokens": 4,
                "eval_sequences": 2, "eval_tokens": 16}
    knobs = {"sparsity": 0.9, "batch_size": 4}
    bound = [{"metric": "kl_divergence", "max": 1e-6}]
    result = GlmInferRunner().run(TrialConfig("glm-infer", {"preset": "glm-tiny"}, "cpu", workload, knobs,
                                              constraints=bound))
    stopped = result.info["stopped_early"]
    assert stopped["rule"] == "constraint" and stopped["metric"] == "kl_divergence" and stopped["value"] > 1e-6
    assert result.metrics["kl_divergence"] > 1e-6 and "throughput_tok_s" not in result.metrics
    assert "window not served: kl_divergence" in result.unavailable["throughput_tok_s"]
    measured = GlmInferRunner().run(TrialConfig("glm-infer", {"preset": "glm-tiny"}, "cpu",
                                                {**workload, "requests": 8, "early_stop": False}, knobs,
                                                constraints=bound))
    assert "stopped_early" not in measured.info and measured.metrics["throughput_tok_s"] > 0
