"""Comparisons (trials side by side, two studies), the search diagnostics, the space and the
nightly regression history."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from reports import figures as figs
from reports import frames as fr
from reports.regression import history_figure
from tuner.space import Objective
from ui.data import draw, history_path, regression_history, show, study, study_figure, summary, trials
from ui.trial import trial_evidence, trial_label


def compare_trials(url: str, name: str, frame: pd.DataFrame, objs: list[Objective]) -> None:
    labels = trial_label(frame)
    # Keep the picks that survive the filters; with none left, start from the Pareto set.
    current = [n for n in st.session_state.get("compare", []) if n in labels]
    pareto = [int(n) for n in frame.loc[frame["pareto"].astype(bool), "number"]]
    st.session_state["compare"] = current or (pareto + [n for n in labels if n not in pareto])[:max(2, min(3, len(pareto)))]
    numbers = st.multiselect("Trials to compare", list(labels), format_func=labels.get, key="compare")
    if len(numbers) < 2:
        st.info("Pick two or more trials (here, on the Pareto chart, or in the table).")
        return
    rows = frame[frame["number"].isin(numbers)].set_index("number")
    names = [o.metric for o in objs]
    fields = ["category", "baseline", *fr.param_columns(rows), *names,
              *[m for m in fr.metric_columns(rows) if m not in names and not m.endswith(("_ci_low", "_ci_high"))],
              "reason", "host", "gpu", "device_name"]
    side = rows[[f for f in fields if f in rows.columns]].T
    side.columns = [f"#{n}" for n in side.columns]
    st.dataframe(side.astype(str), width="stretch")
    trial_evidence(url, name, sorted(numbers))

def compare_studies(url: str, name: str, other: str | None, frame: pd.DataFrame, objs: list[Objective]) -> None:
    if other is None:
        st.info("Pick a second study in the sidebar (e.g. the same space on another GPU, or last night's run).")
        return
    other_frame = trials(url, other)
    other_objs = fr.objectives(study(url, other))
    left, right = st.columns(2)
    for col, study_name, f, o in ((left, name, frame, objs), (right, other, other_frame, other_objs)):
        info = summary(url, study_name)
        devices = "; ".join(", ".join(str(v) for v in d.values() if v) for d in info["devices"]) or "—"
        col.markdown(f"**{study_name}** · {info['trials']} trials · {devices}")
        col.dataframe(fr.best_per_objective(f, o), hide_index=True)
    shared = [m for m in (o.metric for o in objs) if m in {x.metric for x in other_objs}]
    if len(shared) < 2:
        shared = [m for m in fr.metric_columns(frame) if m in other_frame.columns][:2]
    draw(figs.study_compare_figure, {name: frame, other: other_frame}, shared[:2],
         {o.metric: o.direction for o in objs}, key="compare_studies")

def diagnostics(url: str, name: str, objs: list[Objective]) -> None:
    show(*study_figure(url, name, "hypervolume"), key="hypervolume")
    st.markdown("**Parameter importances per objective**")
    for col, o in zip(st.columns(len(objs)), objs, strict=True):
        with col:
            show(*study_figure(url, name, "importance", o.metric), key=f"importance_{o.metric}")
    metric = st.selectbox("Colour parallel coordinates by", [o.metric for o in objs], key=f"parallel_metric_{name}")
    show(*study_figure(url, name, "parallel", metric), key="parallel")

def space_panel(info: dict[str, Any]) -> None:
    st.markdown(f"Space file: `{info['space_source'] or '?'}` · runner `{info['runner'] or '?'}`")
    st.markdown("Constraints: " + (", ".join(
        f"{c['metric']} {'≤ ' + str(c['max']) if 'max' in c else ''}{'≥ ' + str(c['min']) if 'min' in c else ''}"
        for c in info["constraints"]) or "none"))
    st.json({"trials by state": info["states"], "outcomes": info["outcomes"], "devices": info["devices"],
             "versions": info["versions"], "workers": info["workers"]}, expanded=False)
    st.json(info["space"] or {}, expanded=True)

def regression_panel() -> None:
    path = history_path()
    history = regression_history(str(path))
    if history.empty:
        st.info(f"No regression history at `{path}`: run `autoglm-tune regress` (see docs/regress.md), "
                "or pass `-- --history FILE`.")
        return
    configs = sorted(history["config"].dropna().unique())
    pick = st.selectbox("Config", ["(all)", *configs], key="regress_config")
    st.caption(f"`{path}` · now ÷ reference per night; flagged nights are marked")
    st.plotly_chart(history_figure(history, None if pick == "(all)" else pick), use_container_width=True)
