"""Search-space files: safe YAML in, validated dataclasses and Optuna distributions out.

Every problem is a `SpaceError` naming the file and the offending key; the CLI turns it into
one line and exit code 2 before anything (study, output folder) is created.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import yaml

from runners.contract import DEFAULT_MAX_DURATION_S, METRICS
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
    "eval_tokens", "train_steps", "warmup_steps", "data_path", "eval_text", "calibration_text", "ci_metric", "early_stop",
    "mode", "capacity_min_rps", "capacity_max_rps", "capacity_tolerance", "capacity_probes",
    "capacity_probe_s",
}
CI_METRICS = ("ttft", "tpot", "latency")
WORKLOAD_MODES = ("window", "capacity")
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices"}
SEARCH_KEYS = {"sampler", "trials", "timeout_min", "seed", "trial_timeout_s", "baseline",
               "n_startup_trials", "drift_every", "warm_start", "stop"}
SLO_METRICS = {"ttft_ms", "tpot_ms", "latency_ms"}
# A study name is also a folder name (runs/<study>/) and a storage key.
STUDY_NAME_MAX = 100
_STUDY_NAME = re.compile(r"[A-Za-z0-9._-]+")

# Bounds on what a space file can mean. Anything beyond them is a typo or an attack, refused
# (exit 2) before anything is created. Extend a table to bound a new key.
MAX_FILE_BYTES = 1 << 20  # a space file is a few hundred bytes; this also bounds parse time
MAX_VALUES = 10_000  # values once YAML aliases are expanded (an alias bomb grows without bound)
MAX_DEPTH = 10  # nesting of mappings and lists
MAX_STRING = 4096
ABSURD = 1e12  # no number in a space file (ms, MiB, tokens, rates) is meant beyond this
SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)
# Highest allowed value of integer/number workload keys (the lowest is in `_workload`).
WORKLOAD_MAX: dict[str, float] = {
    "requests": 100_000, "max_requests": 100_000, "warmup_requests": 100_000, "concurrency": 10_000,
    "eval_sequences": 10_000, "train_steps": 1_000_000, "warmup_steps": 1_000_000,
    "shared_prefix_groups": 100_000, "seed": SEED_MAX, "rate_rps": 1e6, "burstiness": 100.0,
    "max_duration_s": 7 * 86400.0, "target_p99_ci_ratio": 10.0,
}
SEARCH_MAX: dict[str, float] = {"trials": 100_000, "timeout_min": 525_600.0, "seed": SEED_MAX,
                                "trial_timeout_s": 7 * 86400.0, "n_startup_trials": 100_000}
# Allowed values of numeric knobs, [low, high] (high exclusive where the flag says so).
KNOB_RANGES: dict[str, tuple[float, float, bool]] = {
    "batch_size": (1, 65_536, False), "batch_timeout_ms": (0, 600_000, False), "sparsity": (0, 1, True),
    "prefix_cache_mib": (0, 1e9, False), "memory_limit_mib": (0, 1e9, False),
    "micro_batch_size": (1, 65_536, False), "grad_accum_steps": (1, 65_536, False), "seq_len": (1, 1 << 20, False),
}
# Keys whose value may be null: every section (read as empty), knob values (the knob decides:
# `dtype: null` is "the model's own"), and the optional search limits.
_NULL_OK = {("search", "timeout_min"), ("search", "n_startup_trials"), ("workload", "max_requests")}


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
        try:
            hash(key)
        except TypeError:  # `[a, b]: 1`; other non-string keys are refused by `check_plain`, by key
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be strings, got {type(key).__name__} {_short(key)}",
                key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    text = _read_text(path, source)
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
    except (RecursionError, MemoryError):
        raise SpaceError(source, "", f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise SpaceError(source, "", "top level must be a mapping of keys")
    return data


def _read_text(path: Path, source: str) -> str:
    """The file's text; only a regular file of at most MAX_FILE_BYTES (a FIFO or /dev/zero
    would block or never end). Opened non-blocking, and checked again once open."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SpaceError(source, "", "not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise SpaceError(source, "", f"cannot read file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SpaceError(source, "", "not a regular file")
        try:
            data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise SpaceError(source, "", f"cannot read file ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpaceError(source, "", f"larger than {MAX_FILE_BYTES // 1024} KiB; a space file is a few lines")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(source, "", "not a UTF-8 text file") from None


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


def check_plain(data: Any, source: str) -> None:
    """Every value a plain, bounded one: string keys, no NaN/inf or absurd numbers, no dates or
    binary, no nulls where a value is needed, bounded nesting and size (aliases expanded).

    Runs first, so the checks after it meet only the kinds of values JSON can hold.
    """
    budget = [MAX_VALUES]
    _walk(data, (), 0, source, budget)


def _walk(value: Any, path: tuple[str, ...], depth: int, source: str, budget: list[int]) -> None:
    where = _where(path)
    budget[0] -= 1
    if budget[0] < 0:
        raise SpaceError(source, where, f"more than {MAX_VALUES} values (YAML aliases expanded): not a space file")
    if depth > MAX_DEPTH:
        raise SpaceError(source, where, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpaceError(source, where, f"keys must be strings, got {type(key).__name__} {_short(key)}")
            _walk(item, (*path, key), depth + 1, source, budget)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",), depth + 1, source, budget)
    elif value is None:
        if not _null_ok(path):
            raise SpaceError(source, where, "must not be null (leave the key out for its default)")
    elif isinstance(value, bool):
        return
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise SpaceError(source, where, f"must be a finite number, got {value}")
        if abs(value) > ABSURD:
            raise SpaceError(source, where, f"{value:g} is beyond any meaningful value (|x| <= {ABSURD:g})")
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise SpaceError(source, where, f"a string longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise SpaceError(source, where, "contains a NUL character")
    else:
        kind = "a date" if isinstance(value, (datetime.date, datetime.datetime)) else type(value).__name__
        raise SpaceError(source, where, f"must be a number, string, list or mapping, got {kind}")


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _null_ok(path: tuple[str, ...]) -> bool:
    head = path[0].split("[")[0] if path else ""
    return (len(path) <= 1 or head == "fixed" or (head == "params" and "choices[" in path[-1])
            or tuple(path) in _NULL_OK)


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
    _no_unknown(data, TOP_KEYS, source, "")
    runner = _get(data, "runner", str, source, "", "glm-infer")
    if runner not in RUNNER_KNOBS:
        raise SpaceError(source, "runner", f"must be one of {sorted(RUNNER_KNOBS)}, got {runner!r}")
    study = _get(data, "study", str, source, "", default_study)
    problem = study_name_problem(study)
    if problem:
        hint = "" if "study" in data else " (the file's stem; set `study:` or pass --study)"
        raise SpaceError(source, "study", problem + hint)
    device = _get(data, "device", str, source, "", "auto")
    _check_device(device, source)
    if runner == "replay":
        model = _replay_model(_get(data, "model", dict, source, "", {}), source)
    else:
        model = _model(_get(data, "model", dict, source, "", {"preset": "glm-tiny"}), source)
    knobs = runner_knobs(runner, model)
    workload = _workload(_get(data, "workload", dict, source, "", {}) or {}, source, runner,
                         model_positions(model))
    _text_files(workload, model, source)
    params = _params(_get(data, "params", dict, source, "", {}) or {}, source, runner, knobs)
    fixed = _fixed(_get(data, "fixed", dict, source, "", {}) or {}, source, runner, params, knobs)
    objectives = _objectives(data.get("objectives"), source)
    constraints = _constraints(_get(data, "constraints", list, source, "", []) or [], source)
    search = _search(_get(data, "search", dict, source, "", {}) or {}, source)
    _check_window(workload, search, source)
    slo = _slo(_get(data, "slo", dict, source, "", {}) or {}, source)
    if workload.get("mode") == "capacity" and not {"ttft_ms", "tpot_ms"} & set(slo):
        raise SpaceError(source, "slo", "workload mode: capacity needs ttft_ms and/or tpot_ms (the p99 bounds)")
    if search.sampler == "grid":
        for name, p in params.items():
            if p.type == "float" and p.step is None:
                raise SpaceError(source, f"params.{name}", "the grid sampler needs a `step` on floats")
    description = _get(data, "description", str, source, "", "")
    return Space(source, study, runner, model, device, workload, params, fixed, objectives,
                 constraints, search, slo, description, raw=data)


def study_name_problem(name: str) -> str | None:
    """Why `name` cannot name a study (it becomes a folder name), or None."""
    if not name:
        return "must not be empty"
    if len(name) > STUDY_NAME_MAX:
        return f"longer than {STUDY_NAME_MAX} characters"
    if not _STUDY_NAME.fullmatch(name) or name in (".", ".."):
        return f"{name!r} is not a name: use letters, digits and . _ - only (not . or ..)"
    return None


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
        raise SpaceError(source, "model.preset", "give either `model.preset` or `model.path`, not both")
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
    for key, low, high in (("seed", 0, SEED_MAX), ("num_layers", 1, 1000)):
        value = _get(model, key, int, source, "model", None)
        if value is not None and not low <= value <= high:
            raise SpaceError(source, f"model.{key}", f"must be in [{low}, {high}], got {value}")
    return out


def model_positions(model: dict[str, Any]) -> int | None:
    """The model's maximum positions (prompt + output), from its preset or its config.json."""
    from runners.presets import PRESETS  # torch-free table of preset shapes

    if "table" in model:  # runner replay: no model, no positions
        return None
    if "path" not in model:
        return int(PRESETS[model.get("preset", "glm-tiny")]["max_position_embeddings"])
    config = Path(model["path"]) / "config.json"
    try:
        if config.is_file() and config.stat().st_size <= MAX_FILE_BYTES:
            value = json.loads(config.read_text()).get("max_position_embeddings")
            return int(value) if isinstance(value, int) and value > 0 else None
    except (OSError, ValueError, AttributeError):
        pass
    return None  # a hub name or an unreadable folder: the runner will say


def _positive(data: dict[str, Any], key: str, kind: type, source: str, prefix: str,
              default: Any, allow_zero: bool = False) -> Any:
    value = _get(data, key, kind, source, prefix, default)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise SpaceError(source, f"{prefix}.{key}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _workload(w: dict[str, Any], source: str, runner: str, positions: int | None = None) -> dict[str, Any]:
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
    _serving_keys(w, source)
    for key, top in WORKLOAD_MAX.items():
        value = w.get(key)
        if isinstance(value, (int, float)) and value > top:
            raise SpaceError(source, f"workload.{key}", f"must be <= {top:g}, got {value:g}")
    if arrival == "trace" and "trace" not in w:
        raise SpaceError(source, "workload.trace", "arrival: trace needs a `trace` file path")
    for key in ("trace", "data_path"):
        if key in w:
            _regular_file(_get(w, key, str, source, "workload", ""), source, f"workload.{key}")
    longest = {}
    for key in ("prompt_tokens", "output_tokens"):
        if key in w:
            out[key] = _length_dist(w[key], source, f"workload.{key}")
            longest[key] = _longest_length(out[key], source, f"workload.{key}")
    if positions is not None:
        _check_positions(w, longest, positions, source)
    return out


def _text_files(workload: dict[str, Any], model: dict[str, Any], source: str) -> None:
    """`eval_text` / `calibration_text`: a non-empty text file, tokenized with the checkpoint's
    tokenizer (so `model.path` must have one); stored as an absolute path."""
    for key in ("eval_text", "calibration_text"):
        file = _get(workload, key, str, source, "workload", None)
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


def _serving_keys(w: dict[str, Any], source: str) -> None:
    """The window's CI metric, early stop, and capacity mode (a rate search: Poisson only)."""
    metric = _get(w, "ci_metric", str, source, "workload", "latency")
    if metric not in CI_METRICS:
        raise SpaceError(source, "workload.ci_metric", f"must be one of {list(CI_METRICS)}, got {metric!r}")
    _get(w, "early_stop", bool, source, "workload", True)
    mode = _get(w, "mode", str, source, "workload", "window")
    if mode not in WORKLOAD_MODES:
        raise SpaceError(source, "workload.mode", f"must be one of {list(WORKLOAD_MODES)}, got {mode!r}")
    for key in ("capacity_min_rps", "capacity_max_rps", "capacity_tolerance", "capacity_probe_s"):
        _positive(w, key, float, source, "workload", None)
    _positive(w, "capacity_probes", int, source, "workload", None)
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


def _check_positions(w: dict[str, Any], longest: dict[str, int], positions: int, source: str) -> None:
    """Prompt + output, and the evaluation sequences, must fit the model's positions."""
    prompt, output = longest.get("prompt_tokens", 32), longest.get("output_tokens", 16)
    if prompt + output > positions:
        # Name the length that takes more of the positions (a prompt alone may already exceed them).
        key = "prompt_tokens" if prompt >= output or "output_tokens" not in longest else "output_tokens"
        raise SpaceError(source, f"workload.{key}", f"the longest prompt ({prompt}) + output ({output}) tokens "
                                                    f"exceed the model's {positions} positions")
    for key in ("eval_tokens", "shared_prefix_tokens"):
        value = w.get(key)
        if isinstance(value, int) and value > positions:
            raise SpaceError(source, f"workload.{key}", f"{value} exceeds the model's {positions} positions")


def _check_window(w: dict[str, Any], search: SearchSpec, source: str) -> None:
    """An open-loop window must be able to finish: its arrivals span requests / rate seconds."""
    if w.get("arrival", "poisson") not in ("poisson", "constant", "gamma") or "rate_rps" not in w \
            or w.get("mode") == "capacity":  # capacity mode searches the rate itself
        return
    # Warm-up requests run back to back before the window; the measured ones arrive at the rate,
    # and the window's hard length (max_duration_s, 120 s by default) bounds them.
    count = int(w.get("requests", 64))
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
    _no_unknown(value, allowed, source, where)
    for key in DISTS[dist]:
        if key not in value:
            raise SpaceError(source, f"{where}.{key}", f"required for dist {dist}")
    for key in (*DISTS[dist], "min", "max"):
        number = _get(value, key, float, source, where, None)
        floor = 0 if key in ("sigma", "std") else 1  # a length of zero or less means nothing
        if number is not None and number < floor:
            raise SpaceError(source, f"{where}.{key}", f"must be >= {floor}, got {number}")
    if dist == "uniform" and value["low"] > value["high"]:
        raise SpaceError(source, f"{where}.low", "must be <= high")
    if "min" in value and "max" in value and value["min"] > value["max"]:
        raise SpaceError(source, f"{where}.min", "must be <= max")
    return value


def _longest_length(spec: Any, source: str, where: str) -> int:
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
        problem = knob.check(choice) or _range_problem(name, choice)
        if problem:
            raise SpaceError(source, f"{where}.choices", problem)
    return ParamSpec(name, "categorical", choices=tuple(choices))


def _range_problem(name: str, value: Any) -> str | None:
    """Why a numeric knob value is outside KNOB_RANGES, or None."""
    if name not in KNOB_RANGES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    low, high, open_high = KNOB_RANGES[name]
    if value < low or value > high or (open_high and value == high):
        return f"{value!r} is outside [{low:g}, {high:g}{')' if open_high else ']'}"
    return None


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
    for key, value in (("low", low), ("high", high)):
        problem = _range_problem(name, value)
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
        problem = knobs[name].check(value) or _range_problem(name, value)
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
    if not isinstance(name, str) or name not in METRICS:
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
    spec.drift_every = _get(raw, "drift_every", int, source, "search", None)
    if spec.drift_every is not None and spec.drift_every < 1:
        raise SpaceError(source, "search.drift_every", f"must be >= 1, got {spec.drift_every}")
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
    out = {k: float(_positive(raw, k, float, source, "slo", None)) for k in raw}
    for key, value in out.items():
        if value > 86_400_000:
            raise SpaceError(source, f"slo.{key}", f"{value:g} ms is more than a day")
    return out


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
