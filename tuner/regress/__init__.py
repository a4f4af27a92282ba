"""`autoglm-tune regress`: re-measure a committed baseline's configs and fail on a real regression.

Each config runs R times through the tuner's own launcher and runner (no second measurement
path), round-robin so that machine drift hits every config alike; docs/regress.md has the rule.

- `baseline`: the baseline file's schema and validation, accepting new references, `--init`;
- `measure`: the round-robin measuring, and judging the measurements (host drift included);
- `rule`: the statistical rule, pure functions of numbers, and the history file;
- `command`: the command line, exit codes, Markdown and JUnit XML.
"""

from __future__ import annotations

from tuner.regress.baseline import Baseline, Entry, init_baseline, load_baseline, write_baseline
from tuner.regress.command import EXIT_HOST_DRIFT, EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, main, parser
from tuner.regress.measure import evaluate, measure, plan_rounds

__all__ = ["EXIT_HOST_DRIFT", "EXIT_OK", "EXIT_REGRESSION", "EXIT_USAGE", "Baseline", "Entry", "evaluate",
           "init_baseline", "load_baseline", "main", "measure", "parser", "plan_rounds", "write_baseline"]
