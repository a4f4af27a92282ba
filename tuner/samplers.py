"""The study's sampler: a name -> factory table, and `auto`'s choice among them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import optuna

from tuner import search as search_policy
from tuner.gp_search import auto_gp
from tuner.space import Space, grid_values

# (space, seed, startup trials) -> sampler. Every sampler reads the constraints each trial
# records (`trial.set_constraint`: runnable, and one per bound), so infeasible configs steer
# it away from their region.
SamplerFactory = Callable[[Space, int, int], optuna.samplers.BaseSampler]


def _tpe(space: Space, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    # Multivariate TPE models the knobs jointly (batch size and quant bits interact); the
    # constant liar treats running trials as bad so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def _nsga2(space: Space, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, space.search.trials // 4)))


def _gp(space: Space, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    # Optuna's GP conditions on running trials itself (its answer to parallel suggestions).
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def _random(space: Space, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _grid(space: Space, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GridSampler({n: grid_values(p) for n, p in space.params.items()}, seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {"tpe": _tpe, "nsga2": _nsga2, "gp": _gp, "random": _random, "grid": _grid}


def make_sampler(space: Space, salt: str = "") -> optuna.samplers.BaseSampler:
    """The space's sampler; a `salt` derives another seed from the space's (see `tuner.study`'s worker ticket)."""
    search = space.search
    seed = search.seed if not salt else _salted_seed(search.seed, salt)
    if search.sampler == "grid" or (search.sampler == "auto" and search_policy.auto_sampler(space).sampler == "grid"):
        # Optuna's GridSampler numbers the grid points after shuffling them with its seed and
        # records visited points by that number: every worker (and a resumed run, which gets a
        # worker ticket) must shuffle alike, or grid ids name other configs and points repeat
        # (a resumed 72-point GPU grid ran 20 configs twice and missed 20).
        seed = search.seed
    startup = search.n_startup_trials or min(10, max(2, search.trials // 3))
    if search.sampler == "auto":
        choice = search_policy.auto_sampler(space)
        if choice.sampler == "grid":
            return SAMPLERS["grid"](space, seed, startup)
        startup = search.n_startup_trials or choice.n_startup_trials or startup
        if choice.sampler == "gp" and (exhaustive := auto_gp(space, seed, startup, search.seed)) is not None:
            return exhaustive  # a finite space: the GP scores every untried point (tuner/gp_search.py)
        # `auto` never repeats a tried or running config (NoRepeatSampler): in a finite space the
        # GP can get stuck on one measured point, and in a continuous one its acquisition often
        # peaks on a bound, so two trials can ask for exactly the same config (the CPU headline
        # study ran batch 32 / 16 bits / quantized KV / 0.5 ms twice in 12 trials).
        return search_policy.NoRepeatSampler(SAMPLERS[choice.sampler](space, seed, startup), seed)
    return SAMPLERS[search.sampler](space, seed, startup)


def _salted_seed(seed: int, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:4], "big")
