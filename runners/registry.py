"""Every runner declared once: its class, its knobs, its workload schema with defaults.

Torch-free: the tuner validates space files from these declarations (tuner/space/), the child
loads the class from `target`, the runner fills its workload defaults from `workload`, and the
model cache keys a built model by the knobs flagged `rebuilds` (runners/glm/model_cache.py).

Adding a runner: one `RunnerSpec` in `BUILTIN`. Adding a knob: one `Knob` in runners/knobs.py.
Adding a workload key: one `WorkloadKey` in the group its runners share, below.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from runners.knobs import INFER_KNOBS, INFER_TOGETHER, TRAIN_KNOBS, Knob, Together, refused_together

ARRIVALS = ("poisson", "constant", "closed", "gamma", "trace")
CI_METRICS = ("ttft", "tpot", "latency")  # the latency whose p99 CI a window's `target_p99_ci_ratio` bounds
WORKLOAD_MODES = ("window", "capacity")
SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)


@dataclass(frozen=True)
class WorkloadKey:
    """One key of a runner's `workload:` section.

    kind: number | int | str | bool | length (an int or a {dist: ...} mapping) | file (a path
    to a regular file) | text (a text file tokenized with the checkpoint's tokenizer).
    floor: "> 0" or ">= 0" for numbers; maximum: the highest meaningful value.
    default: what the runner uses when a space leaves the key out (None: unset, the runner's
    code decides, e.g. `max_requests` = `requests`).
    """

    name: str
    kind: str
    default: Any = None
    floor: str | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False  # `key: null` in a space file means "leave it out"


_POS, _NONNEG = "> 0", ">= 0"
_DAY_S = 86400.0
_SEED = WorkloadKey("seed", "int", None, _NONNEG, SEED_MAX)  # the request / data draw; default the trial's seed

# The serving window of an inference runner: request load, its length, and when it ends.
SERVING_WORKLOAD: tuple[WorkloadKey, ...] = (
    WorkloadKey("arrival", "str", "poisson", choices=ARRIVALS),
    WorkloadKey("rate_rps", "number", 8.0, _POS, 1e6),
    WorkloadKey("burstiness", "number", None, _POS, 100.0),
    WorkloadKey("concurrency", "int", None, _POS, 10_000),
    WorkloadKey("requests", "int", 64, _POS, 100_000),
    WorkloadKey("warmup_requests", "int", 4, _NONNEG, 100_000),
    WorkloadKey("max_requests", "int", None, _POS, 100_000, nullable=True),
    WorkloadKey("prompt_tokens", "length", 32),
    WorkloadKey("output_tokens", "length", 16),
    _SEED,
    WorkloadKey("trace", "file"),
    WorkloadKey("max_duration_s", "number", None, _POS, 7 * _DAY_S),
    WorkloadKey("target_p99_ci_ratio", "number", None, _POS, 10.0),
    WorkloadKey("ci_metric", "str", None, choices=CI_METRICS),  # read by serving.WindowRule
    WorkloadKey("early_stop", "bool"),
    WorkloadKey("shared_prefix_tokens", "int", None, _NONNEG),
    WorkloadKey("shared_prefix_groups", "int", None, _NONNEG, 100_000),
    WorkloadKey("mode", "str", None, choices=WORKLOAD_MODES),
    WorkloadKey("capacity_min_rps", "number", None, _POS),
    WorkloadKey("capacity_max_rps", "number", None, _POS),
    WorkloadKey("capacity_tolerance", "number", None, _POS),
    WorkloadKey("capacity_probes", "int", None, _POS),
    WorkloadKey("capacity_probe_s", "number", None, _POS),
)
# The quality measurement of an inference runner: evaluation and calibration sets.
QUALITY_WORKLOAD: tuple[WorkloadKey, ...] = (
    WorkloadKey("eval_sequences", "int", 4, _POS, 10_000),
    WorkloadKey("eval_tokens", "int", 64, _POS),
    WorkloadKey("eval_text", "text"),
    WorkloadKey("calibration_text", "text"),
)
# A training run: steps measured after warm-up steps, on synthetic or given data.
TRAIN_WORKLOAD: tuple[WorkloadKey, ...] = (
    WorkloadKey("train_steps", "int", 8, _POS, 1_000_000),
    WorkloadKey("warmup_steps", "int", 3, _NONNEG, 1_000_000),
    _SEED,
    WorkloadKey("data_path", "file"),
)


def _union(*groups: tuple[WorkloadKey, ...]) -> tuple[WorkloadKey, ...]:
    seen: dict[str, WorkloadKey] = {}
    for group in groups:
        for key in group:
            seen.setdefault(key.name, key)
    return tuple(seen.values())


# What a plug-in runner (a `module:Class` target) may be given: every key of the built-ins.
ANY_WORKLOAD = _union(SERVING_WORKLOAD, QUALITY_WORKLOAD, TRAIN_WORKLOAD)


@dataclass(frozen=True)
class RunnerSpec:
    """One runner. `model`: glm (a preset or checkpoint folder) | table (a replay CSV whose
    knob columns are the runner's knobs; `knobs` is then empty)."""

    name: str
    target: str  # "package.module:Class", loaded in the child process
    knobs: Mapping[str, Knob]
    workload: tuple[WorkloadKey, ...]
    model: str = "glm"
    help: str = ""
    together: tuple[Together, ...] = ()  # values refused together on any device, known before a trial
    workload_keys: Mapping[str, WorkloadKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workload_keys", {k.name: k for k in self.workload})

    def workload_defaults(self) -> dict[str, Any]:
        """The workload a trial runs when its space leaves a key out."""
        return {k.name: k.default for k in self.workload if k.default is not None}

    def rebuilding_knobs(self) -> tuple[str, ...]:
        """The knobs whose value changes the built model (a model cache keys by them)."""
        return tuple(name for name, knob in self.knobs.items() if knob.rebuilds)

    def knobs_for(self, model: Mapping[str, Any] | None = None) -> dict[str, Knob]:
        """The knobs a space for this runner may set (a replay table's knob columns)."""
        if self.model == "table":
            from runners.replay import table_knobs  # torch-free

            return table_knobs(dict(model or {}))
        return dict(self.knobs)


BUILTIN: dict[str, RunnerSpec] = {
    spec.name: spec
    for spec in (
        RunnerSpec("glm-infer", "runners.infer:GlmInferRunner", INFER_KNOBS, SERVING_WORKLOAD + QUALITY_WORKLOAD,
                   help="GLM inference: compression x serving knobs under a request load", together=INFER_TOGETHER),
        RunnerSpec("glm-train", "runners.train:GlmTrainRunner", TRAIN_KNOBS, TRAIN_WORKLOAD,
                   help="GLM training steps: memory and speed knobs"),
        # Answers from a recorded table (torch-free); spaces derived from glm-infer ones keep their workload.
        RunnerSpec("replay", "runners.replay:ReplayRunner", {}, ANY_WORKLOAD, model="table",
                   help="a recorded study's table, looked up by knobs"),
    )
}
# Runners registered at run time by module path (tests, plug-ins): see `RUNNER_KNOBS`.
PLUGINS: dict[str, RunnerSpec] = {}


def plugin_spec(target: str, knobs: Mapping[str, Knob]) -> RunnerSpec:
    """A plug-in runner named by its `module:Class` target, taking any built-in workload key."""
    return RunnerSpec(target, target, dict(knobs), ANY_WORKLOAD)


def runner_spec(name: str) -> RunnerSpec:
    """The declaration of a built-in or registered runner; KeyError names the known ones."""
    spec = BUILTIN.get(name) or PLUGINS.get(name)
    if spec is None:
        raise KeyError(f"unknown runner {name!r} (known: {', '.join(known_runners())})")
    return spec


def known_runners() -> list[str]:
    return sorted({*BUILTIN, *PLUGINS})


class _KnobTables(MutableMapping):
    """Runner name -> its knob table, read from the declarations. Setting an entry registers
    (or replaces) a plug-in runner with those knobs; deleting it unregisters it."""

    def __getitem__(self, name: str) -> Mapping[str, Knob]:
        return runner_spec(name).knobs

    def __setitem__(self, name: str, knobs: Mapping[str, Knob]) -> None:
        if name in BUILTIN:
            raise KeyError(f"{name} is a built-in runner: declare its knobs in runners/knobs.py")
        PLUGINS[name] = plugin_spec(name, knobs)

    def __delitem__(self, name: str) -> None:
        del PLUGINS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(known_runners())

    def __len__(self) -> int:
        return len(known_runners())


RUNNER_KNOBS: MutableMapping[str, Mapping[str, Knob]] = _KnobTables()


def runner_knobs(runner: str, model: Mapping[str, Any] | None = None) -> dict[str, Knob]:
    """The knobs a space for `runner` may set; the replay runner's are its table's knob columns."""
    return runner_spec(runner).knobs_for(model)


def recorded_with(spec: RunnerSpec, model: Mapping[str, Any] | None) -> RunnerSpec | None:
    """The runner a replay table was recorded with (`model: {recorded_with: NAME}`), else None."""
    name = (model or {}).get("recorded_with") if spec.model == "table" else None
    return runner_spec(name) if name else None


def refused_up_front(runner: str, model: Mapping[str, Any] | None, values: Mapping[str, Any]) -> str:
    """Why `runner` refuses these knob values together on any device, or '' (`RunnerSpec.together`)."""
    spec = runner_spec(runner)
    # A replay table's absent knobs read as the recording runner's defaults (it never varied them).
    declaring = recorded_with(spec, model) or spec
    return refused_together(declaring.together, declaring.knobs, values) if declaring.together else ""


def resolve_knobs(runner: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of `runner` overlaid with `given`; unknown names raise KeyError."""
    table = runner_spec(runner).knobs
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise KeyError(f"unknown knob(s) for runner {runner}: {unknown}")
    resolved = {name: knob.default for name, knob in table.items()}
    resolved.update(given)
    return resolved


def resolve_workload(runner: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The runner's workload defaults overlaid with `given` (already validated by the tuner)."""
    return {**runner_spec(runner).workload_defaults(), **given}
