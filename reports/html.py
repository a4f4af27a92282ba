"""A self-contained HTML report: Optuna's Pareto-front plot plus the Pareto table."""

from __future__ import annotations

import html
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go


def pareto_figure(study: optuna.Study) -> go.Figure | None:
    """Optuna's Pareto plot (2-D or 3-D by objective count), infeasible trials included."""
    metric_names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    n = len(study.directions)
    if n < 2 or n > 3 or not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None
    return optuna.visualization.plot_pareto_front(study, target_names=metric_names,
                                                  include_dominated_trials=True)


def write_report(study: optuna.Study, trials: pd.DataFrame, pareto: pd.DataFrame, path: Path) -> None:
    figure = pareto_figure(study)
    plot = (figure.to_html(full_html=False, include_plotlyjs=True) if figure is not None
            else "<p>No Pareto plot: the study needs 2 or 3 objectives and a completed trial.</p>")
    states = trials["state"].value_counts().to_dict() if len(trials) else {}
    body = f"""<!doctype html><html><head><meta charset="utf-8">
<title>autoglm-tune report: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{len(trials)} trials ({html.escape(', '.join(f'{k}: {v}' for k, v in states.items()))});
{len(pareto)} on the feasible Pareto front. Objectives: {html.escape(', '.join(study.metric_names or []))}.</p>
<h2>Pareto front</h2>{plot}
<h2>Feasible Pareto set</h2>{pareto.to_html(index=False, na_rep="")}
</body></html>"""
    path.write_text(body, encoding="utf-8")
