"""`autoglm-tune`: run a study, or one of the subcommands.

Exit codes: 0 ok; 1 run-time failure (or regression found); 2 usage/configuration error
(one line naming the file and key, no traceback, nothing created); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tuner.errors import UsageError
from tuner.space import SpaceError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from tuner.space import Space
    from tuner.study import RunSummary



class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error is exit code 2 alike."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_parser() -> argparse.ArgumentParser:
    p = Parser(prog="autoglm-tune", description="Tune GLM serving and compression knobs with Optuna.",
                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (autoglm-tune SUB --help)")
    p.add_argument("--space", required=True, help="space file, or a bundled name (batch_quant)")
    p.add_argument("--study", help="study name (default: the file's `study`, else its stem)")
    p.add_argument("--storage", default=None, help="journal file path, sqlite:///..., postgresql://...")
    p.add_argument("--trials", type=int, help="total trial budget of the study")
    p.add_argument("--timeout-min", type=float, help="stop starting trials after this many minutes")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--out", help="artifact folder (default runs/<study>/)")
    p.add_argument("--seed", type=int, help="sampler and workload seed")
    p.add_argument("--keep-infeasible", action="store_true",
                   help="keep knob values the device can never run (int4 on CPU, ...) in the space; "
                        "their trials are recorded as infeasible")
    _worker_flags(p)
    return p


def worker_parser() -> argparse.ArgumentParser:
    p = Parser(prog="autoglm-tune worker",
                description="Join a study by name and run its trials until its total budget is used.")
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--storage", default=None,
                   help="the study's storage: postgresql://... across hosts, or the journal file on one host")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K (default: the study's)")
    p.add_argument("--out", help="artifact folder (default runs/<study>/)")
    _worker_flags(p)
    return p


def _worker_flags(p: argparse.ArgumentParser) -> None:
    """Flags a study run and `worker` share."""
    p.add_argument("--gpus", help="one worker process per GPU of this host, e.g. 0,1,2,3 "
                                  "(each pinned with CUDA_VISIBLE_DEVICES, device cuda:0 inside)")
    p.add_argument("--heartbeat-s", type=_positive_int, default=None,
                   help="PostgreSQL: seconds between worker heartbeats; a trial silent for 4 beats is "
                        "failed and retried by another worker (default 30)")
    p.add_argument("--warm", action="store_true",
                   help="keep one runner process between trials (reuses built models)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds >= 1, got {text!r}")
    return int(text)


def run_main(argv: list[str]) -> int:
    from tuner.space import load_space
    from tuner.storage import DEFAULT_STORAGE, check_parallel, check_storage, open_storage, storage_kind

    args = run_parser().parse_args(argv)
    gpus = _gpus(args)
    overrides = {"study": args.study, "device": args.device, "trials": args.trials,
                 "timeout_min": args.timeout_min, "seed": args.seed}
    check_study_flag(args.study)
    space = load_space(args.space, overrides)  # validated before anything is created
    storage_url = args.storage or DEFAULT_STORAGE
    storage_kind(storage_url)
    check_parallel(storage_url, len(gpus) if gpus else 1)
    from tuner.device_fit import fit_to_device

    space = fit_to_device(space, args.keep_infeasible, (lambda _: None) if args.quiet else print)
    out_dir = _out_dir(args.out, space.study)
    check_storage(storage_url)  # the storage and the folder are checked before either is created
    if space.search.warm_start is not None:
        from tuner.warm_start import load_source

        load_source(space.search.warm_start, storage_url)  # a missing source study: exit 2, nothing created

    from tuner.study import RunOptions, open_study, run_study

    storage = open_storage(storage_url, args.heartbeat_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    if gpus:
        open_study(space, storage)  # created (or its budget updated) once, before the workers join
        return _fan_out(space, storage, storage_url, out_dir, args, gpus)
    summary = run_study(space, storage, RunOptions(storage_url, out_dir, args.quiet, args.warm))
    return _exit_code(summary)


def worker_main(argv: list[str]) -> int:
    from tuner.paths import check_out_dir
    from tuner.storage import DEFAULT_STORAGE, check_parallel, open_existing_storage

    args = worker_parser().parse_args(argv)
    gpus = _gpus(args)
    check_study_flag(args.study)
    storage_url = args.storage or DEFAULT_STORAGE
    check_parallel(storage_url, 2)  # a worker is one of several by definition
    if args.out:
        check_out_dir(Path(args.out))
    storage = open_existing_storage(storage_url, args.heartbeat_s)
    space = _joined_space(args.study, storage, storage_url, args.device)
    out_dir = _out_dir(args.out, space.study)
    out_dir.mkdir(parents=True, exist_ok=True)
    if gpus:
        return _fan_out(space, storage, storage_url, out_dir, args, gpus)

    from tuner.study import RunOptions, run_study

    options = RunOptions(storage_url, out_dir, args.quiet, args.warm, join=True)
    return _exit_code(run_study(space, storage, options))


def make_reference_main(argv: list[str]) -> int:
    """Train a reference GLM + tokenizer on local text (runners/reference.py): torch work, so it
    runs in a child process like every trial; its exit code is this command's."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "runners.reference", *argv])


def check_study_flag(name: str | None) -> None:
    """`--study NAME`: a name (it becomes a folder name), checked before anything is opened."""
    from tuner.space import study_name_problem

    problem = None if name is None else study_name_problem(name)
    if problem:
        raise UsageError(f"--study {name!r}: {problem}")


def _out_dir(out: str | None, study: str) -> Path:
    """`--out`, else runs/<study>; checked to be creatable and writable (creates nothing)."""
    from tuner.paths import check_out_dir, default_out

    return check_out_dir(Path(out) if out else default_out(study))


def _gpus(args: argparse.Namespace) -> list[str] | None:
    from tuner.workers import parse_gpus

    if args.gpus is None:
        return None
    if args.device is not None:
        raise UsageError(f"--device {args.device} with --gpus {args.gpus}: each GPU worker runs on cuda:0 "
                         f"of its own pinned GPU; give one of the two")
    return parse_gpus(args.gpus)


def _joined_space(study_name: str, storage: BaseStorage, storage_url: str, device: str | None) -> Space:
    import optuna

    from tuner.study import space_from_study

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UsageError(f"--study {study_name}: no such study in {storage_url} (start it with "
                         f"autoglm-tune --space FILE --storage {storage_url})") from None
    return space_from_study(study, {"device": device})


def _fan_out(space: Space, storage: BaseStorage, storage_url: str, out_dir: Path, args: argparse.Namespace,
             gpus: list[str]) -> int:
    """One forked worker per GPU on this host, all joining the (existing) study by name."""
    from tuner.space import apply_overrides, validate
    from tuner.storage import close_storage, open_storage
    from tuner.study import RunOptions, run_study
    from tuner.workers import run_on_gpus

    pinned = validate(apply_overrides(space.raw, {"device": "cuda:0"}), space.source, space.study)
    close_storage(storage)  # forked workers must not share this process's database connections

    def work(gpu: str) -> int:
        options = RunOptions(storage_url, out_dir, args.quiet, args.warm, worker={"gpu": gpu}, join=True)
        return _guarded(lambda: _exit_code(run_study(pinned, open_storage(storage_url, args.heartbeat_s),
                                                     options)))

    return run_on_gpus(gpus, work)


def _exit_code(summary: RunSummary) -> int:
    """1 when no trial of the study completed or a crash stopped the run; else 0 once done."""
    if summary.budget and not summary.completed or summary.stopped_by:
        return 1
    return 0 if summary.counted >= summary.budget or summary.timed_out or summary.grid_exhausted \
        or summary.plateau else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare command: what it can do, not a complaint about --space
        print(usage_text())
        return 2
    if argv[0] in ("--version", "-V"):
        print(f"autoglm-tune {package_version()}")
        return 0
    if argv[0] == "--list-spaces":
        return spaces_main(argv[1:])
    if argv and argv[0] in SUBCOMMANDS:
        return _guarded(lambda: SUBCOMMANDS[argv[0]](argv[1:]))
    return _guarded(lambda: run_main(argv))


def _guarded(command: Callable[[], int]) -> int:
    """Usage errors become exit 2 with one line; Ctrl-C becomes 130 (in each worker too)."""
    try:
        return command()
    except (SpaceError, UsageError) as exc:
        print(f"autoglm-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoglm-tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # the storage or the output folder failed mid-run (disk full, read-only)
        print(f"autoglm-tune: error: {exc}; the study stopped (run the same command again to resume)",
              file=sys.stderr)
        return 1




# ---------------------------------------------------------------- usage, version, bundled spaces


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoglm-tune")
    except PackageNotFoundError:
        return "(not installed: run pip install -e .)"


def bundled_spaces() -> list[tuple[str, str, str]]:
    """(name, runner, first comment line) of every bundled space file, by name."""
    import yaml

    from tuner.space import bundled_dir

    spaces = []
    for path in sorted(bundled_dir().glob("*.yaml")):
        text = path.read_text()
        try:
            runner = str((yaml.safe_load(text) or {}).get("runner", "?"))
        except yaml.YAMLError:
            runner = "?"
        spaces.append((path.stem, runner, _about(text)))
    return spaces


def _about(text: str, width: int = 78) -> str:
    """The first sentence of a space file's opening comment, cut to one terminal line."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        words += line.strip("# ").split()
    sentence = " ".join(words).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 1].rsplit(" ", 1)[0] + "…"


def spaces_text() -> str:
    rows = bundled_spaces()
    width = max((len(name) for name, _, _ in rows), default=0)
    return "\n".join(f"  {name:<{width}}  {runner:<9}  {about}" for name, runner, about in rows)


def usage_text() -> str:
    return (f"{run_parser().format_help().rstrip()}\n\n"
            "commands:\n"
            "  autoglm-tune --space NAME_OR_FILE   run (or resume) a study\n"
            "  autoglm-tune report --study NAME    CSV + HTML report of a study\n"
            "  autoglm-tune dashboard              the Streamlit dashboard on 127.0.0.1\n"
            "  autoglm-tune regress BASELINE.yaml  re-measure accepted configs (--init to write one)\n"
            "  autoglm-tune worker --study NAME    join a running study as another worker\n"
            "  autoglm-tune spaces                 the bundled search spaces\n"
            "  autoglm-tune --version\n\n"
            f"bundled spaces (--space NAME):\n{spaces_text()}\n\n"
            "start with: autoglm-tune --space batch_quant")


def spaces_main(argv: list[str]) -> int:
    if argv:
        raise UsageError(f"spaces takes no arguments, got {' '.join(argv)}")
    print(spaces_text())
    return 0


# ---------------------------------------------------------------- the subcommands
# Each takes argv and returns an exit code. Their modules are imported when the command runs,
# so `autoglm-tune --space ...` never loads pandas' report code or Streamlit's launcher.


def report_main(argv: list[str]) -> int:
    # The console script is the composition root: its two commands of the reports layer are
    # the one import from tuner up into reports (tests/test_layers.py ENTRY_POINT_IMPORTS).
    from reports.cli import main as report

    return report(argv)


def dashboard_main(argv: list[str]) -> int:
    from reports.dashboard import main as dashboard

    return dashboard(argv)


def regress_main(argv: list[str]) -> int:
    from tuner.regress import main as regress

    return regress(argv)


def export_table_main(argv: list[str]) -> int:
    """A study as a table for `runner: replay`."""
    from tuner.export import main as export_table

    return export_table(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "report": report_main,
    "regress": regress_main,
    "dashboard": dashboard_main,
    "worker": worker_main,
    "make-reference": make_reference_main,
    "spaces": spaces_main,
    "export-table": export_table_main,
}


if __name__ == "__main__":
    sys.exit(main())
