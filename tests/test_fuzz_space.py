"""Generated hostile space files, over every key of the schema: the validator refuses with a
SpaceError naming the key (exit 2 at the CLI), never a traceback, never anything created, in
bounded time and memory. Cases come from hypothesis strategies, not a hand list."""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner import space as schema
from tuner.space import SpaceError, load_space, validate

FUZZ = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _bases(files: Path) -> list[dict[str, Any]]:
    """Valid spaces that between them give every key of the schema a value."""
    trace = files / "trace.csv"
    trace.write_text("timestamp_s,prompt_tokens,output_tokens\n0,8,4\n0.1,8,4\n")
    data = files / "data.bin"
    data.write_bytes(b"\0" * 64)
    infer = {
        "study": "fuzz", "description": "d", "runner": "glm-infer",
        "model": {"preset": "glm-tiny", "dtype": "float32", "seed": 0, "num_layers": 2, "arch": "glm"},
        "device": "cpu",
        "workload": {"arrival": "gamma", "rate_rps": 50, "concurrency": 2, "requests": 8, "warmup_requests": 1,
                     "prompt_tokens": {"dist": "uniform", "low": 4, "high": 8, "min": 4, "max": 8},
                     "output_tokens": {"dist": "lognormal", "mean": 4, "sigma": 0.3, "max": 8}, "seed": 1,
                     "burstiness": 1.5, "max_duration_s": 30, "target_p99_ci_ratio": 0.1, "max_requests": 16,
                     "shared_prefix_tokens": 4, "shared_prefix_groups": 2, "eval_sequences": 2, "eval_tokens": 16},
        "params": {"batch_size": {"type": "int", "low": 1, "high": 8, "step": 1},
                   "sparsity": {"type": "float", "low": 0.0, "high": 0.5, "log": False},
                   "quant_bits": {"type": "categorical", "choices": [16, 8]}},
        "fixed": {"batch_timeout_ms": 5, "dtype": None},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}],
        "constraints": [{"metric": "kl_divergence", "max": 0.1, "min": 0.0}],
        "search": {"sampler": "tpe", "trials": 4, "timeout_min": 5, "seed": 0, "trial_timeout_s": 60,
                   "baseline": True, "n_startup_trials": 2},
        "slo": {"ttft_ms": 500, "tpot_ms": 50, "latency_ms": 1000},
    }
    traced = {**copy.deepcopy(infer), "workload": {"arrival": "trace", "trace": str(trace), "requests": 4,
                                                   "output_tokens": {"dist": "normal", "mean": 4, "std": 1}}}
    train = {"study": "fuzz-train", "runner": "glm-train", "model": {"preset": "glm-tiny"}, "device": "cpu",
             "workload": {"train_steps": 2, "warmup_steps": 1, "data_path": str(data)},
             "params": {"micro_batch_size": {"type": "int", "low": 1, "high": 4}},
             "objectives": [{"metric": "train_tokens_s", "direction": "maximize"}]}
    for base in (infer, traced, train):
        validate(copy.deepcopy(base), "base.yaml", "base")
    return [infer, traced, train]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _schema_paths() -> list[tuple[str, ...]]:
    """Every declared key, present in a base or not (keys added to the schema later included)."""
    sections = {"model": schema.MODEL_KEYS, "workload": schema.WORKLOAD_KEYS, "search": schema.SEARCH_KEYS,
                "slo": schema.SLO_METRICS}
    return [(k,) for k in schema.TOP_KEYS] + [(s, k) for s, keys in sections.items() for k in keys] + \
        [("params", "batch_size", k) for k in schema.PARAM_KEYS]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[dict[str, Any]]:
    return _bases(tmp_path_factory.mktemp("fuzz_files"))


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    node = data
    for part in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return data


def _where(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nested(depth: int, lists_only: bool = False) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 or lists_only else {"k": value}
    return value


# Values no key of the schema can mean: each is refused wherever it is put.
NEVER_MEANT = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 10**40, -(10**40), datetime.date(2026, 1, 1),
                     b"\x00bytes", {1: "int key"}, "nul\x00char"]),
    st.integers(min_value=schema.MAX_DEPTH + 1, max_value=40).map(_nested),
    st.integers(min_value=schema.MAX_DEPTH + 1, max_value=2000).map(lambda d: _nested(d, lists_only=True)),
    st.floats(min_value=1e13, max_value=1e300), st.integers(min_value=10**13, max_value=10**60),
)


def _schema_or_base_path(bases: list[dict[str, Any]]) -> st.SearchStrategy:
    choices = [(i, p) for i, b in enumerate(bases) for p in _paths(b)] + [(0, p) for p in _schema_paths()]
    return st.sampled_from(choices)


def _refused(data: dict[str, Any]) -> SpaceError:
    with pytest.raises(SpaceError) as info:
        validate(data, "fuzz.yaml", "fuzz")
    assert "cannot be validated" not in str(info.value), info.value  # the catch-all means a missing check
    return info.value


@FUZZ
@given(st.data())
def test_values_never_meant_are_refused_at_their_key(bases, data):
    index, path = data.draw(_schema_or_base_path(bases))
    value = data.draw(NEVER_MEANT)
    error = _refused(_set(bases[index], path, value))
    assert error.key.startswith(_where(path)) or (error.key == "" and isinstance(value, dict)), (path, error)


@FUZZ
@given(st.data())
def test_nulls_are_refused_where_a_value_is_needed(bases, data):
    index, path = data.draw(_schema_or_base_path(bases))
    mutated = _set(bases[index], path, None)
    nullable = len(path) == 1 or path[0] == "fixed" or "choices" in path or tuple(path) in schema.NULLABLE_KEYS
    if nullable:
        try:
            validate(mutated, "fuzz.yaml", "fuzz")
        except SpaceError as exc:
            assert "cannot be validated" not in str(exc)
        return
    assert _refused(mutated).key.startswith(_where(path))


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=30), st.sampled_from(["", "..", "../x", "/dev/zero", "int", "categorical", "uniform",
                                                     "poisson", "closed", "trace", "grid", "maximize", "\u202e"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@FUZZ
@given(st.data())
def test_any_value_anywhere_is_refused_by_key_or_accepted_sane(bases, data):
    """Wrong types, negatives, unicode, huge strings...: a SpaceError naming a key, or a space
    whose every number is finite and whose stored form is plain JSON."""
    index, path = data.draw(_schema_or_base_path(bases))
    mutated = _set(bases[index], path, data.draw(JSONISH))
    try:
        space = validate(mutated, "fuzz.yaml", "fuzz")
    except SpaceError as exc:
        assert "cannot be validated" not in str(exc), exc
        assert exc.key or exc.problem.startswith(("top level", "keys must")), exc
        return
    json.dumps(space.raw, allow_nan=False)  # what the study stores
    space.distributions()


# ---------------------------------------------------------------- files


def _alias_bomb(width: int, depth: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, depth + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nstudy: bomb\nobjectives: *a{depth}\n"


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(st.integers(2, 12), st.integers(3, 9))
def test_alias_bombs_are_refused_small_and_fast(width, depth):
    text = _alias_bomb(width, depth)
    assume_big = 10 * width**depth > schema.MAX_VALUES
    tracemalloc.start()
    started = time.monotonic()
    try:
        data = yaml.load(text, Loader=schema._UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
        with pytest.raises(SpaceError) as info:
            validate(data, "bomb.yaml", "bomb")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 64 * 2**20
    if assume_big:
        assert "more than" in str(info.value)


TAGS = st.sampled_from(["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!custom 1",
                        "!!binary aGVsbG8=", "!!timestamp 2026-01-01", "!!set {a, b}", "!!omap [a: 1]",
                        "!!python/tuple [1]", "!<tag:yaml.org,2002:python/object:object> {}"])


@FUZZ
@given(st.sampled_from(["study", "description", "device", "runner"]), TAGS)
def test_tags_are_refused(tmp_path_factory, key, tag):
    path = tmp_path_factory.mktemp("tags") / "t.yaml"
    path.write_text(f"{key}: {tag}\nobjectives: [{{metric: throughput_tok_s}}]\n")
    with pytest.raises(SpaceError):
        load_space(str(path))


@FUZZ
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes_are_refused_or_valid(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("bytes") / "b.yaml"
    path.write_bytes(blob)
    try:
        load_space(str(path))
    except SpaceError as exc:
        assert "cannot be validated" not in str(exc)


def test_files_that_are_not_files(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * (schema.MAX_FILE_BYTES + 10) + "\n")
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (link, "not a regular file"),
                      (tmp_path, "not a regular file"), (big, "larger than"), ("/proc/self/mem", "cannot read")):
        started = time.monotonic()
        with pytest.raises(SpaceError, match=why):
            load_space(str(path))
        assert time.monotonic() - started < 2


# ---------------------------------------------------------------- the CLI, a small sample


@settings(max_examples=6, deadline=None, database=None, derandomize=True)
@given(st.data())
def test_the_cli_exits_2_with_one_line_and_creates_nothing(tmp_path_factory, bases, data):
    index, path = data.draw(_schema_or_base_path(bases))
    root = tmp_path_factory.mktemp("cli")
    space = root / "s.yaml"
    space.write_text(yaml.dump(_set(bases[index], path, data.draw(NEVER_MEANT.filter(
        lambda v: not isinstance(v, (bytes, datetime.date)))))))
    run = subprocess.run([sys.executable, "-m", "tuner", "--space", str(space)], cwd=root, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and "s.yaml:" in run.stderr
    assert sorted(p.name for p in root.iterdir()) == ["s.yaml"]
