"""Wall time of one study budget on one GPU vs one worker per GPU (`--gpus`).

Runs `autoglm-tune --space SPACE --trials N --gpus 0` and then `--gpus 0,1,...` on fresh
journal files, and prints wall times, which GPU each trial ran on, and whether the workers
overlapped. Usage: python -m benchmarks.multi_gpu [--space batch_quant] [--trials 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna

from tuner.storage import open_storage


def run(space: str, trials: int, gpus: str, folder: Path) -> dict:
    journal = folder / f"gpus_{gpus.replace(',', '_')}.journal"
    study = f"gpus_{gpus.replace(',', '_')}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuner", "--space", space, "--study", study, "--trials", str(trials),
                    "--gpus", gpus, "--storage", str(journal), "--out", str(folder / study), "--quiet"],
                   check=True)
    wall_s = time.perf_counter() - start
    done = optuna.load_study(study_name=study, storage=open_storage(str(journal))).get_trials()
    by_gpu: dict[str, list] = {}
    for t in done:
        by_gpu.setdefault(str(t.user_attrs["owner"].get("gpu")), []).append(t)
    overlap = any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
                  for g1, ts1 in by_gpu.items() for g2, ts2 in by_gpu.items() if g1 < g2
                  for a in ts1 for b in ts2)
    return {"gpus": gpus, "trials": len(done), "wall_s": round(wall_s, 1),
            "states": sorted({t.state.name for t in done}),
            "trials_per_gpu": {g: len(ts) for g, ts in by_gpu.items()}, "overlap": overlap}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--space", default="batch_quant")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--gpus", default="0,1")
    p.add_argument("--out", default="runs/multi_gpu")
    args = p.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [run(args.space, args.trials, args.gpus.split(",")[0], folder), run(args.space, args.trials, args.gpus, folder)]
    rows[1]["speedup_vs_one_gpu"] = round(rows[0]["wall_s"] / rows[1]["wall_s"], 2)
    (folder / "multi_gpu.json").write_text(json.dumps(rows, indent=2))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
