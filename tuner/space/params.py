"""`params:` and `fixed:`: knob values checked against the runner's declared knobs, and the
Optuna distributions (and grid values) they become."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from tuner.space.checks import SpaceError, no_unknown_keys, typed_key

PARAM_KEYS = {"type", "low", "high", "step", "log", "choices"}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


def _params(params: dict[str, Any], source: str, runner: str, knobs: dict[str, Any]) -> dict[str, ParamSpec]:
    out: dict[str, ParamSpec] = {}
    for name, spec in params.items():
        where = f"params.{name}"
        if name not in knobs:
            raise SpaceError(source, where, f"unknown knob for runner {runner} (known: {', '.join(knobs)})")
        if not isinstance(spec, dict):
            raise SpaceError(source, where, "must be a mapping like {type: int, low: 1, high: 8}")
        no_unknown_keys(spec, PARAM_KEYS, source, where)
        ptype = spec.get("type")
        if ptype not in ("int", "float", "categorical"):
            raise SpaceError(source, f"{where}.type", f"must be int, float or categorical, got {ptype!r}")
        out[name] = (_categorical if ptype == "categorical" else _numeric)(spec, source, where, knobs[name], name)
    return out


def _categorical(spec: dict[str, Any], source: str, where: str, knob: Any, name: str) -> ParamSpec:
    no_unknown_keys(spec, {"type", "choices"}, source, where)
    choices = spec.get("choices")
    if not isinstance(choices, list):
        raise SpaceError(source, f"{where}.choices", "must be a list")
    if not choices:
        raise SpaceError(source, f"{where}.choices", "must not be empty")
    if len(set(map(repr, choices))) != len(choices):
        raise SpaceError(source, f"{where}.choices", "has duplicates")
    for choice in choices:
        problem = knob.check(choice)
        if problem:
            raise SpaceError(source, f"{where}.choices", problem)
    return ParamSpec(name, "categorical", choices=tuple(choices))


def _numeric(spec: dict[str, Any], source: str, where: str, knob: Any, name: str) -> ParamSpec:
    ptype = spec["type"]
    if knob.choices is not None:
        raise SpaceError(source, f"{where}.type", f"knob takes fixed values {list(knob.choices)}: use categorical")
    kind = int if ptype == "int" else float
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(source, f"{where}.{key}", "required")
    low = typed_key(spec, "low", kind, source, where, None)
    high = typed_key(spec, "high", kind, source, where, None)
    step = typed_key(spec, "step", kind, source, where, None)
    log = typed_key(spec, "log", bool, source, where, False)
    if low > high:
        raise SpaceError(source, f"{where}.low", f"must be <= high (got {low} > {high})")
    if log and low <= 0:
        raise SpaceError(source, f"{where}.low", "must be > 0 with log: true")
    if log and step is not None:
        raise SpaceError(source, f"{where}.step", "cannot be combined with log: true")
    if step is not None and step <= 0:
        raise SpaceError(source, f"{where}.step", "must be > 0")
    if ptype == "int" and int not in (knob.kind if isinstance(knob.kind, tuple) else (knob.kind,)):
        raise SpaceError(source, f"{where}.type", "this knob is not an integer")
    if ptype == "float" and float not in (knob.kind if isinstance(knob.kind, tuple) else (knob.kind,)):
        raise SpaceError(source, f"{where}.type", "this knob is not a number")
    for key, value in (("low", low), ("high", high)):
        problem = knob.bounds_problem(value)
        if problem:
            raise SpaceError(source, f"{where}.{key}", problem)
    return ParamSpec(name, ptype, float(low) if ptype == "float" else low,
                     float(high) if ptype == "float" else high, step, log)


def _fixed(fixed: dict[str, Any], source: str, runner: str, params: dict[str, ParamSpec],
           knobs: dict[str, Any]) -> dict[str, Any]:
    for name, value in fixed.items():
        where = f"fixed.{name}"
        if name not in knobs:
            raise SpaceError(source, where, f"unknown knob for runner {runner} (known: {', '.join(knobs)})")
        if name in params:
            raise SpaceError(source, where, "is also searched in params; keep it in one place")
        problem = knobs[name].check(value)
        if problem:
            raise SpaceError(source, where, problem)
    return dict(fixed)


def to_distribution(p: ParamSpec) -> optuna.distributions.BaseDistribution:
    if p.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(p.choices))
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log,
                                                    step=int(p.step or 1))
    return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)


def grid_values(p: ParamSpec) -> list[Any]:
    """All values of a finite parameter, for the grid sampler."""
    if p.type == "categorical":
        return list(p.choices)
    step = p.step or 1
    count = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
    values = [p.low + i * step for i in range(count)]
    return [int(v) for v in values] if p.type == "int" else [round(v, 12) for v in values]


def _nearest_allowed(p: ParamSpec, value: Any) -> Any:
    if p.type == "categorical":
        return value if value in p.choices else p.choices[0]
    if value is None or isinstance(value, (bool, str)):
        return p.low
    clipped = min(max(value, p.low), p.high)
    if p.step:
        clipped = p.low + round((clipped - p.low) / p.step) * p.step
        clipped = min(clipped, p.high)
    return int(round(clipped)) if p.type == "int" else float(clipped)
