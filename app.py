"""autoglm-tune dashboard: review a study the way a performance engineer does.

    streamlit run app.py -- --storage runs/optuna.journal      (or: autoglm-tune dashboard)

Storage: `--storage URL` after `--`, else $AUTOGLM_TUNE_STORAGE, else runs/optuna.journal.
Reads the Optuna storage and the artifact files each trial recorded; never writes either.
Frames and figures come from `reports/`, the same code `autoglm-tune report` uses; the pages
are in `ui/` (data access, sidebar and header, Pareto and table, one trial, comparisons).
"""

from __future__ import annotations

import streamlit as st

from reports import frames as fr
from tuner.errors import UsageError
from ui.compare import compare_studies, compare_trials, diagnostics, regression_panel, space_panel
from ui.data import storage, storage_url, study, summary, trials
from ui.overview import fingerprint, live_watch, sidebar, study_header, study_state_message
from ui.table import pareto_panel, remember_pick, trial_table
from ui.trial import trial_detail

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
