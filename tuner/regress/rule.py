"""The nightly regression check's rule: verdicts from numbers, and the history file.

(The history's figure is drawn by `reports.regression`; the Markdown and JUnit outputs are
`tuner.regress.command`'s; this module only decides.)

The rule (docs/regress.md): a config x metric is *flagged* when its median over tonight's
repeats is worse than the reference by more than the metric's tolerance **and** the change is
statistically clear by every test the data allows:

- one-sided Mann-Whitney U of tonight's repeats against the reference repeats, p <= alpha,
  when both sides have >= 3 repeats (asv's test);
- robust z of tonight's median against the last N accepted nights (median, 1.4826 * MAD),
  beyond `z_threshold`, when >= `min_history` nights exist;
- with neither (a single stored reference value, as `--init` writes, and no history yet): a
  one-sided prediction test, p <= alpha, that the reference lies outside the spread of
  tonight's repeats (Student t on log values, df = R - 1; needs R >= 2).

A flag becomes a *regression* after `consecutive` flagged nights in a row (default 1);
before that it is *suspect*. Pure functions of numbers; the measuring lives in tuner/regress/measure.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu
from scipy.stats import t as student_t

# The pseudo-metric of a config's runs: how many repeats measured ok (a crash is a regression).
MEASURED = "measured"
VERDICTS = ("ok", "new", "improved", "suspect", "regression", "host drift")
# A flag set aside because the control itself moved beyond its tolerance (tuner/regress/measure.py).
HOST_DRIFT = "host drift"
HISTORY_COLUMNS = [
    "night", "baseline", "config", "metric", "direction", "tolerance", "reference", "now", "ratio",
    "change", "history_median", "p_value", "z", "evidence", "verdict", "flagged", "accepted",
    "repeats", "reason", "device",
]


@dataclass(frozen=True)
class Rule:
    alpha: float = 0.05          # Mann-Whitney level (3 vs 3 repeats: the smallest p is 0.05)
    z_threshold: float = 3.0     # robust z against accepted nights
    min_history: int = 5         # nights before the z test is used
    history_window: int = 30     # the last N accepted nights
    consecutive: int = 1         # flagged nights in a row before "regression"


@dataclass(frozen=True)
class Watch:
    """One watched metric: better direction, practical tolerance (fraction), optional bounds."""

    metric: str
    direction: str
    tolerance: float
    max: float | None = None
    min: float | None = None


@dataclass
class Judgement:
    verdict: str
    flagged: bool
    now: float | None = None
    ratio: float | None = None
    change: float | None = None      # fraction worse (+) or better (-) than the reference
    history_median: float | None = None
    p_value: float | None = None
    z: float | None = None
    evidence: str = ""
    reason: str = ""


# ---------------------------------------------------------------- the rule


def _worse_sign(direction: str) -> float:
    return 1.0 if direction == "minimize" else -1.0


def _change(value: float, reference: float, direction: str) -> float:
    """Relative change, positive when worse."""
    if reference == 0:
        return 0.0 if value == 0 else math.copysign(math.inf, _worse_sign(direction) * value)
    return _worse_sign(direction) * (value - reference) / abs(reference)


def mann_whitney_p(now: Sequence[float], ref_repeats: Sequence[float], direction: str, worse: bool = True) -> float:
    """One-sided p of "tonight's repeats are worse (or better) than the reference repeats".

    Not moved by the tolerance: the practical gate is the median change; moving the reference
    too cost power (simulated: a 10 % shift at 2 % noise caught 83 % instead of 99 %).
    """
    sign = _worse_sign(direction) * (1.0 if worse else -1.0)
    alternative = "greater" if sign > 0 else "less"
    return float(mannwhitneyu(np.asarray(now, float), np.asarray(ref_repeats, float), alternative=alternative).pvalue)


def prediction_p(now: Sequence[float], reference: float, direction: str, worse: bool = True) -> float:
    """One-sided p that a single reference value comes from tonight's distribution.

    The reference is one draw of the same measurement, so its spread is taken to be the
    repeats' spread: t = (mean - ref) / (s * sqrt(1 + 1/n)) on log values (noise is relative).
    """
    logs = np.log(np.asarray(now, float))
    sign = _worse_sign(direction) * (1.0 if worse else -1.0)
    diff = sign * (float(logs.mean()) - math.log(reference))
    spread = float(logs.std(ddof=1)) * math.sqrt(1.0 + 1.0 / len(logs))
    if spread == 0:
        return 0.0 if diff > 0 else 1.0
    return float(student_t.sf(diff / spread, len(logs) - 1))


def robust_z(value: float, history: Sequence[float]) -> tuple[float, float]:
    """(z, history median) with the MAD scaled to a normal sigma; a flat history gives +-inf."""
    values = np.asarray(history, float)
    center = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - center)))
    if scale == 0:
        return (0.0 if value == center else math.copysign(math.inf, value - center)), center
    return (value - center) / scale, center


def _clear(now: Sequence[float], reference: float, ref_repeats: Sequence[float], z: float | None,
           watch: Watch, rule: Rule, worse: bool) -> tuple[bool, float | None, str]:
    """Is a change (worse, or better) statistically clear? Every available test must agree."""
    tests: list[bool] = []
    names: list[str] = []
    p = None
    if len(now) >= 3 and len(ref_repeats) >= 3:
        p = mann_whitney_p(now, ref_repeats, watch.direction, worse)
        tests.append(p <= rule.alpha + 1e-12)  # exact p of 3 vs 3 is 1/20: equal counts
        names.append("mann-whitney")
    if z is not None:
        signed = _worse_sign(watch.direction) * z * (1.0 if worse else -1.0)
        tests.append(signed >= rule.z_threshold)
        names.append("robust-z")
    if not tests and len(now) >= 2 and reference > 0 and min(now) > 0:
        p = prediction_p(now, reference, watch.direction, worse)
        tests.append(p <= rule.alpha)
        names.append("prediction")
    if not tests:
        return False, None, "none possible (one repeat, one reference value, no history)"
    return all(tests), p, "+".join(names)


def judge(now: Sequence[float], reference: float | None, ref_repeats: Sequence[float],
          history: Sequence[float], watch: Watch, rule: Rule) -> Judgement:
    """The verdict of one config x metric for one night (before the consecutive-nights rule)."""
    if not now:
        return Judgement("regression", True, reason="not measured tonight")
    median = float(np.median(now))
    bound = _bound_broken(median, watch)
    if bound:
        return Judgement("regression", True, now=median, reason=bound, evidence="bound")
    z, center = robust_z(median, history) if len(history) >= rule.min_history else (None, None)
    if reference is None or not math.isfinite(reference):
        return Judgement("new", False, now=median, z=z, history_median=center, reason="no reference yet")
    change = _change(median, reference, watch.direction)
    ratio = median / reference if reference else None
    base = Judgement("ok", False, now=median, ratio=ratio, change=change, history_median=center, z=z)
    worse_clear, p, evidence = _clear(now, reference, ref_repeats, z, watch, rule, worse=True)
    base.p_value, base.evidence = p, evidence
    if change > watch.tolerance:
        if worse_clear:
            base.verdict, base.flagged = "regression", True
            base.reason = f"{change:+.1%} worse than the reference (tolerance {watch.tolerance:.0%}; {evidence})"
        else:
            base.reason = f"{change:+.1%} worse but not statistically clear ({evidence})"
    elif change < -watch.tolerance and _clear(now, reference, ref_repeats, z, watch, rule, worse=False)[0]:
        base.verdict, base.reason = "improved", f"{-change:.1%} better than the reference"
    return base


def _bound_broken(median: float, watch: Watch) -> str:
    if watch.max is not None and median > watch.max:
        return f"median {median:.4g} above the bound max {watch.max:g}"
    if watch.min is not None and median < watch.min:
        return f"median {median:.4g} below the bound min {watch.min:g}"
    return ""


def apply_consecutive(judgement: Judgement, previous_flags: Sequence[bool], rule: Rule) -> Judgement:
    """A flag is a regression only after `rule.consecutive` flagged nights in a row."""
    needed = rule.consecutive - 1
    if (judgement.verdict == "regression" and judgement.evidence != "bound" and needed > 0
            and not (len(previous_flags) >= needed and all(previous_flags[-needed:]))):
        judgement.verdict = "suspect"
        judgement.reason += f"; first flagged night (regression after {rule.consecutive} in a row)"
    return judgement


# ---------------------------------------------------------------- the rule's alert rate, simulated


def simulate_alert_rate(noise_cv: float, shift: float, *, runs: int = 100, seed: int = 0, repeats: int = 3,
                        ref_repeats: int = 3, history_nights: int = 14, tolerance: float = 0.05,
                        rule: Rule | None = None) -> float:
    """Fraction of seeded runs that alert on a throughput-like metric (higher is better).

    Each run draws reference repeats, `history_nights` accepted nights (medians of `repeats`)
    and tonight's repeats `shift` lower, all with log-normal noise of relative size `noise_cv`;
    with `rule.consecutive` = 2 an alert needs two independent flagged nights.
    """
    rule = rule or Rule()
    rng = np.random.default_rng(seed)
    watch = Watch("throughput_tok_s", "maximize", tolerance)

    def draw(n: int, level: float = 100.0) -> list[float]:
        return list(level * np.exp(noise_cv * rng.standard_normal(n)))

    if ref_repeats < 1:
        raise ValueError("ref_repeats must be >= 1 (1 = a single stored value, as --init writes)")
    alerts = 0
    for _ in range(runs):
        refs = draw(ref_repeats)
        history = [float(np.median(draw(repeats))) for _ in range(history_nights)]
        flags = [judge(draw(repeats, 100.0 * (1 - shift)), float(np.median(refs)), refs, history, watch,
                       rule).flagged for _ in range(rule.consecutive)]
        alerts += all(flags)
    return alerts / runs


# ---------------------------------------------------------------- history


def read_history(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    for column in ("flagged", "accepted"):
        frame[column] = frame[column].astype(str).str.lower().isin(("true", "1"))
    return frame


def append_history(path: Path, rows: pd.DataFrame) -> None:
    """CSV grows by appending (cheap, diff-able); Parquet is rewritten whole."""
    rows = rows.reindex(columns=HISTORY_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        old = read_history(path)
        pd.concat([old, rows] if len(old) else [rows], ignore_index=True).to_parquet(path, index=False)
    else:
        rows.to_csv(path, mode="a", header=not path.exists(), index=False)


def _series(history: pd.DataFrame, config: str, metric: str) -> pd.DataFrame:
    if history.empty:
        return history
    rows = history[(history["config"] == config) & (history["metric"] == metric)]
    return rows.sort_values("night", kind="stable")


def accepted_values(history: pd.DataFrame, config: str, metric: str, rule: Rule, since: str = "") -> list[float]:
    """Medians of the last accepted nights, from the reference's acceptance on (older nights
    measured another state of the stack)."""
    rows = _series(history, config, metric)
    if rows.empty:
        return []
    rows = rows[rows["accepted"] & (rows["night"].astype(str) >= since)]
    return [float(v) for v in rows["now"].dropna().tail(rule.history_window)]


def previous_flags(history: pd.DataFrame, config: str, metric: str, since: str = "") -> list[bool]:
    """Flags of earlier nights since the reference was accepted, one per night; a night whose
    numbers were accepted (`--update-baseline`) counts as unflagged."""
    rows = _series(history, config, metric)
    if rows.empty:
        return []
    rows = rows[rows["night"].astype(str) >= since]
    live = rows["flagged"] & ~rows["accepted"]
    return [bool(v) for v in live.groupby(rows["night"], sort=True).last()]


# ---------------------------------------------------------------- one judgement as a row


def judgement_row(config: str, watch: Watch, reference: float | None, repeats: Sequence[float],
                  j: Judgement) -> dict[str, Any]:
    row = {"config": config, "metric": watch.metric, "direction": watch.direction,
           "tolerance": watch.tolerance, "reference": reference, "repeats": ";".join(f"{x:.6g}" for x in repeats)}
    row.update({k: v for k, v in asdict(j).items()})
    return row


def present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
