"""Terminal progress for long studies: trials done/total, outcome, best so far, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import optuna
from optuna.trial import TrialState


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt_value(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"


def _fmt_param(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class Progress:
    """Prints one line per finished trial; silent when `quiet`."""

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._started = time.perf_counter()
        self._walls: list[float] = []

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def trial_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, done: int,
                   outcome: str, detail: str, metric_names: list[str], wall_s: float) -> None:
        self._walls.append(wall_s)
        if self.quiet:
            return
        remaining = max(self.total - done, 0)
        eta = _fmt_duration(remaining * sum(self._walls) / len(self._walls)) if remaining else "0s"
        values = ""
        if trial.state == TrialState.COMPLETE and outcome == "ok":
            values = " " + " ".join(f"{n}={_fmt_value(v)}" for n, v in zip(metric_names, trial.values, strict=False))
        params = " ".join(f"{k}={_fmt_param(v)}" for k, v in trial.params.items())
        self.say(f"[{done}/{self.total}] trial {trial.number} ({params}) {outcome.upper()} in "
                 f"{_fmt_duration(wall_s)}{values}{' — ' + detail if detail else ''}")
        self.say(f"        {self.best_line(study, metric_names)} | eta {eta}")

    @staticmethod
    def best_line(study: optuna.Study, metric_names: list[str]) -> str:
        try:
            pareto = study.best_trials
        except ValueError:
            pareto = []
        if not pareto:
            return "no feasible trial yet"
        parts = []
        for i, (name, direction) in enumerate(zip(metric_names, study.directions, strict=False)):
            pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
            best = pick(pareto, key=lambda t: t.values[i])
            parts.append(f"{name} {_fmt_value(best.values[i])} (#{best.number})")
        return f"pareto {len(pareto)}: best " + ", ".join(parts)
