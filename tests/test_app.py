"""app.py under Streamlit's AppTest, on studies made by the real GLM runner on CPU:
populated, running, empty and failed studies render without exception; picking a study and a
trial shows that trial's metrics."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tests.dashboard_study import build
from tuner.storage import open_storage

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> str:
    return build(tmp_path_factory.getbasetemp() / "dashboard_studies")


@pytest.fixture
def app(journal, monkeypatch) -> AppTest:
    monkeypatch.setenv("AUTOGLM_TUNE_STORAGE", journal)
    return AppTest.from_file(APP, default_timeout=60)


def _pick_study(at: AppTest, name: str) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    at.selectbox(key="study").select(name).run()
    assert not at.exception, at.exception
    return at


def _text(at: AppTest) -> str:
    parts = [e.value for kind in ("info", "error", "warning", "markdown", "caption", "subheader", "title")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_populated_study_pick_trial_shows_its_metrics(app, journal):
    before = Path(journal).read_bytes()
    at = _pick_study(app, "populated")
    study = optuna.load_study(study_name="populated", storage=open_storage(journal))
    assert "Study populated" in _text(at)
    assert any(m.label.startswith("best throughput_tok_s") for m in at.metric)
    # An infeasible (int8, KL above the bound) trial: picking it shows its own numbers and why.
    infeasible = next(t for t in study.trials if any(v > 0 for v in t.constraints.values()))
    at.selectbox(key="trial").select(infeasible.number).run()
    assert not at.exception, at.exception
    assert f"Trial #{infeasible.number}" in _text(at)
    shown = {m.label: m.value for m in at.metric}
    for metric in ("throughput_tok_s", "latency_p99_ms", "peak_memory_mib", "kl_divergence"):
        assert shown[metric].split()[0] == f"{infeasible.user_attrs['metrics'][metric]:.4g}", metric
    assert any("kl_divergence = " in w.value and "> 1e-06" in w.value for w in at.warning)  # value > bound
    # The drill-down table lists every measured metric with its unit and CI.
    tables = [df.value for df in at.dataframe]
    assert any("metric" in t.columns and "ttft_p99_ms" in set(t["metric"]) for t in tables)
    assert Path(journal).read_bytes() == before  # the app only reads the storage


def test_running_study_shows_progress_and_the_running_trial(app):
    at = _pick_study(app, "running")
    assert any("running now" in i.value for i in at.info)
    at.selectbox(key="trial").select(4).run()
    assert not at.exception, at.exception
    assert any("Running on" in i.value for i in at.info)
    at.button[0].click().run()  # Refresh
    assert not at.exception, at.exception


def test_empty_and_failed_studies_say_so(app):
    at = _pick_study(app, "empty")
    assert any("no trials yet" in i.value for i in at.info)
    at.selectbox(key="study").select("failed").run()
    assert not at.exception, at.exception
    assert any("No trial has completed" in e.value and "runner hung" in e.value for e in at.error)
    at.selectbox(key="trial").select(1).run()
    assert not at.exception, at.exception
    assert any(e.value.startswith("Failed: runner hung") for e in at.error)
    at.selectbox(key="study").select("populated").run()  # filters from the other study do not leak
    assert any(c.value == "4 of 4 trials" for c in at.caption)


def test_compare_two_studies(app):
    at = _pick_study(app, "populated")
    at.selectbox(key="other_study").select("running").run()
    assert not at.exception, at.exception
    assert "**running**" in _text(at)


def test_worker_filter_3d_and_unmeasured_trials(monkeypatch, tmp_path):
    """Synthetic trials (two hosts, an out-of-memory trial with no values, a crash): the host
    filter narrows the table, 3-D renders, and both failure kinds show their reason."""
    from tests.test_reports import synthetic_study

    synthetic_study(tmp_path, 3)
    monkeypatch.setenv("AUTOGLM_TUNE_STORAGE", f"sqlite:///{tmp_path}/r.db")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.multiselect(key="filter_host").set_value(["h0"]).run()
    assert not at.exception, at.exception
    assert any(c.value == "5 of 5 trials" for c in at.caption)
    at.sidebar.multiselect(key="filter_host").set_value(["h0", "h1"]).run()
    at.toggle(key="pareto_3d").set_value(True).run()
    assert not at.exception, at.exception
    at.selectbox(key="trial").select(9).run()
    assert any(w.value.startswith("Infeasible: out of memory") for w in at.warning)
    at.selectbox(key="trial").select(10).run()
    assert not at.exception, at.exception
    assert any(e.value == "Failed: runner hung" for e in at.error)
    assert any("boom" in c.value for c in at.code)


def test_dashboard_command(tmp_path, capsys):
    from reports.dashboard import command
    from tuner.cli import main

    assert main(["dashboard", "--storage", str(tmp_path / "nope.journal")]) == 2  # no blank page
    assert "no such journal file" in capsys.readouterr().err
    argv = command("runs/optuna.journal", 8600)
    assert argv[-2:] == ["--storage", "runs/optuna.journal"] and "127.0.0.1" in argv and argv[4].endswith("app.py")


def test_missing_storage_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOGLM_TUNE_STORAGE", str(tmp_path / "nope.journal"))
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert any("no such journal file" in e.value for e in at.error)


def test_regression_history_tab(app, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOGLM_TUNE_HISTORY", str(tmp_path / "none.csv"))
    at = _pick_study(app, "populated")
    assert "No regression history" in _text(at)
    from tuner.regress.rule import HISTORY_COLUMNS, append_history

    rows = pd.DataFrame([{**dict.fromkeys(HISTORY_COLUMNS), "night": f"2026-11-{day:02d}T02:00:00+00:00",
                          "config": "best", "metric": "throughput_tok_s", "ratio": ratio, "flagged": ratio < 0.9,
                          "accepted": ratio >= 0.9}
                         for day, ratio in ((18, 1.0), (19, 0.99), (20, 0.7))])
    append_history(tmp_path / "history.csv", rows)
    monkeypatch.setenv("AUTOGLM_TUNE_HISTORY", str(tmp_path / "history.csv"))
    at = _pick_study(AppTest.from_file(APP, default_timeout=60), "populated")
    assert "No regression history" not in _text(at)
    assert any(str(tmp_path / "history.csv") in str(c.value) for c in at.caption)


def test_table_filter_filters_and_refuses_code(app, journal, tmp_path):
    """The filter box: a checked expression filters the table; code is refused and never runs."""
    from reports.frames import trials_frame

    at = _pick_study(app, "populated")
    frame = trials_frame(optuna.load_study(study_name="populated", storage=open_storage(journal)))
    # A bound above every measured latency: the count does not hang on how loaded the machine was.
    bound = float(frame["latency_p99_ms"].max()) + 1.0
    expected = int(((frame["param_batch_size"] >= 4) & (frame["latency_p99_ms"] < bound)).sum())
    at.text_input(key="table_query").input(f"batch_size >= 4 and latency_p99_ms < {bound}").run()
    assert not at.exception, at.exception
    assert not at.error
    assert any(c.value == f"{expected} of 4 trials" for c in at.caption)
    assert 0 < expected < 4  # the grid has both batch sizes: the filter really narrows
    target = tmp_path / "pwned"
    for attack in (f'@os.system("touch {target}")', f'__import__("os").system("touch {target}") == 0'):
        at.text_input(key="table_query").input(attack).run()
        assert not at.exception, at.exception
        assert any(e.value.startswith("filter ignored:") for e in at.error)
        assert any(c.value == "4 of 4 trials" for c in at.caption)  # the table is kept whole
    assert not target.exists()
