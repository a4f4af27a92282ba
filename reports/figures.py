"""Plotly figures shared by `app.py` and `autoglm-tune report` (one code path per figure).

Contract for every figure here (add new ones the same way, e.g. a regression history trend):
a plain function that takes frames or a study and returns a `go.Figure`, or raises
`NoFigure(message)` saying in one sentence why there is nothing to draw. The app shows the
message in place of the chart; the HTML report prints it.

Optuna's own visualisations are used where they exist (hypervolume history, importances,
parallel coordinates); the Pareto chart is drawn here because it must show the baseline,
infeasibility reasons and trial numbers for selection, which Optuna's plot does not.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import optuna
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from reports.frames import DOMINATED, INFEASIBLE, PARETO, metric_label, objectives, param_columns
from tuner import record

# Distinct by colour *and* symbol, so the classes survive greyscale printing.
CATEGORY_STYLE: dict[str, dict[str, object]] = {
    INFEASIBLE: {"color": "#9e9e9e", "symbol": "x", "size": 9, "opacity": 0.8},
    DOMINATED: {"color": "#4c78a8", "symbol": "circle", "size": 9, "opacity": 0.75},
    PARETO: {"color": "#e45756", "symbol": "diamond", "size": 13, "opacity": 1.0},
}
# An open symbol draws its outline in `color`: a dark ring around whatever class the baseline has.
BASELINE_STYLE: dict[str, object] = {"color": "#222222", "symbol": "star-open", "size": 22, "line": {"width": 2}}
LATENCY_COLUMNS = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "latency_ms": "end-to-end"}
# Timeline columns grouped by unit suffix, so memory, power and utilisation get their own axes.
TIMELINE_GROUPS = {"_mib": "memory (MiB)", "_w": "power (W)", "_pct": "utilisation (%)",
                   "_mhz": "clock (MHz)", "_c": "temperature (°C)"}


# The in-memory copies below would each log "A new study created in memory" at INFO.
optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide warnings that only add noise here: Optuna's "experimental" notes on the hypervolume
    plot and set_metric_names, and PED-ANOVA's "low target" note (maximised targets are flipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes the importances")
        yield


class NoFigure(Exception):
    """There is nothing honest to draw; the message says why (shown instead of the figure)."""


# ---------------------------------------------------------------- Pareto front


def _axis_title(metric: str, directions: dict[str, str]) -> str:
    """`throughput (tok/s) ↑ better`: the unit, and which way is better for an objective."""
    direction = directions.get(metric)
    label = metric_label(metric)
    return f"{label} {'↑' if direction == 'maximize' else '↓'} better" if direction else label


def wrap(text: str, width: int = 110, max_lines: int = 3) -> str:
    """Plotly titles do not wrap: break at words with <br> so a subtitle stays on the page."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return "<br>".join(lines)


def _hover(frame: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    params = param_columns(frame)
    texts = []
    for _, row in frame.iterrows():
        lines = [f"<b>trial #{row['number']}</b> ({row['category']}{', baseline' if row['baseline'] else ''})"]
        lines += [f"{a} = {row[a]:.4g}" for a in axes]
        lines += [f"{p.removeprefix('param_')} = {row[p]}" for p in params if pd.notna(row[p])]
        if row["reason"]:
            lines.append(f"<i>{row['reason']}</i>")
        texts.append("<br>".join(lines))
    return texts


def _scatter(frame: pd.DataFrame, axes: Sequence[str], name: str, marker: dict[str, object]) -> go.BaseTraceType:
    common = {"mode": "markers", "name": name, "customdata": frame["number"].tolist(),
              "text": _hover(frame, axes), "hovertemplate": "%{text}<extra></extra>", "marker": marker}
    if len(axes) == 3:
        return go.Scatter3d(x=frame[axes[0]], y=frame[axes[1]], z=frame[axes[2]], **common)
    return go.Scatter(x=frame[axes[0]], y=frame[axes[1]], **common)


def _unplotted_note(frame: pd.DataFrame, plotted: pd.DataFrame) -> str:
    missing = frame[~frame["number"].isin(plotted["number"]) & (frame["state"] == "COMPLETE")]
    if missing.empty:
        return ""
    shown = "; ".join(f"#{n}: {r or 'not measured'}" for n, r in list(zip(missing["number"], missing["reason"], strict=True))[:4])
    return f"{len(missing)} completed trial(s) not measured on these axes ({shown})"


# Values spread over more than this factor read better on a log axis (one outlier would
# otherwise squeeze every other point into a pixel).
LOG_SPREAD = 20.0


def suggest_log(values: pd.Series) -> bool:
    """A log axis by default when every value is positive and they span more than LOG_SPREAD x."""
    finite = pd.to_numeric(values, errors="coerce").dropna()
    finite = finite[finite.map(math.isfinite)]
    return bool(len(finite) > 1 and (finite > 0).all() and finite.max() / finite.min() > LOG_SPREAD)


def pareto_figure(frame: pd.DataFrame, axes: Sequence[str], directions: dict[str, str],
                  title: str = "Pareto front", log_axes: Sequence[bool] | None = None) -> go.Figure:
    """Trials on 2 or 3 metric axes: feasible Pareto / dominated / infeasible / baseline.

    Pareto membership comes from `study.best_trials` (all objectives), so on a 2-D view of a
    3-objective study a Pareto point may look dominated: it wins on the hidden objective.
    Each point's `customdata` is its trial number (what a chart selection returns).
    `log_axes`: per axis, log (True) or linear; default: `suggest_log` of the axis's values.
    """
    if len(axes) not in (2, 3) or len(set(axes)) != len(axes):
        raise NoFigure("pick 2 or 3 different metrics for the Pareto axes")
    missing = [a for a in axes if a not in frame.columns]
    if frame.empty or missing:
        raise NoFigure(f"no completed trial measured {', '.join(missing) or 'anything'} yet")
    measured = frame.dropna(subset=list(axes))
    measured = measured[measured[list(axes)].map(math.isfinite).all(axis=1)]
    measured = measured[measured["category"].isin(CATEGORY_STYLE)]
    if measured.empty:
        raise NoFigure("no completed trial has measured values on these axes yet")
    fig = go.Figure()
    for category, style in CATEGORY_STYLE.items():
        part = measured[measured["category"] == category]
        if not part.empty:
            fig.add_trace(_scatter(part, axes, f"{category} ({len(part)})", dict(style)))
    baseline = measured[measured["baseline"].astype(bool)]
    if not baseline.empty:
        # Scatter3d has no star symbol: an open square ring marks the baseline there.
        style = dict(BASELINE_STYLE, symbol="square-open", size=14) if len(axes) == 3 else dict(BASELINE_STYLE)
        fig.add_trace(_scatter(baseline, axes, "baseline", style))
    note = _unplotted_note(frame, measured)
    logs = list(log_axes) if log_axes is not None else [suggest_log(measured[a]) for a in axes]
    # A log axis cannot show zero or negative values: those axes stay linear.
    logs = [bool(log) and bool((measured[a] > 0).all()) for a, log in zip(axes, logs, strict=True)]
    titles = {k: _axis_title(a, directions) for k, a in zip(("xaxis", "yaxis", "zaxis"), axes, strict=False)}
    types = {k: "log" if log else "linear" for k, log in zip(("xaxis", "yaxis", "zaxis"), logs, strict=False)}
    if len(axes) == 3:
        fig.update_layout(scene={k: {"title": titles[k], "type": types[k]} for k in titles})
    else:
        fig.update_layout(xaxis={"title": titles["xaxis"], "type": types["xaxis"]},
                          yaxis={"title": titles["yaxis"], "type": types["yaxis"]})
    note = wrap(note)
    top = 50 + 18 * (note.count("<br>") + 1) if note else 50
    fig.update_layout(title={"text": title, "subtitle": {"text": note}} if note else title,
                      legend={"orientation": "h", "y": -0.2}, clickmode="event+select", autosize=True,
                      # A click picks the point nearest the pointer, within a marker's radius.
                      hovermode="closest", hoverdistance=12,
                      margin={"t": top, "l": 10 if len(axes) == 3 else 60, "r": 10, "b": 10 if len(axes) == 3 else 60},
                      height=(640 if len(axes) == 3 else 480) + top - 50)
    if len(axes) == 3:
        # A cube seen from a corner fills the frame; Plotly's default eye clips the axis titles.
        fig.update_layout(scene={"aspectmode": "cube", "camera": {"eye": {"x": 1.6, "y": 1.6, "z": 1.1}}},
                          legend={"orientation": "h", "y": 0.0})
    return fig


def study_compare_figure(frames: dict[str, pd.DataFrame], axes: Sequence[str], directions: dict[str, str]) -> go.Figure:
    """Two or more studies (e.g. two GPUs or two nights) on the same metric axes."""
    parts = [f.assign(study=name) for name, f in frames.items() if all(a in f.columns for a in axes)]
    if len(parts) < 2:
        raise NoFigure(f"both studies need measured {', '.join(axes)} to be compared")
    data = pd.concat(parts, ignore_index=True).dropna(subset=list(axes))
    data = data[data["category"].isin(CATEGORY_STYLE)]
    if data.empty:
        raise NoFigure("neither study has completed trials on these axes")
    data["class"] = data["category"]
    fig = px.scatter(data, x=axes[0], y=axes[1], color="study", symbol="class",
                     hover_data=["number", "reason"], title="Studies compared",
                     symbol_map={k: str(v["symbol"]) for k, v in CATEGORY_STYLE.items()})
    fig.update_layout(xaxis_title=_axis_title(axes[0], directions), yaxis_title=_axis_title(axes[1], directions))
    return fig


# ---------------------------------------------------------------- search diagnostics (Optuna)


def measured_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy holding only COMPLETE trials with finite objective values.

    Infeasible trials carry ±inf as values (so nothing ranks them best); a measured one gets
    its measured values back from `metrics`, an unrunnable one is left out. The copy never touches the
    real storage.
    """
    copy = optuna.create_study(directions=study.directions)
    with _quiet():
        copy.set_metric_names([o.metric for o in objectives(study)])
    names = [o.metric for o in objectives(study)]
    trials = [_measured_values(t, names) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    copy.add_trials([t for t in trials if t.values and all(math.isfinite(v) for v in t.values)])
    return copy


def _measured_values(trial: optuna.trial.FrozenTrial, names: list[str]) -> optuna.trial.FrozenTrial:
    """The trial with its measured objective values (a bound-breaking trial is told the worst)."""
    metrics = record.metrics(trial)
    if record.OUTCOME.get(trial) == "ok" and names and all(metrics.get(n) is not None for n in names):
        trial.values = [float(metrics[n]) for n in names]
    return trial


def reference_point(study: optuna.Study) -> list[float]:
    """Hypervolume reference: each objective's worst feasible value, pushed 10 % further out."""
    feasible = [t.values for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if all(c <= 0 for c in t.constraints.values()) and all(math.isfinite(v) for v in t.values)]
    if not feasible:
        raise NoFigure("no feasible completed trial yet, so there is no hypervolume")
    point = []
    for i, o in enumerate(objectives(study)):
        values = [v[i] for v in feasible]
        worst = min(values) if o.direction == "maximize" else max(values)
        span = (max(values) - min(values)) or abs(worst) or 1.0
        point.append(worst - 0.1 * span if o.direction == "maximize" else worst + 0.1 * span)
    return point


def hypervolume_figure(study: optuna.Study) -> go.Figure:
    if len(study.directions) < 2:
        raise NoFigure("hypervolume needs a multi-objective study")
    point = reference_point(study)
    with _quiet():
        fig = optuna.visualization.plot_hypervolume_history(study, reference_point=point)
    ref = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(objectives(study), point, strict=True))
    fig.update_layout(title={"text": "Hypervolume history (feasible trials)", "subtitle": {"text": f"reference point {ref}"}})
    return fig


def _target(study: optuna.Study, metric: str) -> int:
    names = [o.metric for o in objectives(study)]
    if metric not in names:
        raise NoFigure(f"{metric} is not an objective of this study")
    return names.index(metric)


# PED-ANOVA contrasts the top trials with the rest: with fewer than this the ranking is noise.
MIN_IMPORTANCE_TRIALS = 8


def importance_figure(study: optuna.Study, metric: str) -> go.Figure:
    """Optuna's parameter importances (PED-ANOVA) for one objective."""
    index = _target(study, metric)
    measured = measured_study(study)
    n = len(measured.trials)
    if n < MIN_IMPORTANCE_TRIALS:
        raise NoFigure(f"importances need at least {MIN_IMPORTANCE_TRIALS} measured trials; this study has {n}")
    # PED-ANOVA explains what drives a target *low*; flip maximised objectives so the
    # importances answer "what makes this objective good".
    sign = -1.0 if measured.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    try:
        with _quiet():
            fig = optuna.visualization.plot_param_importances(measured, target=lambda t: sign * t.values[index],
                                                              target_name=metric)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        raise NoFigure(f"importances for {metric} cannot be estimated yet: {exc}") from exc
    if not fig.data or not len(fig.data[0].x or []):
        raise NoFigure(f"importances for {metric}: no parameter varied across the measured trials")
    fig.update_layout(title=f"Importances: {metric}")
    return fig


def parallel_figure(study: optuna.Study, metric: str) -> go.Figure:
    """Optuna's parallel coordinates of the params, coloured by one objective."""
    index = _target(study, metric)
    measured = measured_study(study)
    if not measured.trials:
        raise NoFigure("no measured trial yet")
    if not any(t.params for t in measured.trials):
        raise NoFigure("the study has no searched parameters")
    fig = optuna.visualization.plot_parallel_coordinate(measured, target=lambda t: t.values[index],
                                                        target_name=metric)
    _viridis_best_on_top(fig, measured.directions[index] == optuna.study.StudyDirection.MAXIMIZE)
    fig.update_layout(title=f"Parallel coordinates, coloured by {metric_label(metric)} (bright = best)")
    return fig


def _viridis_best_on_top(fig: go.Figure, better_high: bool) -> None:
    """Recolour Optuna's white-to-blue lines with Viridis (best = bright yellow) and draw the best last.

    Optuna draws one line trace per trial; its first y is the objective, normalised to 0..1.
    """
    def is_trial(trace: go.Scatter) -> bool:  # the feasibility legend entries have no data
        return trace.mode == "lines" and trace.y is not None and len(trace.y) > 0 and trace.y[0] is not None

    lines = [t for t in fig.data if is_trial(t)]
    others = [t for t in fig.data if not is_trial(t)]

    def goodness(trace: go.Scatter) -> float:
        return trace.y[0] if better_high else 1.0 - trace.y[0]

    lines.sort(key=goodness)
    for trace in lines:
        trace.line.color = px.colors.sample_colorscale("Viridis", [goodness(trace)])[0]
        trace.line.width = 1.6
        trace.opacity = 0.85
    for trace in others:
        if trace.marker is not None and trace.marker.colorscale is not None:
            trace.marker.colorscale = "Viridis"
            trace.marker.reversescale = not better_high
    fig.data = tuple(lines + others)


# ---------------------------------------------------------------- one trial's evidence


def _latency_long(requests: pd.DataFrame) -> pd.DataFrame:
    present = [c for c in LATENCY_COLUMNS if c in requests.columns]
    if requests.empty or not present:
        raise NoFigure("no per-request samples recorded for this trial")
    if "trial" not in requests.columns:
        requests = requests.assign(trial="trial")
    long = requests.melt(id_vars=["trial"], value_vars=present, var_name="metric", value_name="ms")
    long["ms"] = pd.to_numeric(long["ms"], errors="coerce")
    long = long.dropna(subset=["ms"])
    long["metric"] = long["metric"].map(LATENCY_COLUMNS)
    return long


def latency_figure(requests: pd.DataFrame, kind: str = "cdf") -> go.Figure:
    """TTFT / TPOT / end-to-end per request, as CDFs or histograms, one colour per trial."""
    long = _latency_long(requests)
    common = {"x": "ms", "color": "trial", "facet_col": "metric", "facet_col_spacing": 0.06}
    if kind == "cdf":
        fig = px.ecdf(long, markers=len(long) < 200, **common)
    else:
        fig = px.histogram(long, barmode="overlay", opacity=0.6, nbins=30, **common)
    fig.update_xaxes(matches=None, title_text="ms")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_layout(title=f"Per-request latency ({'CDF' if kind == 'cdf' else 'histogram'}, {len(requests)} requests)")
    return fig


def _timeline_long(timeline: pd.DataFrame) -> pd.DataFrame:
    if timeline.empty or "t_s" not in timeline.columns:
        raise NoFigure("no resource timeline recorded for this trial")
    if "trial" not in timeline.columns:
        timeline = timeline.assign(trial="trial")
    columns = [c for c in timeline.columns if any(c.endswith(s) for s in TIMELINE_GROUPS)]
    if not columns:
        raise NoFigure("the timeline has no memory, power or utilisation columns")
    long = timeline.melt(id_vars=["trial", "t_s"], value_vars=columns, var_name="series", value_name="value")
    long = long.dropna(subset=["value"])
    long["group"] = long["series"].map(lambda c: next(g for s, g in TIMELINE_GROUPS.items() if c.endswith(s)))
    return long


def timeline_figure(timeline: pd.DataFrame) -> go.Figure:
    """Resource samples over the trial (process RSS on CPU; NVML memory, power, utilisation on GPU)."""
    long = _timeline_long(timeline)
    several = long["trial"].nunique() > 1
    fig = px.line(long, x="t_s", y="value", color="series", facet_row="group",
                  line_dash="trial" if several else None, title="Resource timeline",
                  height=220 * long["group"].nunique() + 80)
    fig.update_yaxes(matches=None, title_text="")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_xaxes(title_text="s since the window opened")
    return fig


def objective_directions(study: optuna.Study) -> dict[str, str]:
    return {o.metric: o.direction for o in objectives(study)}

