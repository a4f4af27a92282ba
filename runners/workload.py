"""Request streams: arrival times and prompt/output lengths, seeded and torch-free."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Request:
    rid: int
    arrival_s: float  # seconds after the window opens; NaN for closed-loop (set when sent)
    prompt_tokens: int
    output_tokens: int
    prefix_group: int = -1  # requests of one group share their first `shared_prefix_tokens`


def sample_lengths(spec: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts from an int or a {dist: uniform|lognormal|normal, ...} mapping."""
    if isinstance(spec, int):
        return np.full(n, spec, dtype=np.int64)
    dist = spec["dist"]
    if dist == "uniform":
        values = rng.integers(int(spec["low"]), int(spec["high"]) + 1, size=n)
    elif dist == "lognormal":
        # `mean` is the median length in tokens; sigma the spread of its logarithm.
        values = rng.lognormal(np.log(spec["mean"]), spec["sigma"], size=n)
    elif dist == "normal":
        values = rng.normal(spec["mean"], spec["std"], size=n)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    low = spec.get("min", 1)
    high = spec.get("max", np.inf)
    return np.clip(np.rint(values), max(1, low), high).astype(np.int64)


def arrival_times(kind: str, n: int, rate_rps: float, rng: np.random.Generator,
                  burstiness: float = 1.0) -> np.ndarray:
    """Open-loop arrival times (s) of `n` requests at mean rate `rate_rps`.

    poisson: exponential gaps; constant: equal gaps; gamma: gamma gaps with coefficient of
    variation `burstiness` (1 = Poisson, > 1 burstier, < 1 more regular). The first request
    arrives at 0 so the window starts with work.
    """
    if n == 0:
        return np.zeros(0)
    mean_gap = 1.0 / rate_rps
    if kind == "constant":
        gaps = np.full(n - 1, mean_gap)
    elif kind == "poisson":
        gaps = rng.exponential(mean_gap, size=n - 1)
    elif kind == "gamma":
        shape = 1.0 / burstiness**2
        gaps = rng.gamma(shape, mean_gap / shape, size=n - 1)
    else:
        raise ValueError(f"{kind!r} is not an open-loop arrival process")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def load_trace(path: str | Path) -> np.ndarray:
    """A request trace as an [n, 3] array of (timestamp_s, prompt_tokens, output_tokens),
    sorted by time. CSV with a header row, or JSON Lines; other columns are ignored."""
    path = Path(path)
    if path.suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"trace {path} has no requests")
    columns = ("timestamp_s", "prompt_tokens", "output_tokens")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"trace {path} lacks column(s) {missing}")
    table = np.array([[float(row[c]) for c in columns] for row in rows])
    return table[np.argsort(table[:, 0], kind="stable")]


def replay_trace(table: np.ndarray, count: int) -> np.ndarray:
    """`count` rows of the trace with times from 0; a trace shorter than `count` repeats,
    each repeat starting one mean gap after the previous one ended (a window extension can
    need more requests than the trace holds)."""
    times = table[:, 0] - table[0, 0]
    span = times[-1] + (times[-1] / (len(times) - 1) if len(times) > 1 else 1.0)
    reps = -(-count // len(table))
    out = np.concatenate([np.column_stack([times + k * span, table[:, 1:]]) for k in range(reps)])
    return out[:count]


def make_requests(workload: dict[str, Any], count: int, seed: int, first_rid: int = 0) -> list[Request]:
    """`count` requests described by the space file's workload section."""
    rng = np.random.default_rng(seed)
    kind = workload.get("arrival", "poisson")
    if kind == "trace":
        rows = replay_trace(load_trace(workload["trace"]), count)
        arrivals, prompts, outputs = rows[:, 0], rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64)
    else:
        prompts = sample_lengths(workload.get("prompt_tokens", 32), count, rng)
        outputs = sample_lengths(workload.get("output_tokens", 16), count, rng)
    if kind == "closed":
        arrivals = np.full(count, np.nan)
    elif kind != "trace":
        arrivals = arrival_times(kind, count, float(workload.get("rate_rps", 8.0)), rng,
                                 float(workload.get("burstiness", 1.0)))
    groups = int(workload.get("shared_prefix_groups", 0))
    prefix_group = rng.integers(0, groups, size=count) if groups else np.full(count, -1)
    return [
        Request(first_rid + i, float(arrivals[i]), int(prompts[i]), int(outputs[i]), int(prefix_group[i]))
        for i in range(count)
    ]
