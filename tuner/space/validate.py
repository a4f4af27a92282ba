"""A space file's data -> the checked `Space`: every section validated, from the runner's
declaration (runners/registry.py) for knobs, model and workload."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import optuna

from runners.registry import RunnerSpec, known_runners, runner_spec
from tuner.space.checks import SpaceError, check_plain, no_unknown_keys, typed_key
from tuner.space.files import apply_overrides, read_yaml, resolve_space_path
from tuner.space.goals import Constraint, Objective, _constraints, _objectives, _slo
from tuner.space.model import _check_device, _model, _replay_model, model_positions
from tuner.space.params import ParamSpec, _fixed, _nearest_allowed, _params, to_distribution
from tuner.space.search_spec import SearchSpec, _search
from tuner.space.workload import _check_window, _text_files, _workload

TOP_KEYS = {
    "study", "description", "runner", "model", "device", "workload", "params", "fixed",
    "objectives", "constraints", "search", "slo",
}

# A study name is also a folder name (runs/<study>/) and a storage key.
STUDY_NAME_MAX = 100
_STUDY_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class Space:
    source: str
    study: str
    runner: str
    model: dict[str, Any]
    device: str
    workload: dict[str, Any]
    params: dict[str, ParamSpec]
    fixed: dict[str, Any]
    objectives: list[Objective]
    constraints: list[Constraint]
    search: SearchSpec
    slo: dict[str, float] = field(default_factory=dict)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # the file's data with overrides applied

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: to_distribution(p) for name, p in self.params.items()}

    def baseline_params(self) -> dict[str, Any]:
        """The runner's default knob values, clipped into the searched ranges."""
        defaults = {k: v.default for k, v in runner_spec(self.runner).knobs_for(self.model).items()}
        return {name: _nearest_allowed(p, defaults[name]) for name, p in self.params.items()}


def validate(data: dict[str, Any], source: str, default_study: str) -> Space:
    """The checked Space of a file's data; SpaceError naming the key for anything unusable."""
    try:
        return _validate(data, source, default_study)
    except SpaceError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        # A combination no check above foresaw: still one line and exit 2, never a traceback.
        raise SpaceError(source, "", f"cannot be validated ({type(exc).__name__}: {exc})") from None


def _validate(data: dict[str, Any], source: str, default_study: str) -> Space:
    check_plain(data, source)
    no_unknown_keys(data, TOP_KEYS, source, "")
    runner = typed_key(data, "runner", str, source, "", "glm-infer")
    if runner not in known_runners():
        raise SpaceError(source, "runner", f"must be one of {known_runners()}, got {runner!r}")
    spec = runner_spec(runner)
    study = typed_key(data, "study", str, source, "", default_study)
    problem = study_name_problem(study)
    if problem:
        hint = "" if "study" in data else " (the file's stem; set `study:` or pass --study)"
        raise SpaceError(source, "study", problem + hint)
    device = typed_key(data, "device", str, source, "", "auto")
    _check_device(device, source)
    model = _runner_model(spec, data, source)
    knobs = spec.knobs_for(model)
    workload = _workload(typed_key(data, "workload", dict, source, "", {}) or {}, source, spec,
                         model_positions(model))
    _text_files(workload, model, source, spec)
    params = _params(typed_key(data, "params", dict, source, "", {}) or {}, source, runner, knobs)
    fixed = _fixed(typed_key(data, "fixed", dict, source, "", {}) or {}, source, runner, params, knobs)
    objectives = _objectives(data.get("objectives"), source)
    constraints = _constraints(typed_key(data, "constraints", list, source, "", []) or [], source)
    search = _search(typed_key(data, "search", dict, source, "", {}) or {}, source)
    _check_window(workload, search, source, spec)
    slo = _slo(typed_key(data, "slo", dict, source, "", {}) or {}, source)
    if workload.get("mode") == "capacity" and not {"ttft_ms", "tpot_ms"} & set(slo):
        raise SpaceError(source, "slo", "workload mode: capacity needs ttft_ms and/or tpot_ms (the p99 bounds)")
    if search.sampler == "grid":
        for name, p in params.items():
            if p.type == "float" and p.step is None:
                raise SpaceError(source, f"params.{name}", "the grid sampler needs a `step` on floats")
    description = typed_key(data, "description", str, source, "", "")
    return Space(source, study, runner, model, device, workload, params, fixed, objectives,
                 constraints, search, slo, description, raw=data)


def _runner_model(spec: RunnerSpec, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`model:` as the runner declares it: a replay table, or a GLM preset / checkpoint."""
    if spec.model == "table":
        return _replay_model(typed_key(data, "model", dict, source, "", {}), source)
    return _model(typed_key(data, "model", dict, source, "", {"preset": "glm-tiny"}), source)


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read, validate and apply CLI overrides (`study`, `device`, `trials`, ...)."""
    path = resolve_space_path(name_or_path)
    data = apply_overrides(read_yaml(path), overrides or {})
    return validate(data, source=str(path), default_study=path.stem)


def study_name_problem(name: str) -> str | None:
    """Why `name` cannot name a study (it becomes a folder name), or None."""
    if not name:
        return "must not be empty"
    if len(name) > STUDY_NAME_MAX:
        return f"longer than {STUDY_NAME_MAX} characters"
    if not _STUDY_NAME.fullmatch(name) or name in (".", ".."):
        return f"{name!r} is not a name: use letters, digits and . _ - only (not . or ..)"
    return None
