"""Batch schedulers that drive an engine with a request stream; torch-free.

The clock is injected, so the batching rules can be tested in simulated time with a fake
engine, and run for real with `RealClock`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

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


def run_dynamic(requests: Sequence[Request], engine: Engine, clock: Clock, batch_size: int,
                timeout_s: float, concurrency: int | None = None) -> list[RequestTiming]:
    """Serve `requests` with the dynamic batcher; return one timing per request.

    Open loop: each request arrives at its `arrival_s` (relative to the clock's start).
    Closed loop (`concurrency` given): that many requests are in flight; a new one is sent the
    moment one finishes, so arrival times are set as the run goes.
    """
    pending = list(requests)
    if concurrency is not None:
        start = clock.now()
        for req in pending[:concurrency]:
            req.arrival_s = start
        unsent = pending[concurrency:]
        pending = pending[:concurrency]
    else:
        unsent = []
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
            pending.sort(key=lambda r: r.arrival_s)
            batch_index += 1
            continue
        wake = math.inf
        if pending:
            wake = pending[0].arrival_s
        if queue:
            wake = min(wake, queue[0].arrival_s + timeout_s)
        clock.sleep_until(wake)
    return timings
