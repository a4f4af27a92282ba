"""`autoglm-tune regress`: re-measure a committed baseline's configs and fail on a real regression.

    autoglm-tune regress --init --study NAME [--storage URL] [--top K] --out baseline.yaml
    autoglm-tune regress --baseline baseline.yaml [--repeats R] [--device D] [--out DIR]
                         [--history FILE] [--update-baseline] [--from DIR] [--warm]

Each config runs R times through the tuner's own launcher and runner (no second measurement
path), round-robin so that machine drift hits every config alike; the rule that turns repeats
into verdicts is in reports/regression.py and docs/regress.md. Exit 0: no regression; 1: a
regression (or a config that no longer runs); 2: usage error, naming the file and key (also
`--init` on a study with no feasible trial); 3: host drift: the control moved beyond its
tolerance, so the other configs' flags say nothing about the code and are not judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from runners.contract import METRICS, TrialConfig
from runners.knobs import RUNNER_KNOBS
from tuner import regress_rule as rr
from tuner.errors import UsageError
from tuner.space import SpaceError, read_yaml

DEFAULT_OUT = Path("runs/regress")
DEFAULT_TOLERANCE = 0.05
TAIL_TOLERANCE = 0.10  # p90/p99 latencies move more night to night than medians and rates
TOP_KEYS = {"version", "description", "repeats", "trial_timeout_s", "rule", "metrics", "configs"}
METRIC_KEYS = {"direction", "tolerance", "max", "min"}
CONFIG_KEYS = {"name", "control", "config", "space", "params", "reference", "accepted_at", "source"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrialConfig)}
# Per-measurement fields the regress run sets itself; a stored trial's values are dropped.
MEASUREMENT_FIELDS = ("artifact_dir", "trial_number")
EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_HOST_DRIFT = 0, 1, 2, 3


# ---------------------------------------------------------------- the baseline file


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
    for key in data:
        if key not in allowed:
            raise SpaceError(src, f"{prefix}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _typed(data: dict[str, Any], key: str, kind: Any, src: str, prefix: str, default: Any) -> Any:
    if key not in data or data[key] is None:
        if default is None:
            raise SpaceError(src, f"{prefix}{key}", "is required")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kind):
        names = "/".join(k.__name__ for k in kinds)
        raise SpaceError(src, f"{prefix}{key}", f"must be {names}, got {type(value).__name__} {value!r}")
    return value


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
    from tuner.study import trial_config

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


# ---------------------------------------------------------------- measuring


def plan_rounds(entries: list[Entry], repeats: int) -> list[list[Entry]]:
    """Round-robin: every config once per round, the control first in every round, the others
    rotated so no config always runs right after a pause (or right after a heavy neighbour)."""
    control = [e for e in entries if e.control]
    others = [e for e in entries if not e.control]
    rounds = []
    for r in range(repeats):
        shift = r % len(others) if others else 0
        rounds.append(control + others[shift:] + others[:shift])
    return rounds


def measure(baseline: Baseline, repeats: int, device: str | None, out_dir: Path, warm: bool,
            quiet: bool) -> pd.DataFrame:
    """Run every round through the tuner's launcher; one long row per (config, repeat, metric)."""
    from tuner.launcher import ProcessLauncher, WarmLauncher

    launcher = (WarmLauncher(baseline.trial_timeout_s, out_dir / "runner-stderr.log") if warm
                else ProcessLauncher(baseline.trial_timeout_s))
    rows: list[dict[str, Any]] = []
    rounds = plan_rounds(baseline.entries, repeats)
    total, order = sum(len(r) for r in rounds), 0
    try:
        for repeat, entries in enumerate(rounds):
            for entry in entries:
                order += 1
                workdir = (out_dir / "measure" / entry.name / f"repeat_{repeat}").resolve()
                config = dataclasses.replace(entry.config, artifact_dir=str(workdir), trial_number=repeat,
                                             device=device or entry.config.device)
                outcome = launcher.run(config, workdir)
                rows += _rows(entry.name, repeat, order, outcome, baseline.watches)
                if not quiet:
                    print(_progress_line(order, total, entry.name, repeat, outcome, baseline.watches[0].metric),
                          flush=True)
    finally:
        launcher.close()
    return pd.DataFrame(rows, columns=["config", "repeat", "order", "state", "reason", "wall_s", "metric", "value",
                                       "device_name"])


def _rows(name: str, repeat: int, order: int, outcome: Any, watches: list[rr.Watch]) -> list[dict[str, Any]]:
    base = {"config": name, "repeat": repeat, "order": order, "state": outcome.state, "wall_s": outcome.wall_s}
    if outcome.state != "ok":
        return [{**base, "reason": outcome.reason or outcome.state, "metric": "", "value": math.nan}]
    result = outcome.result
    base["device_name"] = (result.environment or {}).get("device_name")
    rows = [{**base, "reason": "", "metric": m, "value": float(v)} for m, v in result.metrics.items()]
    for w in watches:
        if w.metric not in result.metrics:
            rows.append({**base, "reason": result.unavailable.get(w.metric, "not reported"), "metric": w.metric,
                         "value": math.nan})
    return rows


def _progress_line(order: int, total: int, name: str, repeat: int, outcome: Any, metric: str) -> str:
    detail = outcome.reason
    if outcome.state == "ok":
        value = outcome.result.metrics.get(metric)
        detail = f"{metric} {value:.4g}" if value is not None else f"{metric} not measured"
    return f"[{order}/{total}] {name} repeat {repeat + 1}: {outcome.state} {detail} ({outcome.wall_s:.1f} s)"


def load_measurements(folder: Path, baseline: Baseline) -> pd.DataFrame:
    """A previous run's measurements (`--from`), to re-judge or accept without re-measuring."""
    path = folder / "measurements.csv"
    if not path.exists():
        raise UsageError(f"--from {folder}: no measurements.csv there (the --out folder of a regress run)")
    text = {"config": str, "state": str, "reason": str, "metric": str}  # a config named "1" stays a name
    frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values={"value": [""]})
    missing = [e.name for e in baseline.entries if e.name not in set(frame["config"])]
    if missing:
        raise UsageError(f"--from {folder}: no measurements of config(s) {', '.join(missing)}")
    return frame


# ---------------------------------------------------------------- deciding


def evaluate(baseline: Baseline, measured: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per config x watched metric, plus each config's `measured` row (did it run?)."""
    rows = []
    for entry in baseline.entries:
        runs = measured[measured["config"] == entry.name]
        states = runs.groupby("repeat")["state"].first()
        rows.append(_runs_row(entry, runs, states))
        ok = runs[runs["state"] == "ok"]
        for watch in baseline.watches:
            values = ok.loc[ok["metric"] == watch.metric, "value"].dropna().astype(float).tolist()
            rows.append(_metric_row(entry, watch, values, ok, history, baseline.rule, failed=len(ok) == 0))
    return pd.DataFrame(rows)


def _runs_row(entry: Entry, runs: pd.DataFrame, states: pd.Series) -> dict[str, Any]:
    bad = runs[runs["state"] != "ok"]
    n_ok, n = int((states == "ok").sum()), len(states)
    judgement = rr.Judgement("ok", False, now=float(n_ok), ratio=n_ok / n if n else None, evidence="runs")
    if len(bad):
        first = bad.iloc[0]
        judgement.verdict, judgement.flagged = "regression", True
        judgement.reason = (f"{n - n_ok} of {n} repeats did not measure: {first['state']}: {first['reason']}"
                            + (" (it measured fine when the reference was taken)" if entry.reference else ""))
    watch = rr.Watch(rr.MEASURED, "maximize", 0.0)
    return rr.judgement_row(entry.name, watch, float(n), [], judgement)


def _metric_row(entry: Entry, watch: rr.Watch, values: list[float], ok: pd.DataFrame, history: pd.DataFrame,
                rule: rr.Rule, failed: bool) -> dict[str, Any]:
    reference = entry.reference.get(watch.metric)
    if not values:
        why = ok.loc[(ok["metric"] == watch.metric), "reason"]
        reason = "config could not be measured (see its `measured` row)" if failed else (
            f"not measured: {why.iloc[0] if len(why) else 'not reported'}")
        verdict = "regression" if (reference is not None or failed) else "new"
        judgement = rr.Judgement(verdict, verdict == "regression", reason=reason)
    else:
        hist = rr.accepted_values(history, entry.name, watch.metric, rule, since=entry.accepted_at)
        judgement = rr.judge(values, reference, entry.ref_repeats.get(watch.metric, []), hist, watch, rule)
    judgement = rr.apply_consecutive(judgement, rr.previous_flags(history, entry.name, watch.metric,
                                                                    entry.accepted_at), rule)
    return rr.judgement_row(entry.name, watch, reference, values, judgement)


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
        pareto = [t for t in study.best_trials if _usable(t)]
    except ValueError:
        pareto = []
    sign = -1.0 if directions[0] == "maximize" else 1.0
    chosen = sorted(pareto, key=lambda t: sign * t.user_attrs["metrics"][names[0]])[:top]
    control = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline") and _measured(t)),
                   None)
    if not chosen:
        raise UsageError(f"study {study_name!r} has no feasible trial: a baseline from it would break its own "
                         f"bounds every night (run the study until one is feasible)")
    metrics: dict[str, Any] = {n: {"direction": d, "tolerance": default_tolerance(n)}
                               for n, d in zip(names, directions, strict=True)}
    for c in study.user_attrs.get("constraints", []):
        metrics.setdefault(c["metric"], {}).update({k: c[k] for k in ("max", "min") if k in c})
    watched = list(metrics)
    configs = []
    if control is not None:
        configs.append(_init_entry("baseline", control, study_name, watched, control=True))
    configs += [_init_entry(f"trial_{t.number}", t, study_name, watched) for t in chosen if t is not control]
    return {"version": 1, "description": f"re-measured nightly: study {study_name} feasible Pareto set "
            f"(top {top} by {names[0]}) and its baseline trial", "repeats": 3,
            "rule": dataclasses.asdict(rr.Rule()), "metrics": metrics, "configs": configs}


def _measured(trial: Any) -> bool:
    return (trial.state.name == "COMPLETE" and trial.user_attrs.get("outcome") == "ok"
            and bool(trial.user_attrs.get("config")) and bool(trial.user_attrs.get("metrics")))


def _usable(trial: Any) -> bool:
    """Measured and feasible (named constraints, or the plain list older studies stored)."""
    return _measured(trial) and all(c <= 0 for c in trial.constraints.values())


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
    config = {k: v for k, v in trial.user_attrs["config"].items() if k not in MEASUREMENT_FIELDS}
    metrics = trial.user_attrs["metrics"]
    done = _iso(trial.datetime_complete) if trial.datetime_complete else ""
    entry: dict[str, Any] = {"name": name}
    if control:
        entry["control"] = True
    entry.update({"source": {"study": study, "trial": trial.number, "params": trial.params,
                             "device": (trial.user_attrs.get("environment") or {}).get("device_name")},
                  "config": config, "reference": {m: float(metrics[m]) for m in watched if m in metrics},
                  "accepted_at": done})
    return entry


# ---------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    from tuner.cli import Parser

    p = Parser(prog="autoglm-tune regress", description="Re-measure a baseline's configs; exit 1 on a regression.")
    p.add_argument("--baseline", help="baseline file (YAML or JSON) to check")
    p.add_argument("--repeats", type=int, help="measurements per config (default: the file's, else 3)")
    p.add_argument("--device", help="override every config's device: auto | cpu | cuda | cuda:K")
    p.add_argument("--out", help="output folder (default runs/regress); with --init: the baseline file to write")
    p.add_argument("--history", help="history file, .csv or .parquet (default OUT/history.csv)")
    p.add_argument("--update-baseline", action="store_true", help="accept tonight's numbers as the new references")
    p.add_argument("--from", dest="from_dir",
                   help="judge a previous run's measurements (its --out folder) instead of measuring")
    p.add_argument("--consecutive", type=int, help="flagged nights in a row before a regression (overrides the file)")
    p.add_argument("--warm", action="store_true", help="one runner process for all repeats (as the tuner's --warm)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--init", action="store_true", help="write a baseline file from a study's Pareto set")
    p.add_argument("--study", help="with --init: the study")
    p.add_argument("--storage", help="with --init: storage URL (default runs/optuna.journal)")
    p.add_argument("--top", type=int, default=5, help="with --init: Pareto trials to keep (default 5)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.init:
        return _init_main(args)
    if not args.baseline:
        raise UsageError("regress needs --baseline FILE (or --init --study NAME --out FILE)")
    path = Path(args.baseline)
    if not path.exists():
        raise UsageError(f"--baseline {path}: no such file")
    baseline = load_baseline(path)
    if args.consecutive is not None:
        if args.consecutive < 1:
            raise UsageError("--consecutive must be >= 1")
        baseline.rule = dataclasses.replace(baseline.rule, consecutive=args.consecutive)
    repeats = args.repeats if args.repeats is not None else baseline.repeats
    if repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if args.device and not (args.device in ("auto", "cpu", "cuda")
                            or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise UsageError(f"--device {args.device}: must be auto, cpu, cuda or cuda:K")
    out = Path(args.out) if args.out else DEFAULT_OUT
    measured = load_measurements(Path(args.from_dir), baseline) if args.from_dir else None
    return _check(baseline, args, repeats, out, measured)


def _check(baseline: Baseline, args: argparse.Namespace, repeats: int, out: Path,
           measured: pd.DataFrame | None) -> int:
    night = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    out.mkdir(parents=True, exist_ok=True)
    if measured is None:
        measured = measure(baseline, repeats, args.device, out, args.warm, args.quiet)
    measured.to_csv(out / "measurements.csv", index=False)
    history_path = Path(args.history) if args.history else out / "history.csv"
    history = rr.read_history(history_path)
    checks = mark_host_drift(baseline, evaluate(baseline, measured, history))
    device = device_used(baseline, measured, args.device)
    kept: list[str] = []
    if args.update_baseline:
        data, kept = updated_baseline(baseline, checks, measured, night)
        write_baseline(data, baseline.path)
    checks["night"], checks["baseline"], checks["device"] = night, str(baseline.path), device
    checks["accepted"] = checks["verdict"].isin(("ok", "improved", "new")) | (
        args.update_baseline & ~checks["config"].isin(kept))
    rr.append_history(history_path, checks)
    return _report(baseline, checks, out, history_path, repeats, kept, args.update_baseline, args.quiet)


def _report(baseline: Baseline, checks: pd.DataFrame, out: Path, history_path: Path, repeats: int,
            kept: list[str], updated: bool, quiet: bool) -> int:
    regressions = checks[checks["verdict"] == "regression"]
    drifted = checks[checks["verdict"] == rr.HOST_DRIFT]
    header = {"baseline": str(baseline.path), "night (UTC)": checks["night"].iloc[0],
              "device": checks["device"].iloc[0],
              "repeats": repeats, "rule": _rule_text(baseline.rule), "history": str(history_path)}
    header.update(_control_drift(baseline, checks))
    if updated:
        header["baseline updated"] = ("all configs" if not kept
                                      else f"all but {', '.join(kept)} (not measured on every repeat)")
    markdown = rr.markdown_summary(checks, header)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    (out / "junit.xml").write_text(rr.junit_xml(checks), encoding="utf-8")
    checks.to_csv(out / "checks.csv", index=False)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(markdown)
    if not quiet:
        print(markdown)
    drift_text = f", {len(drifted)} flag(s) set aside as host drift (exit 3)" if len(drifted) else ""
    print(f"autoglm-tune regress: {len(regressions)} regression(s) in {len(checks)} checks{drift_text}; "
          f"wrote {out / 'summary.md'}, {out / 'junit.xml'}; history {history_path}", file=sys.stderr)
    if updated:
        return EXIT_REGRESSION if kept else EXIT_OK
    if len(regressions):
        return EXIT_REGRESSION
    return EXIT_HOST_DRIFT if len(drifted) else EXIT_OK


def device_used(baseline: Baseline, measured: pd.DataFrame, override: str | None) -> str:
    """The devices the runs really used (from each result's environment), not `auto`."""
    named = measured["device_name"].dropna() if "device_name" in measured else pd.Series(dtype=object)
    names = sorted({str(n) for n in named if str(n)})
    asked = override or ", ".join(sorted({e.config.device for e in baseline.entries}))
    return f"{', '.join(names)} (asked: {asked})" if names else asked


def control_drift(baseline: Baseline, checks: pd.DataFrame) -> list[str]:
    """The control's metrics that moved beyond their tolerance (either way): the host changed.

    The control is the unmodified stack; when it alone moves by more than its tolerance, the
    machine (clocks, a noisy neighbour, a driver) moved, and every other config moved with it.
    """
    control = next((e for e in baseline.entries if e.control), None)
    if control is None:
        return []
    rows = checks[(checks["config"] == control.name) & (checks["metric"] != rr.MEASURED)]
    return [f"{r.metric} ×{r.ratio:.3f}" for r in rows.itertuples()
            if rr._present(r.change) and rr._present(r.ratio) and abs(r.change) > r.tolerance]


def mark_host_drift(baseline: Baseline, checks: pd.DataFrame) -> pd.DataFrame:
    """With the control drifted, relative flags become `host drift`; crashes and bounds stay."""
    moved = control_drift(baseline, checks)
    if not moved:
        return checks
    checks = checks.copy()
    relative = (checks["verdict"].isin(("regression", "suspect")) & (checks["metric"] != rr.MEASURED)
                & (checks["evidence"] != "bound"))
    checks.loc[relative, "reason"] = (f"host drift (control moved: {', '.join(moved)}); not judged: "
                                      + checks.loc[relative, "reason"].astype(str))
    checks.loc[relative, "verdict"] = rr.HOST_DRIFT
    checks.loc[relative, "flagged"] = False
    return checks


def _rule_text(rule: rr.Rule) -> str:
    return (f"worse than tolerance and (Mann-Whitney p <= {rule.alpha:g} | robust z >= {rule.z_threshold:g} over "
            f"<= {rule.history_window} accepted nights, from {rule.min_history}); "
            f"{rule.consecutive} flagged night(s) in a row")


def _control_drift(baseline: Baseline, checks: pd.DataFrame) -> dict[str, str]:
    """The control's now/reference ratios: machine (or common-stack) drift, seen by every config."""
    control = next((e for e in baseline.entries if e.control), None)
    if control is None:
        return {}
    rows = checks[(checks["config"] == control.name) & (checks["metric"] != rr.MEASURED)]
    ratios = [f"{r.metric} ×{r.ratio:.3f}" for r in rows.itertuples() if rr._present(r.ratio)]
    return {f"control {control.name}": ", ".join(ratios) or "no ratio (no reference or not measured)"}


def _init_main(args: argparse.Namespace) -> int:
    if not args.study or not args.out:
        raise UsageError("regress --init needs --study NAME and --out FILE (.yaml or .json)")
    if args.top < 1:
        raise UsageError("--top must be >= 1")
    path = Path(args.out)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UsageError(f"--out {path}: the baseline file must end in .yaml, .yml or .json")
    data = init_baseline(args.study, args.storage, args.top)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_baseline(data, path)
    for broken in broken_references(data):
        print(f"autoglm-tune regress: warning: reference {broken} already breaks its bound; that config "
              f"will be flagged every night (drop it from {path} or relax the bound)", file=sys.stderr)
    print(f"wrote {path}: {len(data['configs'])} config(s), watching {', '.join(data['metrics'])}; "
          f"check with: autoglm-tune regress --baseline {path}")
    return 0
