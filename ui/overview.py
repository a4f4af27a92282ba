"""The sidebar (study picker, worker filters) and the study's header: counts, best values
against the baseline, and what to say when there is nothing to review yet."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from reports import frames as fr
from tuner.space import Objective
from ui.data import TTL_S, fmt, study, study_names, trials


def sidebar(url: str) -> tuple[str, pd.DataFrame, str | None]:
    st.sidebar.title("autoglm-tune")
    st.sidebar.caption(f"storage: `{url}`")
    names = study_names(url)
    if not names:
        st.info(f"The storage {url} has no studies yet. Run `autoglm-tune --space batch_quant` first.")
        st.stop()
    # ?study=NAME deep-links a study (shareable in a review); the picker keeps the URL in step.
    if "study" not in st.session_state and st.query_params.get("study") in names:
        st.session_state["study"] = st.query_params["study"]
    name = st.sidebar.selectbox("Study", names, key="study")
    st.query_params["study"] = name
    if st.sidebar.button("Refresh", help=f"reload trials now (they also reload every {TTL_S} s)"):
        st.cache_data.clear()
    frame = worker_filter(trials(url, name))
    others = [n for n in names if n != name]
    other = st.sidebar.selectbox("Compare with study", ["(none)", *others], key="other_study") if others else None
    return name, frame, None if other in (None, "(none)") else other

def worker_filter(frame: pd.DataFrame) -> pd.DataFrame:
    """Distributed studies: look at one worker host or GPU at a time."""
    for column, label in (("host", "Worker host"), ("gpu", "GPU")):
        values = sorted(str(v) for v in frame[column].dropna().unique())
        if len(values) > 1:
            keep = st.sidebar.multiselect(label, values, default=values, key=f"filter_{column}")
            if set(keep) != set(values):  # trials that recorded no worker stay until one is deselected
                frame = frame[frame[column].astype(str).isin(keep)]
    return frame

def study_header(info: dict[str, Any], frame: pd.DataFrame, objs: list[Objective]) -> None:
    st.title(f"Study {info['study']}")
    devices = "; ".join(", ".join(str(v) for v in d.values() if v) for d in info["devices"]) or "not recorded yet"
    versions = "; ".join(", ".join(f"{k} {v}" for k, v in d.items() if v) for d in info["versions"]) or "—"
    st.caption(f"runner **{info['runner'] or '?'}** · space `{info['space_source'] or '?'}` · device {devices} · {versions}")
    states = info["states"]
    cols = st.columns(5)
    cols[0].metric("trials", info["trials"])
    cols[1].metric("complete", states.get("COMPLETE", 0))
    cols[2].metric("feasible Pareto", int(frame["pareto"].astype(bool).sum()) if len(frame) else 0)
    cols[3].metric("failed", states.get("FAIL", 0))
    cols[4].metric("running", states.get("RUNNING", 0))
    best = fr.best_per_objective(frame, objs)
    status = fr.baseline_status(frame)
    tiles = st.columns(max(1, len(best)))
    for tile, row in zip(tiles, best.itertuples(), strict=False):
        change = row.best_vs_baseline_pct
        label = f"best {row.objective} ({'↑' if row.direction == 'maximize' else '↓'})"
        trial = "" if row.trial is None or pd.isna(row.trial) else f" · trial #{int(row.trial)}"
        text = fr.best_delta_text(row.best, change, status)
        if not text.startswith(("+", "-")):
            tile.metric(label + trial, fmt(row.best), delta=text, delta_color="off", delta_arrow="off")
        else:
            # Green means better: a lower latency/memory than the baseline is a negative delta.
            tile.metric(label + trial, fmt(row.best), delta=text,
                        delta_color="normal" if row.direction == "maximize" else "inverse")

def fingerprint(frame: pd.DataFrame) -> list[tuple[int, str]]:
    return [(int(n), str(s)) for n, s in zip(frame["number"], frame["state"], strict=True)]

@st.fragment(run_every=TTL_S)
def live_watch(url: str, name: str, shown: list[tuple[int, str]]) -> None:
    """While trials run, poll the storage (uncached) and rerun the page when one finishes."""
    now = [(t.number, t.state.name) for t in study(url, name).get_trials(deepcopy=False)]
    if now != shown:
        st.cache_data.clear()
        st.rerun()
    st.caption(f"live: checking for finished trials every {TTL_S} s")

def study_state_message(info: dict[str, Any], frame: pd.DataFrame) -> bool:
    """Say plainly when there is nothing to review yet. Returns True if the study has results."""
    states = info["states"]
    if info["trials"] == 0:
        st.info("This study has no trials yet. Start it (or a worker) and press Refresh.")
        return False
    if states.get("RUNNING"):
        st.info(f"{states['RUNNING']} trial(s) running now; the page reloads when one finishes (or press Refresh).")
    if not states.get("COMPLETE"):
        failed = frame[frame["state"] == "FAIL"]
        if len(failed):
            st.error(f"No trial has completed: {len(failed)} failed. First reasons: "
                     + "; ".join(f"#{n}: {r}" for n, r in list(zip(failed["number"], failed["reason"], strict=True))[:3]))
        return False
    return True
