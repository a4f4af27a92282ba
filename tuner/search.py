"""How the search spends its trials: the `auto` sampler rule, the feasible hypervolume, warm
starts from an earlier study, and stopping on a hypervolume plateau.

The numbers behind the choices are measured by `benchmarks/search_efficiency.py` on recorded
grids replayed through `runner: replay` (BENCHMARKS.md, "Search efficiency").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # what plot_hypervolume_history uses
from optuna.trial import FrozenTrial, TrialState

from tuner.space import PlateauStop, Space, grid_values

# ---------------------------------------------------------------- the `auto` sampler


@dataclass(frozen=True)
class AutoChoice:
    sampler: str  # grid | gp | tpe
    why: str
    n_startup_trials: int | None = None  # random trials before the model takes over


# Above this budget the GP's per-suggestion cost (a cubic fit per objective and constraint)
# grows to seconds, while TPE stays at milliseconds.
GP_MAX_TRIALS = 200


# Above this many points a finite space's acquisition is optimised by Optuna's own local search
# (evaluating the GP on every point costs ~1 ms per 100 points and suggestion).
EXHAUSTIVE_MAX_POINTS = 20_000


def grid_points(space: Space) -> list[dict[str, Any]] | None:
    """Every config of a finite space (None when it is continuous or too large to enumerate)."""
    if space_size(space) > EXHAUSTIVE_MAX_POINTS:
        return None
    names = list(space.params)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(grid_values(space.params[n]) for n in names))]


def space_size(space: Space) -> float:
    """Number of distinct configurations; inf when a parameter is continuous."""
    size = 1.0
    for p in space.params.values():
        if p.type == "categorical":
            size *= len(p.choices)
        elif p.type == "int" and not p.log:
            size *= (int(p.high) - int(p.low)) // int(p.step or 1) + 1
        elif p.step is not None:
            size *= math.floor((p.high - p.low) / p.step + 1e-9) + 1
        else:
            return math.inf
    return size


def categorical_share(space: Space) -> float:
    return sum(p.type == "categorical" for p in space.params.values()) / max(1, len(space.params))


def auto_sampler(space: Space) -> AutoChoice:
    """What `sampler: auto` runs, from the space's size, the budget and the objectives.

    Measured on the replayed CPU grid (benchmarks/search_efficiency.py, BENCHMARKS.md "Search
    efficiency"; 180 points, 4 of 5 knobs categorical, 3 objectives, 56 % infeasible; 20 seeds;
    infeasible trials told the worst values), median feasible hypervolume at 10 % of the grid:
    the GP as `auto` runs it (`tuner.gp_search.ExhaustiveGPSampler`, 3 start-up trials)
    0.994 (held-out seeds 20-39: 0.973; seeds 0-59: 0.976), Optuna's GP with the default 10
    start-up trials 0.762, multivariate TPE 0.318, NSGA-II 0.193, random 0.294. On the GPU grid
    (glm-4-9b on an H200, 108 points, 60 feasible, 11 trials at 10 %) the GPs are ahead too: this
    GP 0.704, Optuna's with 10 start-up trials 0.735, TPE 0.531, random 0.521.
    So, in order:
    - a space no larger than the budget is searched exhaustively (grid): nothing beats it;
    - up to GP_MAX_TRIALS trials and 3 objectives: Optuna's GP sampler, with few start-up trials
      (3; 2 and 4 both did worse over 40 seeds, HV at 10 % 92.6 and 92.0 % against 95.3 %; 5
      from a max-min-distance design did worse before); on a finite space of up
      to `tuner.gp_search.EXHAUSTIVE_MAX_POINTS` points as ExhaustiveGPSampler (`auto_gp`).
      It models constraints (one GP each, so the `runnable` and bound constraints steer it away
      from infeasible regions) and conditions on running trials (parallel workers). A large
      categorical share did not hurt it on the measured grid, so it does not decide here;
    - otherwise multivariate TPE with the constant liar: cheap per suggestion at any budget and
      any number of objectives. NSGA-II is never chosen: it needs generations of a population
      (hundreds of trials) before it beats random.
    """
    budget = space.search.trials
    size = space_size(space)
    if size <= budget:
        return AutoChoice("grid", f"the space has {size:.0f} points, no more than the {budget}-trial budget")
    if budget <= GP_MAX_TRIALS and len(space.objectives) <= 3:
        return AutoChoice("gp", f"{budget} trials, {len(space.objectives)} objective(s): a Gaussian process "
                                f"learns most per trial", n_startup_trials=max(3, min(10, budget // 10)))
    return AutoChoice("tpe", f"{budget} trials, {len(space.objectives)} objective(s): multivariate TPE "
                             f"(cheap per suggestion)")


class NoRepeatSampler(optuna.samplers.BaseSampler):
    """A model-based sampler that never spends a trial on a config already tried or running.

    In a finite space Optuna's GP can get stuck proposing one measured point again and again
    (measured on the CPU grid: 16 of 22 trials of one seed were the same config), and two
    workers can be handed the same config at once. A repeat would re-measure what is known, so
    when the inner sampler's joint suggestion equals a finished or running trial's config, this
    trial is drawn at random instead (a cheap exploration step).
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int | None = None) -> None:
        self._inner = inner
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._explore: set[int] = set()  # trial ids drawn at random instead of a repeat

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        params = self._inner.sample_relative(study, trial, search_space)
        if params and _is_repeat(study, trial, params):
            self._explore.add(trial.number)
            return {}
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str,
                           distribution: optuna.distributions.BaseDistribution) -> Any:
        sampler = self._random if trial.number in self._explore else self._inner
        return sampler.sample_independent(study, trial, name, distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._explore.discard(trial.number)
        self._inner.after_trial(study, trial, state, values)


def _is_repeat(study: optuna.Study, trial: FrozenTrial, params: dict[str, Any]) -> bool:
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number != trial.number and all(
                k in other.params and other.params[k] == v for k, v in params.items()):
            return True
    return False


# ---------------------------------------------------------------- hypervolume


def feasible(trial: FrozenTrial) -> bool:
    return (trial.state == TrialState.COMPLETE and trial.values is not None
            and all(c <= 0 for c in trial.constraints.values()) and all(math.isfinite(v) for v in trial.values))


def losses(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Objective values as losses (maximised objectives negated): [points, objectives]."""
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(directions)) * sign


def reference_point(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[float]:
    """Each objective's worst value, pushed 10 % of its span further out (reports use the same rule)."""
    loss = losses(values, directions)
    worst, best = loss.max(axis=0), loss.min(axis=0)
    span = np.where(worst - best > 0, worst - best, np.maximum(np.abs(worst), 1.0))
    ref = worst + 0.1 * span
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return (ref * sign).tolist()


def hypervolume(values: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume dominated by `values` up to `reference` (0 for no point)."""
    if len(values) == 0:
        return 0.0
    loss = losses(values, directions)
    ref = losses([reference], directions)[0]
    inside = loss[(loss < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref))


def study_directions(study: optuna.Study) -> list[str]:
    return [d.name.lower() for d in study.directions]


def hypervolume_history(trials: Sequence[FrozenTrial], directions: Sequence[str],
                        reference: Sequence[float]) -> list[float]:
    """The feasible hypervolume after each of `trials` (in the order given)."""
    history, front = [], []
    current = 0.0
    for trial in trials:
        if feasible(trial):
            front.append(list(trial.values))
            current = hypervolume(front, directions, reference)
        history.append(current)
    return history


# ---------------------------------------------------------------- stopping on a plateau


@dataclass(frozen=True)
class Plateau:
    trials: int  # trials in the window
    before: float
    now: float

    def describe(self, rule: PlateauStop) -> str:
        gain = (self.now - self.before) / self.before if self.before > 0 else math.inf
        return (f"feasible hypervolume improved by {100 * gain:.2f} % over the last {rule.patience} trials "
                f"(< {100 * rule.min_improvement:g} %)")


def plateau_reached(history: Sequence[float], rule: PlateauStop) -> Plateau | None:
    """The plateau rule on a hypervolume history (one value after each finished trial).

    Stops when the hypervolume `patience` trials ago was positive and the latest is not more
    than `min_improvement` (relative) above it. A study with no feasible trial yet never stops
    on a plateau: the budget or the time limit ends it, since that is when searching on matters
    most.
    """
    if len(history) <= rule.patience:
        return None
    before, now = history[-1 - rule.patience], history[-1]
    if before <= 0:
        return None
    if now - before <= rule.min_improvement * before:
        return Plateau(rule.patience, before, now)
    return None


def study_plateau(study: optuna.Study, rule: PlateauStop) -> Plateau | None:
    """The plateau rule on a study's finished trials, in trial order.

    The reference point is taken from all feasible trials so far, so the values compared in one
    check share one reference.
    """
    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    points = [t.values for t in done if feasible(t)]
    if not points:
        return None
    directions = study_directions(study)
    return plateau_reached(hypervolume_history(done, directions, reference_point(points, directions)), rule)


# ---------------------------------------------------------------- warm start
