"""reports/: frames round-trip CSV/Parquet; report.html is self-contained; figures build for
2 and 3 objectives and say why when they cannot."""

from __future__ import annotations

import re

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from reports import figures as figs
from reports import frames as fr
from reports.cli import main as report_main

OBJECTIVES = [("throughput_tok_s", "maximize"), ("latency_p99_ms", "minimize"), ("peak_memory_mib", "minimize")]
DISTRIBUTIONS = {"batch_size": IntDistribution(1, 32, log=True), "kv_cache": CategoricalDistribution(["dynamic", "static"]),
                 "compile": CategoricalDistribution([False, "max-autotune"])}


def _trial(number: int, tmp_path, n_objectives: int, **kw) -> optuna.trial.FrozenTrial:
    """A trial shaped like what tuner/study.py records, with request/timeline artifacts."""
    batch, kv, compile_ = [1, 2, 4, 8, 16, 32][number % 6], ["dynamic", "static"][number % 2], [False, "max-autotune"][number % 2]
    metrics = {"throughput_tok_s": 10.0 * batch + number, "latency_p99_ms": 100.0 + 30 * batch - number,
               "peak_memory_mib": 400.0 + batch, "kl_divergence": 0.01 * (number % 3), "ttft_p99_ms": 20.0}
    folder = tmp_path / f"trial_{number:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ttft_ms": [1.0 + i for i in range(8)], "tpot_ms": [2.0] * 8,
                  "latency_ms": [10.0 + i for i in range(8)]}).to_csv(folder / "requests.csv", index=False)
    pd.DataFrame({"t_s": [0.0, 0.1, 0.2], "rss_mib": [400.0, 410.0, 405.0],
                  "power_w": [300.0, 310.0, 305.0]}).to_csv(folder / "timeline.csv", index=False)
    attrs = {"outcome": "ok", "metrics": metrics, "baseline": number == 0, "artifact_dir": str(folder),
             "artifacts": {"requests": str(folder / "requests.csv"), "timeline": str(folder / "timeline.csv")},
             "environment": {"device_name": "cpu-test", "torch": "2.13.0"}, "owner": {"host": f"h{number % 2}"}}
    attrs.update(kw.pop("attrs", {}))
    values = [metrics[m] for m, _ in OBJECTIVES[:n_objectives]]
    return create_trial(state=TrialState.COMPLETE, values=values, user_attrs=attrs,
                        params={"batch_size": batch, "kv_cache": kv, "compile": compile_}, distributions=DISTRIBUTIONS,
                        constraints={"kl_divergence<=0.015": metrics["kl_divergence"] - 0.015}, **kw)


def synthetic_study(tmp_path, n: int) -> optuna.Study:
    """9 measured trials on two hosts, one unrunnable (±inf values), one FAIL; in SQLite."""
    s = optuna.create_study(study_name=f"r{n}", storage=f"sqlite:///{tmp_path}/r.db",
                            directions=[d for _, d in OBJECTIVES[:n]])
    s.set_metric_names([m for m, _ in OBJECTIVES[:n]])
    s.add_trials([_trial(i, tmp_path, n) for i in range(9)])
    # An unrunnable config: objectives at their worst (±inf), a reason, no metrics.
    s.add_trial(create_trial(state=TrialState.COMPLETE, values=[-float("inf"), *[float("inf")] * (n - 1)],
                             params={"batch_size": 32, "kv_cache": "static", "compile": False},
                             distributions=DISTRIBUTIONS, constraints={"runnable": 1.0},
                             user_attrs={"outcome": "infeasible", "infeasible_reason": "out of memory: 20 MiB cap"}))
    s.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"outcome": "fail", "fail_reason": "runner hung",
                                                                 "stderr_tail": "Traceback: boom"}))
    return s


@pytest.fixture(params=[2, 3], ids=["2obj", "3obj"])
def study(request, tmp_path):
    return synthetic_study(tmp_path, request.param)


def test_frames_round_trip_csv_and_parquet(study, tmp_path):
    trials = fr.trials_frame(study)
    assert set(fr.BASE_COLUMNS) <= set(trials.columns) and len(trials) == 11
    assert trials["pareto"].sum() == len(study.best_trials) > 0
    assert trials.loc[9, "reason"].startswith("out of memory") and trials.loc[10, "reason"] == "runner hung"
    assert "violated" in trials.loc[trials["kl_divergence"] > 0.015, "reason"].iloc[0]
    for suffix in ("csv", "parquet"):
        back = fr.read_table(fr.write_table(trials, tmp_path / f"trials.{suffix}"))
        assert list(back.columns) == list(trials.columns)
        for column in ("number", "throughput_tok_s", "pareto", "feasible", "baseline"):
            pd.testing.assert_series_equal(back[column], trials[column], check_dtype=False)
        # Mixed-type categorical params (False, "max-autotune") survive as text in Parquet.
        assert [str(v) for v in back["param_compile"]] == [str(v) for v in trials["param_compile"]]


def test_report_cli_writes_self_contained_html_and_exports(study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    out = tmp_path / "report"
    assert report_main(["--study", study.study_name, "--storage", url, "--out", str(out)]) == 0
    for name in ("trials.csv", "trials.parquet", "pareto.csv", "pareto.parquet", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=", html)  # nothing fetched: plotly.js is inlined
    assert html.count("plotly.js v") >= 1 or "Plotly" in html
    assert "Hypervolume history" in html and "Importances: throughput_tok_s" in html
    assert len(pd.read_parquet(out / "pareto.parquet")) == len(study.best_trials)


def test_figures_build_for_two_and_three_objectives(study):
    trials = fr.trials_frame(study)
    objs = fr.objectives(study)
    names = [o.metric for o in objs]
    fig = figs.pareto_figure(trials, names, figs.objective_directions(study))
    kinds = {t.type for t in fig.data}
    assert kinds == ({"scatter3d"} if len(names) == 3 else {"scatter"})
    legend = " ".join(t.name for t in fig.data)
    assert all(k in legend for k in ("feasible Pareto", "infeasible", "baseline"))
    plotted = {n for t in fig.data for n in t.customdata}
    assert 9 not in plotted and "out of memory" in fig.layout.title.subtitle.text  # said, not drawn at inf
    assert figs.hypervolume_figure(study).data
    for o in objs:
        assert figs.importance_figure(study, o.metric).data
        assert figs.parallel_figure(study, o.metric).data
    requests = fr.stacked_artifact(study, [0, 1], "requests")
    assert set(requests["trial"]) == {"#0", "#1"}
    assert len(figs.latency_figure(requests, "cdf").data) == 6  # 2 trials x 3 latencies
    assert figs.latency_figure(requests, "hist").data
    assert figs.timeline_figure(fr.stacked_artifact(study, [0], "timeline")).data


def test_figures_explain_what_cannot_be_drawn(tmp_path):
    s = optuna.create_study(directions=["maximize", "minimize"])
    s.set_metric_names(["throughput_tok_s", "latency_p99_ms"])
    trials = fr.trials_frame(s)
    with pytest.raises(figs.NoFigure, match="no completed trial"):
        figs.pareto_figure(trials, ["throughput_tok_s", "latency_p99_ms"], {})
    with pytest.raises(figs.NoFigure, match="no feasible"):
        figs.hypervolume_figure(s)
    s.add_trial(_trial(0, tmp_path, 2))
    with pytest.raises(figs.NoFigure, match="at least"):
        figs.importance_figure(s, "throughput_tok_s")
    with pytest.raises(figs.NoFigure, match="per-request"):
        figs.latency_figure(pd.DataFrame(), "cdf")
