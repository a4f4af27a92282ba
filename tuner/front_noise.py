"""Which searched knob values are on the feasible Pareto front only by margins inside a
measurement's confidence interval (the counterpart of `tuner.front_gaps`, which explains values
off the front). Read from Optuna FrozenTrials only; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner import record
from tuner.front_gaps import (
    discrete_params,
    fmt_gap_pct,
    gap_pct,
    trial_loss,
    trial_name,
    value_key,
    value_order,
    within_ci,
)
from tuner.notes import change_pct, fmt_param, fmt_value


@dataclass(frozen=True)
class NoiseMargin:
    """One objective of a front trial next to the front trial that beats it beyond noise."""

    metric: str
    value: float  # the front trial's
    rival: float  # the rival's
    pct: float | None  # the front trial's signed change vs the rival; None when the rival's is 0
    ci_of: int | None  # the trial whose 95 % CI holds the other's value (a tie), None when neither's does


@dataclass(frozen=True)
class NoiseWin:
    """A front trial that stays on the front only by margins inside a CI, and the front trial
    that dominates it once those margins count as ties."""

    trial: FrozenTrial
    rival: FrozenTrial
    margins: tuple[NoiseMargin, ...]


@dataclass(frozen=True)
class NoiseFront:
    """A knob value all of whose front trials are on the front only within noise."""

    param: str
    value: Any
    wins: tuple[NoiseWin, ...]  # one per front trial of the value


def _ci_holder(a: FrozenTrial, b: FrozenTrial, metric: str, value_a: float, value_b: float) -> int | None:
    """The trial (a first) whose recorded CI of `metric` holds the other's value; None when
    neither has both bounds or neither CI holds it (then the two values compare exactly)."""
    if within_ci(a, metric, value_b):
        return a.number
    if within_ci(b, metric, value_a):
        return b.number
    return None


def noise_margins(rival: FrozenTrial, trial: FrozenTrial, names: Sequence[str],
                  directions: Sequence[StudyDirection]) -> tuple[NoiseMargin, ...] | None:
    """The margins when `rival` dominates `trial` once noise is allowed for, else None.

    An objective on which the two differ is a tie when one trial's recorded 95 % CI of it holds
    the other's value (`trial`'s CI, else `rival`'s); without a CI on either (perplexity on a fixed
    evaluation set is deterministic) the values compare exactly. `rival` dominates within noise
    when `trial` beats it only on ties, and `rival` beats `trial` on at least one objective that
    is not a tie. Equal values are neither a win nor a tie.
    """
    lr, lt = trial_loss(rival, directions), trial_loss(trial, directions)
    out: list[NoiseMargin] = []
    real_edge = False
    for name, r, t, loss_r, loss_t in zip(names, rival.values, trial.values, lr, lt, strict=True):
        holder = _ci_holder(trial, rival, name, t, r) if loss_r != loss_t else None
        if loss_t < loss_r and holder is None:
            return None  # `trial` wins this one beyond noise
        real_edge |= loss_r < loss_t and holder is None
        out.append(NoiseMargin(name, t, r, change_pct(t, r), holder))
    return tuple(out) if real_edge else None


def _noise_win(trial: FrozenTrial, front: Sequence[FrozenTrial], beaten: set[int], param: str,
               names: Sequence[str], directions: Sequence[StudyDirection]) -> NoiseWin | None:
    """The front trial that dominates `trial` within noise: one with another value of `param`
    first (it is what the value is only level with), then one not itself beaten within noise
    (`beaten`: it stands), then the nearest (`gap_pct`), then the earlier."""
    ranked = [((value_key(f.params.get(param)) == value_key(trial.params.get(param))), f.number in beaten,
               gap_pct(f, trial), f.number, f, m) for f in front if f.number != trial.number
              if (m := noise_margins(f, trial, names, directions)) is not None]
    if not ranked:
        return None
    *_, rival, margins_ = min(ranked, key=lambda r: r[:4])
    return NoiseWin(trial, rival, margins_)


def noise_fronts(study: optuna.Study, params: Iterable[str] | None = None) -> list[NoiseFront]:
    """Each value of each searched discrete knob that is on the feasible front only within noise.

    The rule: every front trial T with the value has another front trial F that dominates T once
    each objective where T is better than F is called a tie if T's or F's recorded 95 % CI of
    that objective holds the other's value, and F is better than T on at least one objective
    where neither CI holds the other's value (`noise_margins`). An objective with no CI recorded
    compares exactly, so a front trial that wins on it is never flagged. Front trials are only
    compared with front trials, and a front whose trials are all level within noise flags
    nothing (none is better beyond noise). In knob and value order.
    """
    try:
        front = record.front(study)  # each measured config once (no same-as copies)
    except (ValueError, RuntimeError):
        return []
    if len(front) < 2:
        return []
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and not record.SAME_AS.recorded(t)]
    beaten = {t.number for t in front if any(noise_margins(f, t, names, study.directions) is not None
                                             for f in front if f.number != t.number)}
    out: list[NoiseFront] = []
    for param in discrete_params(finished, params):
        by_value: dict[tuple[str, Any], list[FrozenTrial]] = {}
        for t in front:
            if param in t.params:
                by_value.setdefault(value_key(t.params[param]), []).append(t)
        order = value_order(param, finished)
        for key in sorted(by_value, key=lambda k: order(k[1])):
            wins = [_noise_win(t, front, beaten, param, names, study.directions) for t in by_value[key]]
            if all(w is not None for w in wins):
                out.append(NoiseFront(param, key[1], tuple(w for w in wins if w is not None)))
    return out


# ---------------------------------------------------------------- in words


def _noise_margin_text(m: NoiseMargin, rival: int) -> str:
    pct = "same" if m.pct == 0 else f"{fmt_gap_pct(m.pct)} vs #{rival}"
    return f"{m.metric} {fmt_value(m.value)} ({pct}" + ("" if m.ci_of is None else f", within #{m.ci_of}'s CI") + ")"


def noise_lines(fronts: Sequence[NoiseFront]) -> list[str]:
    """One line per value on the front only within noise: each of its front trials, its values
    and their change vs the rival that beats it beyond noise, ties marked with whose CI."""
    return [f"{nf.param} {fmt_param(nf.value)} on the front only within noise: " + "; ".join(
        f"{trial_name(w.trial)} ({', '.join(_noise_margin_text(m, w.rival.number) for m in w.margins)})"
        for w in nf.wins) for nf in fronts]
