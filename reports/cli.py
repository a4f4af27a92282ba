"""`autoglm-tune report`: trials.csv, pareto.csv and a self-contained report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from reports.frames import pareto_frame, trials_frame
from tuner.errors import UsageError


def parser() -> argparse.ArgumentParser:
    from tuner.cli import _Parser

    p = _Parser(prog="autoglm-tune report", description="Write trials.csv, pareto.csv and report.html.")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="default: runs/optuna.journal")
    p.add_argument("--out", help="output folder (default runs/<study>/report)")
    return p


def load_study(name: str, storage_url: str | None) -> optuna.Study:
    from tuner.storage import DEFAULT_STORAGE, open_existing_storage

    url = storage_url or DEFAULT_STORAGE
    storage = open_existing_storage(url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise UsageError(f"no study {name!r} in {url} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    study = load_study(args.study, args.storage)
    out = Path(args.out) if args.out else Path("runs") / args.study / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(study)
    pareto = pareto_frame(study)
    trials.to_csv(out / "trials.csv", index=False)
    pareto.to_csv(out / "pareto.csv", index=False)
    from reports.html import write_report

    write_report(study, trials, pareto, out / "report.html")
    print(f"wrote {out / 'trials.csv'}, {out / 'pareto.csv'}, {out / 'report.html'} "
          f"({len(trials)} trials, {len(pareto)} on the feasible Pareto front)")
    return 0
