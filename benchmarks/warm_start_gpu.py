"""Warm start, measured on real trials: cold N trials vs warm M trials of one space.

    python -m benchmarks.warm_start_gpu --space benchmarks/grids/gpu_warm_space.yaml \
        --source-study grid_gpu_glm4_9b --source-storage runs/grid_gpu.journal [--cold 30] [--warm 10]

Runs the space cold (`--cold` trials), then as a fresh study warm-started from the source study
(`search.warm_start`; `--warm` trials), both through the CLI with `--warm` model reuse, each in
its own journal under --out. Prints both feasible hypervolumes under one reference point (the
worst feasible value of each objective over both studies, pushed 10 % of its span out) and the
warm study's trial at which it reaches the cold study's final hypervolume.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

from tuner.search import feasible, hypervolume_history, reference_point, study_directions
from tuner.storage import open_storage


def run(raw: dict, name: str, trials: int, out: Path) -> optuna.Study:
    raw = {**raw, "study": name, "search": {**raw.get("search", {}), "trials": trials}}
    space = out / f"{name}.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    journal = str(out / f"{name}.journal")
    subprocess.run([sys.executable, "-m", "tuner", "--space", str(space), "--storage", journal, "--out",
                    str(out / name), "--warm"], check=True)
    return optuna.load_study(study_name=name, storage=open_storage(journal))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True)
    p.add_argument("--source-study", required=True)
    p.add_argument("--source-storage", required=True)
    p.add_argument("--cold", type=int, default=30)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--out", default="runs/warm_start_gpu")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(Path(args.space).read_text())
    cold = run(raw, f"{raw['study']}_cold", args.cold, out)
    warm_raw = {**raw, "search": {**raw.get("search", {}),
                                  "warm_start": {"study": args.source_study,
                                                 "storage": str(Path(args.source_storage).resolve())}}}
    warm = run(warm_raw, f"{raw['study']}_warm", args.warm, out)
    directions = study_directions(cold)
    # Finished trials only: the warm study's unused enqueued configs stay WAITING in it.
    trials = {s.study_name: [t for t in s.get_trials() if t.state.is_finished()
                             and not t.user_attrs.get("carried_over")]
              for s in (cold, warm)}
    points = [t.values for ts in trials.values() for t in ts if feasible(t)]
    ref = reference_point(points, directions)
    cold_hv = hypervolume_history(trials[cold.study_name], directions, ref)
    warm_hv = hypervolume_history(trials[warm.study_name], directions, ref)
    reach = next((i + 1 for i, v in enumerate(warm_hv) if v >= cold_hv[-1] - 1e-12), None)
    result = {"reference": ref, "cold_trials": len(cold_hv), "cold_hv": cold_hv[-1] if cold_hv else 0.0,
              "warm_trials": len(warm_hv), "warm_hv_history": warm_hv, "warm_reaches_cold_at": reach,
              "carried": warm.user_attrs.get("warm_start")}
    (out / "warm_start_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
