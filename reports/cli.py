"""`autoglm-tune report`: trials/pareto as CSV and Parquet, and a self-contained report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from reports.frames import objectives, ordered_columns, pareto_frame, trials_frame, write_table


def parser() -> argparse.ArgumentParser:
    from tuner.cli import Parser

    p = Parser(prog="autoglm-tune report",
                description="Write trials.csv/.parquet, pareto.csv/.parquet and report.html.")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="default: runs/optuna.journal")
    p.add_argument("--out", help="output folder (default runs/<study>/report)")
    return p


def load_study(name: str, storage_url: str | None) -> optuna.Study:
    """The study `name` in `storage_url` (default: the journal file); see `tuner.load_study`."""
    from tuner import load_study as open_study
    from tuner.storage import DEFAULT_STORAGE

    return open_study(storage_url or DEFAULT_STORAGE, name)


def write_all(study: optuna.Study, out: Path) -> list[Path]:
    """Every report file for one study; the same frames and figures the dashboard shows."""
    from reports.html import write_report

    out.mkdir(parents=True, exist_ok=True)
    trials, pareto = trials_frame(study), pareto_frame(study)
    objs = objectives(study)
    # Files read left to right: the knobs first, then the objectives, the verdict, the rest.
    written = [write_table(ordered_columns(frame, objs), out / f"{name}.{suffix}")
               for name, frame in (("trials", trials), ("pareto", pareto)) for suffix in ("csv", "parquet")]
    write_report(study, trials, pareto, out / "report.html")
    return [*written, out / "report.html"]


def main(argv: list[str]) -> int:
    from tuner.cli import check_study_flag
    from tuner.paths import check_out_dir, default_out

    args = parser().parse_args(argv)
    check_study_flag(args.study)  # it names the default folder: a name, not a path
    out = check_out_dir(Path(args.out) if args.out else default_out(args.study, "report"))
    study = load_study(args.study, args.storage)
    written = write_all(study, out)
    trials = len(study.get_trials(deepcopy=False))
    print(f"wrote {', '.join(str(p) for p in written)} ({trials} trials)")
    return 0
