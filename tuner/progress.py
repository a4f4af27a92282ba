"""What the terminal says while a study runs.

Per trial: feasible or not and why (`tuner.notes`: each broken bound as `metric = value >
bound`, overload, an early stop); a live line while a trial runs (phase, requests done,
elapsed, time left), fed by the `progress.jsonl` the child writes (runners/progress_report.py);
an ETA from measured phase times. The lines at the end are `tuner.final`'s.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from runners.progress_report import PHASES, PROGRESS_FILE
from tuner import record
from tuner.notes import fmt_param, fmt_value, trial_notes

# Seconds between looks at a running trial's progress file.
POLL_S = 0.25


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# ---------------------------------------------------------------- live progress inside a trial


def read_progress(path: Path) -> list[dict[str, Any]]:
    """The records of a progress file; a half-written last line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def phase_durations(records: list[dict[str, Any]], end_t: float) -> dict[str, float]:
    """Seconds spent in each phase: from its record to the next phase's (or `end_t`)."""
    marks = [(r["t"], r["phase"]) for r in records if "phase" in r]
    durations: dict[str, float] = {}
    if not marks:
        return durations
    for (t, phase), (t_next, _) in zip(marks, [*marks[1:], (end_t, "")], strict=True):
        durations[phase] = durations.get(phase, 0.0) + max(0.0, t_next - t)
    return durations


class TrialEstimator:
    """Time per trial from measured phase times: the median of each phase over past trials.

    Medians keep one slow outlier (a first build, a compile) from swinging the ETA; the process
    start and result hand-back are the median of what the phases do not account for.
    """

    def __init__(self) -> None:
        self._phases: dict[str, list[float]] = {}
        self._overhead: list[float] = []
        self._walls: list[float] = []

    def add(self, wall_s: float, durations: dict[str, float]) -> None:
        self._walls.append(wall_s)
        for phase, seconds in durations.items():
            self._phases.setdefault(phase, []).append(seconds)
        if durations:
            self._overhead.append(max(0.0, wall_s - sum(durations.values())))

    def per_trial_s(self) -> float | None:
        if not self._walls:
            return None
        if not self._phases:
            return statistics.median(self._walls)
        phased = sum(statistics.median(v) for v in self._phases.values())
        return phased + (statistics.median(self._overhead) if self._overhead else 0.0)

    def remaining_in_trial_s(self, records: list[dict[str, Any]], now: float) -> float | None:
        """Time the running trial still needs: later phases' medians plus the current one's rest."""
        phases = [r["phase"] for r in records if "phase" in r]
        if not phases or not self._phases:
            return None
        current = phases[-1]
        started = next(r["t"] for r in reversed(records) if r.get("phase") == current)
        in_phase = now - started
        requests = [r for r in records if "done" in r and r["t"] >= started]
        if current == "measure" and requests and requests[-1]["done"] > 0:
            last = requests[-1]
            rate = last["done"] / max(last["t"] - started, 1e-6)
            rest = max(0, last["total"] - last["done"]) / rate
        else:
            rest = max(0.0, statistics.median(self._phases.get(current, [in_phase])) - in_phase)
        later = PHASES[PHASES.index(current) + 1:] if current in PHASES else ()
        return rest + sum(statistics.median(self._phases[p]) for p in later if p in self._phases)


def live_text(number: int, records: list[dict[str, Any]], elapsed_s: float, left_s: float | None) -> str:
    phase = next((r["phase"] for r in reversed(records) if "phase" in r), "starting the runner")
    parts = [f"trial {number}", phase]
    requests = next((r for r in reversed(records) if "done" in r), None)
    if phase == "measure" and requests is not None:
        parts.append(f"{requests['done']}/{requests['total']} requests")
    parts.append(f"{_fmt_duration(elapsed_s)} elapsed")
    if left_s is not None:
        parts.append(f"~{_fmt_duration(left_s)} left")
    return " · ".join(parts)


# ---------------------------------------------------------------- the printer


class Progress:
    """One block per finished trial and a live line while one runs; silent when `quiet`.

    The live line needs a terminal: it is off when the stream is not a TTY (a log file, CI).
    """

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = (not quiet) and (live if live is not None else bool(isatty and isatty()))
        self.estimator = TrialEstimator()
        self._current_records: list[dict[str, Any]] = []
        self._ended = 0.0

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def running(self, number: int, artifact_dir: Path) -> Iterator[None]:
        """While the body runs a trial: poll its progress file and keep a live line up to date."""
        path = Path(artifact_dir) / PROGRESS_FILE
        stop = threading.Event()
        started = time.time()
        self._current_records = []
        display = self._live_display() if self.live else None

        def poll() -> None:
            while not stop.wait(POLL_S):
                self._current_records = records = read_progress(path)
                if display is not None:
                    now = time.time()
                    left = self.estimator.remaining_in_trial_s(records, now)
                    display.update(live_text(number, records, now - started, left))

        thread = threading.Thread(target=poll, name="trial-progress", daemon=True)
        if display is not None:
            display.start()
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if display is not None:
                display.stop()
            self._current_records = read_progress(path)
            self._ended = time.time()

    def _live_display(self) -> _LiveLine:
        return _LiveLine(self.stream)

    def trial_done(self, study: optuna.Study, trial: FrozenTrial, done: int, outcome: str, detail: str,
                   metric_names: list[str], wall_s: float,
                   constraints: Sequence[dict[str, Any]] | None = None, same_as: str = "",
                   not_run: str = "") -> None:
        """One finished trial; `same_as` ("#10 (why)"): answered from that trial's record, not run;
        `not_run` ("refused up front"): told without running, for that reason. Both are kept out
        of the ETA, which estimates trials that run."""
        if not same_as and not not_run:
            self.estimator.add(wall_s, phase_durations(self._current_records, self._ended or time.time()))
        self._current_records = []
        if self.quiet:
            return
        constraints = record.constraints(study) if constraints is None else constraints
        params = " ".join(f"{k}={fmt_param(v)}" for k, v in trial.params.items())
        head = f"[{done}/{self.total}] trial {trial.number}{' (baseline)' if record.is_baseline(trial) else ''}"
        notes = trial_notes(trial, constraints)
        if trial.state == TrialState.FAIL:
            verdict = f"FAIL: {detail or '; '.join(notes)}"
        elif record.feasible(trial):
            verdict = "feasible" + (f" ({'; '.join(notes)})" if notes else "")
        else:
            verdict = "INFEASIBLE: " + "; ".join(notes or [detail or "constraint violated"])
        how = f"same as {same_as}" if same_as else (not_run or f"in {_fmt_duration(wall_s)}")
        self.say(f"{head} ({params}) {how}: {verdict}")
        metrics = record.metrics(trial)
        if record.OUTCOME.get(trial) == "ok" and metrics:
            self.say("        " + " ".join(f"{n}={fmt_value(float(metrics[n]))}" for n in metric_names
                                           if metrics.get(n) is not None))
        self.say(f"        {self.best_line(study, metric_names)} | eta {self.eta(done)}")

    def eta(self, done: int) -> str:
        remaining = max(self.total - done, 0)
        per_trial = self.estimator.per_trial_s()
        if not remaining:
            return "0s"
        return _fmt_duration(remaining * per_trial) if per_trial is not None else "?"

    @staticmethod
    def best_line(study: optuna.Study, metric_names: list[str]) -> str:
        try:
            pareto = record.front(study)
        except ValueError:
            pareto = []
        if not pareto:
            return "no feasible trial yet"
        parts = []
        for i, (name, direction) in enumerate(zip(metric_names, study.directions, strict=False)):
            pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
            best = pick(pareto, key=lambda t: t.values[i])
            parts.append(f"{name} {fmt_value(best.values[i])} (#{best.number})")
        return f"pareto {len(pareto)}: best " + ", ".join(parts)


class _LiveLine:
    """A transient one-line status (rich); gone once the trial's block is printed."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live("", console=Console(file=stream, highlight=False), transient=True, refresh_per_second=4)

    def start(self) -> None:
        self._live.start()

    def update(self, text: str) -> None:
        self._live.update(text)

    def stop(self) -> None:
        self._live.stop()


