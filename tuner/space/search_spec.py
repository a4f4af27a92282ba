"""`search:`: the sampler, budget, seed and limits, warm start and the plateau stop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from runners.registry import SEED_MAX
from tuner.space.checks import SpaceError, no_unknown_keys, typed_key

SAMPLERS = ("auto", "tpe", "nsga2", "gp", "random", "grid")
SEARCH_KEYS = {"sampler", "trials", "timeout_min", "seed", "trial_timeout_s", "baseline",
               "n_startup_trials", "drift_every", "warm_start", "stop"}

SEARCH_MAX: dict[str, float] = {"trials": 100_000, "timeout_min": 525_600.0, "seed": SEED_MAX,
                                "trial_timeout_s": 7 * 86400.0, "n_startup_trials": 100_000}


@dataclass
class SearchSpec:
    sampler: str = "auto"
    trials: int = 20
    timeout_min: float | None = None
    seed: int = 0
    trial_timeout_s: float = 900.0
    baseline: bool = True
    n_startup_trials: int | None = None
    drift_every: int | None = None  # re-measure the baseline every N trials (and always at the end)
    warm_start: WarmStart | None = None
    stop: PlateauStop | None = None


@dataclass(frozen=True)
class WarmStart:
    """`search.warm_start`: seed the study with an earlier study's trials (tuner/search.py)."""

    study: str
    storage: str | None = None  # default: this study's storage


@dataclass(frozen=True)
class PlateauStop:
    """`search.stop`: end the study once the feasible hypervolume has not improved by
    `min_improvement` (relative) over the last `patience` trials."""

    patience: int
    min_improvement: float = 0.0


def _search(raw: dict[str, Any], source: str) -> SearchSpec:
    no_unknown_keys(raw, SEARCH_KEYS, source, "search")
    spec = SearchSpec()
    spec.sampler = typed_key(raw, "sampler", str, source, "search", spec.sampler)
    spec.trials = typed_key(raw, "trials", int, source, "search", spec.trials)
    spec.timeout_min = typed_key(raw, "timeout_min", float, source, "search", None)
    spec.seed = typed_key(raw, "seed", int, source, "search", spec.seed)
    spec.trial_timeout_s = typed_key(raw, "trial_timeout_s", float, source, "search", spec.trial_timeout_s)
    spec.baseline = typed_key(raw, "baseline", bool, source, "search", spec.baseline)
    spec.n_startup_trials = typed_key(raw, "n_startup_trials", int, source, "search", None)
    spec.drift_every = typed_key(raw, "drift_every", int, source, "search", None)
    if spec.drift_every is not None and spec.drift_every < 1:
        raise SpaceError(source, "search.drift_every", f"must be >= 1, got {spec.drift_every}")
    spec.warm_start = _warm_start(typed_key(raw, "warm_start", dict, source, "search", None), source)
    spec.stop = _plateau_stop(typed_key(raw, "stop", dict, source, "search", None), source)
    _check_search(spec, source)
    return spec


def _check_search(spec: SearchSpec, source: str) -> None:
    if spec.sampler not in SAMPLERS:
        raise SpaceError(source, "search.sampler", f"must be one of {list(SAMPLERS)}, got {spec.sampler!r}")
    if spec.trials < 1:
        raise SpaceError(source, "search.trials", f"must be >= 1, got {spec.trials}")
    if spec.timeout_min is not None and spec.timeout_min <= 0:
        raise SpaceError(source, "search.timeout_min", "must be > 0")
    if spec.trial_timeout_s <= 0:
        raise SpaceError(source, "search.trial_timeout_s", "must be > 0")
    if spec.seed < 0:
        raise SpaceError(source, "search.seed", f"must be >= 0, got {spec.seed}")
    if spec.n_startup_trials is not None and spec.n_startup_trials < 0:
        raise SpaceError(source, "search.n_startup_trials", "must be >= 0")
    for key, top in SEARCH_MAX.items():
        value = getattr(spec, key)
        if value is not None and value > top:
            raise SpaceError(source, f"search.{key}", f"must be <= {top:g}, got {value:g}")


def _warm_start(raw: dict[str, Any] | None, source: str) -> WarmStart | None:
    if raw is None:
        return None
    no_unknown_keys(raw, {"study", "storage"}, source, "search.warm_start")
    study = typed_key(raw, "study", str, source, "search.warm_start", None)
    if not study:
        raise SpaceError(source, "search.warm_start.study", "required: the name of the earlier study")
    return WarmStart(study, typed_key(raw, "storage", str, source, "search.warm_start", None))


def _plateau_stop(raw: dict[str, Any] | None, source: str) -> PlateauStop | None:
    if raw is None:
        return None
    no_unknown_keys(raw, {"patience", "min_improvement"}, source, "search.stop")
    patience = typed_key(raw, "patience", int, source, "search.stop", None)
    if patience is None or patience < 1:
        raise SpaceError(source, "search.stop.patience", f"required, a whole number of trials >= 1, got {patience!r}")
    gain = typed_key(raw, "min_improvement", float, source, "search.stop", 0.0)
    if not math.isfinite(gain) or gain < 0:
        raise SpaceError(source, "search.stop.min_improvement", f"must be a finite fraction >= 0, got {gain!r}")
    return PlateauStop(patience, float(gain))
