"""What the terminal says while a study runs and when it ends.

Per trial: feasible or not and why (each broken bound as `metric = value > bound`, overload,
an early stop); a live line while a trial runs (phase, requests done, elapsed, time left),
fed by the `progress.jsonl` the child writes (runners/progress_report.py); an ETA from
measured phase times; at the end the recommended configurations, or the reason nothing was
feasible and what to change.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from runners.progress_report import PHASES, PROGRESS_FILE

# Seconds between looks at a running trial's progress file.
POLL_S = 0.25
# At most this many configurations are recommended at the end.
MAX_RECOMMENDED = 3


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
    """4 significant digits; whole numbers up to a million (15570, not 1.557e+04)."""
    if abs(value) >= 1e6 or not abs(value) < float("inf"):
        return f"{value:.3e}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _fmt_param(value: object) -> str:
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
            broken.append(f"{c['metric']} = {_fmt_value(float(value))} > {_fmt_value(float(c['max']))}")
        if c.get("min") is not None and float(value) < float(c["min"]):
            broken.append(f"{c['metric']} = {_fmt_value(float(value))} < {_fmt_value(float(c['min']))}")
    return broken


def overload_note(attrs: dict[str, Any]) -> str:
    """`overloaded (offered X rps, served Y)` when the open-loop stack fell behind its load."""
    serving = (attrs.get("info") or {}).get("serving") or {}
    if not serving.get("overloaded"):
        return ""
    served = (attrs.get("metrics") or {}).get("request_throughput_rps")
    offered = serving.get("offered_rps")
    served_text = f", served {served:.3g}" if served is not None else ""
    offered_text = f"offered {offered:.3g} rps" if offered is not None else "offered load not kept up"
    return f"overloaded ({offered_text}{served_text})"


def stopped_early_note(attrs: dict[str, Any]) -> str:
    stop = attrs.get("stopped_early")
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
        return [str(attrs.get("fail_reason") or "failed")]
    if attrs.get("infeasible_reason"):
        notes.append(str(attrs["infeasible_reason"]))
    elif attrs.get("outcome") == "ok":
        notes += broken_constraints(attrs.get("metrics") or {}, constraints)
    notes += [n for n in (overload_note(attrs), stopped_early_note(attrs)) if n]
    return notes


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


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
                   constraints: Sequence[dict[str, Any]] | None = None) -> None:
        self.estimator.add(wall_s, phase_durations(self._current_records, self._ended or time.time()))
        self._current_records = []
        if self.quiet:
            return
        constraints = study.user_attrs.get("constraints") or [] if constraints is None else constraints
        params = " ".join(f"{k}={_fmt_param(v)}" for k, v in trial.params.items())
        head = f"[{done}/{self.total}] trial {trial.number}{' (baseline)' if trial.user_attrs.get('baseline') else ''}"
        notes = trial_notes(trial, constraints)
        if trial.state == TrialState.FAIL:
            verdict = f"FAIL: {detail or '; '.join(notes)}"
        elif is_feasible(trial):
            verdict = "feasible" + (f" ({'; '.join(notes)})" if notes else "")
        else:
            verdict = "INFEASIBLE: " + "; ".join(notes or [detail or "constraint violated"])
        self.say(f"{head} ({params}) in {_fmt_duration(wall_s)}: {verdict}")
        metrics = trial.user_attrs.get("metrics") or {}
        if trial.user_attrs.get("outcome") == "ok" and metrics:
            self.say("        " + " ".join(f"{n}={_fmt_value(float(metrics[n]))}" for n in metric_names
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


# ---------------------------------------------------------------- the last lines


def _baseline(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The measured baseline (its retry, if the first attempt failed)."""
    measured = [t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE
                and t.user_attrs.get("outcome") == "ok"]
    return measured[0] if measured else None


def change_pct(value: float, base: float | None) -> float | None:
    return None if base in (None, 0) else 100.0 * (value - base) / abs(base)


def _fmt_change(value: float, base: float | None) -> str:
    pct = change_pct(value, base)
    return "" if pct is None else f" ({pct:+.0f}% vs baseline)"


def recommended(study: optuna.Study, metric_names: list[str]) -> list[tuple[str, FrozenTrial]]:
    """The feasible Pareto trial best at each objective (deduplicated), labelled by what it wins."""
    try:
        pareto = study.best_trials
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
                  and (v := (t.user_attrs.get("metrics") or {}).get("request_throughput_rps")) is not None]
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
            if broken_constraints(t.user_attrs.get("metrics") or {}, [c]):
                counts[c["metric"]] += 1
    return [m for m, _ in counts.most_common()]


def _worst_miss(metric: str, measured: list[FrozenTrial], constraint: dict[str, Any]) -> str:
    """The closest any trial came to the bound, and by how much it missed."""
    values = [float(v) for t in measured if (v := (t.user_attrs.get("metrics") or {}).get(metric)) is not None]
    if not values:
        return "never measured"
    bound = float(constraint["max"] if constraint.get("max") is not None else constraint["min"])
    closest = min(values) if constraint.get("max") is not None else max(values)
    side = ">" if constraint.get("max") is not None else "<"
    miss = change_pct(closest, bound)
    return (f"best {metric} = {_fmt_value(closest)} {side} {_fmt_value(bound)}"
            + (f" ({abs(miss):.0f}% beyond the bound)" if miss is not None else ""))


def final_lines(study: optuna.Study, space: Any, storage_url: str) -> list[str]:
    """What to take away: recommended configurations, or why there are none and what to change."""
    names = [o.metric for o in space.objectives]
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    base = _baseline(trials)
    base_metrics = base.user_attrs.get("metrics") or {} if base is not None else {}
    storage_flag = f" --storage {storage_url}"
    picks = recommended(study, names)
    lines: list[str] = []
    if picks:
        lines.append(f"recommended configuration{'s' if len(picks) > 1 else ''} (feasible Pareto set):")
        for label, t in picks:
            knobs = " ".join(f"{k}={_fmt_param(v)}" for k, v in t.params.items()) or "(defaults)"
            lines.append(f"  trial {t.number} [{label}]: {knobs}")
            metrics = t.user_attrs.get("metrics") or {}
            lines.append("      " + ", ".join(
                f"{n} {_fmt_value(float(metrics[n]))}{_fmt_change(float(metrics[n]), base_metrics.get(n))}"
                for n in names if metrics.get(n) is not None))
            caveats = [n for n in (overload_note(t.user_attrs), stopped_early_note(t.user_attrs)) if n]
            if caveats:
                lines.append(f"      caution: {'; '.join(caveats)}")
        if base is None:
            lines.append("  (no measured baseline: changes vs baseline unavailable)")
        elif not is_feasible(base):
            lines.append(f"  (baseline trial {base.number} was measured but infeasible: "
                         f"{'; '.join(trial_notes(base, study.user_attrs.get('constraints') or []))})")
    elif finished:
        lines += no_feasible_lines(study, space, finished)
    lines.append(f"open the report:    autoglm-tune report --study {space.study}{storage_flag}")
    lines.append(f"open the dashboard: autoglm-tune dashboard{storage_flag}")
    return lines


def no_feasible_lines(study: optuna.Study, space: Any, finished: list[FrozenTrial]) -> list[str]:
    constraints = study.user_attrs.get("constraints") or []
    measured = [t for t in finished if t.state == TrialState.COMPLETE and t.user_attrs.get("outcome") == "ok"]
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
        broke = sum(1 for t in measured if broken_constraints(t.user_attrs.get("metrics") or {}, [constraint]))
        lines.append(f"most often broken: {metric} in {broke} of {len(measured)} "
                     f"({_worst_miss(metric, measured, constraint)})")
        overloaded = sum(1 for t in measured if overload_note(t.user_attrs))
        if overloaded:
            lines.append(f"{overloaded} of {len(measured)} measured trial(s) were overloaded "
                         f"(served fewer requests per second than offered)")
        lines.append(f"hint: {_hint(metric, space, measured)}")
    return lines
