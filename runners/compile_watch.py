"""Did anything compile, capture or autotune inside a measured window?

Set-up prepares every shape a trial can reach; a window that still compiles measures the
compiler, not the configuration (the first trial of a GPU study ran 5x slower than a
near-identical second one). `CompileWatch` is a context manager around the window that takes
the difference of every compile-event counter the process exposes:

- Dynamo (`torch._dynamo.utils.counters`): `frames_compiled` (frames handed to the compiler:
  first compiles and recompiles alike; a guard hit never reaches it), `graphs_compiled`
  (`stats/unique_graphs`).
- Inductor: `inductor_compiles` (FX graph cache misses), `inductor_cache_loads` (FX graph cache
  hits: no codegen, but a Dynamo trace and a module load), `inductor_autotunes`
  (`select_algorithm_autotune`, max-autotune's GEMM choice), `inductor_autotune_benches`
  (coordinate-descent and combo-kernel benchmarking).
- Triton `@triton.autotune` kernels of ours (`runners.glm.kernels.woq_triton`): `triton_autotunes`, new
  entries in their per-key config caches. Triton keeps no global event counter, so autotuning
  of other Triton kernels is not observable here; Inductor's own Triton kernels are covered by
  the Inductor counters above.
- CUDA graph captures: the engine's `counters()["shape_misses"]`, the shapes the fast engines
  (`FastEngine`, `SlotEngine`) compiled and captured outside `prepare()`; an engine without that
  key captures nothing we can see.

Only modules already imported are read: watching never imports torch's compiler or Triton.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

# The engine counter a CUDA-graph-capturing engine increments once per shape it had to compile
# and capture outside its set-up (`prepare`).
GRAPH_CAPTURES = "shape_misses"

# (counter group, key) in torch._dynamo.utils.counters -> our event name.
_TORCH_COUNTERS: dict[tuple[str, str], str] = {
    ("frames", "total"): "frames_compiled",
    ("stats", "unique_graphs"): "graphs_compiled",
    ("inductor", "fxgraph_cache_miss"): "inductor_compiles",
    ("inductor", "fxgraph_cache_hit"): "inductor_cache_loads",
    ("inductor", "select_algorithm_autotune"): "inductor_autotunes",
    ("inductor", "coordesc_tuning_bench"): "inductor_autotune_benches",
    ("inductor", "combo_autotune_bench"): "inductor_autotune_benches",
}


def compile_counts(engine: Any | None = None) -> dict[str, float]:
    """Cumulative compile-event counts of this process (and of `engine`'s graph captures)."""
    counts: dict[str, float] = {}
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    if dynamo_utils is not None:
        counters = dynamo_utils.counters
        for (group, key), name in _TORCH_COUNTERS.items():
            # .get: reading must not create empty groups in torch's defaultdict
            counts[name] = counts.get(name, 0.0) + float(counters.get(group, {}).get(key, 0))
    woq_triton = sys.modules.get("runners.glm.kernels.woq_triton")
    if woq_triton is not None:
        counts["triton_autotunes"] = float(sum(len(keys) for keys in woq_triton.best_configs().values()))
    engine_counters = getattr(engine, "counters", None)
    if callable(engine_counters):
        captures = engine_counters().get(GRAPH_CAPTURES)
        if captures is not None:
            counts[GRAPH_CAPTURES] = float(captures)
    return counts


@dataclass
class CompileWatch:
    """`with CompileWatch(engine) as watch: <window>`; then `watch.events` holds what happened."""

    engine: Any | None = None
    events: dict[str, float] = field(default_factory=dict)  # event -> count inside the window
    _before: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CompileWatch:
        self._before = compile_counts(self.engine)
        return self

    def __exit__(self, *exc: object) -> None:
        after = compile_counts(self.engine)
        self.events = {name: after[name] - self._before.get(name, 0.0) for name in after
                       if after[name] - self._before.get(name, 0.0) > 0}

    @property
    def compiled(self) -> bool:
        """Anything compiled, captured or autotuned inside the window."""
        return bool(self.events)


Outcome = TypeVar("Outcome")


def measure_clean(measure: Callable[[], Outcome], info_of: Callable[[Outcome], dict[str, Any]]) -> Outcome:
    """Run `measure` (one measured window); if it compiled, measure once more.

    The compile that spoiled the first window is done by then, so the second one normally
    measures the configuration. If the second window compiles too, its info carries
    `contaminated` (the events of both windows): the number is kept, and says it is not clean.
    `info_of(outcome)` is the outcome's info dict, where `serve` records `compile_events`.
    """
    first = measure()
    first_events = info_of(first).get("compile_events") or {}
    if not first_events:
        return first
    second = measure()
    info = info_of(second)
    info["remeasured"] = {"reason": "the first window compiled", "first_window_events": first_events}
    if info.get("compile_events"):
        info["contaminated"] = {"first_window": first_events, "second_window": info["compile_events"]}
    return second
