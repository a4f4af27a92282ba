"""Search efficiency: how much of a grid's feasible front each sampler finds per trial.

For every recorded grid `benchmarks/grids/NAME.csv` (a replay table, written by
`autoglm-tune export-table` from a `sampler: grid` study of `NAME_space.yaml`), each sampler x
20 seeds runs a study of up to 30 % of the grid's points. After every trial the feasible
hypervolume (Optuna's hypervolume; reference point: the grid's worst feasible value of each
objective pushed 10 % of its span out) is divided by the full grid's. Also measured: the same
samplers with infeasible trials hidden from them (told as FAIL, constraints not recorded: what a
tuner without constraint support does), warm starts (identical and overlapping spaces), and 4
simulated parallel workers (ask 4, then tell 4).

For speed the studies run in this process on in-memory storage, not through child processes:
each trial is `tuner.study.make_sampler` -> `study.ask` -> `runners.replay.replay` (the very
lookup the replay runner answers with) -> `tuner.study.tell_outcome` (the very tell the CLI
does), so samplers see exactly what a `runner: replay` study gives them.

    python -m benchmarks.search_efficiency [--seeds 20] [--grids cpu_tiny,...] [--out DIR]

writes DIR/search_efficiency.json, DIR/search_efficiency.html (Plotly) and DIR/search_efficiency.md
(the tables for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Optuna's GP sampler runs torch on the CPU; one thread is ~10x faster than many on a shared box.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import optuna  # noqa: E402

from benchmarks.search_efficiency_report import BUDGET_SHARES, figure, markdown
from runners.replay import ReplayTable, load_table, replay  # noqa: E402
from tuner.launcher import LaunchOutcome  # noqa: E402
from tuner.search import auto_sampler, feasible, hypervolume, hypervolume_history, reference_point, space_size  # noqa: E402
from tuner.space import grid_values, read_yaml, validate  # noqa: E402
from tuner.study import make_sampler, tell_outcome, trial_config  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=".*independent sampl.*")

GRIDS = Path(__file__).resolve().parent / "grids"
SAMPLERS = ("auto", "tpe", "gp", "nsga2", "random")
MAX_SHARE = 0.20


@dataclass
class Grid:
    name: str
    raw: dict[str, Any]  # the replay space (search section filled per run)
    table: ReplayTable
    points: int
    directions: list[str]
    reference: list[float]
    full_hv: float
    feasible_points: int
    reference_worst: list[float]  # the reports' rule: every feasible point's worst value + 10 % span
    full_hv_worst: float
    oracle_points: int | None  # `oracle_points`: points that reach 95 % of full_hv
    oracle_exact: bool  # ... and no fewer do (the fewest trials any sampler could reach 95 % in)


def replay_raw(csv_path: Path) -> dict[str, Any]:
    """The recording space with runner replay and this table; the search is set per run."""
    recording = read_yaml(csv_path.with_name(csv_path.stem + "_space.yaml"))
    raw = {k: v for k, v in recording.items() if k not in ("workload", "device", "search", "slo")}
    # recorded_with: the replayed study knows what the recorded runner declares (twins, quality
    # keys, combinations refused up front), as the recorded study did (a space's default runner
    # is glm-infer).
    raw.update(study=f"replay_{csv_path.stem}", runner="replay", device="cpu",
               model={"table": str(csv_path), "recorded_with": recording.get("runner", "glm-infer")})
    return raw


def space_for(raw: dict[str, Any], sampler: str, seed: int, trials: int, **search: Any):
    data = {**raw, "search": {"sampler": sampler, "seed": seed, "trials": trials, "baseline": False, **search}}
    return validate(data, source=str(raw["model"]["table"]), default_study=raw["study"])


def load_grid(csv_path: Path) -> Grid:
    """Every point of the grid through the same tell as a study: the full front and its reference."""
    raw = replay_raw(csv_path)
    space = space_for(raw, "grid", 0, 1)
    table = load_table(csv_path)
    directions = [o.direction for o in space.objectives]
    study = optuna.create_study(directions=directions)
    names = list(space.params)
    points = list(itertools.product(*(grid_values(space.params[n]) for n in names)))
    for values in points:
        study.enqueue_trial(dict(zip(names, values, strict=True)))
        trial = study.ask(space.distributions())
        _answer(study, trial, space, table, trial.params)
    ok = [t.values for t in study.trials if feasible(t)]
    # The reference is the grid's feasible front's nadir pushed 10 % of the front's span out:
    # a point counts once it is near the front, so a worst-case outlier (one 46 ms TPOT hiccup
    # of the CPU grid) cannot make every early trial look 60 % good.
    front = [t.values for t in study.best_trials]  # Optuna's: the feasible Pareto set
    ref = reference_point(front, directions)
    worst = reference_point(ok, directions)
    full = hypervolume(ok, directions, ref)
    return Grid(csv_path.stem, raw, table, len(points), directions, ref, full, len(ok),
                worst, hypervolume(ok, directions, worst), *oracle_points(front, directions, ref, full))


def oracle_points(front: list[list[float]], directions: list[str], reference: list[float], full_hv: float,
                  target: float = 0.95, max_subsets: int = 200_000) -> tuple[int | None, bool]:
    """(k, exact): k points of `front` whose hypervolume reaches `target` of `full_hv`, and
    whether no fewer do (then k is the fewest trials in which any sampler could). A front
    concentrated in a few points leaves a sampler little slack within 10 % of the grid.
    `front`: the grid's Pareto points (a dominated point adds no more than the one dominating
    it, so the fewest are among them). Greedy (each step adds the point that raises the
    hypervolume most) gives a size k; then every smaller subset is tried, unless that is over
    `max_subsets` subsets: then greedy's k, not exact (it can only overstate the fewest).
    (None, False) when nothing is feasible."""
    need = target * full_hv - 1e-12
    chosen: list[list[float]] = []
    left = list(front)
    while left and hypervolume(chosen, directions, reference) < need:
        best = max(range(len(left)), key=lambda i: hypervolume(chosen + [left[i]], directions, reference))
        chosen.append(left.pop(best))
    if not chosen or hypervolume(chosen, directions, reference) < need:
        return None, False
    for k in range(1, len(chosen)):
        if math.comb(len(front), k) > max_subsets:
            return len(chosen), False
        if any(hypervolume(list(subset), directions, reference) >= need for subset in itertools.combinations(front, k)):
            return k, True
    return len(chosen), True


def _answer(study: optuna.Study, trial: optuna.Trial, space: Any, table: ReplayTable, params: dict[str, Any]) -> None:
    """One trial exactly as the CLI does it, with the child process replaced by the lookup."""
    config = trial_config(space, params, trial.number, Path(os.devnull))
    result = replay(table, config.knobs)
    tell_outcome(study, trial, space, LaunchOutcome("ok" if result.status == "ok" else "infeasible", result,
                                                    result.reason))


# ---------------------------------------------------------------- one search


def run_search(grid: Grid, sampler: str, seed: int, trials: int, workers: int = 1, hide_infeasible: bool = False,
               seeded: optuna.Study | None = None, warm_raw: dict[str, Any] | None = None) -> np.ndarray:
    """[3, trials]: the feasible-hypervolume fraction after each trial of one seeded study on the
    grid, the number of infeasible trials run so far, and the fraction under the worst-point
    reference."""
    space = space_for(warm_raw or grid.raw, sampler if sampler in SAMPLERS else "random", seed, trials)
    directions = grid.directions
    study = optuna.create_study(directions=directions, sampler=make_sampler(space))
    samplers = [study.sampler] + [make_sampler(space, salt=f"worker {i}") for i in range(1, workers)]
    ledger = study if not hide_infeasible else optuna.create_study(directions=directions)
    if seeded is not None:
        from tuner.warm_start import warm_start

        warm_start(study, space, seeded)
    # Copies (identical space) are COMPLETE and use no budget; enqueued configs (overlapping) are
    # WAITING and run here as this study's first trials, so they count.
    carried = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    while (done := _asked(study) - carried) < trials:
        batch = []
        for sampler_of_worker in samplers[: trials - done]:
            study.sampler = sampler_of_worker  # each simulated worker asks with its own sampler
            batch.append(study.ask(space.distributions()))
        for trial in batch:  # ... and all of them finish before the next round
            if hide_infeasible:
                _tell_hidden(study, ledger, trial, space, grid.table)
            else:
                _answer(study, trial, space, grid.table, trial.params)
    ran = [t for t in ledger.trials[carried:] if t.state != optuna.trial.TrialState.WAITING] \
        if ledger is study else ledger.trials  # enqueued configs the budget did not reach never ran
    start = [t for t in ledger.trials[:carried]]
    history = hypervolume_history(start + ran, directions, grid.reference)[len(start):]
    worst = hypervolume_history(start + ran, directions, grid.reference_worst)[len(start):]
    return np.array([[h / grid.full_hv for h in history], np.cumsum([not feasible(t) for t in ran]),
                     [h / grid.full_hv_worst for h in worst]])


def _asked(study: optuna.Study) -> int:
    """Trials asked so far (an enqueued config waits in `study.trials` until it is asked)."""
    return sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)


def _tell_hidden(study: optuna.Study, ledger: optuna.Study, trial: optuna.Trial, space: Any,
                 table: ReplayTable) -> None:
    """The no-constraint ablation: the ledger records the truth; the sampler's study sees a FAIL
    for an infeasible config and plain values (no constraints) for one that ran."""
    ledger.enqueue_trial(trial.params)
    shadow = ledger.ask(space.distributions())
    _answer(ledger, shadow, space, table, trial.params)
    told = ledger.trials[shadow.number]
    if told.user_attrs.get("infeasible_reason"):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, told.values)


# ---------------------------------------------------------------- experiments


def curves(grid: Grid, sampler: str, seeds: int, trials: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """[seeds, trials] hypervolume fractions, and [seeds, trials] infeasible trials so far."""
    return tuple(all_curves(grid, sampler, seeds, trials, **kw)[:2])


def all_curves(grid: Grid, sampler: str, seeds: int, trials: int, **kw: Any) -> np.ndarray:
    """[3, seeds, trials]: fractions (front-nadir reference), infeasible so far, fractions (worst point)."""
    runs = np.array([run_search(grid, sampler, seed, trials, **kw) for seed in range(seeds)])
    return runs.transpose(1, 0, 2)


def trials_to_reach(median: np.ndarray, target: float) -> int | None:
    hits = np.nonzero(median >= target - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


def budget(grid: Grid, share: float) -> int:
    return max(1, round(share * grid.points))


def sampler_table(grid: Grid, results: dict[str, np.ndarray], worst: dict[str, np.ndarray],
                  infeasible: dict[str, np.ndarray]) -> dict[str, Any]:
    out = {}
    at10 = budget(grid, 0.10)
    for name, runs in results.items():
        median = np.median(runs, axis=0)
        out[name] = {"median_at": {f"{share:.0%}": float(median[budget(grid, share) - 1]) for share in BUDGET_SHARES
                                   if budget(grid, share) <= len(median)},
                     "trials_to_95": trials_to_reach(median, 0.95),
                     "worst_reference_at_10%": float(np.median(worst[name][:, at10 - 1])),
                     "worst_reference_trials_to_95": trials_to_reach(np.median(worst[name], axis=0), 0.95),
                     "infeasible_at_10%": float(np.mean(infeasible[name][:, at10 - 1])),
                     "median_curve": median.tolist()}
    return out


def must_show_auto(grid: Grid, results: dict[str, np.ndarray]) -> dict[str, Any]:
    auto, rand = np.median(results["auto"], axis=0), np.median(results["random"], axis=0)
    first, last = budget(grid, 0.05), budget(grid, 0.20)
    reach = trials_to_reach(auto, 0.95)
    losses = [k for k in range(first, last + 1) if not auto[k - 1] > rand[k - 1]]
    return {"auto_trials_to_95": reach, "limit_10pct": budget(grid, 0.10),
            "auto_95_within_10pct": reach is not None and reach <= budget(grid, 0.10),
            "auto_beats_random_5_to_20pct": not losses, "budgets_not_beaten": losses}


def warm_experiment(grid: Grid, seeds: int, cold_trials: int = 30, limit: int = 10,
                    modes: tuple[str, ...] = ("identical", "overlapping")) -> dict[str, Any]:
    """A cold study's HV at 30 trials vs a warm-started one's after each of its own trials.

    identical: the earlier study is a cold 30-trial study on the same space (other seed), copied
    with add_trials. overlapping: the earlier study's range stopped below the largest value of the
    first multi-valued knob (the new study extends it, e.g. batch sizes up to 16 instead of 8);
    its Pareto set is enqueued into a study over the full space.
    """
    cold, _ = curves(grid, "auto", seeds, cold_trials)
    target = float(np.median(cold[:, -1]))
    out: dict[str, Any] = {"cold_30_median": target, "seeds": seeds}
    narrow = _narrowed(grid.raw)
    for mode, earlier_raw in (("identical", grid.raw), ("overlapping", narrow)):
        if mode not in modes:
            continue
        runs = []
        for seed in range(seeds):
            earlier = _finished_study(grid, earlier_raw, "auto", 1000 + seed, cold_trials)
            runs.append(run_search(grid, "auto", seed, limit, seeded=earlier)[0])
        runs = np.array(runs)
        median = np.median(runs, axis=0)
        out[mode] = {"median_curve": median.tolist(), "trials_to_cold_30": trials_to_reach(median, target),
                     "within_10": bool(median[-1] >= target - 1e-12)}
    out["narrowed_params"] = {k: v for k, v in narrow["params"].items() if v != grid.raw["params"][k]}
    if "overlapping" not in modes:
        out.pop("narrowed_params")
    return out


def _narrowed(raw: dict[str, Any]) -> dict[str, Any]:
    """The space with its first multi-valued knob's largest value left out (a shorter range)."""
    params = dict(raw["params"])
    for name, spec in params.items():
        if spec.get("type") == "categorical" and len(spec["choices"]) > 2:
            params[name] = {**spec, "choices": [c for c in spec["choices"] if c != max(spec["choices"])]}
            break
        if spec.get("type") in ("int", "float") and spec.get("step"):
            params[name] = {**spec, "high": spec["high"] - spec["step"]}
            break
    return {**raw, "params": params, "study": raw["study"] + "_narrow"}


def _finished_study(grid: Grid, raw: dict[str, Any], sampler: str, seed: int, trials: int) -> optuna.Study:
    """An earlier study (in memory) whose stored space is `raw`, as `warm_start` reads it."""
    space = space_for(raw, sampler, seed, trials)
    study = optuna.create_study(study_name=space.study, directions=grid.directions, sampler=make_sampler(space))
    study.set_metric_names([o.metric for o in space.objectives])
    study.set_user_attr("space", space.raw)
    for _ in range(trials):
        trial = study.ask(space.distributions())
        _answer(study, trial, space, grid.table, trial.params)
    return study


def parallel_experiment(grid: Grid, one: np.ndarray, seeds: int, sampler: str) -> dict[str, Any]:
    """Trials 4 simulated workers need to reach the 1-worker median HV at 10 % of the grid.

    `one` holds the 1-worker runs ([seeds, trials]); the 4-worker runs ask 4 trials (each worker
    with its own sampler, seeded as `run_study` seeds workers), then tell all 4, up to as many
    trials as `one` has.
    """
    four, _ = curves(grid, sampler, seeds, one.shape[1], workers=4)
    at = budget(grid, 0.10)
    target = float(np.median(one, axis=0)[at - 1])
    need = trials_to_reach(np.median(four, axis=0), target)
    return {"sampler": sampler, "seeds": seeds, "one_worker_trials": at, "one_worker_median": target,
            "four_workers_trials": need, "ratio": None if need is None else need / at,
            "median_curve_1": np.median(one, axis=0).tolist(), "median_curve_4": np.median(four, axis=0).tolist()}


def grid_tables(wanted: list[str]) -> list[Path]:
    """The grids to replay: names of grids/NAME.csv or paths of CSV files (each with its
    NAME_space.yaml beside it); every grids/*.csv with a space file when none is named."""
    if not wanted:
        return [p for p in sorted(GRIDS.glob("*.csv")) if p.with_name(p.stem + "_space.yaml").exists()]
    paths = [Path(w) if w.endswith(".csv") else GRIDS / f"{w}.csv" for w in wanted]
    for path in paths:
        for needed in (path, path.with_name(path.stem + "_space.yaml")):
            if not needed.exists():
                raise SystemExit(f"--grids: {needed} does not exist (record it: {path.stem}_space.yaml says how)")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--extra-seeds", type=int, default=10, help="seeds of the warm-start and parallel runs")
    p.add_argument("--grids", default="", help="comma-separated grid names or CSV paths (default: every grids/*.csv)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--skip", default="", help="comma-separated: hidden,warm,parallel")
    p.add_argument("--warm-modes", default="identical,overlapping")
    p.add_argument("--out", default="runs/search_efficiency")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [g for g in args.grids.split(",") if g]
    skip = set(filter(None, args.skip.split(",")))
    all_results: dict[str, Any] = {}
    for csv_path in grid_tables(wanted):
        t0 = time.perf_counter()
        grid = load_grid(csv_path)
        trials = budget(grid, MAX_SHARE)
        auto = auto_sampler(space_for(grid.raw, "auto", 0, budget(grid, 0.10)))
        res: dict[str, Any] = {"seeds": args.seeds, "trials": trials, "grid": {
            "points": grid.points, "feasible_points": grid.feasible_points, "full_hv": grid.full_hv,
            "reference": grid.reference, "oracle_points_to_95": grid.oracle_points,
            "oracle_exact": grid.oracle_exact, "objectives": [f"{o['metric']} ({o.get('direction', '')})"
                                                         for o in grid.raw["objectives"]],
            "space_size": space_size(space_for(grid.raw, "random", 0, 1))},
            "auto_choice": {"sampler": auto.sampler, "why": auto.why}}
        runs, infeasible, worst = {}, {}, {}
        for sampler in args.samplers.split(","):
            t1 = time.perf_counter()
            runs[sampler], infeasible[sampler], worst[sampler] = all_curves(grid, sampler, args.seeds, trials)
            print(f"{grid.name} {sampler}: {time.perf_counter() - t1:.0f} s", flush=True)
        res["samplers"] = sampler_table(grid, runs, worst, infeasible)
        if "auto" in runs and "random" in runs:
            res["must_show"] = must_show_auto(grid, runs)
        at10 = budget(grid, 0.10)
        if "hidden" not in skip:
            res["hidden"] = {}
            for sampler in ("tpe", "gp", "nsga2"):
                if sampler not in runs:
                    continue
                hidden, spent = curves(grid, sampler, args.seeds, at10, hide_infeasible=True)
                res["hidden"][sampler] = {
                    "with": float(np.median(runs[sampler][:, at10 - 1])), "hidden": float(np.median(hidden[:, -1])),
                    "infeasible_with": float(np.mean(infeasible[sampler][:, at10 - 1])),
                    "infeasible_hidden": float(np.mean(spent[:, -1]))}
        if "warm" not in skip:
            res["warm_start"] = warm_experiment(grid, args.extra_seeds, modes=tuple(args.warm_modes.split(",")))
        if "parallel" not in skip:
            res["parallel"] = [parallel_experiment(grid, runs[s][: args.extra_seeds], args.extra_seeds, s)
                               for s in ("auto", "tpe") if s in runs]
        res["wall_s"] = time.perf_counter() - t0
        all_results[grid.name] = res
        print(json.dumps({k: v for k, v in res.items() if k not in ("samplers",)}, default=_short, indent=1)[:3000])
    (out / "search_efficiency.json").write_text(json.dumps(all_results, indent=1, default=float))
    figure(all_results).write_html(out / "search_efficiency.html", include_plotlyjs="cdn")
    (out / "search_efficiency.md").write_text(markdown(all_results))
    print(markdown(all_results))
    return 0


def _short(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, np.integer)) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
