"""The regress baseline file: its schema, read and validated (with the space files'
validators), written back, accepted (`--update-baseline`) and made from a study (`--init`).

Every problem is a SpaceError naming the file and the key (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import tuner.regress.rule as rr
from runners.contract import METRICS, TrialConfig
from runners.knobs import RUNNER_KNOBS
from tuner import record
from tuner.errors import UsageError
from tuner.space import SpaceError, read_yaml
from tuner.space import no_unknown_keys as space_no_unknown  # the space files' validators, shared (one validator)
from tuner.space import typed_key as space_get

DEFAULT_TOLERANCE = 0.05
TAIL_TOLERANCE = 0.10  # p90/p99 latencies move more night to night than medians and rates
TOP_KEYS = {"version", "description", "repeats", "trial_timeout_s", "rule", "metrics", "configs"}
METRIC_KEYS = {"direction", "tolerance", "max", "min"}
CONFIG_KEYS = {"name", "control", "config", "space", "params", "reference", "accepted_at", "source"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrialConfig)}
# Per-measurement fields the regress run sets itself; a stored trial's values are dropped.
MEASUREMENT_FIELDS = ("artifact_dir", "trial_number")


# ---------------------------------------------------------------- reading and validating


@dataclass
class Entry:
    """One config of the baseline with its reference numbers."""

    name: str
    config: TrialConfig
    control: bool = False
    reference: dict[str, float] = field(default_factory=dict)
    ref_repeats: dict[str, list[float]] = field(default_factory=dict)
    accepted_at: str = ""

@dataclass
class Baseline:
    path: Path
    entries: list[Entry]
    watches: list[rr.Watch]
    rule: rr.Rule
    repeats: int
    trial_timeout_s: float
    raw: dict[str, Any]

def default_tolerance(metric: str) -> float:
    return TAIL_TOLERANCE if ("_p99_" in metric or "_p90_" in metric) else DEFAULT_TOLERANCE

def load_baseline(path: Path) -> Baseline:
    """Read and validate; every problem is a SpaceError naming the file and the key."""
    src = str(path)
    data = _read(path)
    _no_unknown(data, TOP_KEYS, src, "")
    rule = _rule(_typed(data, "rule", dict, src, "", {}), src)
    repeats = _number(data, "repeats", int, src, "", 3, low=1)
    timeout = float(_number(data, "trial_timeout_s", (int, float), src, "", 900.0, low=1))
    watches = _watches(_typed(data, "metrics", dict, src, "", None), src)
    configs = _typed(data, "configs", list, src, "", None)
    if not configs:
        raise SpaceError(src, "configs", "must be a non-empty list of configs to re-measure")
    entries = [_entry(c, i, src, path.parent) for i, c in enumerate(configs)]
    names = [e.name for e in entries]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise SpaceError(src, f"configs[{i}].name", f"duplicate name {name!r}")
    if sum(e.control for e in entries) > 1:
        raise SpaceError(src, "configs", "at most one config may be the control")
    return Baseline(path, entries, watches, rule, repeats, timeout, data)

def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SpaceError(str(path), "", f"cannot read file ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise SpaceError(str(path), "", f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise SpaceError(str(path), "", "top level must be a mapping of keys")
        return data
    return read_yaml(path)  # safe YAML, duplicate keys refused

def _iso(moment: datetime) -> str:
    """UTC ISO seconds; a naive datetime (Optuna stores local time) is taken as local."""
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _no_unknown(data: dict[str, Any], allowed: set[str], src: str, prefix: str) -> None:
    space_no_unknown(data, allowed, src, prefix.rstrip("."))


def _typed(data: dict[str, Any], key: str, kind: Any, src: str, prefix: str, default: Any) -> Any:
    """The space files' typed read (`prefix` ends in "." or is empty); None as default: required."""
    if default is None and data.get(key) is None:
        raise SpaceError(src, f"{prefix}{key}", "is required")
    return space_get(data, key, kind, src, prefix.rstrip("."), default)


def _number(data: dict[str, Any], key: str, kind: Any, src: str, prefix: str, default: Any,
            low: float | None = None) -> Any:
    value = _typed(data, key, kind, src, prefix, default)
    if value is not None and (not math.isfinite(float(value)) or (low is not None and value < low)):
        raise SpaceError(src, f"{prefix}{key}", f"must be a finite number >= {low:g}, got {value!r}")
    return value


def _rule(raw: dict[str, Any], src: str) -> rr.Rule:
    defaults = rr.Rule()
    _no_unknown(raw, {f.name for f in dataclasses.fields(rr.Rule)}, src, "rule.")
    values = {}
    for f in dataclasses.fields(rr.Rule):
        kind = int if isinstance(getattr(defaults, f.name), int) else (int, float)
        values[f.name] = _number(raw, f.name, kind, src, "rule.", getattr(defaults, f.name), low=0)
    if not 0 < values["alpha"] < 1:
        raise SpaceError(src, "rule.alpha", f"must be between 0 and 1, got {values['alpha']!r}")
    if values["consecutive"] < 1:
        raise SpaceError(src, "rule.consecutive", "must be >= 1")
    return rr.Rule(**values)

def _watches(raw: dict[str, Any], src: str) -> list[rr.Watch]:
    if not raw:
        raise SpaceError(src, "metrics", "name at least one metric to watch")
    watches = []
    for name, spec in raw.items():
        where = f"metrics.{name}"
        if name not in METRICS:
            raise SpaceError(src, where, f"unknown metric (known: {', '.join(sorted(METRICS))})")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise SpaceError(src, where, f"must be a mapping (direction, tolerance, max, min), got {spec!r}")
        _no_unknown(spec, METRIC_KEYS, src, where + ".")
        direction = _typed(spec, "direction", str, src, where + ".", METRICS[name][1])
        if direction not in ("maximize", "minimize"):
            raise SpaceError(src, f"{where}.direction", f"must be maximize or minimize, got {direction!r}")
        tolerance = float(_number(spec, "tolerance", (int, float), src, where + ".", default_tolerance(name), low=0))
        bounds = {k: float(_number(spec, k, (int, float), src, where + ".", None)) for k in ("max", "min") if k in spec}
        watches.append(rr.Watch(name, direction, tolerance, **bounds))
    return watches

def _entry(raw: Any, i: int, src: str, base_dir: Path) -> Entry:
    where = f"configs[{i}]"
    if not isinstance(raw, dict):
        raise SpaceError(src, where, f"must be a mapping, got {raw!r}")
    _no_unknown(raw, CONFIG_KEYS, src, where + ".")
    name = _typed(raw, "name", str, src, where + ".", None)
    if not name.strip() or any(c in name for c in "/\\") or name == rr.MEASURED:
        raise SpaceError(src, f"{where}.name", f"must be a plain non-empty name, got {name!r}")
    if ("config" in raw) == ("space" in raw):
        raise SpaceError(src, where, "give either `config` (a full resolved config) or `space` + `params`")
    config = (_full_config(raw["config"], src, f"{where}.config") if "config" in raw
              else _space_config(raw, src, where, base_dir))
    reference, ref_repeats = _reference(_typed(raw, "reference", dict, src, where + ".", {}), src, where)
    accepted = raw.get("accepted_at")
    if isinstance(accepted, datetime):  # YAML reads an unquoted timestamp as a datetime
        accepted = _iso(accepted)
    accepted = _typed({"accepted_at": accepted}, "accepted_at", str, src, where + ".", "")
    return Entry(name, config, bool(_typed(raw, "control", bool, src, where + ".", False)), reference,
                 ref_repeats, accepted)

def _full_config(raw: Any, src: str, where: str) -> TrialConfig:
    if not isinstance(raw, dict):
        raise SpaceError(src, where, f"must be a mapping (a trial's resolved config), got {raw!r}")
    _no_unknown(raw, CONFIG_FIELDS, src, where + ".")
    for key in ("runner", "model", "device", "workload", "knobs"):
        if key not in raw:
            raise SpaceError(src, f"{where}.{key}", "is required in a full config")
    runner = raw["runner"]
    if runner not in RUNNER_KNOBS:
        raise SpaceError(src, f"{where}.runner", f"must be one of {sorted(RUNNER_KNOBS)}, got {runner!r}")
    _check_knobs(_typed(raw, "knobs", dict, src, where + ".", None), runner, src, f"{where}.knobs")
    for key in ("model", "workload"):
        _typed(raw, key, dict, src, where + ".", None)
    return TrialConfig.from_dict({k: v for k, v in raw.items() if k not in MEASUREMENT_FIELDS})

def _check_knobs(knobs: dict[str, Any], runner: str, src: str, where: str) -> None:
    table = RUNNER_KNOBS[runner]
    for key, value in knobs.items():
        if key not in table:
            raise SpaceError(src, f"{where}.{key}", f"unknown knob for {runner} (known: {', '.join(table)})")
        problem = table[key].check(value)
        if problem:
            raise SpaceError(src, f"{where}.{key}", problem)

def _space_config(raw: dict[str, Any], src: str, where: str, base_dir: Path) -> TrialConfig:
    from tuner.space import load_space
    from tuner.tell import trial_config

    name = _typed(raw, "space", str, src, where + ".", None)
    # A relative space path is relative to the baseline file, so the pair can move together.
    candidate = base_dir / name
    space = load_space(str(candidate) if candidate.exists() else name)
    params = _typed(raw, "params", dict, src, where + ".", {})
    _check_knobs(params, space.runner, src, f"{where}.params")
    config = trial_config(space, params, -1, Path("."))
    return dataclasses.replace(config, artifact_dir="")

def _reference(raw: dict[str, Any], src: str, where: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    values: dict[str, float] = {}
    repeats: dict[str, list[float]] = {}
    for metric, spec in raw.items():
        key = f"{where}.reference.{metric}"
        if metric not in METRICS:
            raise SpaceError(src, key, "unknown metric")
        if isinstance(spec, dict):
            _no_unknown(spec, {"value", "repeats"}, src, key + ".")
            values[metric] = float(_number(spec, "value", (int, float), src, key + ".", None))
            reps = _typed(spec, "repeats", list, src, key + ".", [])
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in reps):
                raise SpaceError(src, f"{key}.repeats", f"must be a list of numbers, got {reps!r}")
            repeats[metric] = [float(x) for x in reps]
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool) and math.isfinite(spec):
            values[metric] = float(spec)
        else:
            raise SpaceError(src, key, f"must be a number or {{value, repeats}}, got {spec!r}")
    return values, repeats


# ---------------------------------------------------------------- accepting (--update-baseline)


def updated_baseline(baseline: Baseline, checks: pd.DataFrame, measured: pd.DataFrame,
                     night: str) -> tuple[dict[str, Any], list[str]]:
    """The baseline file's data with tonight's medians and repeats as references.

    A config that did not measure on every repeat keeps its old reference (returned by name).
    """
    data = json.loads(json.dumps(baseline.raw))  # a deep, plain copy
    kept = []
    for raw, entry in zip(data["configs"], baseline.entries, strict=True):
        runs = checks[(checks["config"] == entry.name) & (checks["metric"] == rr.MEASURED)].iloc[0]
        if runs["verdict"] == "regression":
            kept.append(entry.name)
            continue
        ok = measured[(measured["config"] == entry.name) & (measured["state"] == "ok")]
        reference = dict(raw.get("reference") or {})
        for watch in baseline.watches:
            values = ok.loc[ok["metric"] == watch.metric, "value"].dropna().astype(float).tolist()
            if values:
                reference[watch.metric] = {"value": float(pd.Series(values).median()),
                                           "repeats": [round(v, 6) for v in values]}
        raw["reference"] = reference
        raw["accepted_at"] = night
    return data, kept

def write_baseline(data: dict[str, Any], path: Path) -> None:
    text = (json.dumps(data, indent=2) + "\n" if path.suffix == ".json"
            else yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- --init from a study


def init_baseline(study_name: str, storage_url: str | None, top: int) -> dict[str, Any]:
    """A baseline from the study's feasible Pareto set (top K by the first objective) plus its
    baseline trial as the control, with each trial's stored config and metrics."""
    from tuner import load_study
    from tuner.storage import DEFAULT_STORAGE

    study = load_study(storage_url or DEFAULT_STORAGE, study_name)
    names = study.metric_names or []
    directions = [d.name.lower() for d in study.directions]
    if not names:
        raise UsageError(f"study {study_name!r} has no metric names (not created by autoglm-tune)")
    try:
        pareto = [t for t in study.best_trials if record.usable(t)]
    except ValueError:
        pareto = []
    sign = -1.0 if directions[0] == "maximize" else 1.0
    chosen = sorted(pareto, key=lambda t: sign * record.metrics(t)[names[0]])[:top]
    control = next((t for t in study.get_trials(deepcopy=False) if record.is_baseline(t) and record.rerunnable(t)),
                   None)
    if not chosen:
        raise UsageError(f"study {study_name!r} has no feasible trial: a baseline from it would break its own "
                         f"bounds every night (run the study until one is feasible)")
    metrics: dict[str, Any] = {n: {"direction": d, "tolerance": default_tolerance(n)}
                               for n, d in zip(names, directions, strict=True)}
    for c in record.constraints(study):
        metrics.setdefault(c["metric"], {}).update({k: c[k] for k in ("max", "min") if k in c})
    watched = list(metrics)
    configs = []
    if control is not None:
        configs.append(_init_entry("baseline", control, study_name, watched, control=True))
    configs += [_init_entry(f"trial_{t.number}", t, study_name, watched) for t in chosen if t is not control]
    return {"version": 1, "description": f"re-measured nightly: study {study_name} feasible Pareto set "
            f"(top {top} by {names[0]}) and its baseline trial", "repeats": 3,
            "rule": dataclasses.asdict(rr.Rule()), "metrics": metrics, "configs": configs}

def broken_references(data: dict[str, Any]) -> list[str]:
    """Each config reference that already breaks a watched bound (it would fail every night)."""
    broken = []
    for entry in data["configs"]:
        for metric, spec in data["metrics"].items():
            value = entry["reference"].get(metric)
            if value is None:
                continue
            if spec.get("max") is not None and value > spec["max"]:
                broken.append(f"{entry['name']}: {metric} = {value:.4g} > {spec['max']:g}")
            if spec.get("min") is not None and value < spec["min"]:
                broken.append(f"{entry['name']}: {metric} = {value:.4g} < {spec['min']:g}")
    return broken

def _init_entry(name: str, trial: Any, study: str, watched: list[str], control: bool = False) -> dict[str, Any]:
    config = {k: v for k, v in record.CONFIG.get(trial).items() if k not in MEASUREMENT_FIELDS}
    metrics = record.metrics(trial)
    done = _iso(trial.datetime_complete) if trial.datetime_complete else ""
    entry: dict[str, Any] = {"name": name}
    if control:
        entry["control"] = True
    entry.update({"source": {"study": study, "trial": trial.number, "params": trial.params,
                             "device": (record.ENVIRONMENT.get(trial) or {}).get("device_name")},
                  "config": config, "reference": {m: float(metrics[m]) for m in watched if m in metrics},
                  "accepted_at": done})
    return entry
