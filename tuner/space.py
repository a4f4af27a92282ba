"""Search-space files: safe YAML in, validated dataclasses and Optuna distributions out.

Every problem is a `SpaceError` naming the file and the offending key; the CLI turns it into
one line and exit code 2 before anything (study, output folder) is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import yaml

from runners.contract import METRICS
from runners.knobs import RUNNER_KNOBS, runner_knobs

SAMPLERS = ("auto", "tpe", "nsga2", "gp", "random", "grid")
ARRIVALS = ("poisson", "constant", "closed", "gamma", "trace")
DTYPES = ("float32", "float16", "bfloat16")
DISTS = {"uniform": ("low", "high"), "lognormal": ("mean", "sigma"), "normal": ("mean", "std")}

TOP_KEYS = {
    "study", "description", "runner", "model", "device", "workload", "params", "fixed",
    "objectives", "constraints", "search", "slo",
}
MODEL_KEYS = {"preset", "path", "dtype", "seed", "num_layers", "arch"}
REPLAY_MODEL_KEYS = {"table"}  # runner: replay
WORKLOAD_KEYS = {
    "arrival", "rate_rps", "concurrency", "requests", "warmup_requests", "prompt_tokens",
    "output_tokens", "seed", "burstiness", "trace", "max_duration_s", "target_p99_ci_ratio",
    "max_requests", "shared_prefix_tokens", "shared_prefix_groups", "eval_sequences",
    "eval_tokens", "train_steps", "warmup_steps", "data_path",
}
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices"}
SEARCH_KEYS = {"sampler", "trials", "timeout_min", "seed", "trial_timeout_s", "baseline",
               "n_startup_trials", "warm_start", "stop"}
SLO_METRICS = {"ttft_ms", "tpot_ms", "latency_ms"}


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Constraint:
    metric: str
    max: float | None = None
    min: float | None = None

    def violation(self, value: float) -> float:
        """Optuna's convention: feasible iff every returned value is <= 0."""
        worst = 0.0
        if self.max is not None:
            worst = max(worst, value - self.max)
        if self.min is not None:
            worst = max(worst, self.min - value)
        return worst


@dataclass
class SearchSpec:
    sampler: str = "auto"
    trials: int = 20
    timeout_min: float | None = None
    seed: int = 0
    trial_timeout_s: float = 900.0
    baseline: bool = True
    n_startup_trials: int | None = None
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
        defaults = {k: v.default for k, v in runner_knobs(self.runner, self.model).items()}
        return {name: _nearest_allowed(p, defaults[name]) for name, p in self.params.items()}


# ---------------------------------------------------------------- locating and loading files


def bundled_dir() -> Path:
    return Path(str(resources.files("search_spaces")))


def resolve_space_path(name_or_path: str) -> Path:
    """A path, or the name of a bundled file with or without `.yaml`."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    bundled = bundled_dir() / stem
    if len(path.parts) == 1 and bundled.exists():
        return bundled
    known = ", ".join(sorted(p.name for p in bundled_dir().glob("*.yaml")))
    raise SpaceError(name_or_path, "", f"no such file, and no bundled space of that name ({known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML silently overwrites."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpaceError(source, "", f"cannot read file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SpaceError(source, "", "not a UTF-8 text file") from None
    if not text.strip():
        raise SpaceError(source, "", "file is empty")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f" (line {mark.line + 1})" if mark else ""
        problem = exc.problem or "bad YAML"
        if "could not determine a constructor" in problem:
            problem = "unsafe or unknown YAML tag " + problem.split("tag")[-1].strip()
        raise SpaceError(source, "", f"{problem}{line}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise SpaceError(source, "", f"malformed YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise SpaceError(source, "", "top level must be a mapping of keys")
    return data


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read, validate and apply CLI overrides (`study`, `device`, `trials`, ...)."""
    path = resolve_space_path(name_or_path)
    data = apply_overrides(read_yaml(path), overrides or {})
    return validate(data, source=str(path), default_study=path.stem)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """CLI flags over the file: `study` and `device` at the top, the rest under `search`."""
    data = dict(data)
    search = dict(data.get("search") or {}) if isinstance(data.get("search") or {}, dict) else data["search"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("study", "device"):
            data[key] = value
        elif isinstance(search, dict):
            search[key] = value
    if search:
        data["search"] = search
    return data


# ---------------------------------------------------------------- validation


def validate(data: dict[str, Any], source: str, default_study: str) -> Space:
    _no_unknown(data, TOP_KEYS, source, "")
    runner = _get(data, "runner", str, source, "", "glm-infer")
    if runner not in RUNNER_KNOBS:
        raise SpaceError(source, "runner", f"must be one of {sorted(RUNNER_KNOBS)}, got {runner!r}")
    study = _get(data, "study", str, source, "", default_study)
    if not study.strip():
        raise SpaceError(source, "study", "must not be empty")
    device = _get(data, "device", str, source, "", "auto")
    _check_device(device, source)
    if runner == "replay":
        model = _replay_model(_get(data, "model", dict, source, "", {}), source)
    else:
        model = _model(_get(data, "model", dict, source, "", {"preset": "glm-tiny"}), source)
    knobs = runner_knobs(runner, model)
    workload = _workload(_get(data, "workload", dict, source, "", {}), source, runner)
    params = _params(_get(data, "params", dict, source, "", {}), source, runner, knobs)
    fixed = _fixed(_get(data, "fixed", dict, source, "", {}) or {}, source, runner, params, knobs)
    objectives = _objectives(data.get("objectives"), source)
    constraints = _constraints(_get(data, "constraints", list, source, "", []) or [], source)
    search = _search(_get(data, "search", dict, source, "", {}) or {}, source)
    slo = _slo(_get(data, "slo", dict, source, "", {}) or {}, source)
    if search.sampler == "grid":
        for name, p in params.items():
            if p.type == "float" and p.step is None:
                raise SpaceError(source, f"params.{name}", "the grid sampler needs a `step` on floats")
    description = _get(data, "description", str, source, "", "")
    return Space(source, study, runner, model, device, workload, params, fixed, objectives,
                 constraints, search, slo, description, raw=data)


def _no_unknown(data: dict[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    for key in data:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise SpaceError(source, where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str,
         prefix: str, default: Any) -> Any:
    where = f"{prefix}.{key}" if prefix else key
    if key not in data or data[key] is None:
        return default
    value = data[key]
    if kind is float:
        kind = (int, float)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SpaceError(source, where, f"must be {_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise SpaceError(source, where, f"must be {_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"dict": "a mapping", "list": "a list", "str": "a string", "int": "an integer",
             "float": "a number", "bool": "true or false"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _check_device(device: str, source: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise SpaceError(source, "device", f"must be auto, cpu, cuda or cuda:K, got {device!r}")


def _model(model: dict[str, Any], source: str) -> dict[str, Any]:
    _no_unknown(model, MODEL_KEYS, source, "model")
    if "preset" in model and "path" in model:
        raise SpaceError(source, "model", "give either `preset` or `path`, not both")
    out = dict(model)
    if "path" in model:
        _get(model, "path", str, source, "model", "")
    else:
        from runners.presets import PRESETS  # torch-free table of preset shapes

        preset = _get(model, "preset", str, source, "model", "glm-tiny")
        if preset not in PRESETS:
            raise SpaceError(source, "model.preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        out["preset"] = preset
    dtype = _get(model, "dtype", str, source, "model", None)
    if dtype is not None and dtype not in DTYPES:
        raise SpaceError(source, "model.dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    for key in ("seed", "num_layers"):
        value = _get(model, key, int, source, "model", None)
        if value is not None and value < (1 if key == "num_layers" else 0):
            raise SpaceError(source, f"model.{key}", f"must be >= {1 if key == 'num_layers' else 0}")
    return out


def _positive(data: dict[str, Any], key: str, kind: type, source: str, prefix: str,
              default: Any, allow_zero: bool = False) -> Any:
    value = _get(data, key, kind, source, prefix, default)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise SpaceError(source, f"{prefix}.{key}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _workload(w: dict[str, Any], source: str, runner: str) -> dict[str, Any]:
    _no_unknown(w, WORKLOAD_KEYS, source, "workload")
    out = dict(w)
    arrival = _get(w, "arrival", str, source, "workload", "poisson")
    if arrival not in ARRIVALS:
        raise SpaceError(source, "workload.arrival", f"must be one of {list(ARRIVALS)}, got {arrival!r}")
    out["arrival"] = arrival
    for key in ("rate_rps", "burstiness", "max_duration_s", "target_p99_ci_ratio"):
        _positive(w, key, float, source, "workload", None)
    for key in ("concurrency", "requests", "max_requests", "eval_sequences", "eval_tokens",
                "train_steps"):
        _positive(w, key, int, source, "workload", None)
    for key in ("warmup_requests", "seed", "shared_prefix_tokens", "shared_prefix_groups",
                "warmup_steps"):
        _positive(w, key, int, source, "workload", None, allow_zero=True)
    if arrival == "trace" and "trace" not in w:
        raise SpaceError(source, "workload.trace", "arrival: trace needs a `trace` file path")
    for key in ("prompt_tokens", "output_tokens"):
        if key in w:
            out[key] = _length_dist(w[key], source, f"workload.{key}")
    return out


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
    if dist not in DISTS:
        raise SpaceError(source, f"{where}.dist", f"must be one of {list(DISTS)}, got {dist!r}")
    allowed = {"dist", "min", "max", *DISTS[dist]}
    _no_unknown(value, allowed, source, where)
    for key in DISTS[dist]:
        if key not in value:
            raise SpaceError(source, f"{where}.{key}", f"required for dist {dist}")
        _get(value, key, float, source, where, None)
    if dist == "uniform" and value["low"] > value["high"]:
        raise SpaceError(source, f"{where}.low", "must be <= high")
    return value


def _params(params: dict[str, Any], source: str, runner: str, knobs: dict[str, Any]) -> dict[str, ParamSpec]:
    out: dict[str, ParamSpec] = {}
    for name, spec in params.items():
        where = f"params.{name}"
        if name not in knobs:
            raise SpaceError(source, where, f"unknown knob for runner {runner} (known: {', '.join(knobs)})")
        if not isinstance(spec, dict):
            raise SpaceError(source, where, "must be a mapping like {type: int, low: 1, high: 8}")
        _no_unknown(spec, PARAM_KEYS, source, where)
        ptype = spec.get("type")
        if ptype not in ("int", "float", "categorical"):
            raise SpaceError(source, f"{where}.type", f"must be int, float or categorical, got {ptype!r}")
        out[name] = (_categorical if ptype == "categorical" else _numeric)(spec, source, where, knobs[name], name)
    return out


def _categorical(spec: dict[str, Any], source: str, where: str, knob: Any, name: str) -> ParamSpec:
    _no_unknown(spec, {"type", "choices"}, source, where)
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
    low = _get(spec, "low", kind, source, where, None)
    high = _get(spec, "high", kind, source, where, None)
    step = _get(spec, "step", kind, source, where, None)
    log = _get(spec, "log", bool, source, where, False)
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
        _no_unknown(item, {"metric", "direction"}, source, where)
        metric = _metric(item.get("metric"), source, f"{where}.metric")
        direction = item.get("direction", METRICS[metric][1])
        if direction not in ("maximize", "minimize"):
            raise SpaceError(source, f"{where}.direction", f"must be maximize or minimize, got {direction!r}")
        if metric in (o.metric for o in out):
            raise SpaceError(source, f"{where}.metric", f"{metric} is listed twice")
        out.append(Objective(metric, direction))
    return out


def _metric(name: Any, source: str, where: str) -> str:
    if name not in METRICS:
        raise SpaceError(source, where, f"unknown metric {name!r} (see DESIGN.md metric names)")
    return name


def _constraints(raw: list[Any], source: str) -> list[Constraint]:
    out = []
    for i, item in enumerate(raw):
        where = f"constraints[{i}]"
        if not isinstance(item, dict):
            raise SpaceError(source, where, "must be a mapping {metric, max|min}")
        _no_unknown(item, {"metric", "max", "min"}, source, where)
        metric = _metric(item.get("metric"), source, f"{where}.metric")
        bound_max = _get(item, "max", float, source, where, None)
        bound_min = _get(item, "min", float, source, where, None)
        if bound_max is None and bound_min is None:
            raise SpaceError(source, where, "needs a `max` or `min` bound")
        if bound_max is not None and bound_min is not None and bound_min > bound_max:
            raise SpaceError(source, f"{where}.min", "must be <= max")
        out.append(Constraint(metric, bound_max, bound_min))
    return out


def _search(raw: dict[str, Any], source: str) -> SearchSpec:
    _no_unknown(raw, SEARCH_KEYS, source, "search")
    spec = SearchSpec()
    spec.sampler = _get(raw, "sampler", str, source, "search", spec.sampler)
    spec.trials = _get(raw, "trials", int, source, "search", spec.trials)
    spec.timeout_min = _get(raw, "timeout_min", float, source, "search", None)
    spec.seed = _get(raw, "seed", int, source, "search", spec.seed)
    spec.trial_timeout_s = _get(raw, "trial_timeout_s", float, source, "search", spec.trial_timeout_s)
    spec.baseline = _get(raw, "baseline", bool, source, "search", spec.baseline)
    spec.n_startup_trials = _get(raw, "n_startup_trials", int, source, "search", None)
    spec.warm_start = _warm_start(_get(raw, "warm_start", dict, source, "search", None), source)
    spec.stop = _plateau_stop(_get(raw, "stop", dict, source, "search", None), source)
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


def _warm_start(raw: dict[str, Any] | None, source: str) -> WarmStart | None:
    if raw is None:
        return None
    _no_unknown(raw, {"study", "storage"}, source, "search.warm_start")
    study = _get(raw, "study", str, source, "search.warm_start", None)
    if not study:
        raise SpaceError(source, "search.warm_start.study", "required: the name of the earlier study")
    return WarmStart(study, _get(raw, "storage", str, source, "search.warm_start", None))


def _plateau_stop(raw: dict[str, Any] | None, source: str) -> PlateauStop | None:
    if raw is None:
        return None
    _no_unknown(raw, {"patience", "min_improvement"}, source, "search.stop")
    patience = _get(raw, "patience", int, source, "search.stop", None)
    if patience is None or patience < 1:
        raise SpaceError(source, "search.stop.patience", f"required, a whole number of trials >= 1, got {patience!r}")
    gain = _get(raw, "min_improvement", float, source, "search.stop", 0.0)
    if not math.isfinite(gain) or gain < 0:
        raise SpaceError(source, "search.stop.min_improvement", f"must be a finite fraction >= 0, got {gain!r}")
    return PlateauStop(patience, float(gain))


def _replay_model(model: dict[str, Any], source: str) -> dict[str, Any]:
    """`model: {table: FILE}`; a relative FILE is found beside the space file, else from here."""
    from runners.replay import TableError, load_table

    _no_unknown(model, REPLAY_MODEL_KEYS, source, "model")
    table = _get(model, "table", str, source, "model", None)
    if not table:
        raise SpaceError(source, "model.table", "runner replay needs the recorded table: model: {table: FILE.csv}")
    path = Path(table)
    beside = Path(source).parent / path
    if not path.is_absolute() and not path.exists() and beside.exists():
        path = beside
    try:
        load_table(path)
    except TableError as exc:
        raise SpaceError(source, "model.table", str(exc)) from None
    return {"table": str(path.resolve())}


def _slo(raw: dict[str, Any], source: str) -> dict[str, float]:
    _no_unknown(raw, SLO_METRICS, source, "slo")
    return {k: float(_positive(raw, k, float, source, "slo", None)) for k in raw}


# ---------------------------------------------------------------- Optuna distributions


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
