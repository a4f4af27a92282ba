"""The first tab: the Pareto chart and the trial table, their filters and selections."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from reports import figures as figs
from reports import frames as fr
from tuner.space import Objective
from ui.data import draw


def pareto_axes(objs: list[Objective], frame: pd.DataFrame, name: str) -> list[str]:
    names = [o.metric for o in objs]
    choices = names + [m for m in fr.metric_columns(frame) if m not in names]
    if len(choices) < 2:
        return choices
    three = len(names) == 3 and st.toggle("3-D (all three objectives)", key="pareto_3d")
    if three:
        return names
    left, right = st.columns(2)
    # Keys per study: another study's metrics are other options, and stale picks must not leak.
    x = left.selectbox("x axis", choices, index=0, key=f"pareto_x_{name}")
    y = right.selectbox("y axis", choices, index=1, key=f"pareto_y_{name}")
    return [x, y]

def selected_on_chart(event: Any) -> list[int]:
    if not event:
        return []
    points = event["selection"]["points"] if "selection" in event else []
    numbers = []
    for p in points:
        data = p.get("customdata")
        number = data[0] if isinstance(data, list) else data
        if number is not None:
            numbers.append(int(number))
    return sorted(set(numbers))

def log_toggles(frame: pd.DataFrame, axes: list[str], name: str) -> list[bool]:
    """One log/linear switch per axis; on by default where the values span more than 20x."""
    cols = st.columns(len(axes)) if axes else []
    return [col.toggle(f"log {label}", value=figs.suggest_log(frame[axis]) if axis in frame else False,
                       key=f"log_{label}_{axis}_{name}", help="a log axis keeps one outlier from squeezing the rest")
            for col, label, axis in zip(cols, ("x", "y", "z"), axes, strict=False)]

def pareto_panel(frame: pd.DataFrame, objs: list[Objective], name: str) -> list[int]:
    directions = {o.metric: o.direction for o in objs}
    axes = pareto_axes(objs, frame, name)
    logs = log_toggles(frame, axes, name)
    event = draw(figs.pareto_figure, frame, axes, directions, "Pareto front", logs, key="pareto",
                 on_select="rerun", selection_mode=("points", "box", "lasso"))
    if len(objs) == 3 and len(axes) == 2:
        st.caption("Pareto membership is over all objectives: a Pareto point that looks dominated here wins "
                   "on the objective not shown.")
    return selected_on_chart(event)

def table_filters(frame: pd.DataFrame, chart_pick: list[int]) -> pd.DataFrame:
    cols = st.columns([4, 2, 4, 1.2])
    categories = sorted(frame["category"].dropna().unique())
    # A new set of classes (another study, a first infeasible trial) starts from "all shown".
    keep = cols[0].multiselect("Class", categories, default=categories, key=f"filter_class_{'|'.join(categories)}")
    only_chart = cols[1].toggle("Only chart selection", value=bool(chart_pick), disabled=not chart_pick,
                                key=f"only_chart_{bool(chart_pick)}")
    query = cols[2].text_input("Filter (columns, comparisons, and/or/not)", key="table_query",
                               placeholder="batch_size >= 4 and latency_p99_ms < 500")
    shown = frame[frame["category"].isin(keep)]
    if only_chart and chart_pick:
        shown = shown[shown["number"].isin(chart_pick)]
    if query:
        from reports.filter_expr import FilterError, filter_frame  # parsed and checked, never evaluated

        try:
            shown = filter_frame(shown, query)
        except FilterError as exc:  # a user's expression: say what is wrong, keep the table
            cols[2].error(f"filter ignored: {exc}")
    cols[3].caption(f"{len(shown)} of {len(frame)} trials")
    return shown

def table_columns(frame: pd.DataFrame, objs: list[Objective]) -> list[str]:
    names = [o.metric for o in objs]
    lead = ["number", "category", "baseline", *names, *fr.param_columns(frame)]
    rest = [m for m in fr.metric_columns(frame) if m not in names and not m.endswith(("_ci_low", "_ci_high"))]
    tail = ["reason", "overloaded", "stopped_early", "host", "gpu", "device_name", "duration_s"]
    return [c for c in [*lead, *rest, *tail] if c in frame.columns]

def trial_table(frame: pd.DataFrame, objs: list[Objective], chart_pick: list[int], name: str) -> list[int]:
    shown = table_filters(frame, chart_pick)
    view = shown[table_columns(shown, objs)].reset_index(drop=True)
    view.insert(1, "on_chart", view["number"].isin(chart_pick))
    event = st.dataframe(fr.arrow_safe(view), key="trial_table", on_select="rerun", selection_mode="multi-row",
                         hide_index=True, width="stretch",
                         column_config={"on_chart": st.column_config.CheckboxColumn("selected", width="small"),
                                        **{m: st.column_config.NumberColumn(m, format="%.4g")
                                           for m in fr.metric_columns(view)}})
    rows = list(event["selection"]["rows"]) if event else []
    left, right = st.columns(2)
    left.download_button("Download CSV", shown.to_csv(index=False).encode(), f"{name}_trials.csv", "text/csv")
    right.download_button("Download Parquet", fr.to_parquet_bytes(shown), f"{name}_trials.parquet",
                          "application/octet-stream")
    return [int(view.loc[r, "number"]) for r in rows if r < len(view)]

def remember_pick(picked: list[int], options: list[int]) -> None:
    """Chart/table selections drive the drill-down and comparison pickers (set before they render)."""
    if picked == st.session_state.get("_last_pick"):
        return
    st.session_state["_last_pick"] = picked
    valid = [n for n in picked if n in options]
    if valid:
        st.session_state["trial"] = valid[0]
    if len(valid) >= 2:
        st.session_state["compare"] = valid
