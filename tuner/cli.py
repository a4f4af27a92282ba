"""`autoglm-tune`: run a study, or one of the subcommands.

Exit codes: 0 ok; 1 run-time failure (or regression found); 2 usage/configuration error
(one line naming the file and key, no traceback, nothing created); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from tuner.errors import UsageError
from tuner.space import SpaceError

# name -> (module, function); each function takes argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "report": ("reports.cli", "main"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error is exit code 2 alike."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autoglm-tune", description="Tune GLM serving and compression knobs with Optuna.",
                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (autoglm-tune SUB --help)")
    p.add_argument("--space", required=True, help="space file, or a bundled name (batch_quant)")
    p.add_argument("--study", help="study name (default: the file's `study`, else its stem)")
    p.add_argument("--storage", default=None, help="journal file path, sqlite:///..., postgresql://...")
    p.add_argument("--trials", type=int, help="total trial budget of the study")
    p.add_argument("--timeout-min", type=float, help="stop starting trials after this many minutes")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--out", help="artifact folder (default runs/<study>/)")
    p.add_argument("--seed", type=int, help="sampler and workload seed")
    p.add_argument("--warm", action="store_true",
                   help="keep one runner process between trials (reuses built models)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def run_main(argv: list[str]) -> int:
    from tuner.space import load_space
    from tuner.storage import DEFAULT_STORAGE, open_storage, storage_kind

    args = run_parser().parse_args(argv)
    overrides = {"study": args.study, "device": args.device, "trials": args.trials,
                 "timeout_min": args.timeout_min, "seed": args.seed}
    space = load_space(args.space, overrides)  # validated before anything is created
    storage_url = args.storage or DEFAULT_STORAGE
    storage_kind(storage_url)
    out_dir = Path(args.out) if args.out else Path("runs") / space.study

    from tuner.study import RunOptions, run_study

    storage = open_storage(storage_url)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_study(space, storage, RunOptions(storage_url, out_dir, args.quiet, args.warm))
    return 0 if summary.counted >= summary.budget or summary.timed_out else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0])(argv[1:])
        return run_main(argv)
    except (SpaceError, UsageError) as exc:
        print(f"autoglm-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoglm-tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _subcommand(name: str) -> Callable[[list[str]], int]:
    import importlib

    module, func = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)


if __name__ == "__main__":
    sys.exit(main())
