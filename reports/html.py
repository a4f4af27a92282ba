"""A self-contained HTML report: the app's Pareto, hypervolume and importance figures plus the
Pareto table, with plotly.js inlined once so the file opens offline."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
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
from reports.frames import best_per_objective, metric_columns, objectives, param_columns, study_summary


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
        sections.append(f"<h3>{html.escape(title)}</h3>"
                        + figure.to_html(full_html=False, include_plotlyjs=not plotlyjs_done))
        plotlyjs_done = True
    return "\n".join(sections)


def _pareto_table(study: optuna.Study, pareto: pd.DataFrame) -> str:
    if pareto.empty:
        return "<p>No feasible completed trial yet.</p>"
    names = [o.metric for o in objectives(study)]
    columns = ["number", "baseline", *names, *[c for c in metric_columns(pareto) if c not in names],
               *param_columns(pareto)]
    return pareto[[c for c in columns if c in pareto.columns]].to_html(index=False, na_rep="", float_format="%.4g")


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
    best = best_per_objective(trials, objectives(study))
    states = ", ".join(f"{k}: {v}" for k, v in summary["states"].items()) or "no trials"
    devices = "; ".join(", ".join(f"{k}={v}" for k, v in d.items() if v) for d in summary["devices"]) or "unknown"
    body = f"""<!doctype html><html><head><meta charset="utf-8">
<title>autoglm-tune report: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} .nofigure{{color:#666;font-style:italic}}</style></head><body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{len(trials)} trials ({html.escape(states)}); {len(pareto)} on the feasible Pareto front.
Objectives: {html.escape(', '.join(f"{o['metric']} ({o['direction']})" for o in summary['objectives']))}.
Device: {html.escape(devices)}. Space: {html.escape(str(summary['space_source'] or 'unknown'))}.</p>
<p>{html.escape(drift_sentence(summary))}</p>
<h2>Best per objective (feasible) vs baseline</h2>{best.to_html(index=False, na_rep="", float_format="%.4g")}
<h2>Figures</h2>
{_figure_sections(study, trials)}
<h2>Feasible Pareto set</h2>{_pareto_table(study, pareto)}
</body></html>"""
    Path(path).write_text(body, encoding="utf-8")
