"""`objectives:`, `constraints:` and `slo:`: contract metric names with directions and bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runners.contract import METRICS
from tuner.space.checks import SpaceError, _positive, no_unknown_keys, typed_key

SLO_METRICS = {"ttft_ms", "tpot_ms", "latency_ms"}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Constraint:
    metric: str
    max: float | None = None
    min: float | None = None

    @property
    def name(self) -> str:
        """The name its violation is stored under (`trial.set_constraint`), e.g. `kl_divergence<=0.1`."""
        return (f"{self.metric}{'<=' + str(self.max) if self.max is not None else ''}"
                f"{'>=' + str(self.min) if self.min is not None else ''}")

    def violation(self, value: float) -> float:
        """Optuna's convention: feasible iff every returned value is <= 0."""
        worst = 0.0
        if self.max is not None:
            worst = max(worst, value - self.max)
        if self.min is not None:
            worst = max(worst, self.min - value)
        return worst


def _objectives(raw: Any, source: str) -> list[Objective]:
    if raw is None:
        raise SpaceError(source, "objectives", "required: a list of {metric, direction}")
    if not isinstance(raw, list) or not raw:
        raise SpaceError(source, "objectives", "must be a non-empty list of {metric, direction}")
    out = []
    for i, item in enumerate(raw):
        where = f"objectives[{i}]"
        if not isinstance(item, dict):
            raise SpaceError(source, where, "must be a mapping {metric, direction}")
        no_unknown_keys(item, {"metric", "direction"}, source, where)
        metric = _metric(item.get("metric"), source, f"{where}.metric")
        direction = item.get("direction", METRICS[metric][1])
        if direction not in ("maximize", "minimize"):
            raise SpaceError(source, f"{where}.direction", f"must be maximize or minimize, got {direction!r}")
        if metric in (o.metric for o in out):
            raise SpaceError(source, f"{where}.metric", f"{metric} is listed twice")
        out.append(Objective(metric, direction))
    return out


def _metric(name: Any, source: str, where: str) -> str:
    if not isinstance(name, str) or name not in METRICS:
        raise SpaceError(source, where, f"unknown metric {name!r} (see DESIGN.md metric names)")
    return name


def _constraints(raw: list[Any], source: str) -> list[Constraint]:
    out = []
    for i, item in enumerate(raw):
        where = f"constraints[{i}]"
        if not isinstance(item, dict):
            raise SpaceError(source, where, "must be a mapping {metric, max|min}")
        no_unknown_keys(item, {"metric", "max", "min"}, source, where)
        metric = _metric(item.get("metric"), source, f"{where}.metric")
        bound_max = typed_key(item, "max", float, source, where, None)
        bound_min = typed_key(item, "min", float, source, where, None)
        if bound_max is None and bound_min is None:
            raise SpaceError(source, where, "needs a `max` or `min` bound")
        if bound_max is not None and bound_min is not None and bound_min > bound_max:
            raise SpaceError(source, f"{where}.min", "must be <= max")
        out.append(Constraint(metric, bound_max, bound_min))
    return out


def _slo(raw: dict[str, Any], source: str) -> dict[str, float]:
    no_unknown_keys(raw, SLO_METRICS, source, "slo")
    out = {k: float(_positive(raw, k, float, source, "slo", None)) for k in raw}
    for key, value in out.items():
        if value > 86_400_000:
            raise SpaceError(source, f"slo.{key}", f"{value:g} ms is more than a day")
    return out
