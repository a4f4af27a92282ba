"""The last lines of a study run: the recommended configurations, or why nothing was
feasible and what to change."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import record
from tuner.front_summary import summary_lines as front_gap_lines
from tuner.notes import (
    broken_constraints,
    change_pct,
    fmt_param,
    fmt_value,
    overload_note,
    served_rps,
    stopped_early_note,
    trial_notes,
)

# At most this many configurations are recommended at the end.
MAX_RECOMMENDED = 3


def _baseline(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The measured baseline (its retry, if the first attempt failed)."""
    measured = [t for t in trials if record.is_baseline(t) and record.measured(t)]
    return measured[0] if measured else None


def _fmt_change(value: float, base: float | None) -> str:
    pct = change_pct(value, base)
    return "" if pct is None else f" ({pct:+.0f}% vs baseline)"


def recommended(study: optuna.Study, metric_names: list[str]) -> list[tuple[str, FrozenTrial]]:
    """The feasible Pareto trial best at each objective (deduplicated), labelled by what it wins."""
    try:
        pareto = record.front(study)
    except ValueError:
        return []
    picks: dict[int, tuple[list[str], FrozenTrial]] = {}
    for i, (name, direction) in enumerate(zip(metric_names, study.directions, strict=False)):
        if not pareto:
            break
        pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        best = pick(pareto, key=lambda t: (t.values[i], -t.number))
        picks.setdefault(best.number, ([], best))[0].append(f"best {name}")
    return [(", ".join(labels), t) for labels, t in list(picks.values())[:MAX_RECOMMENDED]]


def _hint(metric: str, space: Any, measured: Sequence[FrozenTrial] = ()) -> str:
    """A concrete next step for a bound that breaks in most trials."""
    rate = (space.workload or {}).get("rate_rps")
    loosen = f"relax the bound (constraints: {metric})"
    if metric.startswith(("ttft", "tpot", "latency", "e2e")) or metric.endswith("_ms"):
        served = [float(v) for t in measured if overload_note(t.user_attrs)
                  and (v := served_rps(t.user_attrs)) is not None]
        keeps_up = (f"; the stack served at most {max(served):.3g} req/s here, so try rate_rps "
                    f"<= {0.8 * max(served):.2g}") if served else ""
        lower = f"lower workload.rate_rps (now {rate:g}{keeps_up}) so the stack keeps up, " if rate else ""
        return f"{lower}{loosen}, or drop the slowest knob values (small batch_size, offloaded KV)"
    if metric in ("kl_divergence", "top1_agreement", "perplexity"):
        return f"drop the most aggressive compression values (quant_bits 4, high sparsity) or {loosen}"
    if "memory" in metric:
        return f"drop large batch_size values or 16-bit weights, or {loosen}"
    return f"{loosen}, or drop the knob values that break it"


def _failing_bounds(measured: list[FrozenTrial], constraints: Sequence[dict[str, Any]]) -> list[str]:
    counts: Counter[str] = Counter()
    for t in measured:
        for c in constraints:
            if broken_constraints(record.metrics(t), [c]):
                counts[c["metric"]] += 1
    return [m for m, _ in counts.most_common()]


def _worst_miss(metric: str, measured: list[FrozenTrial], constraint: dict[str, Any]) -> str:
    """The closest any trial came to the bound, and by how much it missed."""
    values = [float(v) for t in measured if (v := record.metrics(t).get(metric)) is not None]
    if not values:
        return "never measured"
    bound = float(constraint["max"] if constraint.get("max") is not None else constraint["min"])
    closest = min(values) if constraint.get("max") is not None else max(values)
    side = ">" if constraint.get("max") is not None else "<"
    miss = change_pct(closest, bound)
    return (f"best {metric} = {fmt_value(closest)} {side} {fmt_value(bound)}"
            + (f" ({abs(miss):.0f}% beyond the bound)" if miss is not None else ""))


def final_lines(study: optuna.Study, space: Any, storage_url: str) -> list[str]:
    """What to take away: recommended configurations, or why there are none and what to change."""
    names = [o.metric for o in space.objectives]
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    base = _baseline(trials)
    base_metrics = record.metrics(base) if base is not None else {}
    storage_flag = f" --storage {storage_url}"
    picks = recommended(study, names)
    lines: list[str] = []
    if picks:
        lines.append(f"recommended configuration{'s' if len(picks) > 1 else ''} (feasible Pareto set):")
        for label, t in picks:
            knobs = " ".join(f"{k}={fmt_param(v)}" for k, v in t.params.items()) or "(defaults)"
            lines.append(f"  trial {t.number} [{label}]: {knobs}")
            metrics = record.metrics(t)
            lines.append("      " + ", ".join(
                f"{n} {fmt_value(float(metrics[n]))}{_fmt_change(float(metrics[n]), base_metrics.get(n))}"
                for n in names if metrics.get(n) is not None))
            caveats = [n for n in (overload_note(t.user_attrs), stopped_early_note(t.user_attrs)) if n]
            if caveats:
                lines.append(f"      caution: {'; '.join(caveats)}")
        if base is None:
            lines.append("  (no measured baseline: changes vs baseline unavailable)")
        elif not record.feasible(base):
            lines.append(f"  (baseline trial {base.number} was measured but infeasible: "
                         f"{'; '.join(trial_notes(base, record.constraints(study)))})")
        # Why the other knob values lost: the best trial of each and what dominates it.
        lines += front_gap_lines(study, getattr(space, "params", None))
    elif finished:
        lines += no_feasible_lines(study, space, finished)
    lines.append(f"open the report:    autoglm-tune report --study {space.study}{storage_flag}")
    lines.append(f"open the dashboard: autoglm-tune dashboard{storage_flag}")
    return lines


def no_feasible_lines(study: optuna.Study, space: Any, finished: list[FrozenTrial]) -> list[str]:
    constraints = record.constraints(study)
    measured = [t for t in finished if record.measured(t)]
    if not measured:
        reasons = Counter(trial_notes(t, constraints)[0] for t in finished if trial_notes(t, constraints))
        reason, count = reasons.most_common(1)[0] if reasons else ("unknown", 0)
        return [f"no trial was measured; most common reason ({count} of {len(finished)}): {reason}",
                "hint: fix that cause (or drop the knob values it names) and run the same command again"]
    lines = [f"no feasible trial: every one of {len(measured)} measured trial(s) broke a bound"]
    failing = _failing_bounds(measured, constraints)
    if failing:
        metric = failing[0]
        constraint = next(c for c in constraints if c["metric"] == metric)
        broke = sum(1 for t in measured if broken_constraints(record.metrics(t), [constraint]))
        lines.append(f"most often broken: {metric} in {broke} of {len(measured)} "
                     f"({_worst_miss(metric, measured, constraint)})")
        overloaded = sum(1 for t in measured if overload_note(t.user_attrs))
        if overloaded:
            lines.append(f"{overloaded} of {len(measured)} measured trial(s) were overloaded "
                         f"(served fewer requests per second than offered)")
        lines.append(f"hint: {_hint(metric, space, measured)}")
    return lines
