"""A fast fake runner with chosen metrics, to test what the user sees (terminal, exit codes).

Knobs: `ttft_ms` (the trial's ttft_p99_ms), `x` (throughput scale), `mode` (ok | crash |
crash_other | infeasible; every mode crashes while $UX_BROKEN is set), `overload` (report an open-loop window that fell behind).
Loaded by the child as `tests.ux_runner:UxRunner`; it writes progress like the real runner.
"""

from __future__ import annotations

import os
import time

from runners import progress_report
from runners.base import Runner
from runners.contract import InfeasibleConfig, TrialConfig, TrialResult
from runners.knobs import Knob

UX_RUNNER = "tests.ux_runner:UxRunner"
UX_KNOBS = {"mode": Knob("mode", "ok", str, ("ok", "crash", "crash_other", "infeasible")),
            "x": Knob("x", 1.0, (int, float)),
            "ttft_ms": Knob("ttft_ms", 100.0, (int, float)),
            "overload": Knob("overload", False, bool)}
REQUESTS = 4


class UxRunner(Runner):
    name = UX_RUNNER

    def run(self, config: TrialConfig) -> TrialResult:
        knobs = {k: config.knobs.get(k, v.default) for k, v in UX_KNOBS.items()}
        progress_report.start(config.artifact_dir)
        progress_report.report_phase("build")
        if knobs["mode"] == "crash" or os.environ.get("UX_BROKEN"):  # UX_BROKEN: a missing dependency
            raise RuntimeError("weights file is truncated")
        if knobs["mode"] == "crash_other":
            raise RuntimeError(f"a different error {time.time_ns()}")
        if knobs["mode"] == "infeasible":
            raise InfeasibleConfig("mode=infeasible cannot run here")
        progress_report.report_phase("measure")
        for done in range(1, REQUESTS + 1):
            time.sleep(0.01)
            progress_report.report_requests(done, REQUESTS)
        x = float(knobs["x"])
        served = 2.6 if knobs["overload"] else 25.0
        metrics = {"throughput_tok_s": 100.0 * x, "latency_p99_ms": 1000.0 / x,
                   "ttft_p99_ms": float(knobs["ttft_ms"]), "kl_divergence": 0.01,
                   "request_throughput_rps": served, "peak_memory_mib": 300.0 + 50.0 * x}
        info = {"serving": {"offered_rps": 25.9, "overloaded": bool(knobs["overload"])}}
        return TrialResult("ok", metrics, environment={"device_name": "Fake Accelerator 9000"}, info=info)


def register() -> None:
    from runners.knobs import RUNNER_KNOBS

    RUNNER_KNOBS[UX_RUNNER] = UX_KNOBS


if __name__ == "__main__":  # `python -m tests.ux_runner ARGS`: autoglm-tune with this runner
    import sys

    from tuner.cli import main

    register()
    sys.exit(main(sys.argv[1:]))
