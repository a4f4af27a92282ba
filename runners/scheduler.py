"""Batch schedulers that drive an engine with a request stream; torch-free.

The clock is injected, so the batching rules can be tested in simulated time with a fake
engine, and run for real with `RealClock`.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from runners.workload import Request


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep_until(self, t: float) -> None: ...


class RealClock:
    """Monotonic wall clock; `now()` is seconds since construction."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class Engine(Protocol):
    """What a scheduler drives. `device` names where it runs; `counters()` returns cumulative
    work done so far — `decode_steps`, `tokens` (generated), `bytes_read` (weights + KV read
    from device memory) and `flops` — from which the serving layer derives MBU and MFU."""

    device: str

    def counters(self) -> dict[str, float]: ...

    def run_batch(self, requests: Sequence[Request], clock: Clock) -> list[float]:
        """Run one batch to completion; return the clock time after each generated step.

        Entry k is when token k+1 of every still-running request exists (entry 0 ends the
        prefill). Its length is the largest `output_tokens` in the batch.
        """
        ...


@dataclass
class RequestTiming:
    rid: int
    arrival_s: float
    start_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    batch_index: int
    batch_size: int


def batch_is_ready(queue: Sequence[Request], now: float, batch_size: int, timeout_s: float) -> bool:
    """The dynamic-batching rule: `batch_size` requests wait, or the oldest waited `timeout_s`."""
    if not queue:
        return False
    return len(queue) >= batch_size or now - queue[0].arrival_s >= timeout_s - 1e-12


StopRule = Callable[[Sequence[RequestTiming]], bool]


@dataclass(frozen=True)
class QueueState:
    """What a stop rule may see of the scheduler besides finished requests (early stop,
    `runners.early_stop`). `queue` and `pending` are the scheduler's live lists, read only
    during the call: a pending request whose arrival is <= `now_s` has arrived too (the
    scheduler moves it to the queue at its next iteration)."""

    now_s: float
    queue: Sequence[Request]
    pending: Sequence[Request]  # sorted by arrival
    running: int
    finished: int = 0

    def waiting_arrivals(self) -> list[float]:
        """Arrival times of every request that arrived and has not started."""
        arrived = bisect.bisect_right(self.pending, self.now_s, key=lambda r: r.arrival_s)
        return [r.arrival_s for r in self.queue] + [r.arrival_s for r in self.pending[:arrived]]


def window_should_stop(stop: StopRule | None, timings: Sequence[RequestTiming], now_s: float,
                       queue: Sequence[Request], pending: Sequence[Request], running: int) -> bool:
    """Ask the stop rule; a rule with `observe` sees the queue first."""
    if stop is None:
        return False
    observe = getattr(stop, "observe", None)
    if observe is not None:
        observe(QueueState(now_s, queue, pending, running, len(timings)))
    return stop(timings)


def abandons(stop: StopRule | None) -> bool:
    """A rule that stopped on a decided outcome (or the hard window length) sets `abandon`:
    waiting and running requests are dropped rather than served, so the window ends now."""
    return bool(getattr(stop, "abandon", False))


def _split_closed_loop(requests: Sequence[Request], clock: Clock, concurrency: int | None
                       ) -> tuple[list[Request], list[Request]]:
    """(pending, unsent): closed loop sends `concurrency` requests now and the rest one per
    finished request; open loop has every request pending at its own arrival time."""
    pending = list(requests)
    if concurrency is None:
        return pending, []
    start = clock.now()
    for req in pending[:concurrency]:
        req.arrival_s = start
    return pending[:concurrency], pending[concurrency:]


def run_dynamic(requests: Sequence[Request], engine: Engine, clock: Clock, batch_size: int,
                timeout_s: float, concurrency: int | None = None, stop: StopRule | None = None
                ) -> list[RequestTiming]:
    """Serve `requests` with the dynamic batcher; return one timing per request.

    Open loop: each request arrives at its `arrival_s` (relative to the clock's start).
    Closed loop (`concurrency` given): that many requests are in flight; a new one is sent the
    moment one finishes, so arrival times are set as the run goes.
    `stop(timings)`, asked after every batch, ends the window early: no request is issued after
    it says True, and those already waiting are still served (LoadGen's rule).
    """
    pending, unsent = _split_closed_loop(requests, clock, concurrency)
    queue: list[Request] = []
    timings: list[RequestTiming] = []
    batch_index = 0
    while pending or queue:
        now = clock.now()
        while pending and pending[0].arrival_s <= now:
            queue.append(pending.pop(0))
        if batch_is_ready(queue, now, batch_size, timeout_s):
            batch, queue = queue[:batch_size], queue[batch_size:]
            start_s = clock.now()
            steps = engine.run_batch(batch, clock)
            for req in batch:
                timings.append(RequestTiming(
                    req.rid, req.arrival_s, start_s, steps[0], steps[req.output_tokens - 1],
                    req.prompt_tokens, req.output_tokens, batch_index, len(batch)))
                if unsent:  # closed loop: the finished client sends its next request
                    nxt = unsent.pop(0)
                    nxt.arrival_s = steps[req.output_tokens - 1]
                    pending.append(nxt)
            if concurrency is not None:  # only the closed loop adds arrivals out of order
                pending.sort(key=lambda r: r.arrival_s)
            batch_index += 1
            if window_should_stop(stop, timings, clock.now(), queue, pending, 0):
                _stop_issuing(pending, unsent, clock.now())
                if abandons(stop):
                    pending.clear()
                    queue.clear()
            continue
        wake = math.inf
        if pending:
            wake = pending[0].arrival_s
        if queue:
            wake = min(wake, queue[0].arrival_s + timeout_s)
        clock.sleep_until(wake)
    return timings


def _stop_issuing(pending: list[Request], unsent: list[Request], now: float) -> None:
    """Drop every request not yet issued at `now`; arrived ones stay to be served."""
    pending[:] = [r for r in pending if r.arrival_s <= now]
    unsent.clear()


@runtime_checkable
class IterationEngine(Protocol):
    """An engine whose running batch changes between decode steps (continuous batching).

    Each call returns once its work is done on the device (synchronised), so the clock read
    right after it is the time the tokens exist.
    """

    device: str

    def counters(self) -> dict[str, float]: ...

    def join(self, requests: Sequence[Request]) -> None:
        """Prefill `requests` and add them to the running batch; each then has its first token."""
        ...

    def step(self) -> Sequence[int] | None:
        """One decode step: every running sequence gains one token. An engine that may hold
        some admitted sequences back (preempted, KV offloaded) returns the rids that did gain
        one; None means all of them."""
        ...

    def leave(self, rids: Sequence[int]) -> None:
        """Drop these finished sequences from the running batch."""
        ...


@runtime_checkable
class OffersIterationEngine(Protocol):
    """An engine that runs whole batches itself and, for `scheduler: continuous`, offers an
    `IterationEngine` over the same model (transformers' loop offers `ContinuousEngine`)."""

    def iteration_engine(self, knobs: dict[str, Any]) -> IterationEngine:
        """The per-iteration engine for these knobs; InfeasibleConfig where they cannot run so."""
        ...


class ChunkedPrefillEngine(IterationEngine, Protocol):
    """An iteration engine whose prefill advances in chunks between decode steps.

    `chunked` says whether it does (a knob); when it does, the scheduler calls `begin` to queue
    admitted requests and `advance` for one chunk of prefill work, which returns the rids whose
    prompt is done (they have their first token and decode from the next step on).
    """

    chunked: bool

    def begin(self, requests: Sequence[Request]) -> None: ...

    def advance(self) -> Sequence[int]: ...


@dataclass
class StepRecord:
    """One iteration of the continuous scheduler: a prefill of joining requests or a decode
    step of the running batch (`rids`), ending at `t_s`."""

    t_s: float
    kind: str  # "join" | "decode" | "prefill" (a chunk; rids = the requests it completed)
    rids: tuple[int, ...]


@dataclass
class _Running:
    request: Request
    start_s: float
    first_token_s: float
    join_index: int
    batch_size: int
    produced: int = 1


def admission_due(queue: Sequence[Request], now: float, free_slots: int, wait_s: float) -> bool:
    """Queued requests join once they fill the free slots or the oldest waited `wait_s`."""
    if not queue or free_slots <= 0:
        return False
    return len(queue) >= free_slots or now - queue[0].arrival_s >= wait_s - 1e-12


def run_continuous(requests: Sequence[Request], engine: IterationEngine, clock: Clock,
                   max_batch: int, admission_wait_s: float, concurrency: int | None = None,
                   stop: StopRule | None = None, steps: list[StepRecord] | None = None
                   ) -> list[RequestTiming]:
    """Serve `requests` with iteration-level batching; return one timing per request.

    Between decode steps, queued requests join the running batch (at most `max_batch`
    sequences) when `admission_due`; a finished sequence leaves at once, freeing its slot.
    An idle engine waits for arrivals like the dynamic batcher. Loops and `stop` as in
    `run_dynamic`; `steps`, when given, receives every iteration's composition.

    Chunked prefill (`engine.chunked`): admitted requests are queued in the engine (`begin`) and
    their prefill advances one chunk per iteration, alternating with decode steps of the running
    batch while both have work, so a long prompt never stalls the running sequences for more
    than one chunk. A request's first token (TTFT) is when its last chunk ends.
    """
    pending, unsent = _split_closed_loop(requests, clock, concurrency)
    chunked = bool(getattr(engine, "chunked", False))
    queue: list[Request] = []
    prefilling: dict[int, tuple[Request, float, int]] = {}  # rid -> (request, start_s, join index)
    running: dict[int, _Running] = {}
    timings: list[RequestTiming] = []
    joins = 0
    last_was_prefill = False
    while pending or queue or running or prefilling:
        now = clock.now()
        while pending and pending[0].arrival_s <= now:
            queue.append(pending.pop(0))
        free = max_batch - len(running) - len(prefilling)
        if admission_due(queue, now, free, admission_wait_s):
            batch, queue = queue[:free], queue[free:]
            start_s = clock.now()
            if chunked:
                engine.begin(batch)  # type: ignore[attr-defined]
                prefilling.update({r.rid: (r, start_s, joins) for r in batch})
                joins += 1
                continue
            engine.join(batch)
            t = clock.now()
            size = len(running) + len(batch)
            for req in batch:
                running[req.rid] = _Running(req, start_s, t, joins, size)
            joins += 1
            _record(steps, t, "join", batch)
        elif prefilling and not (running and last_was_prefill):
            done = engine.advance()  # type: ignore[attr-defined]
            t = clock.now()
            last_was_prefill = True
            size = len(running) + len(done)
            for rid in done:
                req, start_s, index = prefilling.pop(rid)
                running[rid] = _Running(req, start_s, t, index, size)
            _record(steps, t, "prefill", [running[rid].request for rid in done])
        elif running:
            advanced = engine.step()
            t = clock.now()
            last_was_prefill = False
            moved = running.values() if advanced is None else [running[rid] for rid in advanced if rid in running]
            for state in moved:
                state.produced += 1
            _record(steps, t, "decode", [s.request for s in moved])
        else:
            wake = pending[0].arrival_s if pending else math.inf
            if queue:
                wake = min(wake, queue[0].arrival_s + admission_wait_s)
            clock.sleep_until(wake)
            continue
        done_states = [s for s in running.values() if s.produced >= s.request.output_tokens]
        if not done_states:
            continue
        engine.leave([s.request.rid for s in done_states])
        for state in done_states:
            del running[state.request.rid]
            req = state.request
            timings.append(RequestTiming(req.rid, req.arrival_s, state.start_s, state.first_token_s, t,
                                         req.prompt_tokens, req.output_tokens, state.join_index,
                                         state.batch_size))
            if unsent:  # closed loop: the finished client sends its next request
                nxt = unsent.pop(0)
                nxt.arrival_s = t
                pending.append(nxt)
        pending.sort(key=lambda r: r.arrival_s)
        if window_should_stop(stop, timings, clock.now(), queue, pending, len(running)):
            _stop_issuing(pending, unsent, clock.now())
            if abandons(stop):
                pending.clear()
                queue.clear()
                # A stopped window finishes nothing: running and half-prefilled requests leave.
                gone = [*running, *prefilling]
                if gone:
                    engine.leave(gone)
                running.clear()
                prefilling.clear()
    return timings


def _record(steps: list[StepRecord] | None, t: float, kind: str, requests: Sequence[Request]) -> None:
    if steps is not None:
        steps.append(StepRecord(t, kind, tuple(r.rid for r in requests)))
