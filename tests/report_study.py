"""A fast study for the report's layout checks: the fake runner (tests/ux_runner.py), three
objectives (so the 3-D view is drawn), bounds that some trials break, an overloaded trial."""

from __future__ import annotations

from pathlib import Path

from tests.ux_runner import UX_RUNNER, register
from tuner.space import validate
from tuner.storage import open_storage
from tuner.study import RunOptions, run_study

SPACE = {"study": "report_demo", "runner": UX_RUNNER, "device": "cpu", "workload": {"rate_rps": 30, "requests": 8},
         "params": {"x": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
                    "ttft_ms": {"type": "categorical", "choices": [100.0, 900.0, 4132.0]},
                    "overload": {"type": "categorical", "choices": [False, True]}},
         "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"},
                        {"metric": "latency_p99_ms", "direction": "minimize"},
                        {"metric": "peak_memory_mib", "direction": "minimize"}],
         "constraints": [{"metric": "ttft_p99_ms", "max": 2000}, {"metric": "kl_divergence", "max": 0.05}],
         "search": {"sampler": "random", "trials": 12, "seed": 4, "trial_timeout_s": 30}}


def build(root: Path) -> str:
    """Run the study into `root/optuna.journal`; returns the journal's path."""
    register()
    root.mkdir(parents=True, exist_ok=True)
    url = str(root / "optuna.journal")
    run_study(validate(SPACE, "report_demo.yaml", "report_demo"), open_storage(url),
              RunOptions(url, root / "out", quiet=True))
    return url
