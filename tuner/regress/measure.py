"""Measuring a baseline's configs (round-robin, through the tuner's own launcher and runner:
no second measurement path) and judging the measurements with `tuner.regress.rule`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd

import tuner.regress.rule as rr
from tuner.errors import UsageError
from tuner.regress.baseline import Baseline, Entry

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


def device_used(baseline: Baseline, measured: pd.DataFrame, override: str | None) -> str:
    """The devices the runs really used (from each result's environment), not `auto`."""
    named = measured["device_name"].dropna() if "device_name" in measured else pd.Series(dtype=object)
    names = sorted({str(n) for n in named if str(n)})
    asked = override or ", ".join(sorted({e.config.device for e in baseline.entries}))
    return f"{', '.join(names)} (asked: {asked})" if names else asked


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
            if rr.present(r.change) and rr.present(r.ratio) and abs(r.change) > r.tolerance]

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
