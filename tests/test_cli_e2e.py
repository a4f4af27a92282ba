"""The headline command on the tiny CPU stack, then the report: the issue's must-show."""

from __future__ import annotations

import pandas as pd
import pytest

from runners.contract import METRICS
from tuner.cli import main


@pytest.mark.slow
def test_batch_quant_six_trials_then_report(in_tmp, capsys):
    assert main(["--space", "batch_quant.yaml", "--trials", "6", "--device", "cpu"]) == 0
    progress = capsys.readouterr().out
    assert "[6/6]" in progress and "pareto" in progress
    # The run ends with what to run: at least one recommended configuration, and where to look.
    ending = progress.split("done: 6/6 trials")[1]
    assert "recommended configuration" in ending and "  trial " in ending
    assert "autoglm-tune report --study batch_quant" in ending and "autoglm-tune dashboard" in ending
    # The space was fitted to the CPU first (issue 17): no trial spent on values it cannot run.
    assert "quant_bits=4 removed from the space" in progress and "'offloaded' removed" in progress
    assert "drift: baseline throughput_tok_s" in progress
    assert main(["report", "--study", "batch_quant"]) == 0
    out = in_tmp / "runs" / "batch_quant" / "report"
    trials = pd.read_csv(out / "trials.csv")
    pareto = pd.read_csv(out / "pareto.csv")
    assert len(trials) == 6 and trials["baseline"].sum() == 1
    assert not (trials["param_quant_bits"] == 4).any() and not (trials["param_kv_cache"] == "offloaded").any()
    assert "Drift: baseline throughput re-measured / first" in (out / "report.html").read_text()
    assert len(pareto) >= 1 and pareto["feasible"].all()
    for metric in ("throughput_tok_s", "latency_p99_ms", "peak_memory_mib", "kl_divergence"):
        assert metric in pareto.columns and metric in METRICS
    html = (out / "report.html").read_text()
    assert "plotly" in html.lower() and "<script" in html  # self-contained: plotly.js inlined
    # Infeasible trials (e.g. int4 or offloaded KV on CPU) carry their reason.
    infeasible = trials[(trials["state"] == "COMPLETE") & ~trials["feasible"]]
    assert all(isinstance(r, str) and r for r in infeasible["reason"])
    # Raw per-request samples exist for each measured trial.
    for folder in trials.loc[trials["outcome"] == "ok", "artifact_dir"]:
        assert (pd.read_csv(f"{folder}/requests.csv")["ttft_ms"] > 0).all()


def test_report_on_unknown_study_exits_2(in_tmp, capsys):
    assert main(["report", "--study", "nope"]) == 2
    assert "no such journal file" in capsys.readouterr().err
