"""The nightly regression history drawn for the dashboard; the rule itself is `tuner.regress.rule`."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from tuner.regress.rule import MEASURED


def history_figure(history: pd.DataFrame, config: str | None = None) -> go.Figure:
    """History trend for the dashboard: now / reference per night, one panel per metric.

    Lines are configs; flagged nights are marked. A ratio of 1 is the reference, so metrics with
    different units share an axis.
    """
    frame = history[history["metric"] != MEASURED].copy() if len(history) else history
    if config is not None and len(frame):
        frame = frame[frame["config"] == config]
    if frame is None or frame.empty:
        return go.Figure().update_layout(title="No regression history yet")
    frame["night"] = pd.to_datetime(frame["night"], utc=True, format="ISO8601")
    frame = frame.sort_values("night")
    fig = px.line(frame, x="night", y="ratio", color="config", facet_row="metric", markers=True,
                  hover_data=["now", "reference", "verdict", "p_value", "z"],
                  title="Nightly re-measurements: median ÷ reference",
                  height=max(300, 220 * frame["metric"].nunique()))
    flagged = frame[frame["verdict"].isin(("regression", "suspect"))]
    metrics = list(dict.fromkeys(frame["metric"]))
    for row, metric in enumerate(metrics):
        bad = flagged[flagged["metric"] == metric]
        if len(bad):
            # px numbers facet rows from the bottom up.
            fig.add_trace(go.Scatter(x=bad["night"], y=bad["ratio"], mode="markers", name=f"flagged {metric}",
                                     marker={"symbol": "x", "size": 12, "color": "red"}, text=bad["reason"]),
                          row=len(metrics) - row, col=1)
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_yaxes(matches=None, title_text="")
    return fig
