"""`workload:`: each key checked by its runner's declaration (runners/registry.py), then the
rules between keys (trace file, capacity mode, positions, a window that can finish)."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

from runners.contract import DEFAULT_MAX_DURATION_S
from runners.registry import RunnerSpec, WorkloadKey
from tuner.space.checks import SpaceError, _positive, _short, no_unknown_keys, typed_key
from tuner.space.search_spec import SearchSpec

DISTS = {"uniform": ("low", "high"), "lognormal": ("mean", "sigma"), "normal": ("mean", "std")}


def _workload(w: dict[str, Any], source: str, spec: RunnerSpec, positions: int | None = None) -> dict[str, Any]:
    """Each key by its declaration (runners/registry.py), then the rules between keys."""
    keys = spec.workload_keys
    no_unknown_keys(w, set(keys), source, "workload")
    out = dict(w)
    for key in keys.values():
        if key.name in w:
            value = _declared_value(w, key, source)
            if value is not None:
                out[key.name] = value
    if "arrival" in keys:  # the trial's workload names its arrival process, given or not
        out["arrival"] = out.get("arrival", keys["arrival"].default)
    _capacity_mode(w, source)
    if out.get("arrival") == "trace" and "trace" not in w:
        raise SpaceError(source, "workload.trace", "arrival: trace needs a `trace` file path")
    longest = {k: _longest_length(out[k]) for k in ("prompt_tokens", "output_tokens") if k in w}
    if positions is not None:
        _check_positions(w, longest, positions, source, spec)
    return out


def _declared_value(w: dict[str, Any], key: WorkloadKey, source: str) -> Any:
    """`w[key.name]` checked against its declaration; the value to keep (a length spec as given)."""
    where = f"workload.{key.name}"
    if key.kind == "length":
        return _length_dist(w[key.name], source, where)
    kind = {"number": float, "int": int, "bool": bool}.get(key.kind, str)
    if key.floor is not None:
        value = _positive(w, key.name, kind, source, "workload", None, allow_zero=key.floor == ">= 0")
    else:
        value = typed_key(w, key.name, kind, source, "workload", None)
    if key.choices is not None and value not in key.choices:
        raise SpaceError(source, where, f"must be one of {list(key.choices)}, got {value!r}")
    if key.maximum is not None and value is not None and value > key.maximum:
        raise SpaceError(source, where, f"must be <= {key.maximum:g}, got {value:g}")
    if key.kind == "file":
        _regular_file(value, source, where)
    return value


def _text_files(workload: dict[str, Any], model: dict[str, Any], source: str, spec: RunnerSpec) -> None:
    """Text keys (`eval_text`, `calibration_text`): a non-empty text file, tokenized with the
    checkpoint's tokenizer (so `model.path` must have one); stored as an absolute path."""
    for key in (k.name for k in spec.workload if k.kind == "text"):
        file = typed_key(workload, key, str, source, "workload", None)
        if file is None:
            continue
        path = Path(file).expanduser()
        if not path.is_file():
            raise SpaceError(source, f"workload.{key}", f"{file} is not a file")
        if not path.read_bytes().strip():
            raise SpaceError(source, f"workload.{key}", f"{file} is empty")
        tokenizer = ("tokenizer.json", "tokenizer_config.json")
        if "path" not in model or not any((Path(model["path"]) / name).is_file() for name in tokenizer):
            raise SpaceError(source, f"workload.{key}", "needs a tokenizer: set model.path to a checkpoint "
                             "folder with tokenizer.json or tokenizer_config.json")
        workload[key] = str(path.resolve())


def _capacity_mode(w: dict[str, Any], source: str) -> None:
    """Capacity mode searches an open-loop rate itself: no fixed rate, a Poisson-like arrival."""
    mode = w.get("mode", "window")
    if mode == "capacity" and "rate_rps" in w:
        raise SpaceError(source, "workload.rate_rps", "mode: capacity searches the rate itself; bound it with "
                         "capacity_min_rps / capacity_max_rps instead")
    if mode == "capacity" and w.get("arrival", "poisson") not in ("poisson", "constant", "gamma"):
        raise SpaceError(source, "workload.arrival", "mode: capacity searches an open-loop rate "
                         f"(poisson, constant or gamma), not {w['arrival']!r}")
    low, high = w.get("capacity_min_rps"), w.get("capacity_max_rps")
    if low is not None and high is not None and low >= high:
        raise SpaceError(source, "workload.capacity_min_rps", "must be < capacity_max_rps")


def _regular_file(path: str, source: str, where: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SpaceError(source, where, f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise SpaceError(source, where, f"{path}: not a regular file")


def _check_positions(w: dict[str, Any], longest: dict[str, int], positions: int, source: str,
                     spec: RunnerSpec) -> None:
    """Prompt + output, and the evaluation sequences, must fit the model's positions."""
    defaults = spec.workload_defaults()
    prompt = longest.get("prompt_tokens", defaults.get("prompt_tokens", 0))
    output = longest.get("output_tokens", defaults.get("output_tokens", 0))
    if prompt + output > positions:
        # Name the length that takes more of the positions (a prompt alone may already exceed them).
        key = "prompt_tokens" if prompt >= output or "output_tokens" not in longest else "output_tokens"
        raise SpaceError(source, f"workload.{key}", f"the longest prompt ({prompt}) + output ({output}) tokens "
                                                    f"exceed the model's {positions} positions")
    for key in ("eval_tokens", "shared_prefix_tokens"):
        value = w.get(key)
        if isinstance(value, int) and value > positions:
            raise SpaceError(source, f"workload.{key}", f"{value} exceeds the model's {positions} positions")


def _check_window(w: dict[str, Any], search: SearchSpec, source: str, spec: RunnerSpec) -> None:
    """An open-loop window must be able to finish: its arrivals span requests / rate seconds."""
    if w.get("arrival", "poisson") not in ("poisson", "constant", "gamma") or "rate_rps" not in w \
            or w.get("mode") == "capacity":  # capacity mode searches the rate itself
        return
    # Warm-up requests run back to back before the window; the measured ones arrive at the rate,
    # and the window's hard length (max_duration_s, 120 s by default) bounds them.
    count = int(w.get("requests", spec.workload_defaults().get("requests", 1)))
    span_s = (count - 1) / float(w["rate_rps"])
    limit, name = ((float(w["max_duration_s"]), "max_duration_s") if "max_duration_s" in w
                   else (min(DEFAULT_MAX_DURATION_S, search.trial_timeout_s), "the default max_duration_s"))
    if span_s > limit:
        raise SpaceError(source, "workload.rate_rps", f"{count} requests at {w['rate_rps']:g} req/s take "
                                                      f"{span_s:.4g} s to arrive, beyond {name} ({limit:g} s)")


def _length_dist(value: Any, source: str, where: str) -> Any:
    if isinstance(value, bool):
        raise SpaceError(source, where, "must be an integer or a {dist: ...} mapping")
    if isinstance(value, int):
        if value < 1:
            raise SpaceError(source, where, f"must be >= 1, got {value}")
        return value
    if not isinstance(value, dict):
        raise SpaceError(source, where, "must be an integer or a {dist: ...} mapping")
    dist = value.get("dist")
    if not isinstance(dist, str) or dist not in DISTS:
        raise SpaceError(source, f"{where}.dist", f"must be one of {list(DISTS)}, got {_short(dist)}")
    allowed = {"dist", "min", "max", *DISTS[dist]}
    no_unknown_keys(value, allowed, source, where)
    for key in DISTS[dist]:
        if key not in value:
            raise SpaceError(source, f"{where}.{key}", f"required for dist {dist}")
    for key in (*DISTS[dist], "min", "max"):
        number = typed_key(value, key, float, source, where, None)
        floor = 0 if key in ("sigma", "std") else 1  # a length of zero or less means nothing
        if number is not None and number < floor:
            raise SpaceError(source, f"{where}.{key}", f"must be >= {floor}, got {number}")
    if dist == "uniform" and value["low"] > value["high"]:
        raise SpaceError(source, f"{where}.low", "must be <= high")
    if "min" in value and "max" in value and value["min"] > value["max"]:
        raise SpaceError(source, f"{where}.min", "must be <= max")
    return value


def _longest_length(spec: Any) -> int:
    """The longest length a spec can produce (a normal/lognormal without `max`: 6 sigma out)."""
    if isinstance(spec, int):
        return spec
    dist = spec["dist"]
    if dist == "uniform":
        tail = spec["high"]
    elif dist == "normal":
        tail = spec["mean"] + 6 * spec["std"]
    else:
        tail = spec["mean"] * math.exp(min(6 * spec["sigma"], 700))
    return int(min(tail, spec.get("max", math.inf)))
