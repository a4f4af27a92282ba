"""The dynamic batcher's size/timeout rule, in simulated time with a fake engine."""

from __future__ import annotations

from runners.scheduler import batch_is_ready, run_dynamic
from runners.workload import Request
from tests.test_scheduler import FakeClock


class FakeEngine:
    """Each step takes `step_s`; records the batches it was given."""

    device = "cpu"

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.batches: list[list[int]] = []

    def counters(self) -> dict[str, float]:
        return {}

    def run_batch(self, requests, clock):
        self.batches.append([r.rid for r in requests])
        steps = []
        for _ in range(max(r.output_tokens for r in requests)):
            clock.t += self.step_s
            steps.append(clock.t)
        return steps


def reqs(arrivals, out=2):
    return [Request(i, a, 4, out) for i, a in enumerate(arrivals)]


def test_rule_size_or_timeout():
    queue = reqs([0.0, 0.001])
    assert not batch_is_ready(queue, 0.004, batch_size=4, timeout_s=0.005)
    assert batch_is_ready(queue, 0.005, batch_size=4, timeout_s=0.005)
    assert batch_is_ready(reqs([0, 0, 0, 0]), 0.0, batch_size=4, timeout_s=1.0)
    assert not batch_is_ready([], 10.0, batch_size=1, timeout_s=0.0)


def test_full_batch_starts_without_waiting_for_timeout():
    engine, clock = FakeEngine(0.001), FakeClock()
    timings = run_dynamic(reqs([0.0, 0.0, 0.0, 0.0]), engine, clock, batch_size=4, timeout_s=1.0)
    assert engine.batches == [[0, 1, 2, 3]]
    assert all(t.start_s == 0.0 for t in timings)


def test_partial_batch_waits_exactly_the_timeout():
    engine, clock = FakeEngine(0.001), FakeClock()
    timings = run_dynamic(reqs([0.0, 0.002]), engine, clock, batch_size=4, timeout_s=0.010)
    assert engine.batches == [[0, 1]]
    assert timings[0].start_s == 0.010  # the oldest waited the full timeout
    assert timings[0].first_token_s == 0.011 and timings[0].finish_s == 0.012


def test_arrivals_during_a_batch_form_the_next_batch():
    # batch 1 = {0,1} (size 2) runs 0..0.004; 2 and 3 arrive meanwhile and are full at once.
    engine, clock = FakeEngine(0.002), FakeClock()
    run_dynamic(reqs([0.0, 0.0, 0.001, 0.003, 0.5]), engine, clock, batch_size=2, timeout_s=0.05)
    assert engine.batches == [[0, 1], [2, 3], [4]]


def test_closed_loop_keeps_concurrency_requests_in_flight():
    engine, clock = FakeEngine(0.001), FakeClock()
    requests = [Request(i, float("nan"), 4, 1) for i in range(6)]
    timings = run_dynamic(requests, engine, clock, batch_size=2, timeout_s=0.0, concurrency=2)
    assert engine.batches == [[0, 1], [2, 3], [4, 5]]
    # each follow-up request is sent when its predecessor finishes
    by_id = {t.rid: t for t in timings}
    assert by_id[2].arrival_s == by_id[0].finish_s


def test_output_lengths_set_per_request_finish():
    engine, clock = FakeEngine(0.001), FakeClock()
    requests = [Request(0, 0.0, 4, 1), Request(1, 0.0, 4, 3)]
    timings = {t.rid: t for t in run_dynamic(requests, engine, clock, batch_size=2, timeout_s=0.0)}
    assert timings[0].finish_s == 0.001 and timings[1].finish_s == 0.003
    assert timings[0].first_token_s == timings[1].first_token_s == 0.001
