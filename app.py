"""autoglm-tune dashboard: review a study the way a performance engineer does.

    streamlit run app.py -- --storage runs/optuna.journal      (or: autoglm-tune dashboard)

Storage: `--storage URL` after `--`, else $AUTOGLM_TUNE_STORAGE, else runs/optuna.journal.
Reads the Optuna storage and the artifact files each trial recorded; never writes either.
Frames and figures come from `reports/`, the same code `autoglm-tune report` uses.
"""

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
from reports.regression import history_figure
from runners.contract import METRICS
from tuner.errors import UsageError
from tuner.regress_rule import read_history
from tuner.storage import DEFAULT_STORAGE, open_existing_storage

TTL_S = 15  # a running study's new trials show up within this many seconds (or on Refresh)
QUALITY = ("kl_divergence", "top1_agreement", "perplexity")
EFFICIENCY = ("mbu", "mfu", "mean_power_w", "energy_j_per_tok")
LATENCY = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "latency_p50_ms", "latency_p99_ms")


# ---------------------------------------------------------------- data access (read-only, cached)


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


# ---------------------------------------------------------------- sidebar


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


# ---------------------------------------------------------------- study summary


def study_header(info: dict[str, Any], frame: pd.DataFrame, objs: list[fr.Objective]) -> None:
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


# ---------------------------------------------------------------- Pareto and table


def pareto_axes(objs: list[fr.Objective], frame: pd.DataFrame, name: str) -> list[str]:
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


def pareto_panel(frame: pd.DataFrame, objs: list[fr.Objective], name: str) -> list[int]:
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


def table_columns(frame: pd.DataFrame, objs: list[fr.Objective]) -> list[str]:
    names = [o.metric for o in objs]
    lead = ["number", "category", "baseline", *names, *fr.param_columns(frame)]
    rest = [m for m in fr.metric_columns(frame) if m not in names and not m.endswith(("_ci_low", "_ci_high"))]
    tail = ["reason", "overloaded", "stopped_early", "host", "gpu", "device_name", "duration_s"]
    return [c for c in [*lead, *rest, *tail] if c in frame.columns]


def trial_table(frame: pd.DataFrame, objs: list[fr.Objective], chart_pick: list[int], name: str) -> list[int]:
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


# ---------------------------------------------------------------- one trial


def trial_label(frame: pd.DataFrame) -> dict[int, str]:
    labels = {}
    for row in frame.itertuples():
        tags = [row.category] + (["baseline"] if row.baseline else [])
        labels[int(row.number)] = f"#{row.number} · {', '.join(tags)}"
    return labels


def metric_table(metrics: dict[str, float], unavailable: dict[str, str]) -> pd.DataFrame:
    rows = []
    for name in METRICS:
        if name.endswith(("_ci_low", "_ci_high")):
            continue
        if name in metrics:
            ci = (metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high"))
            ci_text = "" if ci == (None, None) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"
            rows.append({"metric": name, "value": fmt(float(metrics[name])), "unit": METRICS[name][0],
                         "95% CI": ci_text, "note": ""})
        elif name in unavailable:
            rows.append({"metric": name, "value": "—", "unit": METRICS[name][0], "95% CI": "", "note": unavailable[name]})
    return pd.DataFrame(rows)


def with_unit(name: str, value: float) -> str:
    unit = METRICS.get(name, ("", ""))[0]
    if unit == "ratio":  # MBU, MFU, top-1 agreement read best as percentages
        return f"{value * 100:.3g} %"
    return f"{fmt(value)} {unit}".strip()


def metric_tiles(metrics: dict[str, float], names: list[str]) -> None:
    present = [n for n in names if n in metrics]
    for start in range(0, len(present), 4):
        for col, n in zip(st.columns(4), present[start:start + 4], strict=False):
            col.metric(n, with_unit(n, float(metrics[n])))


def outcome_banner(data: dict[str, Any], row: pd.Series) -> None:
    attrs = data["user_attrs"]
    if data["state"] == "RUNNING":
        owner = attrs.get("owner") or {}
        st.info(f"Running on {owner.get('host', '?')} (pid {owner.get('pid', '?')}) since {row['datetime_start']}.")
    elif data["state"] == "FAIL":
        st.error(f"Failed: {row['reason'] or 'no reason recorded'}")
        if attrs.get("stderr_tail"):
            st.code(attrs["stderr_tail"], language="text")
    elif row["category"] == fr.INFEASIBLE:
        st.warning(f"Infeasible: {row['reason']}")
    for note in (row.get("overloaded"), row.get("stopped_early")):
        if isinstance(note, str) and note:  # the window fell behind its load, or was cut short
            st.warning(note[0].upper() + note[1:])


def trial_detail(url: str, name: str, frame: pd.DataFrame, objs: list[fr.Objective]) -> None:
    labels = trial_label(frame)
    if not labels:
        st.info("No trial matches the filters.")
        return
    if st.session_state.get("trial") not in labels:
        st.session_state["trial"] = int(next(iter(frame.loc[frame["pareto"].astype(bool), "number"]), next(iter(labels))))
    number = st.selectbox("Trial", list(labels), format_func=labels.get, key="trial")
    data = trial_attrs(url, name, int(number))
    row = frame[frame["number"] == number].iloc[0]
    attrs = data["user_attrs"]
    st.subheader(f"Trial #{number}")
    outcome_banner(data, row)
    metrics = attrs.get("metrics") or {}
    if metrics:
        metric_tiles(metrics, [o.metric for o in objs] + [m for m in LATENCY if m not in [o.metric for o in objs]])
        st.markdown("**Efficiency vs measured ceilings**")
        metric_tiles(metrics, list(EFFICIENCY))
        ceilings = ((attrs.get("info") or {}).get("serving") or {}).get("ceilings")
        if ceilings:
            st.caption("ceilings: " + ", ".join(f"{k} {fmt(v)}" for k, v in ceilings.items()))
        st.markdown("**Quality vs the unoptimised reference**")
        metric_tiles(metrics, list(QUALITY))
        with st.expander("All metrics (and why some are absent)"):
            st.dataframe(metric_table(metrics, attrs.get("unavailable") or {}), hide_index=True)
    trial_evidence(url, name, [int(number)])
    left, right = st.columns(2)
    with left.expander("Resolved config", expanded=False):
        st.json(attrs.get("config") or data["params"])
    with right.expander("Environment and worker", expanded=False):
        st.json({"environment": attrs.get("environment"), "owner": attrs.get("owner"),
                 "constraints": data["constraints"], "artifact_dir": attrs.get("artifact_dir")})
    if data["state"] != "FAIL" and attrs.get("stderr_tail"):
        with st.expander("stderr tail"):
            st.code(attrs["stderr_tail"], language="text")


def trial_evidence(url: str, name: str, numbers: list[int]) -> None:
    requests = artifact(url, name, tuple(numbers), "requests")
    kind = st.radio("Latency view", ["CDF", "histogram"], horizontal=True, key=f"latency_kind_{len(numbers) > 1}")
    draw(figs.latency_figure, requests, "cdf" if kind == "CDF" else "hist", key=f"latency_{numbers}")
    draw(figs.timeline_figure, artifact(url, name, tuple(numbers), "timeline"), key=f"timeline_{numbers}")


# ---------------------------------------------------------------- comparisons


def compare_trials(url: str, name: str, frame: pd.DataFrame, objs: list[fr.Objective]) -> None:
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


def compare_studies(url: str, name: str, other: str | None, frame: pd.DataFrame, objs: list[fr.Objective]) -> None:
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


def diagnostics(url: str, name: str, objs: list[fr.Objective]) -> None:
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


# ---------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="autoglm-tune", layout="wide")
    url = storage_url()
    try:
        storage(url)
    except UsageError as exc:
        st.error(f"Cannot open the study storage: {exc}")
        st.stop()
    name, frame, other = sidebar(url)
    info = summary(url, name)
    objs = fr.objectives(study(url, name))
    study_header(info, frame, objs)
    has_results = study_state_message(info, frame)
    if info["states"].get("RUNNING"):
        live_watch(url, name, fingerprint(trials(url, name)))
    tabs = st.tabs(["Pareto & trials", "Trial detail", "Compare trials", "Compare studies", "Search diagnostics",
                    "Space", "Regression history"])
    with tabs[0]:
        chart_pick = pareto_panel(frame, objs, name) if has_results else []
        table_pick = trial_table(frame, objs, chart_pick, name) if len(frame) else []
    remember_pick(table_pick or chart_pick, list(frame["number"]))
    with tabs[1]:
        trial_detail(url, name, frame, objs)
    with tabs[2]:
        compare_trials(url, name, frame, objs)
    with tabs[3]:
        compare_studies(url, name, other, frame, objs)
    with tabs[4]:
        if has_results:
            diagnostics(url, name, objs)
        else:
            st.info("Hypervolume, importances and parallel coordinates need completed trials.")
    with tabs[5]:
        space_panel(info)
    with tabs[6]:
        regression_panel()


main()
