"""Search policy: the plateau rule, warm starts, the feasible hypervolume and the `auto` choice."""

from __future__ import annotations

import csv
import math

import numpy as np
import optuna
import pytest
import yaml

from tuner.cli import _exit_code
from tuner.cli import main as cli_main
from tuner.search import Plateau, auto_sampler, hypervolume, plateau_reached, reference_point, space_size
from tuner.space import PlateauStop, SpaceError, validate
from tuner.storage import open_storage
from tuner.study import RunOptions, counted_trials, run_study

# ---------------------------------------------------------------- the plateau rule


@pytest.mark.parametrize(("history", "stops"), [
    ([0.0, 0.0, 0.0, 0.0, 0.0], False),  # nothing feasible yet: keep searching
    ([1.0, 1.02, 1.03], False),  # fewer trials than the patience
    ([1.0, 2.0, 2.04, 2.05, 2.08], True),  # +4 % over the last 3 trials, less than 5 %
    ([1.0, 2.0, 2.04, 2.05, 2.2], False),  # +10 %
    ([0.0, 0.0, 3.0, 3.0, 3.0, 3.0], True),
    ([0.0, 0.0, 0.0, 3.0, 3.0, 3.0], False),  # 3 trials ago there was no front: 0 -> 3 improved
])
def test_plateau_rule_on_a_synthetic_sequence(history, stops):
    found = plateau_reached(history, PlateauStop(patience=3, min_improvement=0.05))
    assert (found is not None) == stops
    if stops:
        assert found == Plateau(3, history[-4], history[-1])
        assert "over the last 3 trials (< 5 %)" in found.describe(PlateauStop(3, 0.05))


def test_plateau_with_zero_min_improvement_needs_no_gain_at_all():
    rule = PlateauStop(patience=2, min_improvement=0.0)
    assert plateau_reached([1.0, 1.0, 1.0], rule) is not None
    assert plateau_reached([1.0, 1.0, 1.0001], rule) is None


def test_stop_and_warm_start_keys_are_validated():
    base = {"objectives": [{"metric": "throughput_tok_s"}], "params": {}}
    for stop, key in (({"patience": 0}, "search.stop.patience"), ({"min_improvement": 0.1}, "search.stop.patience"),
                      ({"patience": 3, "min_improvement": -1}, "search.stop.min_improvement"),
                      ({"patience": 3, "every": 2}, "search.stop.every")):
        with pytest.raises(SpaceError, match=key):
            validate({**base, "search": {"stop": stop}}, "s.yaml", "s")
    with pytest.raises(SpaceError, match="search.warm_start.study"):
        validate({**base, "search": {"warm_start": {"storage": "x.journal"}}}, "s.yaml", "s")
    space = validate({**base, "search": {"stop": {"patience": 4, "min_improvement": 0.01},
                                         "warm_start": {"study": "earlier"}}}, "s.yaml", "s")
    assert space.search.stop == PlateauStop(4, 0.01) and space.search.warm_start.study == "earlier"


# ---------------------------------------------------------------- hypervolume


def test_hypervolume_of_known_boxes():
    directions = ["maximize", "minimize"]
    # Two points against reference (0, 10): boxes 4x8 and 2x9 overlapping in 2x8 -> 32 + 18 - 16.
    assert hypervolume([[4.0, 2.0], [2.0, 1.0]], directions, [0.0, 10.0]) == pytest.approx(34.0)
    assert hypervolume([[-1.0, 2.0]], directions, [0.0, 10.0]) == 0.0  # outside the reference box
    assert hypervolume([], directions, [0.0, 10.0]) == 0.0
    assert reference_point([[4.0, 2.0], [2.0, 1.0]], directions) == pytest.approx([1.8, 2.1])


# ---------------------------------------------------------------- studies over a replay table


def write_table(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["batch_size", "quant_bits", "throughput_tok_s", "latency_p99_ms", "infeasible_reason"])
        writer.writerows(rows)
    return path


def saturating_table(path):
    """Throughput grows with the batch up to 4 and then stays flat; latency constant."""
    return write_table(path, [[b, 16, 100.0 * min(b, 4), 10.0, ""] for b in range(1, 13)])


def raw(table, study="s", params=None, **search):
    return {"study": study, "runner": "replay", "model": {"table": str(table)}, "device": "cpu",
            "params": params or {"batch_size": {"type": "int", "low": 1, "high": 12}},
            "objectives": [{"metric": "throughput_tok_s"}, {"metric": "latency_p99_ms"}],
            "search": {"sampler": "random", "trials": 12, "seed": 0, "baseline": False, **search}}


def run(space, url, tmp_path, enqueue=(), quiet=True):
    storage = open_storage(url)
    study = optuna.create_study(study_name=space.study, storage=storage,
                                directions=[o.direction for o in space.objectives], load_if_exists=True)
    for params in enqueue:
        study.enqueue_trial(params)
    summary = run_study(space, storage, RunOptions(url, tmp_path / space.study, quiet=quiet))
    return summary, optuna.load_study(study_name=space.study, storage=open_storage(url))


def test_plateau_ends_a_study_and_the_summary_says_so(tmp_path, capsys):
    table = saturating_table(tmp_path / "t.csv")
    space = validate(raw(table, stop={"patience": 3, "min_improvement": 0.01}), "s.yaml", "s")
    url = str(tmp_path / "j.journal")
    summary, study = run(space, url, tmp_path, [{"batch_size": b} for b in range(1, 13)], quiet=False)
    # The hypervolume last grew at batch 4 (trial 3); trials 4, 5, 6 add nothing -> stop after 7.
    assert summary.counted == 7 and summary.budget == 12
    assert "over the last 3 trials" in summary.plateau and _exit_code(summary) == 0
    assert study.user_attrs["stopped"]["rule"] == "plateau"
    out = capsys.readouterr().out
    assert "stopping on a plateau: feasible hypervolume improved by 0.00 % over the last 3 trials" in out
    assert "done: 7/12 trials" in out and "stopped on a plateau" in out


def test_warm_start_identical_space_copies_every_trial(tmp_path):
    table = saturating_table(tmp_path / "t.csv")
    url = str(tmp_path / "j.journal")
    earlier, _ = run(validate(raw(table, "earlier", trials=4, baseline=True), "s.yaml", "s"), url, tmp_path,
                     [{"batch_size": b} for b in (2, 3, 5)])
    assert earlier.counted == 4
    space = validate(raw(table, "later", trials=2, warm_start={"study": "earlier"}, baseline=True), "s.yaml", "s")
    summary, study = run(space, url, tmp_path)
    carried = [t for t in study.trials if t.user_attrs.get("carried_over")]
    assert [t.user_attrs["warm_start_from"] for t in carried] == [{"study": "earlier", "trial": n} for n in range(4)]
    # The baseline (the table's first row: batch 1) was measured there and is not queued again.
    assert sorted(t.values[0] for t in carried) == [100.0, 200.0, 300.0, 400.0]
    assert [t.params for t in study.trials if t.user_attrs.get("baseline")] == [{"batch_size": 1}]
    # The copies were measured there: this study's budget of 2 is spent on 2 new trials.
    assert summary.counted == counted_trials(study) == 2 and len(study.trials) == 6
    assert study.user_attrs["warm_start"] == {"study": "earlier", "mode": "identical", "trials": [0, 1, 2, 3]}
    from reports.frames import trials_frame

    origins = trials_frame(study)["warm_start_from"]
    assert list(origins[:4]) == ["earlier#0", "earlier#1", "earlier#2", "earlier#3"] and origins[4:].isna().all()
    # Running again does not carry the trials over a second time.
    run(space, url, tmp_path)
    assert sum(bool(t.user_attrs.get("carried_over")) for t in study.get_trials()) == 4


def earlier_grid_study(tmp_path, rows: list) -> tuple[object, str, optuna.Study]:
    """The table of `rows`, and an earlier grid study over batch {1, 2, 4} x bits {16, 8} of it
    (the source a warm start reads)."""
    table = write_table(tmp_path / "t.csv", rows)
    url = str(tmp_path / "j.journal")
    narrow = {"batch_size": {"type": "categorical", "choices": [1, 2, 4]},
              "quant_bits": {"type": "categorical", "choices": [16, 8]}}
    run(validate(raw(table, "earlier", narrow, sampler="grid", trials=6), "s.yaml", "s"), url, tmp_path)
    return table, url, optuna.load_study(study_name="earlier", storage=open_storage(url))


def test_warm_start_overlapping_space_enqueues_the_earlier_front(tmp_path):
    rows = [[b, q, 100.0 * b / (1 if q == 16 else 0.8), 10.0 * b * (1 if q == 16 else 0.5), ""]
            for b in (1, 2, 4, 8) for q in (16, 8)] + [[b, 4, "", "", "no int4 here"] for b in (1, 2, 4, 8)]
    table, url, earlier = earlier_grid_study(tmp_path, rows)
    front = {t.number: t.params for t in earlier.best_trials}
    assert len(front) >= 2

    # Another range: batch 1 is no longer searched, 8 and int4 are new.
    wide = {"batch_size": {"type": "categorical", "choices": [2, 4, 8]},
            "quant_bits": {"type": "categorical", "choices": [16, 8, 4]}}
    space = validate(raw(table, "later", wide, trials=6, warm_start={"study": "earlier"}, baseline=True),
                     "s.yaml", "s")
    summary, study = run(space, url, tmp_path)
    expected = {n: p for n, p in front.items() if p["batch_size"] != 1}
    queued = [t for t in study.trials if t.user_attrs.get("warm_start_from")]
    seeded = [t for t in queued if not t.user_attrs["warm_start_from"].get("extended")]
    assert study.trials[0].user_attrs.get("baseline")  # the baseline stays first ...
    assert [t.number for t in queued] == list(range(1, 1 + len(queued)))  # ... then the carried configs
    assert {t.user_attrs["warm_start_from"]["trial"]: t.params for t in seeded} == expected
    # The study records them in the order they were queued (each extension right after its parent).
    assert [t.user_attrs["warm_start_from"]["trial"] for t in seeded] == study.user_attrs["warm_start"]["trials"]
    assert not any(t.user_attrs.get("carried_over") for t in study.trials)
    assert summary.counted == 6 and study.user_attrs["warm_start"]["mode"] == "overlapping"


def test_warm_start_extends_the_front_past_the_edge_of_the_earlier_range(tmp_path):
    rows = [[b, q, 100.0 * b / (1 if q == 16 else 0.8), 10.0 * b * (1 if q == 16 else 0.5), ""]
            for b in (1, 2, 4, 8) for q in (16, 8, 4)]
    table, url, earlier = earlier_grid_study(tmp_path, rows)
    # int8 is faster and quicker per token at every batch size: the front is batch 1, 2, 4 at int8,
    # cut by both old edges (batch 4 is the largest batch, int8 the fewest bits).
    assert sorted((t.params["batch_size"], t.params["quant_bits"]) for t in earlier.best_trials) == [
        (1, 8), (2, 8), (4, 8)]
    wide = {"batch_size": {"type": "categorical", "choices": [2, 4, 8]},
            "quant_bits": {"type": "categorical", "choices": [16, 8, 4]}}
    space = validate(raw(table, "later", wide, trials=6, warm_start={"study": "earlier"}), "s.yaml", "s")
    _, study = run(space, url, tmp_path)
    queued = [(t.params["batch_size"], t.params["quant_bits"], bool(t.user_attrs["warm_start_from"].get("extended")))
              for t in study.trials[:5]]
    # Reference (60 tok/s, 43.5 ms) over the earlier 6 points: (4, 8) alone holds 250 x 23.5 = 5875,
    # (2, 8) 125 x 10 = 1250, (1, 8) 65 x 5 = 325 (and falls outside this range). Each is followed
    # by its configs one value past a cut edge: batch 4 -> 8, int8 -> int4 ((1, 4) is outside too).
    assert queued == [(4, 8, False), (8, 8, True), (4, 4, True), (2, 8, False), (2, 4, True)]
    assert all(t.user_attrs.get("warm_start_from") is None for t in study.trials[5:])


def source_study(points: list[tuple[float, float]], metric_names: list[str] | None) -> optuna.Study:
    """An in-memory earlier study: trial n measured `points[n]` (throughput, p99 latency) at batch n + 1."""
    study = optuna.create_study(study_name="earlier", directions=["maximize", "minimize"])
    if metric_names:
        study.set_metric_names(metric_names)
    batch = optuna.distributions.IntDistribution(1, 12)
    study.add_trials([optuna.trial.create_trial(
        values=list(v), params={"batch_size": n + 1}, distributions={"batch_size": batch},
        user_attrs={"metrics": {"throughput_tok_s": v[0], "latency_p99_ms": v[1]}}) for n, v in enumerate(points)])
    return study


@pytest.mark.parametrize("metric_names", [["throughput_tok_s", "latency_p99_ms"], None])
def test_overlapping_warm_start_enqueues_the_largest_hypervolume_contribution_first(tmp_path, metric_names):
    from tuner.warm_start import warm_start

    # Front (tok/s, ms): #0 (100, 10), #1 (300, 30), #2 (400, 80); #3 (90, 50) is dominated.
    # Reference over the feasible values: (90 - 0.1 * 310, 80 + 0.1 * 70) = (59, 87). Exclusive
    # boxes: #1 200 tok/s x 50 ms = 10000, #0 41 x 20 = 820, #2 100 x 7 = 700.
    source = source_study([(100.0, 10.0), (300.0, 30.0), (400.0, 80.0), (90.0, 50.0)], metric_names)
    space = validate(raw(saturating_table(tmp_path / "t.csv"), "later"), "s.yaml", "s")
    study = optuna.create_study(directions=["maximize", "minimize"])
    result = warm_start(study, space, source)
    assert result.mode == "overlapping" and result.carried == [1, 0, 2]
    asked = [study.ask(space.distributions()).params["batch_size"] for _ in range(3)]
    assert asked == [2, 1, 3]  # the queue runs in that order
    assert "largest exclusive hypervolume contribution in the earlier study first" in result.detail


def test_equal_hypervolume_contributions_keep_the_source_trial_order(tmp_path):
    from tuner.warm_start import warm_start

    # Reference (80, 32): #1 (100, 10) holds 20 x 10 = 200 alone, #0 (300, 30) 100 x 2 = 200, and
    # #2 (200, 20) 100 x 10 = 1000: #2 first, then the tie in trial order (#0 before #1).
    source = source_study([(300.0, 30.0), (100.0, 10.0), (200.0, 20.0)], ["throughput_tok_s", "latency_p99_ms"])
    space = validate(raw(saturating_table(tmp_path / "t.csv"), "later"), "s.yaml", "s")
    result = warm_start(optuna.create_study(directions=["maximize", "minimize"]), space, source)
    assert result.carried == [2, 0, 1]


def test_extensions_need_an_ordered_knob_whose_range_grew():
    from tuner.warm_start import _ordered_values

    cat = optuna.distributions.CategoricalDistribution
    assert _ordered_values(cat([16, 8, 4])) == [4, 8, 16]
    assert _ordered_values(cat(["static", "dynamic"])) is None  # no order: no "past the edge"
    assert _ordered_values(cat([True, False])) is None
    assert _ordered_values(optuna.distributions.FloatDistribution(0.0, 0.5, step=0.25)) == [0.0, 0.25, 0.5]
    assert _ordered_values(optuna.distributions.FloatDistribution(0.0, 0.5)) is None  # continuous


def test_warm_start_from_a_missing_study_is_a_usage_error(tmp_path, capsys):
    table = saturating_table(tmp_path / "t.csv")
    space_file = tmp_path / "s.yaml"
    space_file.write_text(yaml.safe_dump(raw(table, "later", warm_start={"study": "nope"})))
    url = str(tmp_path / "j.journal")
    open_storage(url)
    out = tmp_path / "out"
    assert cli_main(["--space", str(space_file), "--storage", url, "--out", str(out), "--quiet"]) == 2
    assert "search.warm_start: no study 'nope'" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- auto


def test_auto_takes_the_grid_when_the_budget_covers_the_space(tmp_path):
    table = saturating_table(tmp_path / "t.csv")
    small = validate(raw(table, sampler="auto", trials=12), "s.yaml", "s")
    assert space_size(small) == 12 and auto_sampler(small).sampler == "grid"
    bigger = validate(raw(table, sampler="auto", trials=6), "s.yaml", "s")
    assert auto_sampler(bigger).sampler != "grid"


class AlwaysOne(optuna.samplers.BaseSampler):
    """A model that always proposes x = 1 jointly (what a stuck GP does in a finite space)."""

    def infer_relative_search_space(self, study, trial):
        return {"x": optuna.distributions.IntDistribution(0, 999)}

    def sample_relative(self, study, trial, search_space):
        return {"x": 1}

    def sample_independent(self, study, trial, name, distribution):
        raise AssertionError("the joint suggestion covers every param")


def test_no_repeat_sampler_explores_instead_of_repeating_a_tried_or_running_config():
    from tuner.search import NoRepeatSampler

    study = optuna.create_study(sampler=NoRepeatSampler(AlwaysOne(), seed=0))
    dist = {"x": optuna.distributions.IntDistribution(0, 999)}
    running = study.ask(dist)
    assert running.params["x"] == 1
    concurrent = study.ask(dist)  # x = 1 is running: another worker gets something else
    assert concurrent.params["x"] != 1
    study.tell(running, 1.0)
    study.tell(concurrent, 2.0)
    later = [study.ask(dist) for _ in range(4)]
    xs = [t.params["x"] for t in later]
    assert 1 not in xs and len(set(xs)) == 4


def test_auto_scores_every_point_of_a_finite_space_and_wraps_larger_ones(tmp_path, monkeypatch):
    import tuner.search
    from tuner.gp_search import ExhaustiveGPSampler
    from tuner.search import NoRepeatSampler
    from tuner.study import make_sampler

    table = saturating_table(tmp_path / "t.csv")
    finite = validate(raw(table, sampler="auto", trials=6), "s.yaml", "s")
    assert isinstance(make_sampler(finite), ExhaustiveGPSampler)
    monkeypatch.setattr(tuner.search, "EXHAUSTIVE_MAX_POINTS", 11)  # 12 points: too many to enumerate
    sampler = make_sampler(finite)
    assert isinstance(sampler, NoRepeatSampler) and type(sampler._inner) is optuna.samplers.GPSampler
    table2 = tmp_path / "f.csv"
    table2.write_text("batch_timeout_ms,throughput_tok_s\n1.0,1.0\n")
    continuous = validate({**raw(table2, sampler="auto", trials=6),
                           "params": {"batch_timeout_ms": {"type": "float", "low": 0.5, "high": 5.0}}}, "s.yaml", "s")
    wrapped = make_sampler(continuous)  # a GP's acquisition can peak on a bound twice: no repeats either
    assert isinstance(wrapped, NoRepeatSampler) and type(wrapped._inner) is optuna.samplers.GPSampler


def test_exhaustive_gp_never_repeats_a_tried_or_running_config(tmp_path):
    from tuner.gp_search import ExhaustiveGPSampler
    from tuner.search import grid_points

    space = validate(raw(saturating_table(tmp_path / "t.csv"), sampler="auto", trials=6), "s.yaml", "s")
    points = grid_points(space)
    assert [p["batch_size"] for p in points] == list(range(1, 13))
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=ExhaustiveGPSampler(space, points, seed=0, n_startup_trials=2))
    seen = []
    for _ in range(5):  # ask two at once: the second must avoid the first, still running
        pair = [study.ask(space.distributions()), study.ask(space.distributions())]
        for trial in pair:
            seen.append(trial.params["batch_size"])
            study.tell(trial, [100.0 * min(seen[-1], 4), 10.0])
    assert len(seen) == 10 and len(set(seen)) == 10


def test_the_gp_reads_measured_values_of_trials_that_broke_a_bound():
    from tuner.gp_search import _MeasuredView

    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    worst = [float("-inf"), float("inf")]
    for x, attrs, values in ((0, {"metrics": {"throughput_tok_s": 5.0, "latency_p99_ms": 7.0}}, worst),
                             (1, {}, worst),  # could not run: nothing measured
                             (2, {"metrics": {"throughput_tok_s": 9.0, "latency_p99_ms": 3.0}}, [9.0, 3.0])):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, values=values, user_attrs=attrs))
    view = _MeasuredView(study, ["throughput_tok_s", "latency_p99_ms"])
    assert [t.values for t in view._get_trials(states=(optuna.trial.TrialState.COMPLETE,))] == [
        [5.0, 7.0], worst, [9.0, 3.0]]
    assert study.trials[0].values == worst  # the study itself is unchanged
    assert view.directions == study.directions


def test_the_gp_counts_each_constraint_once():
    from tuner.gp_search import _MeasuredView
    from tuner.tell import store_constraint_list

    study = optuna.create_study()
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    trial.set_constraint("runnable", 0.0)
    trial.set_constraint("kl_divergence<=0.1", 0.5)
    store_constraint_list(study, trial, [0.0, 0.5])  # the list optuna-dashboard reads
    study.tell(trial, 1.0)
    assert len(study.trials[0].constraints) == 4  # named and listed: each bound twice
    (seen,) = _MeasuredView(study, ["throughput_tok_s"])._get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert seen.constraints == {"runnable": 0.0, "kl_divergence<=0.1": 0.5}


def test_the_benchmark_replays_recorded_grids_and_names_a_missing_one(tmp_path):
    verbosity = optuna.logging.get_verbosity()
    try:
        from benchmarks.search_efficiency import GRIDS, grid_tables
    finally:
        optuna.logging.set_verbosity(verbosity)  # the benchmark quiets Optuna for its own runs
    found = grid_tables([])
    assert GRIDS / "cpu_tiny.csv" in found
    assert all(p.with_name(p.stem + "_space.yaml").exists() for p in found)
    with pytest.raises(SystemExit, match="gpu_nope.csv does not exist"):
        grid_tables(["gpu_nope"])
    table = write_table(tmp_path / "mine.csv", [[1, 16, 1.0, 1.0, ""]])
    with pytest.raises(SystemExit, match="mine_space.yaml does not exist"):
        grid_tables([str(table)])
    (tmp_path / "mine_space.yaml").write_text("study: mine\n")
    assert grid_tables([str(table)]) == [table]


def test_the_benchmark_counts_enqueued_warm_start_configs_as_the_warm_studys_trials(tmp_path):
    verbosity = optuna.logging.get_verbosity()
    try:
        from benchmarks.search_efficiency import load_grid, run_search
    finally:
        optuna.logging.set_verbosity(verbosity)
    table = write_table(tmp_path / "mine.csv", [[b, 16, 100.0 * b, 10.0 * b, ""] for b in range(1, 5)])
    (tmp_path / "mine_space.yaml").write_text(yaml.safe_dump({
        "study": "mine", "params": {"batch_size": {"type": "int", "low": 1, "high": 4}},
        "objectives": [{"metric": "throughput_tok_s"}, {"metric": "latency_p99_ms"}]}))
    grid = load_grid(table)
    # An earlier front of batch 1 and batch 4 (equal contributions: batch 1, the earlier trial,
    # first), enqueued into the warm study: its first two trials are those two, not extra ones.
    source = optuna.create_study(directions=["maximize", "minimize"])
    source.set_metric_names(["throughput_tok_s", "latency_p99_ms"])
    batch = optuna.distributions.IntDistribution(1, 4)
    source.add_trials([optuna.trial.create_trial(values=[100.0 * b, 10.0 * b], params={"batch_size": b},
                                                 distributions={"batch_size": batch}) for b in (1, 4)])
    curve = run_search(grid, "random", 0, 2, seeded=source)[0]
    share = [hypervolume(points, grid.directions, grid.reference) / grid.full_hv
             for points in ([[100.0, 10.0]], [[100.0, 10.0], [400.0, 40.0]])]
    assert curve.tolist() == pytest.approx(share) and share[1] < 1.0


def test_the_oracle_counts_the_fewest_points_that_reach_a_share_of_the_hypervolume():
    verbosity = optuna.logging.get_verbosity()
    try:
        from benchmarks.search_efficiency import oracle_points
    finally:
        optuna.logging.set_verbosity(verbosity)
    directions, reference = ["maximize", "minimize"], [0.0, 10.0]
    # Boxes up to (0, 10): A 9 x 1 = 9, B 1 x 9 = 9, C 5 x 5 = 25; the union is 25 + 4 + 4 = 33.
    # D (4, 6) is dominated by C: passed in anyway, it changes no count.
    points = [[9.0, 9.0], [1.0, 1.0], [5.0, 5.0], [4.0, 6.0]]
    full = hypervolume(points, directions, reference)
    assert full == pytest.approx(33.0)
    assert oracle_points(points, directions, reference, full, target=0.75) == (1, True)  # C: 25 / 33
    assert oracle_points(points, directions, reference, full, target=0.85) == (2, True)  # C + A or B: 29 / 33
    assert oracle_points(points, directions, reference, full, target=0.95) == (3, True)
    assert oracle_points(points, directions, reference, full, target=0.95, max_subsets=0) == (3, False)  # greedy alone
    assert oracle_points([], directions, reference, 0.0) == (None, False)


# ---------------------------------------------------------------- the model behind `auto`


def test_normal_scores_rank_each_objective_and_tame_an_outlier():
    from scipy.stats import norm

    from tuner.gp_search import normal_scores

    values = np.array([[1.0, 5.0], [2.0, 5.0], [1000.0, 1.0], [3.0, 2.0]])  # [trials, objectives]
    scores = normal_scores(values)
    # Column 0: ranks 1, 2, 4, 3 of 4 -> quantiles of 1/8, 3/8, 7/8, 5/8; the outlier is only the top rank.
    assert np.allclose(scores[:, 0], norm.ppf([1 / 8, 3 / 8, 7 / 8, 5 / 8]))
    # Column 1: the tie at 5.0 shares rank 3.5.
    assert np.allclose(scores[:, 1], norm.ppf([6 / 8, 6 / 8, 1 / 8, 3 / 8]))


def test_constraint_columns_fit_each_bound_to_the_trials_that_ran():
    from tuner.gp_search import constraint_columns

    names = ["kl<=0.1", "runnable", "stopped_early"]
    # Trials 0-2 ran (one broke the KL bound, one stopped early); trial 3 could not run and carries
    # placeholders (1.0) for every constraint.
    violations = np.array([[-0.05, 0.0, 0.0], [0.2, 0.0, 1.0], [-0.08, 0.0, 0.0], [1.0, 1.0, 1.0]])
    ran = np.array([True, True, True, False])
    columns = {name: (rows, values) for name, rows, values in constraint_columns(names, violations, ran)}
    # "runnable" is 0 on every trial that ran: no GP for it; "ran" covers it on every trial.
    assert set(columns) == {"ran", "constraint kl<=0.1", "constraint stopped_early"}
    rows, values = columns["ran"]
    assert rows.all() and list(values) == [-1.0, -1.0, -1.0, 1.0]
    rows, values = columns["constraint kl<=0.1"]
    assert list(rows) == [True, True, True, False] and list(values) == [-0.05, 0.2, -0.08]
    # A pass/fail constraint: a pass is -0.5, not 0 (on the bound).
    assert list(columns["constraint stopped_early"][1]) == [-0.5, 0.5, -0.5]
    # Nothing broken and everything ran: no constraint GP at all.
    assert constraint_columns(names, np.array([[-0.05, 0.0, 0.0]] * 2), np.array([True, True])) == []


def test_a_bound_measured_in_set_up_feeds_its_own_gp_and_not_the_ran_gp():
    from tuner import record
    from tuner.gp_search import constraint_columns, measured_bounds

    names = ["kl_divergence<=0.1", "runnable", "tpot_p99_ms<=30"]
    # Trial 0 ran. Trial 1 stopped before its window: its KL (1.0) was measured in set-up, its
    # other values are placeholders. Trial 2 could not run at all (nothing measured).
    trials = [optuna.trial.create_trial(values=[1.0], user_attrs={record.METRICS.key: m})
              for m in ({"kl_divergence": 0.03, "tpot_p99_ms": 12.0}, {"kl_divergence": 1.0}, {})]
    ran = np.array([True, False, False])
    measured = measured_bounds(names, trials, ran, {"kl_divergence<=0.1": "kl_divergence",
                                                    "tpot_p99_ms<=30": "tpot_p99_ms"})
    assert measured.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    violations = np.array([[-0.07, 0.0, -18.0], [0.9, 1.0, 1.0], [1.0, 1.0, 1.0]])
    columns = {name: (rows, values) for name, rows, values in constraint_columns(names, violations, ran, measured)}
    # The KL-stopped trial is explained by its bound: "ran" fails only the trial that could not run ...
    assert list(columns["ran"][1]) == [-1.0, -1.0, 1.0]
    # ... and the KL GP learns from it; the TPOT GP (nothing broke it where it was measured) drops out.
    rows, values = columns["constraint kl_divergence<=0.1"]
    assert list(rows) == [True, True, False] and list(values) == [-0.07, 0.9]
    assert "constraint tpot_p99_ms<=30" not in columns


def _gp_study(tmp_path, trials):
    """A study of `auto`'s GP over quant_bits {16, 8, 4} x batch_size {1, 2, 4, 8}, seeded with `trials`."""
    from tuner.gp_search import auto_gp

    table = write_table(tmp_path / "t.csv", [[b, q, 1.0, 1.0, ""] for b in (1, 2, 4, 8) for q in (16, 8, 4)])
    params = {"quant_bits": {"type": "categorical", "choices": [16, 8, 4]},
              "batch_size": {"type": "categorical", "choices": [1, 2, 4, 8]}}
    space = validate(raw(table, params=params, sampler="auto", trials=10), "s.yaml", "s")
    dist = space.distributions()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=auto_gp(space, 0, 3))
    for (q, b), values, constraints, attrs in trials:
        study.add_trial(optuna.trial.create_trial(
            params={"quant_bits": q, "batch_size": b}, distributions=dist, values=values, user_attrs=attrs,
            system_attrs={f"constraints:{k}": v for k, v in constraints.items()}))
    return study, dist


def test_the_gp_steers_away_from_configs_that_could_not_run_before_any_feasible_trial(tmp_path):
    worst = [float("-inf"), float("inf")]
    failed = {"runnable": 1.0, "kl<=0.1": 1.0}
    study, dist = _gp_study(tmp_path, [((4, b), worst, failed, {}) for b in (1, 2, 4)])
    trial = study.ask(dist)
    assert trial.params["quant_bits"] != 4  # 3 of 3 int4 configs failed to run; batch 8 there is untried


def _fitted(study, dist):
    from tuner.gp_search import _MeasuredView, fit_model

    view = _MeasuredView(study, ["throughput_tok_s", "latency_p99_ms"])
    completed = view._get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return fit_model(study.sampler, view, completed, [], dist)


def test_an_untried_config_is_50_50_feasible_even_when_every_measured_trial_broke_a_bound(tmp_path):
    # Optuna's constraint GP is centred on the mean of what it saw: when every trial broke the
    # bound, every untried config is ~0 % feasible, so nothing steers the search. Centred on the
    # bound, a config unlike the measured ones leans towards 50/50 (~20 % here: the categorical
    # kernel still correlates it with the measured ones) and the measured region stays near 0.
    worst = [float("-inf"), float("inf")]
    broke = {"runnable": 0.0, "kl<=0.1": 0.3}
    trials = [((4, b), worst, broke, {"metrics": {"throughput_tok_s": 10.0 * b, "latency_p99_ms": 1.0}})
              for b in (1, 2, 4)]
    study, dist = _gp_study(tmp_path, trials)
    internal, acqf = _fitted(study, dist)
    near, far = acqf.eval_acqf_no_grad(internal.get_normalized_params(
        [None] * 2, [{"quant_bits": 4, "batch_size": 2}, {"quant_bits": 16, "batch_size": 8}]))
    assert near < math.log(0.01) and math.log(0.1) < far <= 0.0


def test_objective_gps_read_only_the_trials_that_ran(tmp_path):
    ok = {"runnable": 0.0, "kl<=0.1": -0.05}
    measured = [((8, b), [100.0 * b, 1.0 + b], ok, {}) for b in (1, 2, 4)]
    failed = [((4, b), [float("-inf"), float("inf")], {"runnable": 1.0, "kl<=0.1": 1.0}, {}) for b in (1, 8)]
    study, dist = _gp_study(tmp_path, measured + failed)
    _fitted(study, dist)
    cache = study.sampler._kernel_cache
    # 3 measured trials for each objective; the 2 that could not run only for "ran" (5 trials).
    assert [cache[f"objective {i}"]._X_train.shape[0] for i in range(2)] == [3, 3]
    assert cache["ran"]._X_train.shape[0] == 5
    assert "constraint kl<=0.1" not in cache  # never broken by a trial that ran


def test_start_up_trials_cover_distinct_values_of_every_knob_across_workers(tmp_path):
    from tuner.gp_search import auto_gp

    rows = [[b, q, 100.0 * b, 10.0 * b, ""] for b in (1, 2, 4, 8) for q in (16, 8, 4)]
    table = write_table(tmp_path / "t.csv", rows)
    params = {"batch_size": {"type": "categorical", "choices": [1, 2, 4, 8]},
              "quant_bits": {"type": "categorical", "choices": [16, 8, 4]}}
    space = validate(raw(table, params=params, sampler="auto", trials=10), "s.yaml", "s")
    # Two workers: their own seeds, one design (the space's seed); the first 3 trials run at once.
    workers = [auto_gp(space, seed, 3, design_seed=0) for seed in (11, 12)]
    study = optuna.create_study(directions=["maximize", "minimize"])
    asked = []
    for i in range(3):
        study.sampler = workers[i % 2]
        asked.append(study.ask(space.distributions()).params)
    assert sorted(p["quant_bits"] for p in asked) == [4, 8, 16]
    assert len({p["batch_size"] for p in asked}) == 3
    # Another study seed, another design.
    other = optuna.create_study(directions=["maximize", "minimize"], sampler=auto_gp(space, 5, 3, design_seed=5))
    assert [other.ask(space.distributions()).params for _ in range(3)] != asked
