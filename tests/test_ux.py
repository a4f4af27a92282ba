"""What a user sees: per-trial verdicts, live progress, the last lines, exit codes, crashes."""

from __future__ import annotations

import io
import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.ux_runner import UX_KNOBS, UX_RUNNER
from tuner import notes as tn
from tuner import progress as tp
from tuner.cli import main
from tuner.space import validate
from tuner.storage import open_storage
from tuner.study import RunOptions, run_study


@pytest.fixture
def ux_runner(monkeypatch):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, UX_RUNNER, UX_KNOBS)


def ux_space(trials: int, choices: dict, baseline: bool = False, study: str = "ux") -> dict:
    return {
        "study": study, "runner": UX_RUNNER, "device": "cpu",
        "workload": {"rate_rps": 30, "requests": 8},
        "params": {k: {"type": "categorical", "choices": v} for k, v in choices.items()},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                       {"metric": "latency_p99_ms", "direction": "minimize"}],
        "constraints": [{"metric": "ttft_p99_ms", "max": 2000}, {"metric": "kl_divergence", "max": 0.05}],
        "search": {"sampler": "random", "trials": trials, "seed": 1, "trial_timeout_s": 30,
                   "baseline": baseline},
    }


def run(tmp_path, raw: dict, enqueue: list[dict] | None = None):
    space = validate(raw, "ux.yaml", raw["study"])
    url = str(tmp_path / "j.journal")
    storage = open_storage(url)
    if enqueue:
        study = optuna.create_study(study_name=raw["study"], storage=storage,
                                    directions=["maximize", "minimize"])
        for params in enqueue:
            study.enqueue_trial(params)
    summary = run_study(space, storage, RunOptions(url, tmp_path / "out"))
    return summary, optuna.load_study(study_name=raw["study"], storage=storage)


# ---------------------------------------------------------------- pure pieces


def test_broken_constraint_reads_value_then_bound():
    bounds = [{"metric": "ttft_p99_ms", "max": 2000}, {"metric": "top1_agreement", "min": 0.9},
              {"metric": "kl_divergence", "max": 0.05}]
    metrics = {"ttft_p99_ms": 4132.0, "top1_agreement": 0.5, "kl_divergence": 0.01}
    assert tn.broken_constraints(metrics, bounds) == ["ttft_p99_ms = 4132 > 2000", "top1_agreement = 0.5 < 0.9"]
    assert tn.broken_constraints({}, bounds[:1]) == ["ttft_p99_ms not measured"]


def test_overload_and_early_stop_notes():
    attrs = {"info": {"serving": {"offered_rps": 25.9, "overloaded": True}},
             "metrics": {"request_throughput_rps": 2.6},
             "stopped_early": {"rule": "ttft bound hopeless", "evidence": "p99 lower bound 3100 > 2000"}}
    assert tn.overload_note(attrs) == "overloaded (offered 25.9 rps, served 2.6)"
    assert tn.stopped_early_note(attrs) == "stopped early: ttft bound hopeless (p99 lower bound 3100 > 2000)"
    assert tn.overload_note({"info": {"serving": {"offered_rps": 5.0, "overloaded": False}}}) == ""


def test_estimator_uses_phase_medians_so_one_outlier_does_not_swing_the_eta():
    est = tp.TrialEstimator()
    for build, measure in ((60.0, 10.0), (2.0, 10.0), (2.0, 12.0)):  # the first build is slow
        est.add(build + measure + 1.0, {"build": build, "measure": measure})
    assert est.per_trial_s() == pytest.approx(2.0 + 10.0 + 1.0)
    # A running trial 4 s into `measure`, 10 of 40 requests done: 3x as long again.
    records = [{"t": 100.0, "phase": "build"}, {"t": 102.0, "phase": "measure"},
               {"t": 106.0, "done": 10, "total": 40}]
    assert est.remaining_in_trial_s(records, 106.0) == pytest.approx(12.0)
    assert tp.live_text(3, records, 6.0, 12.0) == "trial 3 · measure · 10/40 requests · 6s elapsed · ~12s left"


def test_running_trial_progress_is_polled_from_the_child_file(tmp_path):
    from runners import progress_report

    out = io.StringIO()
    progress = tp.Progress(2, stream=out, live=False)
    with progress.running(0, tmp_path):
        progress_report.start(tmp_path)
        progress_report.report_phase("build")
        progress_report.report_phase("measure")
        for done in range(1, 5):
            progress_report.report_requests(done, 4)
        time.sleep(2 * tp.POLL_S)
    phases = [r["phase"] for r in progress._current_records if "phase" in r]
    assert phases == ["build", "measure"]
    assert json.loads((tmp_path / "progress.jsonl").read_text().splitlines()[-1])["done"] == 4
    assert tp.Progress(1, stream=io.StringIO()).live is False  # not a TTY: no live line
    assert tp.Progress(1, quiet=True, live=True).live is False


# ---------------------------------------------------------------- a study's terminal


def test_terminal_names_broken_bounds_overload_and_recommends(tmp_path, ux_runner, capsys):
    raw = ux_space(3, {"x": [1.0, 2.0, 4.0], "ttft_ms": [100.0, 4132.0], "overload": [False, True]})
    summary, study = run(tmp_path, raw, [{"x": 1.0, "ttft_ms": 100.0, "overload": False},
                                         {"x": 4.0, "ttft_ms": 4132.0, "overload": True},
                                         {"x": 2.0, "ttft_ms": 100.0, "overload": False}])
    out = capsys.readouterr().out
    assert summary.counted == 3 and summary.completed == 3
    assert "trial 0 (x=1 ttft_ms=100 overload=False) in" in out and ": feasible" in out
    assert "INFEASIBLE: ttft_p99_ms = 4132 > 2000; overloaded (offered 25.9 rps, served 2.6)" in out
    # Trial 2 dominates trial 0; trial 1 (4x) is infeasible and must not be recommended.
    assert "recommended configuration (feasible Pareto set):" in out
    assert "trial 2 [best throughput_tok_s, best latency_p99_ms]: x=2 ttft_ms=100 overload=False" in out
    assert "throughput_tok_s 200" in out and "latency_p99_ms 500" in out
    assert f"autoglm-tune report --study ux --storage {tmp_path / 'j.journal'}" in out
    assert "autoglm-tune dashboard --storage" in out


def test_changes_are_signed_percent_vs_the_measured_baseline(tmp_path, ux_runner, capsys):
    raw = ux_space(2, {"x": [1.0, 2.0]}, baseline=True)
    raw["params"]["x"]["choices"] = [1.0, 2.0]
    run(tmp_path, raw, None)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "vs baseline" in line]
    if "x=2" in out.split("recommended")[1]:
        assert "throughput_tok_s 200 (+100% vs baseline), latency_p99_ms 500 (-50% vs baseline)" in out, out
    else:  # the sampler drew the baseline's value again: no change
        assert "(+0% vs baseline)" in lines[0]


def test_all_infeasible_run_ends_with_the_bound_that_failed_and_a_hint(tmp_path, ux_runner, capsys):
    raw = ux_space(3, {"ttft_ms": [2400.0, 4132.0, 11338.0]})
    summary, _ = run(tmp_path, raw, [{"ttft_ms": v} for v in (2400.0, 4132.0, 11338.0)])
    out = capsys.readouterr().out
    assert summary.feasible_pareto == 0
    assert "no feasible trial: every one of 3 measured trial(s) broke a bound" in out
    assert "most often broken: ttft_p99_ms in 3 of 3 (best ttft_p99_ms = 2400 > 2000 (20% beyond the bound))" in out
    assert "hint: lower workload.rate_rps (now 30) so the stack keeps up, relax the bound" in out
    # Overloaded trials: the hint names a rate the stack kept up with (0.8 x the best served).
    raw = ux_space(2, {"ttft_ms": [4132.0], "overload": [True]}, study="overloaded")
    run(tmp_path, raw, None)
    out = capsys.readouterr().out
    assert "2 of 2 measured trial(s) were overloaded" in out
    assert "lower workload.rate_rps (now 30; the stack served at most 2.6 req/s here, so try rate_rps <= 2.1)" in out
    assert "recommended" not in out


# ---------------------------------------------------------------- failures and the budget


def test_same_crash_three_times_stops_the_study_and_exits_1(tmp_path, ux_runner, capsys):
    raw = ux_space(5, {"mode": ["crash"]})
    summary, study = run(tmp_path, raw)
    out = capsys.readouterr().out
    assert len(study.trials) == 3 and all(t.state == TrialState.FAIL for t in study.trials)
    assert "stopping: the same crash in 3 trials in a row: runner crashed (exit 1): " \
           "RuntimeError: weights file is truncated" in out
    assert "no trial was measured; most common reason (3 of 3): runner crashed" in out
    from tuner.cli import _exit_code

    assert summary.completed == 0 and summary.counted == 0 and _exit_code(summary) == 1


def test_different_crashes_stop_at_the_fail_limit(tmp_path, ux_runner, capsys):
    raw = ux_space(3, {"mode": ["crash_other"]})
    summary, study = run(tmp_path, raw)
    assert len(study.trials) == 3 and summary.counted == 0  # fail_limit(3) == 3 distinct crashes
    assert "3 trials crashed in this run (limit 3)" in capsys.readouterr().out


def test_crashes_do_not_use_the_budget_and_a_fixed_rerun_continues(tmp_path, ux_runner, capsys, monkeypatch):
    # First run: every trial crashes (as with a missing dependency), three times in a row.
    raw = ux_space(2, {"x": [1.0, 2.0]}, baseline=True)
    monkeypatch.setenv("UX_BROKEN", "1")
    summary, study = run(tmp_path, raw)
    assert summary.counted == 0 and study.trials[0].user_attrs["baseline"]
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    # The cause is fixed: the whole budget of 2 is still there, and the failed baseline is
    # queued again first.
    monkeypatch.delenv("UX_BROKEN")
    summary, study = run(tmp_path, raw)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert summary.counted == 2 and len(complete) == 2
    assert complete[0].user_attrs.get("baseline") is True and complete[0].params == {"x": 1.0}


@pytest.mark.slow
def test_cli_exit_codes_all_crash_vs_all_infeasible(in_tmp, capsys):
    import yaml

    from tests.ux_runner import register

    register()
    crash = ux_space(3, {"mode": ["crash"]}, study="crashing")
    (in_tmp / "crash.yaml").write_text(yaml.safe_dump(crash))
    assert main(["--space", "crash.yaml", "--quiet"]) == 1
    infeasible = ux_space(2, {"ttft_ms": [4132.0]}, study="slow")
    (in_tmp / "slow.yaml").write_text(yaml.safe_dump(infeasible))
    assert main(["--space", "slow.yaml", "--quiet"]) == 0  # measured, just not feasible


def test_a_local_checkpoint_loads_without_accelerate(tmp_path, monkeypatch):
    import sys

    import torch

    from runners.glm.model import ARCHS, PRESETS, build_model, make_config

    monkeypatch.setitem(sys.modules, "accelerate", None)  # a plain install: importing it fails
    _, model_cls = ARCHS[PRESETS["glm-tiny"]["arch"]]
    torch.manual_seed(0)
    saved = model_cls._from_config(make_config({"preset": "glm-tiny"}), dtype=torch.float32)
    saved.save_pretrained(tmp_path / "ckpt")
    loaded = build_model({"path": str(tmp_path / "ckpt")}, torch.float32, "cpu", seed=0)
    ids = torch.tensor([[1, 2, 3, 4]])  # (batch 1, 4 tokens)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, saved.eval()(ids).logits)


# ---------------------------------------------------------------- the command line


def test_bare_command_prints_usage_subcommands_and_bundled_spaces(capsys):
    from tuner.space import bundled_dir

    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: autoglm-tune" in out and "--space" in out
    for sub in ("report", "dashboard", "regress", "worker", "spaces"):
        assert f"autoglm-tune {sub}" in out
    names = sorted(p.stem for p in bundled_dir().glob("*.yaml"))
    assert "batch_quant" in names and all(f"  {n} " in out for n in names)


def test_version_and_spaces_listing(capsys):
    from importlib.metadata import version

    from tuner.space import bundled_dir

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"autoglm-tune {version('autoglm-tune')}"
    assert main(["spaces"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list(bundled_dir().glob("*.yaml")))
    batch_quant = next(line for line in lines if line.split()[0] == "batch_quant")
    assert batch_quant.split()[1] == "glm-infer" and "headline" in batch_quant
    assert main(["--list-spaces"]) == 0 and len(capsys.readouterr().out.splitlines()) == len(lines)
    assert main(["spaces", "extra"]) == 2


# ---------------------------------------------------------------- other Optuna tools


def test_optuna_dashboard_never_shows_an_infeasible_trial_as_best(tmp_path, ux_runner, capsys):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard (the ci extra) is not installed")
    from optuna_dashboard._app import create_app

    raw = ux_space(2, {"x": [1.0, 4.0], "ttft_ms": [100.0, 4132.0]})
    # Trial 1 dominates trial 0 on both objectives but breaks ttft_p99_ms <= 2000.
    _, study = run(tmp_path, raw, [{"x": 1.0, "ttft_ms": 100.0}, {"x": 4.0, "ttft_ms": 4132.0}])
    assert study.trials[1].system_attrs["constraints"] == [0.0, 2132.0, 0.0, 0.0]  # runnable, 2 bounds, stopped_early
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": f"/api/studies/{study._study_id}"}
    setup_testing_defaults(environ)  # a plain GET, as the dashboard's page sends it
    statuses: list[str] = []
    body = create_app(study._storage)(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["200 OK"]
    detail = json.loads(b"".join(body))
    assert [t["number"] for t in detail["best_trials"]] == [0]
    assert [t["constraints"] for t in detail["trials"]] == [[0.0, 0.0, 0.0, 0.0], [0.0, 2132.0, 0.0, 0.0]]
    # Optuna's own view agrees.
    assert [t.number for t in study.best_trials] == [0]


def test_load_study_takes_a_plain_journal_path(tmp_path, ux_runner, capsys, monkeypatch):
    from tuner import UsageError, load_study

    run(tmp_path, ux_space(1, {"x": [2.0]}), None)
    monkeypatch.chdir(tmp_path)
    study = load_study("j.journal", "ux")
    assert study.study_name == "ux" and study.trials[0].user_attrs["metrics"]["throughput_tok_s"] == 200.0
    assert load_study("j.journal").study_name == "ux"  # the only study: no name needed
    with pytest.raises(UsageError, match="no such journal file"):
        load_study("missing.journal", "ux")


def test_readme_frame_snippet_has_every_metric_as_a_column(in_tmp, ux_runner, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### From Python and other Optuna tools")[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    raw = ux_space(1, {"x": [2.0]}, study="batch_quant")
    raw["params"]["batch_size"] = {"type": "categorical", "choices": [4]}  # the snippet prints it
    from runners.knobs import RUNNER_KNOBS, Knob

    RUNNER_KNOBS[UX_RUNNER] = {**UX_KNOBS, "batch_size": Knob("batch_size", 1, int)}
    space = validate(raw, "ux.yaml", "batch_quant")
    run_study(space, open_storage("runs/optuna.journal"), RunOptions("runs/optuna.journal", in_tmp / "out", True))
    scope: dict = {}
    exec(snippet, scope)
    frame = scope["frame"]
    assert frame.loc[0, "throughput_tok_s"] == 200.0 and frame.loc[0, "ttft_p99_ms"] == 100.0
    assert frame.loc[0, "param_batch_size"] == 4 and bool(frame.loc[0, "feasible"])
    assert "request_throughput_rps" in frame.columns  # metrics beyond objectives and bounds too


# ---------------------------------------------------------------- regress


def _regress_entry(name: str, x: float, reference: float, control: bool = False, mode: str = "ok") -> dict:
    import dataclasses

    from runners.contract import TrialConfig

    config = dataclasses.asdict(TrialConfig(UX_RUNNER, {}, "cpu", {}, {"mode": mode, "x": x}))
    entry = {"name": name, "config": {k: v for k, v in config.items() if k not in ("artifact_dir", "trial_number")},
             "reference": {"throughput_tok_s": {"value": reference, "repeats": [reference] * 3}}}
    return {**entry, "control": True} if control else entry


def _write_baseline(path, configs) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"repeats": 3, "metrics": {"throughput_tok_s": {"tolerance": 0.05}},
                                    "configs": configs}, sort_keys=False))


def test_regress_init_refuses_a_study_with_no_feasible_trial(in_tmp, ux_runner, capsys):
    raw = ux_space(2, {"ttft_ms": [4132.0, 5000.0]}, baseline=True)
    run(in_tmp, raw, None)
    capsys.readouterr()
    code = main(["regress", "--init", "--study", "ux", "--storage", str(in_tmp / "j.journal"), "--out", "b.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no feasible trial" in err[0]
    assert not (in_tmp / "b.yaml").exists()


def test_regress_init_warns_when_a_reference_already_breaks_a_bound(in_tmp, ux_runner, capsys):
    # The baseline (the control) measures ttft 4132 > 2000; trial 1 is feasible.
    raw = ux_space(2, {"ttft_ms": [4132.0, 100.0]}, baseline=True)
    raw["params"]["ttft_ms"]["choices"] = [4132.0, 100.0]
    from runners.knobs import RUNNER_KNOBS, Knob

    RUNNER_KNOBS[UX_RUNNER] = {**UX_KNOBS, "ttft_ms": Knob("ttft_ms", 4132.0, (int, float))}
    _, study = run(in_tmp, raw, [{"ttft_ms": 100.0}])  # then the queued baseline
    assert study.trials[1].user_attrs["baseline"] and study.trials[1].params == {"ttft_ms": 4132.0}
    capsys.readouterr()
    code = main(["regress", "--init", "--study", "ux", "--storage", str(in_tmp / "j.journal"), "--out", "b.yaml"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: reference baseline: ttft_p99_ms = 4132 > 2000 already breaks its bound" in err
    assert "trial_0: ttft" not in err


def test_regress_calls_flags_host_drift_when_the_control_moved(in_tmp, ux_runner, capsys):
    # Everything runs at x0.30 of its reference, the control too: the host is slower, not the code.
    _write_baseline(in_tmp / "b.yaml", [_regress_entry("baseline", 0.3, 100.0, control=True),
                                        _regress_entry("tuned", 0.6, 200.0)])
    code = main(["regress", "--baseline", "b.yaml", "--out", "out"])
    out = capsys.readouterr()
    checks = {(r["config"], r["metric"]): r for r in __import__("pandas").read_csv(in_tmp / "out" / "checks.csv")
              .to_dict("records")}
    assert code == 3 and "set aside as host drift (exit 3)" in out.err
    assert checks[("tuned", "throughput_tok_s")]["verdict"] == "host drift"
    assert "control moved: throughput_tok_s ×0.300" in checks[("tuned", "throughput_tok_s")]["reason"]
    summary = (in_tmp / "out" / "summary.md").read_text()
    assert "host drift: 2 flag(s) not judged" in summary
    assert "- **device**: Fake Accelerator 9000 (asked: cpu)" in summary
    # A config that no longer runs is still a regression, drift or not.
    _write_baseline(in_tmp / "b.yaml", [_regress_entry("baseline", 0.3, 100.0, control=True),
                                        _regress_entry("broken", 1.0, 100.0, mode="crash")])
    assert main(["regress", "--baseline", "b.yaml", "--out", "out2", "--quiet"]) == 1


def test_regress_without_drift_still_calls_regressions(in_tmp, ux_runner, capsys):
    _write_baseline(in_tmp / "b.yaml", [_regress_entry("baseline", 1.0, 100.0, control=True),
                                        _regress_entry("tuned", 0.5, 200.0)])
    assert main(["regress", "--baseline", "b.yaml", "--out", "out", "--quiet"]) == 1


# ---------------------------------------------------------------- the report


def test_report_files_put_knobs_first_and_changes_as_signed_percent(tmp_path):
    import pandas as pd

    from reports.cli import load_study, write_all
    from reports.frames import metric_label
    from tests.report_study import build

    journal = build(tmp_path / "study")
    write_all(load_study("report_demo", journal), tmp_path / "report")
    trials = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert list(trials.columns[:6]) == ["number", "category", "baseline", "param_x", "param_ttft_ms",
                                        "param_overload"]
    assert list(trials.columns[6:9]) == ["throughput_tok_s", "latency_p99_ms", "peak_memory_mib"]
    overloaded = trials[trials["param_overload"]]
    assert overloaded["overloaded"].str.startswith("overloaded (offered 25.9 rps, served 2.6)").all()
    slow = trials[(trials["param_ttft_ms"] == 4132.0)]
    assert slow["reason"].str.contains("ttft_p99_ms = 4132 > 2000").all() and not slow["feasible"].any()
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.index("Recommended configurations") < page.index("<h2>Figures")
    baseline = trials[trials["baseline"]].iloc[0]
    best = trials[trials["feasible"]]["throughput_tok_s"].max()
    assert f"{100 * (best - baseline['throughput_tok_s']) / baseline['throughput_tok_s']:+.1f}%" in page
    assert metric_label("throughput_tok_s") == "throughput (tok/s)"
    assert metric_label("latency_p99_ms") == "p99 latency (ms)"


# ---------------------------------------------------------------- the dashboard


@pytest.mark.slow
def test_dashboard_command_stops_streamlit_when_it_is_killed(in_tmp, ux_runner, capsys):
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    import psutil

    run(in_tmp, ux_space(1, {"x": [2.0]}), None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", "--storage", str(in_tmp / "j.journal"),
                            "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "streamlit never answered"
                assert cli.poll() is None, "the dashboard command exited early"
                time.sleep(0.5)
        children = psutil.Process(cli.pid).children(recursive=True)
        assert children  # Streamlit runs in a child process
        cli.send_signal(signal.SIGTERM)  # what `kill PID` sends
        assert cli.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    finally:
        if cli.poll() is None:
            cli.kill()


def _frame(rows: list[tuple[int, float, float, str, bool]]):
    import pandas as pd

    return pd.DataFrame([{"number": n, "throughput_tok_s": x, "latency_p99_ms": y, "category": c, "baseline": b,
                          "state": "COMPLETE", "reason": "", "param_batch_size": n + 1} for n, x, y, c, b in rows])


def test_pareto_axes_go_log_for_an_outlier_and_points_carry_their_trial_number():
    from reports.figures import pareto_figure

    directions = {"throughput_tok_s": "maximize", "latency_p99_ms": "minimize"}
    # One 22 s latency outlier among ~100 ms trials.
    frame = _frame([(0, 100.0, 120.0, "feasible Pareto", True), (1, 90.0, 22000.0, "feasible dominated", False),
                    (2, 110.0, 140.0, "feasible Pareto", False), (10, 105.0, 118.0, "infeasible", False)])
    fig = pareto_figure(frame, ["throughput_tok_s", "latency_p99_ms"], directions)
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "linear"
    assert fig.layout.xaxis.title.text == "throughput (tok/s) ↑ better"
    linear = pareto_figure(frame, ["throughput_tok_s", "latency_p99_ms"], directions, log_axes=[False, False])
    assert linear.layout.yaxis.type == "linear"
    by_trace = {t.name: list(t.customdata) for t in fig.data}
    assert by_trace["feasible Pareto (2)"] == [0, 2] and by_trace["infeasible (1)"] == [10]
    assert by_trace["baseline"] == [0] and fig.layout.hovermode == "closest"
    frame.loc[3, "latency_p99_ms"] = 0.0  # a log axis cannot show zero: that axis stays linear
    assert pareto_figure(frame, ["throughput_tok_s", "latency_p99_ms"], directions, log_axes=[True, True]) \
        .layout.yaxis.type == "linear"


def test_parallel_coordinates_use_viridis_with_the_best_line_drawn_last(tmp_path):
    from reports.cli import load_study
    from reports.figures import parallel_figure
    from tests.report_study import build

    study = load_study("report_demo", build(tmp_path))
    fig = parallel_figure(study, "latency_p99_ms")
    lines = [t for t in fig.data if t.mode == "lines" and t.y[0] is not None]
    # The objective axis is first; low latency is best, so the last line drawn has the lowest y.
    assert lines[-1].y[0] == min(t.y[0] for t in lines) and lines[0].y[0] == max(t.y[0] for t in lines)
    assert lines[-1].line.color == "rgb(253, 231, 37)" and lines[0].line.color == "rgb(68, 1, 84)"  # Viridis ends
    bar = next(t for t in fig.data if t.mode == "markers" and t.marker.showscale)
    assert bar.marker.reversescale is True and bar.marker.colorscale[0][1] == "#440154"


def test_baseline_wording_says_what_is_true():
    import pandas as pd

    from reports.frames import baseline_status, best_delta_text

    def frame(**row):
        base = {"number": 0, "baseline": True, "state": "COMPLETE", "outcome": "ok", "feasible": True}
        return pd.DataFrame([{**base, **row}])

    assert baseline_status(frame()) == "measured"
    assert baseline_status(frame(feasible=False)) == "measured, infeasible"
    assert baseline_status(frame(state="FAIL", outcome="fail", feasible=False)) == "failed"
    assert baseline_status(frame(baseline=False)) == "not run"
    assert best_delta_text(150.0, 50.0, "measured, infeasible") == "+50.0% vs baseline (infeasible)"
    assert best_delta_text(None, None, "measured") == "no feasible trial yet"
    assert best_delta_text(150.0, None, "failed") == "baseline failed (no measurement)"
    assert best_delta_text(150.0, None, "not run") == "no baseline in this study"


# ---------------------------------------------------------------- docs


def test_design_doc_is_linked_and_names_every_knob_metric_and_command():
    import re
    from pathlib import Path

    from runners.contract import METRICS
    from runners.knobs import RUNNER_KNOBS
    from tuner.cli import SUBCOMMANDS

    root = Path(__file__).resolve().parent.parent
    readme, design = (root / "README.md").read_text(), (root / "docs" / "design.md").read_text()
    assert "](docs/design.md)" in readme and "shared folder" not in readme
    for runner in ("glm-infer", "glm-train"):
        missing = [k for k in RUNNER_KNOBS[runner] if f"`{k}`" not in design]
        assert not missing, f"docs/design.md does not name the {runner} knobs {missing}"
    # Latency triples are written as `ttft_p50/p90/p99_ms`; CI bounds as `_ci_low` / `_ci_high`.
    names = set(re.findall(r"`([a-z0-9_/]+)`", design))
    expanded = {n.replace("p50/p90/p99", p) for n in names for p in ("p50", "p90", "p99")}
    missing = [m for m in METRICS if "_ci_" not in m and m not in expanded]
    assert not missing, f"docs/design.md does not name the metrics {missing}"
    assert all(f"autoglm-tune {sub}" in design for sub in SUBCOMMANDS)
