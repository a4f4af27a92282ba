"""Arrival processes match their mean rate and dispersion; trace replay reproduces its file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from runners.workload import arrival_times, load_trace, make_requests

N = 20000
RATE = 40.0


def _gap_stats(kind: str, burstiness: float = 1.0, seed: int = 0) -> tuple[float, float]:
    times = arrival_times(kind, N, RATE, np.random.default_rng(seed), burstiness)
    gaps = np.diff(times)
    return 1.0 / gaps.mean(), gaps.std() / gaps.mean()


@pytest.mark.parametrize("kind, burstiness, cv", [
    ("poisson", 1.0, 1.0), ("constant", 1.0, 0.0), ("gamma", 2.0, 2.0), ("gamma", 0.5, 0.5)])
def test_arrival_rate_and_dispersion(kind, burstiness, cv):
    rate, gap_cv = _gap_stats(kind, burstiness)
    assert rate == pytest.approx(RATE, rel=0.05)
    assert gap_cv == pytest.approx(cv, abs=0.06 * max(cv, 1.0))


def test_poisson_counts_have_index_of_dispersion_one():
    times = arrival_times("poisson", N, RATE, np.random.default_rng(3))
    counts = np.bincount(np.floor(times).astype(int))[:-1]  # whole seconds only
    assert counts.mean() == pytest.approx(RATE, rel=0.05)
    assert counts.var(ddof=1) / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_first_request_arrives_at_zero_and_times_increase():
    times = arrival_times("gamma", 100, 5.0, np.random.default_rng(0), 3.0)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)


def test_closed_loop_requests_have_no_arrival_yet():
    requests = make_requests({"arrival": "closed", "prompt_tokens": 8, "output_tokens": 4}, 5, seed=0)
    assert all(math.isnan(r.arrival_s) for r in requests)


def _write_trace(tmp_path, fmt: str):
    rows = [(100.0, 12, 5), (100.25, 40, 9), (100.30, 7, 1), (101.5, 64, 32)]
    if fmt == "csv":
        path = tmp_path / "trace.csv"
        lines = ["timestamp_s,prompt_tokens,output_tokens,user"]
        lines += [f"{t},{p},{o},u{i}" for i, (t, p, o) in enumerate(rows)]
        path.write_text("\n".join(lines) + "\n")
    else:
        path = tmp_path / "trace.jsonl"
        path.write_text("\n".join(json.dumps({"timestamp_s": t, "prompt_tokens": p, "output_tokens": o})
                                  for t, p, o in rows) + "\n")
    return path, rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_trace_replay_reproduces_timestamps_and_lengths(tmp_path, fmt):
    path, rows = _write_trace(tmp_path, fmt)
    requests = make_requests({"arrival": "trace", "trace": str(path)}, len(rows), seed=0)
    assert [r.arrival_s for r in requests] == pytest.approx([t - rows[0][0] for t, _, _ in rows])
    assert [(r.prompt_tokens, r.output_tokens) for r in requests] == [(p, o) for _, p, o in rows]


def test_trace_repeats_after_a_mean_gap_when_more_requests_are_needed(tmp_path):
    path, rows = _write_trace(tmp_path, "csv")
    requests = make_requests({"arrival": "trace", "trace": str(path)}, 6, seed=0)
    span = 1.5 + 1.5 / 3  # last timestamp + one mean gap
    assert requests[4].arrival_s == pytest.approx(span)
    assert requests[5].arrival_s == pytest.approx(span + 0.25)
    assert requests[5].prompt_tokens == 40


def test_trace_missing_column_is_an_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,prompt_tokens,output_tokens\n0,1,1\n")
    with pytest.raises(ValueError, match="timestamp_s"):
        load_trace(path)
