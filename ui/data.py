"""The dashboard's data access: read-only and cached (a running study's new trials show up
within TTL_S seconds, or on Refresh), and the small helpers every page uses to show a figure."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from reports import figures as figs
from reports import frames as fr
from tuner.regress.rule import read_history
from tuner.storage import DEFAULT_STORAGE, open_existing_storage

TTL_S = 15  # a running study's new trials show up within this many seconds (or on Refresh)


def _app_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--storage")
    p.add_argument("--history")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args

def storage_url() -> str:
    return _app_args().storage or os.environ.get("AUTOGLM_TUNE_STORAGE") or DEFAULT_STORAGE

def history_path() -> Path:
    """`autoglm-tune regress` history: `--history`, else $AUTOGLM_TUNE_HISTORY, else its default."""
    return Path(_app_args().history or os.environ.get("AUTOGLM_TUNE_HISTORY") or "runs/regress/history.csv")

@st.cache_data(ttl=30, show_spinner=False)
def regression_history(path: str) -> pd.DataFrame:
    return read_history(Path(path))

@st.cache_resource(show_spinner=False)
def storage(url: str) -> optuna.storages.BaseStorage:
    # One storage object per URL for all sessions: a journal replays its log only once.
    return open_existing_storage(url)

def study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage(url))

@st.cache_data(ttl=TTL_S, show_spinner=False)
def study_names(url: str) -> list[str]:
    """All studies, the most recently started first (what a reviewer most likely opened the app for)."""
    summaries = optuna.study.get_all_study_summaries(storage(url), include_best_trial=False)
    latest = sorted(summaries, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0), reverse=True)
    return [s.study_name for s in latest]

@st.cache_data(ttl=TTL_S, show_spinner=False)
def trials(url: str, name: str) -> pd.DataFrame:
    return fr.trials_frame(study(url, name))

@st.cache_data(ttl=TTL_S, show_spinner=False)
def summary(url: str, name: str) -> dict[str, Any]:
    return fr.study_summary(study(url, name))

@st.cache_data(ttl=TTL_S, show_spinner=False)
def trial_attrs(url: str, name: str, number: int) -> dict[str, Any]:
    t = study(url, name).get_trials(deepcopy=False)[number]
    return {"user_attrs": dict(t.user_attrs), "params": dict(t.params), "constraints": fr.named_constraints(t),
            "state": t.state.name, "values": t.values}

@st.cache_data(ttl=TTL_S, show_spinner=False)
def artifact(url: str, name: str, numbers: tuple[int, ...], kind: str) -> pd.DataFrame:
    return fr.stacked_artifact(study(url, name), list(numbers), kind)

@st.cache_data(ttl=TTL_S, show_spinner=False)
def study_figure(url: str, name: str, kind: str, metric: str = "") -> tuple[go.Figure | None, str]:
    """Optuna-based figures need the study itself; cache them as (figure, or why not)."""
    builders = {"hypervolume": lambda s: figs.hypervolume_figure(s),
                "importance": lambda s: figs.importance_figure(s, metric),
                "parallel": lambda s: figs.parallel_figure(s, metric)}
    try:
        return builders[kind](study(url, name)), ""
    except figs.NoFigure as why:
        return None, str(why)

def show(figure: go.Figure | None, message: str, **kwargs: Any) -> Any:
    if figure is None:
        st.info(message)
        return None
    return st.plotly_chart(figure, **kwargs)

def draw(build: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a figure from reports.figures and show it, or show why there is none."""
    try:
        figure = build(*args)
    except figs.NoFigure as why:
        return show(None, str(why))
    return show(figure, "", **kwargs)

def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
