"""Configs of a finite space that the `auto` GP sampler knows not to propose, without a trial.

Two kinds, both read from what the runner declares (runners/knobs.py), not learnt:
- refused up front: values the runner refuses together on any device (`RunnerSpec.together`:
  kv_cache=offloaded with scheduler=dynamic on the fast engine);
- a stack whose quality broke a bound: the runner scores quality (KL, top-1, perplexity) once per
  built model and KV policy, so every config with the same `quality_knobs` as a finished trial that
  broke a quality bound would measure the same value (int4 on random weights: KL 1.0 against 0.1).
  With `engine: auto` the runner picks the engine per config, so two such configs may run on
  different engines, whose scores differ by kernel numerics only: a bound one broke is taken as
  broken by both (a config within that noise of its bound is skipped with it).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from runners.contract import QUALITY_METRICS, TrialResult
from runners.knobs import quality_knobs, runner_knobs
from tuner import record
from tuner.device_fit import refused_points
from tuner.space import Constraint, Space


def plain_key(params: dict[str, Any]) -> tuple[Any, ...]:
    """A point's params as a hashable key (every knob: a refusal may read any of them)."""
    return tuple(sorted(params.items()))


class RuledOut:
    """Which points of `points` the sampler skips: refused ones always, broken-quality ones once seen."""

    def __init__(self, space: Space, points: list[dict[str, Any]], given: dict[str, Any]) -> None:
        # given: the knobs every point shares (the space's fixed knobs and single-valued params)
        self.refused = {plain_key(p) for p, why in zip(points, refused_points(space, points), strict=True) if why}
        self._bounds = [c for c in space.constraints if c.metric in QUALITY_METRICS]
        table = runner_knobs(space.runner, space.model)
        self._quality = lambda params: quality_knobs(table, {**given, **params})

    def runnable(self, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for p in points if plain_key(p) not in self.refused]

    def broken_quality(self, study: optuna.Study) -> set[Any]:
        """The `quality_knobs` of the finished trials whose measured quality broke a bound."""
        out = set()
        if not self._bounds:
            return out
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if broken_bound(t, self._bounds) is not None and (key := self._quality(t.params)) is not None:
                out.add(key)
        return out

    def excludes(self, params: dict[str, Any], broken: set[Any]) -> bool:
        """Whether the runner refuses `params` up front, or their quality is among `broken`."""
        return plain_key(params) in self.refused or (bool(broken) and self._quality(params) in broken)


def broken_quality_source(study: optuna.Study, space: Space, knobs: dict[str, Any]) -> TrialResult | None:
    """The answer to a trial whose stack is known to break a quality bound, for any sampler: the
    earliest finished trial of this study (measured here, not carried over by a warm start) with
    the same `quality_knobs` whose measured quality broke a bound gives its quality metrics; the
    objectives are not measured (the runner would stop the window in set-up). None otherwise."""
    bounds = [c for c in space.constraints if c.metric in QUALITY_METRICS]
    table = runner_knobs(space.runner, space.model)
    key = quality_knobs(table, knobs)
    if not bounds or key is None:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        stored = record.CONFIG.get(t)
        if not stored or record.CARRIED_OVER.get(t) or quality_knobs(table, stored.get("knobs") or {}) != key:
            continue
        if (c := broken_bound(t, bounds)) is not None:
            quality = measured_quality(t)
            why = (f"{c.metric} = {quality[c.metric]:.4g} breaks {c.name}, as trial "
                   f"#{t.number} with the same quality knobs measured")
            return TrialResult("ok", quality, unavailable={o.metric: why for o in space.objectives},
                               info={"same_quality_as": t.number})
    return None


def measured_quality(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """The quality metrics `trial` measured (its set-up measures them even when no request ran)."""
    measured = record.metrics(trial)
    return {m: float(v) for m in QUALITY_METRICS if isinstance(v := measured.get(m), (int, float))}


def broken_bound(trial: optuna.trial.FrozenTrial, bounds: list[Constraint]) -> Constraint | None:
    """The first quality bound of `bounds` that `trial`'s measured quality breaks, or None."""
    quality = measured_quality(trial)
    return next((c for c in bounds if c.metric in quality and c.violation(quality[c.metric]) > 0), None)
