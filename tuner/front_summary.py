"""The end-of-study block about the feasible front, in words: the knob values off it
(`tuner.front_gaps`) and those on it only within noise (`tuner.front_noise`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import optuna

from tuner.front_gaps import MAX_GAP_LINES, front_gaps, gap_lines
from tuner.front_noise import noise_fronts, noise_lines


def _capped(heading: str, lines: Sequence[str], limit: int) -> list[str]:
    if not lines:
        return []
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  and {len(lines) - limit} more (autoglm-tune report lists them all)")
    return [heading, *shown]


def summary_lines(study: optuna.Study, params: Iterable[str] | None = None,
                  limit: int = MAX_GAP_LINES) -> list[str]:
    """The end-of-study block: a heading and at most `limit` gap lines, then a heading and at
    most `limit` lines of values on the front only within noise (nothing when neither has any)."""
    params = None if params is None else list(params)
    return (_capped("why these knob values are not on the feasible front:", gap_lines(front_gaps(study, params)), limit)
            + _capped("knob values on the feasible front only within measurement noise (a CI holds each of "
                      "their wins):", noise_lines(noise_fronts(study, params)), limit))
