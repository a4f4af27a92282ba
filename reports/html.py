"""A self-contained HTML report: what to run (the recommended configurations) first, then the
app's Pareto, hypervolume and importance figures and the trial tables, with plotly.js inlined
once so the file opens offline. Laid out for a 1280 px window (tests/test_browser.py)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go

from reports.figures import (
    NoFigure,
    hypervolume_figure,
    importance_figure,
    objective_directions,
    pareto_figure,
)
from reports.frames import (
    baseline_status,
    best_per_objective,
    metric_label,
    objectives,
    ordered_columns,
    param_columns,
    study_summary,
)
from tuner.final import no_feasible_lines, recommended
from tuner.front_gaps import front_gaps, gap_lines
from tuner.front_noise import noise_fronts, noise_lines
from tuner.notes import change_pct
from tuner.space import Objective

STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1240px;padding:0 12px}
table{border-collapse:collapse;font-size:12px;margin-bottom:1em} td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3} .nofigure{color:#666;font-style:italic} .better{color:#1a7f37} .worse{color:#b3261e}
.recommended{background:#eef6ee;border:1px solid #9c9;padding:.5em 1em;border-radius:6px}
.scroll{overflow-x:auto;max-width:100%} .plotly-graph-div{max-width:100%}"""


def pareto_figures(study: optuna.Study, trials: pd.DataFrame) -> list[tuple[str, Callable[[], go.Figure]]]:
    """The Pareto views a reader needs: all objectives at once (2-D or 3-D), then each pair."""
    names = [o.metric for o in objectives(study)]
    directions = objective_directions(study)
    views: list[tuple[str, Callable[[], go.Figure]]] = []
    if len(names) in (2, 3):
        views.append((" vs ".join(names), lambda: pareto_figure(trials, names, directions)))
    if len(names) == 3:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                views.append((f"{a} vs {b}", lambda a=a, b=b: pareto_figure(trials, [a, b], directions,
                                                                             title=f"Pareto front: {a} vs {b}")))
    return views


def report_figures(study: optuna.Study, trials: pd.DataFrame) -> list[tuple[str, Callable[[], go.Figure]]]:
    views = pareto_figures(study, trials)
    views.append(("Hypervolume history", lambda: hypervolume_figure(study)))
    for o in objectives(study):
        views.append((f"Importances: {o.metric}", lambda m=o.metric: importance_figure(study, m)))
    return views


def _figure_sections(study: optuna.Study, trials: pd.DataFrame) -> str:
    sections, plotlyjs_done = [], False
    for title, build in report_figures(study, trials):
        try:
            figure = build()
        except NoFigure as why:
            sections.append(f"<h3>{html.escape(title)}</h3><p class='nofigure'>{html.escape(str(why))}</p>")
            continue
        # Inline plotly.js with the first figure only: self-contained without repeating 4 MB.
        # Responsive, full width: a figure follows the page instead of a fixed 700 px or clipping.
        figure.update_layout(width=None)
        sections.append(f"<h3>{html.escape(title)}</h3>"
                        + figure.to_html(full_html=False, include_plotlyjs=not plotlyjs_done,
                                         default_width="100%", config={"responsive": True}))
        plotlyjs_done = True
    return "\n".join(sections)


def _pct_cell(pct: float | None, direction: str) -> str:
    if pct is None or pd.isna(pct):
        return ""
    better = pct > 0 if direction == "maximize" else pct < 0
    return f"<span class='{'better' if better else 'worse'}'>{pct:+.1f}%</span>"


def _baseline_values(trials: pd.DataFrame) -> dict[str, float]:
    rows = trials[trials["baseline"].astype(bool) & (trials["outcome"] == "ok") & (trials["state"] == "COMPLETE")]
    return {} if rows.empty else {k: v for k, v in rows.iloc[0].items() if isinstance(v, (int, float))}


def _table(frame: pd.DataFrame) -> str:
    return "<div class='scroll'>" + frame.to_html(index=False, na_rep="", float_format="%.4g", escape=False) + "</div>"


def _with_changes(frame: pd.DataFrame, objs: list[Objective], base: dict[str, float]) -> pd.DataFrame:
    """Each objective followed by its signed change vs the measured baseline."""
    out = frame.copy()
    for o in objs:
        if o.metric in out and o.metric in base:
            column = out.columns.get_loc(o.metric) + 1
            out.insert(column, f"{o.metric} vs baseline",
                       [_pct_cell(change_pct(v, base[o.metric]) if pd.notna(v) else None, o.direction)
                        for v in out[o.metric]])
    return out


def _study_space(study: optuna.Study) -> Any:
    """What the hint needs (workload, study name): the stored space, else a blank one."""
    from tuner.errors import UsageError
    from tuner.space import SpaceError
    from tuner.study import space_from_study

    try:
        return space_from_study(study)
    except (UsageError, SpaceError, KeyError, TypeError, ValueError):
        return SimpleNamespace(workload={}, study=study.study_name, objectives=objectives(study))


def _recommended_section(study: optuna.Study, trials: pd.DataFrame) -> str:
    objs = objectives(study)
    picks = recommended(study, [o.metric for o in objs])
    if not picks:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        lines = no_feasible_lines(study, _study_space(study), finished) if finished else ["no trial finished yet"]
        return "<div class='recommended'><p>" + "<br>".join(html.escape(line) for line in lines) + "</p></div>"
    numbers = {t.number: label for label, t in picks}
    rows = trials[trials["number"].isin(numbers)].copy()
    rows.insert(1, "recommended for", [numbers[n] for n in rows["number"]])
    columns = ["number", "recommended for", *param_columns(rows), *[o.metric for o in objs if o.metric in rows]]
    table = _with_changes(rows[columns], objs, _baseline_values(trials))
    status = baseline_status(trials)
    note = "" if status == "measured" else f"<p>Baseline: {html.escape(status)}.</p>"
    return f"<div class='recommended'>{_table(table.rename(columns=_param_label))}{note}</div>"


def _param_label(column: str) -> str:
    return column.removeprefix("param_")


def _best_table(trials: pd.DataFrame, objs: list[Objective]) -> str:
    best = best_per_objective(trials, objs)
    best["objective"] = [metric_label(m) for m in best["objective"]]
    best["vs baseline"] = [_pct_cell(p, d) for p, d in zip(best.pop("best_vs_baseline_pct"), best["direction"],
                                                         strict=True)]
    return _table(best)


def _pareto_table(study: optuna.Study, pareto: pd.DataFrame, trials: pd.DataFrame) -> str:
    if pareto.empty:
        return "<p>No feasible completed trial yet.</p>"
    objs = objectives(study)
    frame = ordered_columns(pareto, objs)
    frame = frame[[c for c in frame.columns if c not in ("category", "feasible", "reason", "state", "pareto")]]
    return _table(_with_changes(frame, objs, _baseline_values(trials)).rename(columns=_param_label))


def _front_gaps_section(study: optuna.Study, pareto: pd.DataFrame) -> str:
    """Why each searched knob value that ran is absent from the front (`tuner.front_gaps`)."""
    if pareto.empty:
        return "<p>No feasible front yet, so nothing to compare with.</p>"
    params = getattr(_study_space(study), "params", None)
    lines = gap_lines(front_gaps(study, params))
    noise = noise_lines(noise_fronts(study, params))
    section = ("<p>Every value of every searched knob that ran has a trial on the front.</p>" if not lines else
               "<ul class='gaps'>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    if noise:  # on the front, but only by margins a recorded 95 % CI holds (tuner.front_noise.noise_fronts)
        section += ("<p>On the front only within measurement noise (each win lies inside a 95 % CI; "
                    "another front trial is better beyond it):</p><ul class='gaps'>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in noise) + "</ul>")
    return section


def _trials_table(study: optuna.Study, trials: pd.DataFrame) -> str:
    """Every trial: knobs, objectives, and why it is not feasible (bounds, overload, early stop)."""
    if trials.empty:
        return "<p>No trials yet.</p>"
    objs = objectives(study)
    columns = ["number", "category", "baseline", *param_columns(trials),
               *[o.metric for o in objs if o.metric in trials], "reason", "overloaded", "stopped_early", "wall_s"]
    return _table(trials[[c for c in columns if c in trials]].rename(columns=_param_label))


def drift_sentence(summary: dict[str, Any]) -> str:
    """The baseline re-measurement in words: how far the first figures can be trusted."""
    checks = [c for c in summary.get("drift_checks", []) if "ratio" in c]
    if summary.get("drift") is None or not checks:
        return "Drift: the baseline was not measured again (no drift figure)."
    ratios = ", ".join(f"{c['ratio']:.3f} after {c['after_trials']} trials" for c in checks)
    return (f"Drift: baseline throughput re-measured / first = {summary['drift']:.3f} "
            f"({ratios}); 1.0 means the machine and the first measurement agree.")


def write_report(study: optuna.Study, trials: pd.DataFrame, pareto: pd.DataFrame, path: Path) -> None:
    summary = study_summary(study)
    objs = objectives(study)
    states = ", ".join(f"{k}: {v}" for k, v in summary["states"].items()) or "no trials"
    devices = "; ".join(", ".join(f"{k}={v}" for k, v in d.items() if v) for d in summary["devices"]) or "unknown"
    body = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoglm-tune report: {html.escape(study.study_name)}</title>
<style>{STYLE}</style></head><body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{len(trials)} trials ({html.escape(states)}); {len(pareto)} on the feasible Pareto front.
Objectives: {html.escape(', '.join(f"{metric_label(o.metric)} ({o.direction})" for o in objs))}.
Device: {html.escape(devices)}. Space: {html.escape(str(summary['space_source'] or 'unknown'))}.</p>
<h2>Recommended configurations</h2>
{_recommended_section(study, trials)}
<h2>Best per objective (feasible) vs baseline</h2>{_best_table(trials, objs)}
<p>{html.escape(drift_sentence(summary))}</p>
<h2>Figures</h2>
{_figure_sections(study, trials)}
<h2>Feasible Pareto set</h2>{_pareto_table(study, pareto, trials)}
<h2>Knob values not on the front</h2>{_front_gaps_section(study, pareto)}
<h2>All trials</h2>{_trials_table(study, trials)}
</body></html>"""
    Path(path).write_text(body, encoding="utf-8")
