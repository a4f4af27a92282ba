"""tuner/front_gaps.py: each searched knob value absent from the feasible front names its best
trial, the front trial dominating it and the margins; infeasible-only values name their reason;
values on the front only by margins inside a recorded CI are named; the end-of-study lines and
report.html carry them."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from reports.frames import pareto_frame, trials_frame
from reports.html import write_report
from tuner.final import final_lines
from tuner.front_gaps import front_gaps, gap_lines
from tuner.front_noise import noise_fronts, noise_lines
from tuner.front_summary import summary_lines
from tuner.space import Objective

BOUND = {"metric": "perplexity", "max": 60.0}
DISTS = {"sparsity": CategoricalDistribution([0.0, 0.3, 0.5, 0.7, 0.9]),
         "quant_bits": CategoricalDistribution([16, 8])}
INF = float("inf")


def _measured(sparsity: float, bits: int, ppl: float, tput: float, baseline: bool = False,
              **metrics: float) -> optuna.trial.FrozenTrial:
    """A measured trial as tuner.tell records it: told its values when within the bound, the
    worst values (and a positive violation) when not."""
    ok = ppl <= BOUND["max"]
    return create_trial(state=TrialState.COMPLETE, values=[ppl, tput] if ok else [INF, -INF],
                        params={"sparsity": sparsity, "quant_bits": bits}, distributions=DISTS,
                        constraints={"runnable": 0.0, "perplexity<=60.0": ppl - BOUND["max"]},
                        user_attrs={"outcome": "ok", "baseline": baseline,
                                    "metrics": {"perplexity": ppl, "throughput_tok_s": tput, **metrics}})


def _unrunnable(sparsity: float, bits: int, reason: str) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, values=[INF, -INF], params={"sparsity": sparsity, "quant_bits": bits},
                        distributions=DISTS, constraints={"runnable": 1.0, "perplexity<=60.0": 1.0},
                        user_attrs={"outcome": "infeasible", "infeasible_reason": reason, "metrics": {}})


def _study(trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    study = optuna.create_study(study_name="gaps", directions=["minimize", "maximize"])
    study.set_metric_names(["perplexity", "throughput_tok_s"])
    study.set_user_attr("constraints", [BOUND])
    study.add_trials(trials)
    return study


TWO_FOUR = "2:4 sparsity needs dims that are multiples of 64"


@pytest.fixture
def study() -> optuna.Study:
    return _study([
        _measured(0.0, 16, 43.20, 2110, baseline=True),  # 0: front
        _measured(0.0, 8, 43.30, 2500),                  # 1: front
        # 2: dominated by #0 and #1; #0's perplexity lies in #2's CI, its throughput above it
        _measured(0.3, 16, 43.35, 2101, perplexity_ci_low=43.1, perplexity_ci_high=43.6,
                  throughput_tok_s_ci_low=2090, throughput_tok_s_ci_high=2105),
        _measured(0.3, 8, 44.00, 2400),   # 3: dominated by #1 only, but farther from it
        _measured(0.3, 16, 45.00, 2000),  # 4: dominated by #2 within its own value
        _measured(0.9, 16, 91.0, 2600),   # 5: breaks the bound
        _measured(0.9, 8, 95.0, 2700),    # 6: breaks the bound
        _unrunnable(0.5, 8, TWO_FOUR),    # 7: no kernel path
    ])


def test_best_trial_of_a_value_is_the_one_nearest_the_front(study):
    gaps = front_gaps(study)
    assert [(g.param, g.value) for g in gaps] == [("sparsity", 0.3), ("sparsity", 0.5), ("sparsity", 0.9)]
    gap = gaps[0]
    # #2 vs #0: perplexity 0.15/43.35 = 0.346 %, throughput 9/2101 = 0.428 % -> gap 0.428 %;
    # #2 vs #1: 0.115 % and 399/2101 = 19.0 % -> 19.0 %; #3 vs #1: 0.7/44 = 1.59 %, 100/2400 = 4.17 %.
    # #2 (gap 0.43 %, two dominators) wins over #3 (gap 4.2 %, one); #4 is beaten by #2 itself.
    assert (gap.best.number, gap.dominator.number, gap.dominators, gap.feasible) == (2, 0, 2, 3)
    by_metric = {m.metric: m for m in gap.margins}
    assert by_metric["perplexity"].pct == pytest.approx(-100 * 0.15 / 43.35)
    assert by_metric["throughput_tok_s"].pct == pytest.approx(100 * 9 / 2101)
    assert by_metric["perplexity"].within_ci and not by_metric["throughput_tok_s"].within_ci


def test_a_trial_its_own_value_beats_is_never_the_values_best():
    study = _study([
        _measured(0.0, 16, 9.999, 99.995),  # 0: front, dominates #3 narrowly but not #2
        _measured(0.0, 8, 10.0, 110.0),     # 1: front, dominates #2 and #3 by 10 % throughput
        _measured(0.3, 16, 10.0, 100.0),    # 2: sparsity 0.3's own best
        _measured(0.3, 8, 10.01, 99.99),    # 3: dominated by #2 (its own value), 0.11 % behind #0
    ])
    gap = front_gaps(study, params=["sparsity"])[0]
    assert (gap.best.number, gap.dominator.number, gap.dominators) == (2, 1, 1)


def test_lines_name_dominator_margins_and_infeasible_reasons(study):
    assert gap_lines(front_gaps(study)) == [
        "sparsity 0.3 (3 feasible trials) not on the front: best #2 (perplexity 43.35, throughput_tok_s 2101) "
        "is dominated by #0 (baseline) (perplexity 43.2 (-0.3 %, within its CI), throughput_tok_s 2110 (+0.4 %)) "
        "and 1 other front trial",
        f"sparsity 0.5 ran only infeasibly (1 trial; most common reason, 1 of 1: {TWO_FOUR})",
        # Two different perplexities, one reason: the broken bound.
        "sparsity 0.9 ran only infeasibly (2 trials; most common reason, 2 of 2: perplexity = 91 > 60)",
    ]


def test_a_knob_whose_values_are_all_on_the_front_gets_no_line(study):
    # quant_bits 16 (#0) and 8 (#1) are both on the front; only sparsity has gaps.
    assert {g.param for g in front_gaps(study)} == {"sparsity"}
    assert front_gaps(study, params=["quant_bits"]) == []


def test_values_sharing_an_infeasible_reason_share_a_line():
    study = _study([_measured(0.0, 16, 43.0, 2000), _unrunnable(0.7, 16, TWO_FOUR), _unrunnable(0.9, 16, TWO_FOUR),
                    _unrunnable(0.9, 8, TWO_FOUR), _measured(0.9, 8, 80.0, 2500)])
    assert gap_lines(front_gaps(study, params=["sparsity"])) == [
        f"sparsity 0.7, 0.9 ran only infeasibly (4 trials; most common reason, 3 of 4: {TWO_FOUR})"]


def test_a_shared_line_names_at_most_six_values():
    study = optuna.create_study(directions=["minimize"])
    dist = {"batch_size": IntDistribution(1, 16)}
    study.add_trials([create_trial(value=1.0, params={"batch_size": 16}, distributions=dist, constraints={"runnable": 0.0},
                                   user_attrs={"outcome": "ok", "metrics": {}})]
                     + [create_trial(value=INF, params={"batch_size": b}, distributions=dist, constraints={"runnable": 1.0},
                                     user_attrs={"outcome": "infeasible", "infeasible_reason": "out of memory"})
                        for b in (9, 1, 2, 3, 4, 5, 6, 7)])
    assert gap_lines(front_gaps(study)) == ["batch_size 1, 2, 3, 4, 5, 6 and 2 more values ran only infeasibly "
                                            "(8 trials; most common reason, 8 of 8: out of memory)"]


def test_a_margin_inside_the_dominated_trials_ci_says_so():
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_metric_names(["ttft_p99_ms", "latency_p99_ms"])
    dist = {"batch_size": CategoricalDistribution([4, 8, 16])}

    def trial(batch: int, ttft: float, lat: float, cis: dict[str, float]) -> optuna.trial.FrozenTrial:
        return create_trial(values=[ttft, lat], params={"batch_size": batch}, distributions=dist,
                            user_attrs={"outcome": "ok", "metrics": {"ttft_p99_ms": ttft, "latency_p99_ms": lat, **cis}})

    study.add_trials([
        trial(4, 100.0, 200.0, {}),
        # 100 lies in [95, 110]; 200 lies outside [201, 215]: only ttft is noise.
        trial(8, 105.0, 208.0, {"ttft_p99_ms_ci_low": 95.0, "ttft_p99_ms_ci_high": 110.0,
                                "latency_p99_ms_ci_low": 201.0, "latency_p99_ms_ci_high": 215.0}),
        # Both margins inside the CIs: dominated only within the noise.
        trial(16, 104.0, 204.0, {"ttft_p99_ms_ci_low": 90.0, "ttft_p99_ms_ci_high": 120.0,
                                 "latency_p99_ms_ci_low": 190.0, "latency_p99_ms_ci_high": 220.0}),
    ])
    lines = gap_lines(front_gaps(study))
    assert lines[0] == ("batch_size 8 (1 feasible trial) not on the front: its #1 (ttft_p99_ms 105, latency_p99_ms 208) "
                        "is dominated by #0 (ttft_p99_ms 100 (-4.8 %, within its CI), latency_p99_ms 200 (-3.8 %))")
    assert lines[1].endswith("latency_p99_ms 200 (-2.0 %, within its CI)); every margin is within the measurement's CI")


def test_continuous_knobs_and_wide_ranges_get_no_value_lines():
    # Each sampled value of a continuous range (or of a 64-value int range) runs about once: a
    # line per value would list every trial. Stepped ranges of few values are read value by value.
    study = optuna.create_study(directions=["minimize"])
    dists = {"timeout_ms": FloatDistribution(1.0, 20.0, log=True), "batch_size": IntDistribution(1, 64),
             "bits": IntDistribution(4, 16, step=4), "ratio": FloatDistribution(0.0, 0.9, step=0.3)}
    for i, loss in enumerate([1.0, 2.0, 3.0]):
        study.add_trial(create_trial(value=loss, params={"timeout_ms": 1.0 + i, "batch_size": 1 + i, "bits": 4 * (i + 1),
                                                        "ratio": 0.3 * i}, distributions=dists,
                                     constraints={"runnable": 0.0}, user_attrs={"outcome": "ok", "metrics": {}}))
    assert [g.param for g in front_gaps(study)] == ["bits", "bits", "ratio", "ratio"]


def test_end_of_study_lines_are_capped_and_point_to_the_report(study):
    space = SimpleNamespace(study="gaps", params={"sparsity": None, "quant_bits": None}, workload={},
                            objectives=[Objective("perplexity", "minimize"), Objective("throughput_tok_s", "maximize")])
    lines = final_lines(study, space, "mem")
    heading = lines.index("why these knob values are not on the feasible front:")
    assert lines[heading + 1].startswith("  sparsity 0.3 (3 feasible trials) not on the front: best #2")
    assert lines[heading + 3].startswith("  sparsity 0.9 ran only infeasibly")
    capped = summary_lines(study, limit=2)
    assert capped[1:] == [f"  {line}" for line in gap_lines(front_gaps(study))[:2]] + [
        "  and 1 more (autoglm-tune report lists them all)"]


def test_no_front_no_gap_lines():
    study = _study([_measured(0.9, 16, 91.0, 2600), _unrunnable(0.5, 8, TWO_FOUR)])
    assert front_gaps(study) == [] and summary_lines(study) == []


def test_report_html_has_the_section(study, tmp_path):
    path = tmp_path / "report.html"
    write_report(study, trials_frame(study), pareto_frame(study), path)
    page = path.read_text()
    section = page[page.index("<h2>Knob values not on the front</h2>"):]
    assert "<li>sparsity 0.3 (3 feasible trials) not on the front: best #2" in section
    assert f"<li>sparsity 0.5 ran only infeasibly (1 trial; most common reason, 1 of 1: {TWO_FOUR})</li>" in section
    assert "quant_bits" not in section.split("<h2>", 2)[1]


# ---------------------------------------------------------------- on the front only within noise

def _ci(low: float, high: float) -> dict[str, float]:
    return {"throughput_tok_s_ci_low": low, "throughput_tok_s_ci_high": high}


def _noise_study(sparse_tput: float, dense_ci: dict[str, float], sparse_ci: dict[str, float]) -> optuna.Study:
    """Dense #0 with the lower (deterministic) perplexity; sparse #1 on the front by throughput."""
    return _study([_measured(0.0, 16, 22.44, 2366.26, baseline=True, **dense_ci),
                   _measured(0.7, 8, 27.53, sparse_tput, **sparse_ci),
                   _measured(0.3, 16, 30.0, 2000.0)])  # #2: dominated by both, not on the front


def test_a_value_on_the_front_by_a_margin_inside_a_ci_is_flagged():
    study = _noise_study(2366.35, _ci(2300.0, 2430.0), _ci(2290.0, 2440.0))
    assert {t.number for t in study.best_trials} == {0, 1}
    fronts = noise_fronts(study)
    # #1's throughput edge (0.09 tok/s) lies in its own CI; #0's perplexity edge has no CI: real.
    assert [(f.param, f.value) for f in fronts] == [("sparsity", 0.7), ("quant_bits", 8)]
    win = fronts[0].wins[0]
    assert (win.trial.number, win.rival.number) == (1, 0)
    by_metric = {m.metric: m for m in win.margins}
    assert by_metric["perplexity"].ci_of is None and by_metric["throughput_tok_s"].ci_of == 1
    assert by_metric["throughput_tok_s"].pct == pytest.approx(100 * 0.09 / 2366.26)
    assert noise_lines(fronts)[0] == ("sparsity 0.7 on the front only within noise: #1 (perplexity 27.53 "
                                      "(+23 % vs #0), throughput_tok_s 2366 (+0.0038 % vs #0, within #1's CI))")


def test_the_rival_named_is_one_that_stands_not_the_nearest_beaten_one():
    study = _noise_study(2366.35, _ci(2300.0, 2430.0), _ci(2290.0, 2440.0))
    study.add_trial(_measured(0.5, 16, 25.0, 2366.30, **_ci(2295.0, 2435.0)))  # #3: between #0 and #1
    assert {t.number for t in study.best_trials} == {0, 1, 3}
    # #1 is nearer #3 (perplexity +10 %) than #0 (+23 %), but #3 is itself on only within noise.
    rivals = {(f.param, f.value): [(w.trial.number, w.rival.number) for w in f.wins] for f in noise_fronts(study)}
    assert rivals == {("sparsity", 0.5): [(3, 0)], ("sparsity", 0.7): [(1, 0)], ("quant_bits", 8): [(1, 0)]}


def test_the_rivals_ci_holding_the_edge_also_makes_it_a_tie():
    # #1's own CI [2367, 2440] misses #0's 2366.26; #0's CI [2300, 2430] holds #1's 2366.35.
    study = _noise_study(2366.35, _ci(2300.0, 2430.0), _ci(2367.0, 2440.0))
    win = noise_fronts(study, params=["sparsity"])[0].wins[0]
    assert {m.metric: m.ci_of for m in win.margins}["throughput_tok_s"] == 0


def test_a_margin_beyond_both_cis_is_not_flagged():
    study = _noise_study(2500.0, _ci(2300.0, 2430.0), _ci(2450.0, 2550.0))
    assert {t.number for t in study.best_trials} == {0, 1}
    assert noise_fronts(study) == []


def test_a_value_on_the_front_without_a_recorded_ci_is_not_flagged():
    # The 0.09 tok/s edge would be noise, but nothing recorded says so: it compares exactly.
    study = _noise_study(2366.35, {}, {})
    assert {t.number for t in study.best_trials} == {0, 1}
    assert noise_fronts(study) == []


def test_a_value_with_one_front_trial_beyond_noise_is_not_flagged():
    study = _noise_study(2366.35, _ci(2300.0, 2430.0), _ci(2290.0, 2440.0))
    study.add_trial(_measured(0.7, 8, 40.0, 2600.0, **_ci(2550.0, 2650.0)))  # #3: a real throughput win
    assert {t.number for t in study.best_trials} == {0, 1, 3}
    assert noise_fronts(study) == []


def test_noise_lines_reach_the_end_of_study_block_and_the_report(tmp_path):
    study = _noise_study(2366.35, _ci(2300.0, 2430.0), _ci(2290.0, 2440.0))
    space = SimpleNamespace(study="gaps", params={"sparsity": None}, workload={},
                            objectives=[Objective("perplexity", "minimize"), Objective("throughput_tok_s", "maximize")])
    lines = final_lines(study, space, "mem")
    heading = next(i for i, line in enumerate(lines) if line.startswith("knob values on the feasible front only within"))
    assert lines[heading + 1] == f"  {noise_lines(noise_fronts(study, ['sparsity']))[0]}"
    assert summary_lines(study, params=["sparsity"])[0] == "why these knob values are not on the feasible front:"
    path = tmp_path / "report.html"
    write_report(study, trials_frame(study), pareto_frame(study), path)
    section = path.read_text().split("<h2>Knob values not on the front</h2>", 1)[1].split("<h2>", 1)[0]
    assert "On the front only within measurement noise" in section
    assert "<li>sparsity 0.7 on the front only within noise: #1 (perplexity 27.53" in section
