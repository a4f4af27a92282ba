"""Why a searched knob's value is not on the feasible Pareto front: which front trial dominates
the value's best trial, and by how much on each objective (or that it only ran infeasibly).
Values on the front only within noise: `tuner.front_noise`; both in words: `tuner.front_summary`.

Read from Optuna FrozenTrials only: the front is `record.front` (`study.best_trials` without
same-as copies), feasibility is `tuner.record.feasible`, the reasons are
`tuner.notes.trial_notes`; nothing is measured here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner import record
from tuner.notes import change_pct, fmt_param, fmt_value, trial_notes
from tuner.search import losses

# The end-of-study summary prints at most this many lines of them; the report shows them all.
MAX_GAP_LINES = 4
# A numeric knob is read value by value only when its range has at most this many values: a
# continuous range samples each value about once, so "value 1.727 is not on the front" says nothing.
MAX_DISCRETE_VALUES = 16


@dataclass(frozen=True)
class Margin:
    """One objective of a dominated trial next to its dominator's."""

    metric: str
    dominated: float
    dominator: float
    pct: float | None  # the dominator's signed change vs the dominated trial; None when that is 0
    within_ci: bool  # the dominator's value lies inside the dominated trial's 95 % CI


@dataclass(frozen=True)
class ValueGap:
    """A value of one knob that no front trial has, and why."""

    param: str
    value: Any
    feasible: int  # its feasible trials (all off the front)
    best: FrozenTrial | None  # its trial nearest the front (None: it never ran feasibly)
    dominator: FrozenTrial | None  # the front trial nearest to `best` that dominates it
    dominators: int  # how many front trials dominate `best`
    margins: tuple[Margin, ...]
    infeasible: int  # its finished trials when none was feasible
    reason: str  # their most common reason ("" when it ran feasibly)
    reason_count: int  # how many of them share it


def trial_loss(t: FrozenTrial, directions: Sequence[StudyDirection]) -> list[float]:
    """The objective values as losses (maximized ones negated), as Optuna compares them."""
    return losses([t.values], [d.name.lower() for d in directions])[0].tolist()


def dominates(a: FrozenTrial, b: FrozenTrial, directions: Sequence[StudyDirection]) -> bool:
    """`a` is no worse than `b` on every objective and better on one (Optuna's definition)."""
    la, lb = trial_loss(a, directions), trial_loss(b, directions)
    return all(x <= y for x, y in zip(la, lb, strict=True)) and any(x < y for x, y in zip(la, lb, strict=True))


def _advantage_pct(better: float, worse: float) -> float:
    """How far `better` is from `worse`, in % of `worse` (infinite when `worse` is 0)."""
    pct = change_pct(better, worse)
    if pct is None:
        return 0.0 if better == worse else float("inf")
    return abs(pct)


def gap_pct(dominator: FrozenTrial, dominated: FrozenTrial) -> float:
    """The largest per-objective margin by which `dominator` beats `dominated`, in %."""
    return max(_advantage_pct(f, t) for f, t in zip(dominator.values, dominated.values, strict=True))


def within_ci(trial: FrozenTrial, metric: str, value: float) -> bool:
    """`value` inside the trial's recorded CI of `metric` (both bounds needed to say so)."""
    metrics = record.metrics(trial)
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    return low is not None and high is not None and float(low) <= value <= float(high)


def margins(dominator: FrozenTrial, dominated: FrozenTrial, names: Sequence[str]) -> tuple[Margin, ...]:
    return tuple(Margin(n, t, f, change_pct(f, t), within_ci(dominated, n, f))
                 for n, f, t in zip(names, dominator.values, dominated.values, strict=True))


def _nearest(trial: FrozenTrial, front: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
             ) -> tuple[float, int, FrozenTrial] | None:
    """(gap %, number of dominators, nearest dominator) of a feasible trial off the front."""
    over = [f for f in front if dominates(f, trial, directions)]
    if not over:  # not dominated by the front: only with NaN values, which never compare
        return None
    nearest = min(over, key=lambda f: (gap_pct(f, trial), f.number))
    return gap_pct(nearest, trial), len(over), nearest


def _dominated_gap(param: str, value: Any, trials: list[FrozenTrial], front: Sequence[FrozenTrial],
                   study: optuna.Study, names: Sequence[str]) -> ValueGap | None:
    """The value's best trial and its dominator.

    "Best" in multi-objective terms: among the value's own non-dominated trials (none of its
    other trials beats them), the one nearest the front, i.e. whose nearest front dominator
    beats it by the smallest largest-margin (in %); ties go to the trial with fewer front
    dominators, then the earlier trial. The line then reads "even the best this value did is
    this far behind trial #N", and a value that is behind only by noise shows it.
    """
    directions = study.directions
    own = [t for t in trials if not any(dominates(o, t, directions) for o in trials)]
    ranked = [(near[0], near[1], t.number, t, near[2]) for t in own
              if (near := _nearest(t, front, directions)) is not None]
    if not ranked:
        return None
    _, count, _, best, dominator = min(ranked, key=lambda r: r[:3])
    return ValueGap(param, value, len(trials), best, dominator, count, margins(dominator, best, names), 0, "", 0)


# `tuner.notes.broken_constraints`' wording of a broken bound: `metric = value > bound`.
_BROKEN_BOUND = re.compile(r"(\w+) = \S+ [<>] \S+")


def _reason_key(note: str) -> str:
    """A broken bound counts as one reason whatever the value (`perplexity = 91 > 60` -> perplexity)."""
    bound = _BROKEN_BOUND.fullmatch(note)
    return bound.group(1) if bound else note


def most_common_reason(trials: Sequence[FrozenTrial], constraints: Sequence[dict[str, Any]]) -> tuple[str, int]:
    """The reason most of these infeasible trials share (an example of it) and how many share it."""
    notes = [(trial_notes(t, constraints) or ["no reason recorded"])[0] for t in trials]
    counts = Counter(_reason_key(n) for n in notes)
    key, count = counts.most_common(1)[0]
    return next(n for n in notes if _reason_key(n) == key), count


def value_key(value: Any) -> tuple[str, Any]:
    """Type and value: a categorical 1 and True (or 0 and False) are different choices."""
    return type(value).__name__, value


def value_order(param: str, trials: Sequence[FrozenTrial]) -> Callable[[Any], tuple[int, Any]]:
    """Values in the distribution's order: choices as listed, numbers ascending."""
    dist = next((t.distributions[param] for t in trials if param in t.distributions), None)

    def key(value: Any) -> tuple[int, Any]:
        if isinstance(dist, CategoricalDistribution):
            return 0, next((i for i, c in enumerate(dist.choices) if value_key(c) == value_key(value)), 0)
        return (0, value) if isinstance(value, (int, float)) else (1, str(value))
    return key


def discrete(dist: BaseDistribution | None) -> bool:
    """A knob whose values recur across trials: categorical, or a numeric range of at most
    MAX_DISCRETE_VALUES values (a stepped int or float range)."""
    if isinstance(dist, CategoricalDistribution):
        return True
    if isinstance(dist, IntDistribution) and not dist.log:
        return (dist.high - dist.low) // dist.step + 1 <= MAX_DISCRETE_VALUES
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return round((dist.high - dist.low) / dist.step) + 1 <= MAX_DISCRETE_VALUES
    return False


def discrete_params(trials: Sequence[FrozenTrial], params: Iterable[str] | None) -> list[str]:
    """The searched discrete knobs (`discrete`): the space's `params` when known, else every
    trial's, in first-seen order."""
    names = list(params) if params is not None else list(dict.fromkeys(name for t in trials for name in t.params))
    dists = {name: t.distributions[name] for t in trials for name in t.distributions}
    return [name for name in names if discrete(dists.get(name))]


def front_gaps(study: optuna.Study, params: Iterable[str] | None = None) -> list[ValueGap]:
    """Each value of each searched knob that ran but is absent from the feasible front, in knob
    and value order; nothing when the front is empty (the no-feasible summary says why)."""
    try:
        front = record.front(study)  # each measured config once (no same-as copies)
    except (ValueError, RuntimeError):
        return []
    if not front:
        return []
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and not record.SAME_AS.recorded(t)]
    constraints = record.constraints(study)
    gaps: list[ValueGap] = []
    for param in discrete_params(finished, params):
        on_front = {value_key(t.params[param]) for t in front if param in t.params}
        by_value: dict[tuple[str, Any], list[FrozenTrial]] = {}
        for t in finished:
            if param in t.params and value_key(t.params[param]) not in on_front:
                by_value.setdefault(value_key(t.params[param]), []).append(t)
        order = value_order(param, finished)
        for key in sorted(by_value, key=lambda k: order(k[1])):
            ran, value = by_value[key], key[1]
            feasible = [t for t in ran if record.feasible(t)]
            if feasible:
                gap = _dominated_gap(param, value, feasible, front, study, names)
                if gap is not None:
                    gaps.append(gap)
            else:
                reason, count = most_common_reason(ran, constraints)
                gaps.append(ValueGap(param, value, 0, None, None, 0, (), len(ran), reason, count))
    return gaps


# ---------------------------------------------------------------- in words


def fmt_gap_pct(pct: float | None) -> str:
    if pct is None:
        return "vs 0"
    if pct == 0:
        return "same"
    return f"{pct:+.2g} %" if abs(pct) < 0.1 else f"{pct:+.1f} %" if abs(pct) < 10 else f"{pct:+.0f} %"


def trial_name(t: FrozenTrial) -> str:
    return f"#{t.number}" + (" (baseline)" if record.is_baseline(t) else "")


def _dominated_line(gap: ValueGap) -> str:
    assert gap.best is not None and gap.dominator is not None
    plural = "s" if gap.feasible > 1 else ""
    own = ", ".join(f"{m.metric} {fmt_value(m.dominated)}" for m in gap.margins)
    theirs = ", ".join(f"{m.metric} {fmt_value(m.dominator)} ({fmt_gap_pct(m.pct)}"
                       + (", within its CI" if m.within_ci else "") + ")" for m in gap.margins)
    more = gap.dominators - 1
    others = f" and {more} other front trial{'s' if more > 1 else ''}" if more else ""
    line = (f"{gap.param} {fmt_param(gap.value)} ({gap.feasible} feasible trial{plural}) not on the front: "
            f"{'best' if gap.feasible > 1 else 'its'} {trial_name(gap.best)} ({own}) is dominated by "
            f"{trial_name(gap.dominator)} ({theirs}){others}")
    differs = [m for m in gap.margins if m.pct != 0]
    if differs and all(m.within_ci for m in differs):
        line += "; every margin is within the measurement's CI"
    return line


# A continuous knob can have as many values as trials; a shared line names this many of them.
MAX_GROUPED_VALUES = 6


def _infeasible_line(group: Sequence[ValueGap]) -> str:
    runs, sharing = sum(g.infeasible for g in group), sum(g.reason_count for g in group)
    named = ", ".join(fmt_param(g.value) for g in group[:MAX_GROUPED_VALUES])
    if len(group) > MAX_GROUPED_VALUES:
        named += f" and {len(group) - MAX_GROUPED_VALUES} more values"
    return (f"{group[0].param} {named} ran only infeasibly "
            f"({runs} trial{'s' if runs > 1 else ''}; most common reason, {sharing} of {runs}: {group[0].reason})")


def gap_lines(gaps: Sequence[ValueGap]) -> list[str]:
    """One line per value that ran feasibly; values of one knob that ran only infeasibly for the
    same reason share a line (at the first one's place)."""
    entries: list[ValueGap | list[ValueGap]] = []
    groups: dict[tuple[str, str], list[ValueGap]] = {}
    for gap in gaps:
        if gap.best is not None:
            entries.append(gap)
            continue
        key = (gap.param, _reason_key(gap.reason))
        if key not in groups:
            groups[key] = []
            entries.append(groups[key])
        groups[key].append(gap)
    return [_infeasible_line(e) if isinstance(e, list) else _dominated_line(e) for e in entries]
