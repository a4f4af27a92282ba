"""Why a finished trial is (not) feasible, in words: each broken bound as `metric = value >
bound`, an overload, an early stop; numbers formatted the way the terminal and reports show them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner import record


def fmt_value(value: float) -> str:
    """4 significant digits; whole numbers up to a million (15570, not 1.557e+04)."""
    if abs(value) >= 1e6 or not abs(value) < float("inf"):
        return f"{value:.3e}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def fmt_param(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- why a trial is (not) feasible


def broken_constraints(metrics: dict[str, Any], constraints: Sequence[dict[str, Any]]) -> list[str]:
    """Each violated bound as `metric = value > bound` (or `< bound`); unmeasured ones named."""
    broken = []
    for c in constraints:
        value = metrics.get(c["metric"])
        if value is None:
            broken.append(f"{c['metric']} not measured")
            continue
        if c.get("max") is not None and float(value) > float(c["max"]):
            broken.append(f"{c['metric']} = {fmt_value(float(value))} > {fmt_value(float(c['max']))}")
        if c.get("min") is not None and float(value) < float(c["min"]):
            broken.append(f"{c['metric']} = {fmt_value(float(value))} < {fmt_value(float(c['min']))}")
    return broken


def served_rps(attrs: dict[str, Any]) -> float | None:
    """The rate the open-loop stack finished requests at: the departure rate the overload flag
    is judged on (records before it: the window's request rate, drain included)."""
    serving = (record.INFO.get(attrs) or {}).get("serving") or {}
    if "served_rps" in serving:
        return serving["served_rps"]
    return record.metrics(attrs).get("request_throughput_rps")


def overload_note(attrs: dict[str, Any]) -> str:
    """`overloaded (offered X rps, served Y)` when the open-loop stack fell behind its load."""
    serving = (record.INFO.get(attrs) or {}).get("serving") or {}
    if not serving.get("overloaded"):
        return ""
    served = served_rps(attrs)
    offered = serving.get("offered_rps")
    served_text = f", served {served:.3g}" if served is not None else ""
    offered_text = f"offered {offered:.3g} rps" if offered is not None else "offered load not kept up"
    return f"overloaded ({offered_text}{served_text})"


def stopped_early_note(attrs: dict[str, Any]) -> str:
    stop = record.STOPPED_EARLY.get(attrs)
    if not stop:
        return ""
    if isinstance(stop, dict):
        evidence = stop.get("evidence")
        return f"stopped early: {stop.get('rule', '?')}" + (f" ({evidence})" if evidence else "")
    return f"stopped early: {stop}"


def trial_notes(trial: FrozenTrial, constraints: Sequence[dict[str, Any]]) -> list[str]:
    """Everything that makes a finished trial infeasible or suspect, most important first."""
    attrs = trial.user_attrs
    notes = []
    if trial.state == TrialState.FAIL:
        return [str(record.FAIL_REASON.get(attrs) or "failed")]
    if record.INFEASIBLE_REASON.get(attrs):
        notes.append(str(record.INFEASIBLE_REASON.get(attrs)))
    elif record.OUTCOME.get(attrs) == "ok":
        notes += broken_constraints(record.metrics(attrs), constraints)
    notes += [n for n in (overload_note(attrs), stopped_early_note(attrs)) if n]
    return notes


def change_pct(value: float, base: float | None) -> float | None:
    return None if base in (None, 0) else 100.0 * (value - base) / abs(base)
