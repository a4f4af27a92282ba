"""A runner that misbehaves on request, to test how the tuner classifies outcomes.

Knob `mode`: ok | crash | hang | oom | infeasible | failed_capture (a refusal wrapping the
error of a step that failed, as the engines raise after a failed CUDA-graph capture). Loaded by the child as
`tests.fault_runner:FaultRunner`.
"""

from __future__ import annotations

import os
import time

from runners.base import Runner
from runners.contract import InfeasibleConfig, TrialConfig, TrialResult
from runners.knobs import Knob

FAULT_RUNNER = "tests.fault_runner:FaultRunner"
FAULT_KNOBS = {"mode": Knob("mode", "ok", str, ("ok", "crash", "hang", "oom", "infeasible", "failed_capture")),
               "x": Knob("x", 1.0, (int, float)),
               "sleep_s": Knob("sleep_s", 0.0, (int, float))}


class FaultRunner(Runner):
    name = FAULT_RUNNER

    def run(self, config: TrialConfig) -> TrialResult:
        mode = config.knobs.get("mode", "ok")
        if mode == "crash":
            print("fault runner: about to crash", flush=True)
            os.abort()
        if mode == "hang":
            time.sleep(3600)
        if mode == "oom":
            raise MemoryError("simulated allocation failure")
        if mode == "infeasible":
            raise InfeasibleConfig("mode=infeasible cannot run here")
        if mode == "failed_capture":
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            except RuntimeError as exc:
                raise InfeasibleConfig(f"step cannot capture: {exc}") from exc
        time.sleep(float(config.knobs.get("sleep_s", 0.0)))
        x = float(config.knobs.get("x", 1.0))
        return TrialResult("ok", {"throughput_tok_s": 100.0 * x, "latency_p99_ms": 10.0 / x,
                                  "kl_divergence": 0.01})


def main(argv: list[str]) -> int:
    """`autoglm-tune` with this runner registered (the real CLI accepts only built-in runners)."""
    from runners.knobs import RUNNER_KNOBS
    from tuner.cli import main as cli_main

    RUNNER_KNOBS[FAULT_RUNNER] = FAULT_KNOBS
    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
