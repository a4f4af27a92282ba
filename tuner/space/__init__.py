"""Search-space files: safe YAML in, validated dataclasses and Optuna distributions out.

Every problem is a `SpaceError` naming the file and the offending key; the CLI turns it into
one line and exit code 2 before anything (study, output folder) is created. The knobs, model
kind and workload keys a runner takes come from its declaration (runners/registry.py).

Modules: `checks` (the error, bounds on a file, the plain-value walk), `files` (locating and
reading YAML), `model`, `workload`, `params` (knobs -> distributions), `goals` (objectives,
constraints, SLO), `search_spec` (the `search:` section) and `validate` (the whole file).
"""

from __future__ import annotations

from runners.knobs import DTYPES
from runners.registry import ANY_WORKLOAD, ARRIVALS, CI_METRICS, SEED_MAX, WORKLOAD_MODES
from tuner.space.checks import (
    ABSURD,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_STRING,
    MAX_VALUES,
    NULLABLE_KEYS,
    SpaceError,
    check_plain,
    no_unknown_keys,
    typed_key,
)
from tuner.space.files import _UniqueKeyLoader, apply_overrides, bundled_dir, read_yaml, resolve_space_path
from tuner.space.goals import SLO_METRICS, Constraint, Objective
from tuner.space.model import MODEL_KEYS, REPLAY_MODEL_KEYS, model_positions
from tuner.space.params import PARAM_KEYS, ParamSpec, grid_values, to_distribution
from tuner.space.search_spec import SAMPLERS, SEARCH_KEYS, SEARCH_MAX, PlateauStop, SearchSpec, WarmStart
from tuner.space.validate import STUDY_NAME_MAX, TOP_KEYS, Space, load_space, study_name_problem, validate
from tuner.space.workload import DISTS

# Every workload key some runner takes (each runner's own set: `runner_spec(name).workload_keys`).
WORKLOAD_KEYS = {k.name for k in ANY_WORKLOAD}
__all__ = [
    "ABSURD", "ARRIVALS", "CI_METRICS", "DISTS", "DTYPES", "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_STRING",
    "MAX_VALUES", "MODEL_KEYS", "PARAM_KEYS", "REPLAY_MODEL_KEYS", "SAMPLERS", "SEARCH_KEYS", "SEARCH_MAX",
    "SEED_MAX", "SLO_METRICS", "STUDY_NAME_MAX", "TOP_KEYS", "WORKLOAD_KEYS", "WORKLOAD_MODES", "NULLABLE_KEYS",
    "no_unknown_keys", "typed_key",
    "Constraint", "Objective", "ParamSpec", "PlateauStop", "SearchSpec", "Space", "SpaceError", "WarmStart",
    "_UniqueKeyLoader", "apply_overrides", "bundled_dir", "check_plain", "grid_values", "load_space",
    "model_positions", "read_yaml", "resolve_space_path", "study_name_problem", "to_distribution", "validate",
]
