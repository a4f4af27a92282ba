"""The replay runner answers from a recorded table; `export-table` writes one from any study."""

from __future__ import annotations

import csv
import math

import optuna
import pytest

from runners.replay import NOT_IN_TABLE, ReplayTable, load_table, replay, same_value
from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tuner import record
from tuner.cli import main as cli_main
from tuner.export import export_table
from tuner.space import SpaceError, validate
from tuner.storage import open_storage
from tuner.study import RunOptions, run_study

HEADER = ["batch_size", "quant_bits", "kv_cache", "batch_timeout_ms", "throughput_tok_s", "latency_p99_ms",
          "kl_divergence", "infeasible_reason"]
ROWS = [
    [1, 16, "dynamic", 0.30000000000000004, 100.0, 10.0, 0.0, ""],
    [4, 16, "static", 2.5, 380.0, 14.0, 0.0, ""],
    [4, 8, "static", 2.5, 410.0, 13.0, 0.01, ""],
    [8, 4, "static", 2.5, "", "", "", "quant_bits=4 (int4 weight-only) needs CUDA tinygemm kernels; not on CPU"],
    [8, 8, "dynamic", 10.0, 600.0, "", 0.01, ""],
]


def write_table(path, header=HEADER, rows=ROWS):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def knobs(batch_size=4, quant_bits=16, kv_cache="static", batch_timeout_ms=2.5, **more):
    return {"batch_size": batch_size, "quant_bits": quant_bits, "kv_cache": kv_cache,
            "batch_timeout_ms": batch_timeout_ms, **more}


def test_columns_split_into_knobs_and_metrics(tmp_path):
    table = ReplayTable.read(write_table(tmp_path / "t.csv"))
    assert table.knob_columns == ["batch_size", "quant_bits", "kv_cache", "batch_timeout_ms"]
    assert table.metric_columns == ["throughput_tok_s", "latency_p99_ms", "kl_divergence"]
    assert len(table.rows) == 5


def test_exact_lookup_returns_the_recorded_metrics(tmp_path):
    table = ReplayTable.read(write_table(tmp_path / "t.csv"))
    result = replay(table, knobs(quant_bits=8))
    assert result.status == "ok"
    assert result.metrics == {"throughput_tok_s": 410.0, "latency_p99_ms": 13.0, "kl_divergence": 0.01}
    assert result.info["replay_row"] == 2
    # Knobs the table has no column for are not compared.
    assert replay(table, knobs(quant_bits=8, scheduler="dynamic")).metrics["throughput_tok_s"] == 410.0


def test_floats_match_to_1e9_relative_and_no_further(tmp_path):
    table = ReplayTable.read(write_table(tmp_path / "t.csv"))
    assert replay(table, knobs(1, 16, "dynamic", 0.1 * 3)).metrics["throughput_tok_s"] == 100.0
    assert replay(table, knobs(1, 16, "dynamic", 0.3)).metrics["throughput_tok_s"] == 100.0
    assert replay(table, knobs(batch_timeout_ms=2.5 * (1 + 5e-10))).status == "ok"
    assert replay(table, knobs(batch_timeout_ms=2.5 * (1 + 5e-9))).reason == NOT_IN_TABLE
    assert replay(table, knobs(batch_size=4.0)).status == "ok"  # an int column takes 4.0
    assert not same_value(True, 1) and not same_value(0, False) and not same_value("8", 8)


def test_missing_row_is_infeasible_not_in_table(tmp_path):
    table = ReplayTable.read(write_table(tmp_path / "t.csv"))
    for asked in (knobs(batch_size=2), knobs(kv_cache="quantized"), {"batch_size": 4}):
        result = replay(table, asked)
        assert (result.status, result.reason, result.metrics) == ("infeasible", NOT_IN_TABLE, {})


def test_recorded_infeasible_row_and_empty_metrics(tmp_path):
    table = ReplayTable.read(write_table(tmp_path / "t.csv"))
    result = replay(table, knobs(8, 4))
    assert result.status == "infeasible" and "tinygemm" in result.reason
    partial = replay(table, knobs(8, 8, "dynamic", 10.0))
    assert partial.status == "ok" and "latency_p99_ms" not in partial.metrics
    assert partial.unavailable["latency_p99_ms"] == "empty in the replay table"


def test_unusable_tables_are_refused(tmp_path):
    from runners.replay import TableError

    with pytest.raises(TableError, match="no metric column"):
        ReplayTable.read(write_table(tmp_path / "a.csv", ["batch_size"], [[1]]))
    with pytest.raises(TableError, match="no knob column"):
        ReplayTable.read(write_table(tmp_path / "b.csv", ["throughput_tok_s"], [[1.0]]))
    with pytest.raises(TableError, match="cannot read"):
        load_table(tmp_path / "missing.csv")


def replay_raw(table_path, params=None, **search):
    return {"study": "replayed", "runner": "replay", "model": {"table": str(table_path)}, "device": "cpu",
            "params": params or {"batch_size": {"type": "categorical", "choices": [1, 4, 8]},
                                 "quant_bits": {"type": "categorical", "choices": [16, 8, 4]}},
            "fixed": {"kv_cache": "static", "batch_timeout_ms": 2.5},
            "objectives": [{"metric": "throughput_tok_s"}, {"metric": "latency_p99_ms"}],
            "constraints": [{"metric": "kl_divergence", "max": 0.005}],
            "search": {"sampler": "random", "trials": 3, "seed": 0, "baseline": False, **search}}


def test_space_knobs_are_the_table_columns(tmp_path):
    path = write_table(tmp_path / "t.csv")
    space = validate(replay_raw(path), "r.yaml", "r")
    assert set(space.params) == {"batch_size", "quant_bits"}
    bad = replay_raw(path, {"sparsity": {"type": "float", "low": 0.0, "high": 0.5}})
    with pytest.raises(SpaceError, match="params.sparsity: unknown knob for runner replay"):
        validate(bad, "r.yaml", "r")
    with pytest.raises(SpaceError, match="model.table"):
        validate({**replay_raw(path), "model": {"table": str(tmp_path / "nope.csv")}}, "r.yaml", "r")
    with pytest.raises(SpaceError, match="model.table"):
        validate({**replay_raw(path), "model": {}}, "r.yaml", "r")


def test_replay_study_goes_through_the_launcher_and_constraints(tmp_path):
    path = write_table(tmp_path / "t.csv")
    space = validate(replay_raw(path, trials=3), "r.yaml", "r")
    url = str(tmp_path / "j.journal")
    study = optuna.create_study(study_name="replayed", storage=open_storage(url),
                                directions=["maximize", "minimize"])
    for bs, bits in ((4, 16), (4, 8), (8, 4)):
        study.enqueue_trial({"batch_size": bs, "quant_bits": bits})
    summary = run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    assert summary.counted == 3
    trials = {(t.params["batch_size"], t.params["quant_bits"]): t for t in study.get_trials()}
    assert trials[4, 16].values == [380.0, 14.0]
    # kl 0.01 breaks the space's bound 0.005: measured, but infeasible by the constraint.
    # (told the worst values, so no tool ranks it best; the measured ones stay in `metrics`)
    assert trials[4, 8].values == [float("-inf"), float("inf")] and max(trials[4, 8].constraints.values()) > 0
    assert trials[4, 8].user_attrs["metrics"]["throughput_tok_s"] == 410.0
    assert "tinygemm" in trials[8, 4].user_attrs["infeasible_reason"]
    assert [t.number for t in study.best_trials] == [trials[4, 16].number]


@pytest.mark.slow
def test_report_reads_a_replay_study_like_any_other(tmp_path):
    import pandas as pd

    path = write_table(tmp_path / "t.csv")
    space = validate(replay_raw(path, sampler="grid", trials=9), "r.yaml", "r")
    url = str(tmp_path / "j.journal")
    run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    assert cli_main(["report", "--study", "replayed", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    frame = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert sorted(frame["throughput_tok_s"].dropna()) == [380.0, 410.0]
    assert (frame["reason"] == "not in table").sum() == 6


# ---------------------------------------------------------------- export round trip


@pytest.fixture
def fault_runner_registered(monkeypatch):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


def test_export_then_replay_gives_the_same_objective_values(tmp_path, fault_runner_registered):
    params = {"x": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5},
              "mode": {"type": "categorical", "choices": ["ok", "infeasible"]}}
    source = validate({"study": "measured", "runner": FAULT_RUNNER, "device": "cpu", "params": params,
                       "fixed": {"sleep_s": 0.0},
                       "objectives": [{"metric": "throughput_tok_s"}, {"metric": "latency_p99_ms"}],
                       "search": {"sampler": "grid", "trials": 8, "seed": 1, "baseline": False}}, "m.yaml", "m")
    url = str(tmp_path / "j.journal")
    run_study(source, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    measured = optuna.load_study(study_name="measured", storage=open_storage(url))
    assert cli_main(["export-table", "--study", "measured", "--storage", url, "--out", str(tmp_path / "t.csv")]) == 0
    table = load_table(tmp_path / "t.csv")
    assert table.knob_columns == ["x", "mode", "sleep_s"] and len(table.rows) == 8

    raw = {**source.raw, "study": "replayed", "runner": "replay", "model": {"table": str(tmp_path / "t.csv")}}
    replayed_space = validate(raw, "r.yaml", "r")
    run_study(replayed_space, open_storage(url), RunOptions(url, tmp_path / "out2", quiet=True))
    replayed = optuna.load_study(study_name="replayed", storage=open_storage(url))

    def by_params(study):
        return {(t.params["x"], t.params["mode"]): (t.values, t.user_attrs.get("infeasible_reason"))
                for t in study.get_trials()}

    assert by_params(replayed) == by_params(measured)
    assert by_params(measured)[1.5, "ok"][0] == [150.0, pytest.approx(10 / 1.5)]
    assert by_params(replayed)[2.0, "infeasible"] == ([-math.inf, math.inf], "mode=infeasible cannot run here")


def test_export_of_an_empty_study_is_a_usage_error(tmp_path, capsys):
    url = str(tmp_path / "j.journal")
    optuna.create_study(study_name="empty", storage=open_storage(url), directions=["maximize"])
    assert cli_main(["export-table", "--study", "empty", "--storage", url, "--out", str(tmp_path / "t.csv")]) == 2
    assert "no finished trial" in capsys.readouterr().err
    assert cli_main(["export-table", "--study", "nope", "--storage", url, "--out", str(tmp_path / "t.csv")]) == 2
    assert not (tmp_path / "t.csv").exists()


def test_export_keeps_the_first_of_repeated_configs(tmp_path):
    path = write_table(tmp_path / "t.csv")
    space = validate(replay_raw(path, trials=2), "r.yaml", "r")
    url = str(tmp_path / "j.journal")
    study = optuna.create_study(study_name="replayed", storage=open_storage(url), directions=["maximize", "minimize"])
    study.enqueue_trial({"batch_size": 4, "quant_bits": 16})
    study.enqueue_trial({"batch_size": 4, "quant_bits": 16})
    run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    rows, repeats = export_table(study, tmp_path / "again.csv")
    assert (rows, repeats) == (1, 1)
    assert replay(load_table(tmp_path / "again.csv"), knobs()).metrics["throughput_tok_s"] == 380.0


def test_export_replays_a_window_stopped_early_as_infeasible(tmp_path):
    """A stopped window ran (outcome ok) with partial metrics: its row keeps the stop as the reason."""
    dist = {"batch_size": optuna.distributions.CategoricalDistribution([1, 2])}
    study = optuna.create_study(study_name="stopped", directions=["maximize"])
    study.set_user_attr("space", {"params": {"batch_size": {"type": "categorical", "choices": [1, 2]}}})
    reason = "window stopped early: over-saturation"
    for batch, attrs in ((1, {"outcome": "ok", "metrics": {"throughput_tok_s": 50.0}}),
                         (2, {"outcome": "ok", "metrics": {"throughput_tok_s": 90.0},
                              "stopped_early": {"rule": "over-saturation"}, "infeasible_reason": reason})):
        study.add_trial(optuna.trial.create_trial(params={"batch_size": batch}, distributions=dist,
                                                  values=[attrs["metrics"]["throughput_tok_s"]], user_attrs=attrs))
    export_table(study, tmp_path / "t.csv")
    table = load_table(tmp_path / "t.csv")
    ran, stopped = replay(table, {"batch_size": 1}), replay(table, {"batch_size": 2})
    assert (ran.status, ran.metrics["throughput_tok_s"]) == ("ok", 50.0)
    assert (stopped.status, stopped.reason) == ("infeasible", reason)


# ---------------------------------------------------------------- what the recorded runner declares

# batch {1, 2} x bits {16, 4} x KV {static, offloaded} x scheduler {dynamic, continuous}, engine fast:
# offloaded + dynamic is refused by the fast engine on any device (4 points); int4 reads KL 1.0
# in set-up, so its window is never served (no objective measured).
DECLARED_HEADER = ["batch_size", "quant_bits", "kv_cache", "scheduler", "engine", "throughput_tok_s",
                   "tpot_p50_ms", "kl_divergence", "infeasible_reason"]


def declared_rows():
    rows = []
    for bs in (1, 2):
        for bits in (16, 4):
            for kv in ("static", "offloaded"):
                for scheduler in ("dynamic", "continuous"):
                    if kv == "offloaded" and scheduler == "dynamic":
                        rows.append([bs, bits, kv, scheduler, "fast", "", "", "", "refused by the engine"])
                    elif bits == 4:
                        rows.append([bs, bits, kv, scheduler, "fast", "", "", 1.0, ""])
                    else:
                        rows.append([bs, bits, kv, scheduler, "fast", 100.0 * bs + (kv == "static"),
                                     5.0 + bs + (scheduler == "continuous"), 0.0, ""])
    return rows


def declared_raw(path, recorded_with="glm-infer", sampler="auto", trials=6):
    model = {"table": str(path), **({"recorded_with": recorded_with} if recorded_with else {})}
    return {"study": "declared", "runner": "replay", "model": model, "device": "cpu",
            "params": {"batch_size": {"type": "categorical", "choices": [1, 2]},
                       "quant_bits": {"type": "categorical", "choices": [16, 4]},
                       "kv_cache": {"type": "categorical", "choices": ["static", "offloaded"]},
                       "scheduler": {"type": "categorical", "choices": ["dynamic", "continuous"]}},
            "fixed": {"engine": "fast"},
            "objectives": [{"metric": "throughput_tok_s"}, {"metric": "tpot_p50_ms", "direction": "minimize"}],
            "constraints": [{"metric": "kl_divergence", "max": 0.1}],
            "search": {"sampler": sampler, "trials": trials, "seed": 0, "baseline": False}}


def test_recorded_with_takes_the_runners_knob_declarations(tmp_path):
    from runners.knobs import INFER_KNOBS
    from runners.registry import runner_knobs

    path = write_table(tmp_path / "d.csv", DECLARED_HEADER, declared_rows())
    space = validate(declared_raw(path), "r.yaml", "r")
    table = runner_knobs(space.runner, space.model)
    assert table["kv_cache"] is INFER_KNOBS["kv_cache"] and table["quant_bits"].rebuilds
    plain = validate(declared_raw(path, recorded_with=None), "r.yaml", "r")
    assert not runner_knobs(plain.runner, plain.model)["quant_bits"].rebuilds  # a bare column
    for bad in ("replay", "nope"):
        with pytest.raises(SpaceError, match="model.recorded_with"):
            validate(declared_raw(path, recorded_with=bad), "r.yaml", "r")


def test_refused_combinations_are_told_without_a_child_and_announced(tmp_path):
    from tuner.device_fit import announce_refused

    path = write_table(tmp_path / "d.csv", DECLARED_HEADER, declared_rows())
    space = validate(declared_raw(path, sampler="random", trials=16), "r.yaml", "r")
    said = []
    announce_refused(space, said.append)
    assert len(said) == 1 and said[0].startswith("4 of 16 configurations are refused by runner replay on any device")
    assert "kv_cache=offloaded preempts sequences" in said[0]
    url = str(tmp_path / "j.journal")
    run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    study = optuna.load_study(study_name="declared", storage=open_storage(url))
    refused = [t for t in study.trials if t.params["kv_cache"] == "offloaded" and t.params["scheduler"] == "dynamic"]
    assert refused  # random draws reach them: each is answered by the rule, not by the table's row
    for t in refused:
        assert t.user_attrs["infeasible_reason"].startswith("engine=fast: kv_cache=offloaded")
        assert t.user_attrs["info"]["refused_up_front"] is True and "replay_row" not in t.user_attrs["info"]
    others = [t for t in study.trials if t not in refused]  # looked up, or an int4 stack's quality known
    assert all("replay_row" in t.user_attrs["info"] or "same_quality_as" in t.user_attrs["info"] for t in others)


def test_a_space_whose_every_point_is_refused_is_a_usage_error(tmp_path):
    from tuner.device_fit import announce_refused
    from tuner.errors import UsageError

    path = write_table(tmp_path / "d.csv", DECLARED_HEADER, declared_rows())
    raw = declared_raw(path)
    raw["params"] = {"batch_size": {"type": "categorical", "choices": [1, 2]}}
    raw["fixed"] = {"engine": "fast", "kv_cache": "offloaded", "scheduler": "dynamic", "quant_bits": 16}
    with pytest.raises(UsageError, match="every one of the 2 configurations is refused by runner replay on any device, so nothing could run"):
        announce_refused(validate(raw, "r.yaml", "r"), lambda _: None)


def test_auto_never_proposes_refused_points_or_a_second_config_of_a_broken_stack(tmp_path):
    # 12 runnable points: 6 at 16 bits; 6 at int4, which share 2 quality keys (KV static or
    # offloaded: quality is scored once per built model and KV policy, whatever the batch size
    # or scheduler). In 7 trials auto may try each key once, and never a refused point.
    path = write_table(tmp_path / "d.csv", DECLARED_HEADER, declared_rows())
    space = validate(declared_raw(path, trials=7), "r.yaml", "r")
    url = str(tmp_path / "j.journal")
    run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    trials = optuna.load_study(study_name="declared", storage=open_storage(url)).trials
    assert len(trials) == 7
    assert not [t for t in trials if t.params["kv_cache"] == "offloaded" and t.params["scheduler"] == "dynamic"]
    int4 = [t.params["kv_cache"] for t in trials if t.params["quant_bits"] == 4]
    assert int4 and len(int4) == len(set(int4))
    assert {(t.params["batch_size"], t.params["kv_cache"], t.params["scheduler"])
            for t in trials if t.params["quant_bits"] == 16} <= {(b, kv, s) for b in (1, 2)
                                                              for kv, s in (("static", "dynamic"),
                                                                            ("static", "continuous"),
                                                                            ("offloaded", "continuous"))}


def test_any_sampler_gets_a_stack_whose_quality_broke_a_bound_answered_without_running(tmp_path):
    path = write_table(tmp_path / "d.csv", DECLARED_HEADER, declared_rows())
    space = validate(declared_raw(path, sampler="random", trials=4), "r.yaml", "r")
    url = str(tmp_path / "j.journal")
    study = optuna.create_study(study_name="declared", storage=open_storage(url),
                                directions=["maximize", "minimize"])
    for bs, bits, kv, scheduler in ((1, 4, "static", "dynamic"), (2, 4, "static", "continuous"),
                                    (1, 4, "offloaded", "continuous"), (2, 16, "static", "dynamic")):
        study.enqueue_trial({"batch_size": bs, "quant_bits": bits, "kv_cache": kv, "scheduler": scheduler})
    run_study(space, open_storage(url), RunOptions(url, tmp_path / "out", quiet=True))
    first, same_stack, other_kv, bf16 = optuna.load_study(study_name="declared", storage=open_storage(url)).trials
    assert "replay_row" in first.user_attrs["info"] and first.user_attrs["metrics"]["kl_divergence"] == 1.0
    # another batch size and scheduler, the same built model and KV policy: the same quality
    assert same_stack.user_attrs["info"] == {"same_quality_as": first.number}
    assert same_stack.user_attrs["metrics"]["kl_divergence"] == 1.0
    assert "as trial #0 with the same quality knobs measured" in same_stack.user_attrs["infeasible_reason"]
    assert same_stack.constraints["kl_divergence<=0.1"] > 0 and same_stack.values == first.values
    # another KV policy is another quality: measured (from the table), as is a 16-bit stack
    assert "replay_row" in other_kv.user_attrs["info"] and "replay_row" in bf16.user_attrs["info"]
    assert record.feasible(bf16)
