"""Plain data that crosses the tuner/runner line.

This module must stay free of torch and Optuna: the tuner imports it to validate space files
and to read results, and the runner child process imports it to build them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

# Metric name -> (unit, better direction). The names are stored exactly so (DESIGN.md).
METRICS: dict[str, tuple[str, str]] = {
    "throughput_tok_s": ("tok/s", "maximize"),
    "request_throughput_rps": ("req/s", "maximize"),
    "ttft_p50_ms": ("ms", "minimize"),
    "ttft_p90_ms": ("ms", "minimize"),
    "ttft_p99_ms": ("ms", "minimize"),
    "tpot_p50_ms": ("ms", "minimize"),
    "tpot_p90_ms": ("ms", "minimize"),
    "tpot_p99_ms": ("ms", "minimize"),
    "latency_p50_ms": ("ms", "minimize"),
    "latency_p90_ms": ("ms", "minimize"),
    "latency_p99_ms": ("ms", "minimize"),
    "peak_memory_mib": ("MiB", "minimize"),
    "torch_peak_allocated_mib": ("MiB", "minimize"),
    "torch_peak_reserved_mib": ("MiB", "minimize"),
    "mean_power_w": ("W", "minimize"),
    "energy_j_per_tok": ("J/tok", "minimize"),
    "mbu": ("ratio", "maximize"),
    "mfu": ("ratio", "maximize"),
    "kl_divergence": ("nats", "minimize"),
    "top1_agreement": ("ratio", "maximize"),
    "perplexity": ("", "minimize"),
    "goodput_rps": ("req/s", "maximize"),
    "prefix_hit_rate": ("ratio", "maximize"),
    "measured_requests": ("requests", "maximize"),
    "setup_s": ("s", "minimize"),
    "setup_build_s": ("s", "minimize"),
    "setup_compress_s": ("s", "minimize"),
    "setup_compile_s": ("s", "minimize"),
    "setup_quality_s": ("s", "minimize"),
    # capacity mode: the highest Poisson rate whose p99 TTFT and TPOT meet the `slo:` section
    "capacity_rps": ("req/s", "maximize"),
    "capacity_tok_s": ("tok/s", "maximize"),
    # training runner
    "train_tokens_s": ("tok/s", "maximize"),
    "train_step_ms": ("ms", "minimize"),
    "train_step_p50_ms": ("ms", "minimize"),
    "train_step_p90_ms": ("ms", "minimize"),
    "train_peak_memory_mib": ("MiB", "minimize"),
    "train_mfu": ("ratio", "maximize"),
    "train_loss": ("nats", "minimize"),
}
# The metrics of the quality pass: one score per built model and KV policy, measured in set-up
# before any request is served (`runners.knobs.quality_knobs` says which knobs decide them).
QUALITY_METRICS = ("kl_divergence", "top1_agreement", "perplexity")
# Every latency percentile carries an order-statistic confidence interval.
for _base in ("ttft", "tpot", "latency"):
    for _p in (50, 90, 99):
        for _side in ("low", "high"):
            METRICS[f"{_base}_p{_p}_ms_ci_{_side}"] = ("ms", "minimize")
# Throughput carries a batch-means t-interval over the window's time slices (runners.stats).
for _side in ("low", "high"):
    METRICS[f"throughput_tok_s_ci_{_side}"] = ("tok/s", "maximize")

# A measured window's hard length when the workload names no `max_duration_s` (seconds).
DEFAULT_MAX_DURATION_S = 120.0

Direction = Literal["maximize", "minimize"]
TrialStatus = Literal["ok", "infeasible"]


class InfeasibleConfig(Exception):
    """A deterministic, config-caused failure: the knobs cannot run on this device.

    Raised by a runner; the tuner records the trial as COMPLETE but infeasible with this
    message as the reason, so samplers learn to avoid the region instead of retrying it.
    """


@dataclass
class TrialConfig:
    """Everything a runner needs for one trial; JSON-serialisable."""

    runner: str
    model: dict[str, Any]
    device: str
    workload: dict[str, Any]
    knobs: dict[str, Any]
    seed: int = 0
    artifact_dir: str = ""
    trial_number: int = -1
    study: str = ""
    slo: dict[str, float] = field(default_factory=dict)
    # The study's constraints as `{metric, max|min}`: a window stops early once one is decided.
    constraints: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        return cls(**data)


@dataclass
class TrialResult:
    """What a runner hands back: metrics with contract names plus evidence.

    `metrics` holds only what was measured; a metric the device cannot measure is absent and
    its reason sits in `unavailable` (never a made-up 0).
    """

    status: TrialStatus
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        return cls(**data)


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in results; store them as plain numbers/strings.
    if hasattr(value, "item"):
        return value.item()
    return str(value)
