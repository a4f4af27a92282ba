"""Continuous (iteration-level) batching in simulated time, the window's stop rule, and the
iteration engine over transformers' GLM against plain batched greedy decoding."""

from __future__ import annotations

import math

import pytest

from runners.contract import InfeasibleConfig
from runners.scheduler import StepRecord, run_continuous, run_dynamic
from runners.workload import Request


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        assert math.isfinite(t), "the scheduler must never sleep forever"
        self.t = max(self.t, t)


class FakeIterationEngine:
    """A prefill takes `prefill_s`, a decode step `step_s`; tracks who is running."""

    device = "cpu"

    def __init__(self, clock: FakeClock, prefill_s: float = 1.0, step_s: float = 1.0) -> None:
        self.clock, self.prefill_s, self.step_s = clock, prefill_s, step_s
        self.running: list[int] = []

    def counters(self) -> dict[str, float]:
        return {}

    def join(self, requests) -> None:
        self.clock.t += self.prefill_s
        self.running += [r.rid for r in requests]

    def step(self) -> None:
        assert self.running, "a decode step needs running sequences"
        self.clock.t += self.step_s

    def leave(self, rids) -> None:
        self.running = [rid for rid in self.running if rid not in set(rids)]


def _serve(requests, max_batch, wait_s, concurrency=None):
    clock = FakeClock()
    engine = FakeIterationEngine(clock)
    steps: list[StepRecord] = []
    timings = run_continuous(requests, engine, clock, max_batch, wait_s, concurrency, steps=steps)
    assert engine.running == []
    return {t.rid: t for t in timings}, [(s.t_s, s.kind, s.rids) for s in steps]


def test_requests_join_between_decode_steps_and_leave_when_done():
    requests = [Request(0, 0.0, 8, 3), Request(1, 0.5, 8, 2), Request(2, 0.5, 8, 2), Request(3, 10.0, 8, 1)]
    timings, steps = _serve(requests, max_batch=2, wait_s=0.0)
    assert steps == [
        (1.0, "join", (0,)),
        (2.0, "join", (1,)),  # one free slot: B joins, C waits
        (3.0, "decode", (0, 1)),  # B has its 2 tokens and leaves
        (4.0, "join", (2,)),  # C takes the slot between decode steps
        (5.0, "decode", (0, 2)),  # A (3 tokens) and C (2) finish together
        (11.0, "join", (3,)),  # idle until D arrives; one token: done at prefill
    ]
    got = {rid: (t.start_s, t.first_token_s, t.finish_s) for rid, t in timings.items()}
    assert got == {0: (0.0, 1.0, 5.0), 1: (1.0, 2.0, 3.0), 2: (3.0, 4.0, 5.0), 3: (10.0, 11.0, 11.0)}


def test_admission_wait_groups_prefills_without_stalling_decode():
    requests = [Request(i, float(i), 8, 5) for i in range(3)] + [Request(3, 4.0, 8, 2)]
    timings, steps = _serve(requests, max_batch=8, wait_s=2.5)  # free slots never fill up
    # Idle engine: the first three are admitted together once the oldest waited 2.5 s.
    assert steps[0] == (3.5, "join", (0, 1, 2))
    # Busy engine: request 3 (arrived at 4.0) waits 2.5 s while decoding goes on.
    assert steps[1:4] == [(4.5, "decode", (0, 1, 2)), (5.5, "decode", (0, 1, 2)), (6.5, "decode", (0, 1, 2))]
    assert steps[4] == (7.5, "join", (3,))
    assert steps[5] == (8.5, "decode", (0, 1, 2, 3))
    assert timings[3].finish_s == 8.5 and timings[0].finish_s == 8.5


def test_closed_loop_sends_next_request_when_one_finishes():
    requests = [Request(i, math.nan, 8, 2 + i) for i in range(4)]
    timings, steps = _serve(requests, max_batch=4, wait_s=0.0, concurrency=2)
    assert steps[0] == (1.0, "join", (0, 1))
    assert timings[2].arrival_s == timings[0].finish_s == 2.0  # request 0 (2 tokens) finished
    # Request 2's prefill (2.0 -> 3.0) pauses decoding: request 1's last token comes at 4.0.
    assert timings[3].arrival_s == timings[1].finish_s == 4.0
    assert [t.batch_size for t in timings.values()][:2] == [2, 2]
    assert len(timings) == 4


def test_max_batch_is_never_exceeded():
    requests = [Request(i, 0.1 * i, 8, 1 + i % 7) for i in range(60)]
    _, steps = _serve(requests, max_batch=5, wait_s=0.3)
    live: set[int] = set()
    done_at = {r.rid: r.output_tokens for r in requests}
    produced: dict[int, int] = {}
    for _, kind, rids in steps:
        if kind == "join":
            live |= set(rids)
            produced.update({rid: 1 for rid in rids})
        else:
            assert set(rids) == live
            for rid in rids:
                produced[rid] += 1
        assert len(live) <= 5
        live = {rid for rid in live if produced[rid] < done_at[rid]}


def test_stop_rule_ends_issuing_but_serves_queued_requests():
    class BatchEngine:
        device = "cpu"

        def __init__(self, clock):
            self.clock = clock

        def counters(self):
            return {}

        def run_batch(self, requests, clock):
            clock.t += 1.0
            return [clock.t] * max(r.output_tokens for r in requests)

    clock = FakeClock()
    requests = [Request(i, 0.4 * i, 8, 1) for i in range(20)]
    timings = run_dynamic(requests, BatchEngine(clock), clock, batch_size=2, timeout_s=0.0,
                          stop=lambda done: len(done) >= 1)
    # Stop after the first batch (t=1.0): requests 1 and 2 had arrived and are still served.
    assert sorted(t.rid for t in timings) == [0, 1, 2]


# --- the iteration engine on transformers' GLM (CPU, tiny) ------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    from runners.glm.engines.hf import HFEngine
    from runners.glm.model import build_model
    from runners.infer import PromptBank

    model = build_model({"preset": "glm-tiny"}, torch.float32, "cpu", 0)
    prompts = PromptBank(model.config.vocab_size, 0, 0)
    return model, prompts, HFEngine(model, "cpu", "dynamic", 4, prompts)


def test_continuous_engine_decodes_like_batch_greedy(tiny):
    import torch

    from runners.glm.engines.continuous import ContinuousEngine

    model, prompts, hf = tiny
    requests = [Request(i, 0.0, p, o) for i, (p, o) in enumerate([(5, 6), (9, 4), (3, 7), (12, 5), (7, 3)])]
    reference = {r.rid: torch.cat(list(hf.decode([prompts(r)], r.output_tokens)), 1)[0].tolist() for r in requests}
    engine = ContinuousEngine(model, "cpu", prompts, record_tokens=True)
    engine.join(requests[:2])
    engine.step()
    engine.join(requests[2:4])  # joins a batch with a longer cache: left padding on merge
    engine.step()
    engine.step()
    engine.leave([1])  # leaves mid-batch: rows selected, padding columns trimmed
    engine.step()
    engine.join(requests[4:])
    for _ in range(6):
        engine.step()
    for r in requests:
        assert engine.generated[r.rid][:r.output_tokens] == reference[r.rid], r.rid
    assert engine.counters()["decode_steps"] == 13


def test_serve_with_continuous_scheduler_end_to_end(tiny):
    from runners.measure.ceilings import Ceilings
    from runners.serving import serve

    _, _, hf = tiny
    workload = {"arrival": "poisson", "rate_rps": 50.0, "requests": 24, "warmup_requests": 2,
                "prompt_tokens": 8, "output_tokens": {"dist": "uniform", "low": 1, "high": 6}}
    knobs = {"batch_size": 4, "batch_timeout_ms": 2.0, "scheduler": "continuous", "kv_cache": "dynamic"}
    outcome = serve(hf, "cpu", workload, knobs, 0, {}, ceilings=Ceilings(1e10, 1e10, "x", "y", "z"))
    assert outcome.metrics["measured_requests"] == 24
    assert outcome.info["scheduler"] == "continuous"
    assert outcome.info["engine_work"]["tokens"] == sum(t.output_tokens for t in outcome.timings)
    assert 0 < outcome.metrics["mbu"] and 0 < outcome.metrics["mfu"]
    assert max(t.batch_size for t in outcome.timings) <= 4
    with pytest.raises(InfeasibleConfig, match="kv_cache"):
        serve(hf, "cpu", workload, {**knobs, "kv_cache": "static"}, 0, {})


def test_continuous_refuses_an_engine_it_cannot_drive():
    from runners.serving import iteration_engine

    class OwnModuleEngine:  # like a fused engine: a model that is no transformers LM
        device = "cpu"
        model = object()
        prompt_fn = staticmethod(lambda r: [1, 2])

        def step(self, slot):
            pass

    with pytest.raises(InfeasibleConfig, match="cannot add sequences"):
        iteration_engine(OwnModuleEngine(), {"kv_cache": "dynamic"})
