"""The knobs each runner understands, with their defaults; free of torch.

Each knob is declared once here; runners/registry.py names the table each runner takes. The
tuner validates space files against it, so a typo in a knob name is a usage error (exit 2)
before any study exists. A runner resolves a trial's knobs with `registry.resolve_knobs`.
`rebuilds=True` marks a knob whose value changes the built model: the model cache keys by
those (runners/glm/model_cache.py), so a new one cannot silently reuse a stale model.
`applies_when` says when a knob matters at all: outside those conditions the runner ignores its
value (cited per knob below), so two configs that differ only there measure the same stack; the
tuner answers such a repeat from the earlier trial (tuner/repeats.py) and the model cache shares
its build.
`quality=True` (implied by `rebuilds=True`) marks a knob that changes what the quality pass
measures (KL, top-1, perplexity against the reference): the runner scores quality once per built
model and KV policy, so configs with the same `quality_knobs` measure the same quality, and the
sampler need not try a second config of a stack whose quality broke a bound (tuner/gp_search.py).
`Together` rules name values a runner refuses together on any device (kv_cache=offloaded with
scheduler=dynamic on the fast engine): the engine refuses with them, and the tuner knows them
before the first trial (tuner/device_fit.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_OPS = ("==", "!=", ">", "<")


@dataclass(frozen=True)
class When:
    """A condition on another knob's value, `knob op value` (op: == != > <), as plain data."""

    knob: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"When.op must be one of {_OPS}, got {self.op!r}")

    def holds(self, values: Mapping[str, Any]) -> bool:
        got = values.get(self.knob)
        if self.op == "==":
            return bool(got == self.value)
        if self.op == "!=":
            return bool(got != self.value)
        if got is None:
            return False
        return float(got) > self.value if self.op == ">" else float(got) < self.value


@dataclass(frozen=True)
class Knob:
    name: str
    default: Any
    kind: type | tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    help: str = ""
    rebuilds: bool = False  # changes the built model (weights, kernels, compiled graphs)
    bounds: tuple[float, float] | None = None  # allowed numbers [low, high], `high_open`: [low, high)
    high_open: bool = False
    # Conditions (all must hold) on the other knobs under which this one has any effect; empty: always.
    applies_when: tuple[When, ...] = ()
    quality: bool = False  # changes the measured quality without a rebuild (the KV policy); rebuilds imply it

    def check(self, value: Any) -> str | None:
        """Return why `value` is not acceptable, or None."""
        if self.choices is not None:
            if value not in self.choices:
                return f"must be one of {list(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) and bool not in _as_tuple(self.kind):
            return f"must be {_kind_name(self.kind)}, got {value!r}"
        if not isinstance(value, self.kind):
            return f"must be {_kind_name(self.kind)}, got {value!r}"
        return self.bounds_problem(value)

    def bounds_problem(self, value: Any) -> str | None:
        """Why a number is outside `bounds`, or None (also for values that are not numbers)."""
        if self.bounds is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        low, high = self.bounds
        if value < low or value > high or (self.high_open and value == high):
            return f"{value!r} is outside [{low:g}, {high:g}{')' if self.high_open else ']'}"
        return None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


_NUMBER = (int, float)
# Floating-point types a model or its autocast may run in (runners/glm/model.py maps them to torch's).
DTYPES = ("float32", "float16", "bfloat16")

INFER_KNOBS: dict[str, Knob] = {
    k.name: k
    for k in [
        Knob("batch_size", 8, int, help="most requests in one batch", bounds=(1, 65_536)),
        Knob("batch_timeout_ms", 10.0, _NUMBER, help="longest wait of the oldest queued request",
             bounds=(0, 600_000)),
        Knob("scheduler", "dynamic", str, ("dynamic", "continuous")),
        Knob("quant_bits", 16, int, (16, 8, 4), rebuilds=True),
        Knob(
            "quant_scheme",
            "weight_only",
            str,
            ("weight_only", "dynamic_activation", "fp8"),
            help="8-bit: int8 weight-only or int8 dynamic activation; fp8 dyn act + weight",
            rebuilds=True,
            # compress.quant_config returns None at 16 bits before reading it; engines/build.py and
            # compress._fp8_follows read it only with quant_bits == 8.
            applies_when=(When("quant_bits", "!=", 16),),
        ),
        # Read by Int4WeightOnlyConfig and woq.quantize_int4 only (compress.quant_config, woq.PackedLinear).
        Knob("quant_group_size", 128, int, (32, 64, 128, 256), help="int4 group size", rebuilds=True,
             applies_when=(When("quant_bits", "==", 4),)),
        # compress.apply_quantization reads it only once a quantisation config (quant_bits != 16) exists.
        Knob("quantize_lm_head", False, bool, help="also quantise the output projection", rebuilds=True,
             applies_when=(When("quant_bits", "!=", 16),)),
        Knob("quant_kernel", "torchao", str, ("torchao", "triton", "cuda"),
             help="int8/int4 weight-only kernels: torchao's; our Triton GEMV/matmul; or `cuda`, our "
                  "hand-written CUDA GEMV for one row (NVRTC-compiled) and the Triton matmul for more (GPU)",
             # compress.apply_quantization packs only with quant_bits != 16; engines/build.py's
             # inductor_options reads it only with quant_bits == 8.
             rebuilds=True, applies_when=(When("quant_bits", "!=", 16),)),
        Knob("decode_attention", "torch", str, ("torch", "cuda"),
             help="static-KV decode steps of one sequence (batch bucket 1; larger buckets keep the torch ops): "
                  "torch ops (bias, rope, cache write, QK, softmax, PV), or `cuda`, one hand-written "
                  "NVRTC-compiled kernel for all of them (GPU)", rebuilds=True),
        Knob("sparsity", 0.0, _NUMBER, help="fraction of linear weights set to zero", rebuilds=True,
             bounds=(0, 1), high_open=True),
        # compress.apply_sparsity / prune_weights / refuse_sparsity_knobs / _fp8_config return or
        # skip before reading these two at sparsity 0.
        Knob("sparsity_kind", "unstructured", str, ("unstructured", "2:4"), rebuilds=True,
             applies_when=(When("sparsity", ">", 0),)),
        Knob("sparsity_method", "magnitude", str, ("magnitude", "wanda"),
             help="which weights sparsity removes: smallest |W| per layer (magnitude), or smallest "
                  "|W| * ||x|| per output row with input norms from calibration text (wanda)", rebuilds=True,
             applies_when=(When("sparsity", ">", 0),)),
        Knob("engine", "auto", str, ("auto", "fast", "hf"),
             help="fast: our static-KV engine (CUDA-graph decode; slot pool for scheduler=continuous); hf: "
                  "transformers' own loop (the untuned baseline); auto: fast wherever the other knobs allow",
             rebuilds=True),
        # The quality pass runs with the trial's KV policy (infer.py keys its scores by quality_knobs).
        Knob("kv_cache", "dynamic", str, ("dynamic", "static", "offloaded", "quantized"),
             help="fast engine: static (model-dtype slots), quantized (int8 + per-token scales, kv_bits=8), "
                  "offloaded (preempted sequences park in pinned host memory; continuous, CUDA); "
                  "dynamic: transformers' DynamicCache (engine hf)", quality=True),
        # Read only with kv_cache == quantized: engines/base.py refusals, hf.make_cache,
        # slot_steps.SlotSteps, fast.slot_engine's key, infer's quality key.
        Knob("kv_bits", 4, int, (2, 4, 8), help="quantized KV: 8 on the fast engine, 2/4 (quanto) on hf",
             applies_when=(When("kv_cache", "==", "quantized"),), quality=True),
        Knob("kv_slots", 0, int, help="fast engine, continuous: sequences whose KV fits the GPU pool; "
                                      "0 = batch_size. With kv_cache=offloaded, admitted sequences beyond it "
                                      "wait preempted in host memory"),
        Knob("kv_memory_mib", 0, _NUMBER,
             help="fast engine, continuous: device memory for the KV slot pool; its rows = this budget / one "
                  "sequence's KV (int8 KV fits about twice the rows), at most kv_slots or batch_size; 0 = no budget",
             bounds=(0, 1e9)),
        Knob("decode_length_step", 0, int, (0, 2, 4),
             help="fast engine, continuous: 0 = each row attends at its own length (one decode graph per "
                  "batch bucket; a Triton kernel on GPU); 2 or 4 = masked attention over length buckets L, L/2.. "
                  "or L/4.. (>= 256), one graph per bucket"),
        Knob("prefill_chunk_tokens", 0, int, help="fast engine, continuous: prefill prompts in chunks of this "
                                                  "many tokens, interleaved with decode steps; 0 = whole prompt"),
        Knob("prefill_group_tokens", 2048, int,
             help="fast engine, slot pool: queued prompts of at most 256 tokens prefill together, one row each, "
                  "in passes of at most this many padded tokens (and at most prefill_chunk_tokens when chunked); "
                  "0 = one prompt per pass",
             bounds=(0, 1 << 20)),
        Knob("prefix_cache", "off", str, ("off", "lru", "lfu")),
        # prefix_cache.engine_prefix_cache returns None for policy off before reading the budget.
        Knob("prefix_cache_mib", 256, _NUMBER, bounds=(0, 1e9), applies_when=(When("prefix_cache", "!=", "off"),)),
        Knob("dtype", None, (str, type(None)), (None, *DTYPES), rebuilds=True),
        Knob("compile", False, bool, rebuilds=True),
        Knob("attn_implementation", "sdpa", str, ("sdpa", "eager", "flash_attention_2"), rebuilds=True),
        Knob("memory_limit_mib", 0, _NUMBER, help="cap the runner's memory; 0 = no cap", bounds=(0, 1e9)),
    ]
}

@dataclass(frozen=True)
class Together:
    """Values a runner refuses together on any device: `reason` when every condition holds."""

    when: tuple[When, ...]
    reason: str

    def holds(self, values: Mapping[str, Any]) -> bool:
        return all(w.holds(values) for w in self.when)


_CONTINUOUS_ONLY = When("scheduler", "!=", "continuous")
# What the fast engine refuses together, whatever the device (runners/glm/engines/base.py reads
# these in its refusal, after the single-value and device checks); the runner-level rules below
# add the engine=fast condition. Knob values are resolved (defaults filled in) before a check.
FAST_ENGINE_TOGETHER: tuple[Together, ...] = (
    Together((When("kv_cache", "==", "offloaded"), _CONTINUOUS_ONLY),
             "kv_cache=offloaded preempts sequences of the continuous scheduler to host memory; "
             "scheduler=dynamic runs each batch to completion in the GPU pool (use scheduler=continuous)"),
    Together((When("kv_slots", ">", 0), _CONTINUOUS_ONLY),
             "kv_slots sizes the slot pool of scheduler=continuous; scheduler=dynamic holds each whole batch"),
    Together((When("kv_memory_mib", ">", 0), _CONTINUOUS_ONLY),
             "kv_memory_mib sizes the slot pool of scheduler=continuous; scheduler=dynamic holds each whole batch"),
    Together((When("decode_length_step", ">", 0), _CONTINUOUS_ONLY, When("kv_cache", "==", "static")),
             "decode_length_step shapes the slot pool's decode graphs; scheduler=dynamic with kv_cache=static "
             "runs static batches (FastEngine)"),
    Together((When("prefill_chunk_tokens", ">", 0), _CONTINUOUS_ONLY),
             "prefill_chunk_tokens interleaves prefill chunks with decode steps of scheduler=continuous; "
             "scheduler=dynamic prefills each batch whole"),
    # Off its default only: only the slot pool reads it, so elsewhere it would measure a twin of
    # the default config (refused instead, as kv_slots is).
    Together((When("prefill_group_tokens", "!=", INFER_KNOBS["prefill_group_tokens"].default), _CONTINUOUS_ONLY,
              When("kv_cache", "==", "static")),
             "prefill_group_tokens sizes the slot pool's prefill passes (scheduler=continuous, or a non-static "
             "kv_cache); scheduler=dynamic with kv_cache=static prefills each static batch in one pass"),
    Together((When("decode_attention", "==", "cuda"), When("kv_cache", "==", "quantized")),
             "decode_attention=cuda reads model-dtype K/V; kv_cache=quantized stores int8 codes"),
)
# glm-infer refuses these before any build: with engine=auto a config the fast engine refuses may
# still run on engine=hf, so only engine=fast is known up front.
INFER_TOGETHER: tuple[Together, ...] = tuple(
    Together((When("engine", "==", "fast"), *rule.when), f"engine=fast: {rule.reason}") for rule in FAST_ENGINE_TOGETHER)


def refused_together(rules: tuple[Together, ...], table: Mapping[str, Knob], values: Mapping[str, Any]) -> str:
    """The first rule's reason that refuses `values` (a knob left out reads as its default), or ''."""
    resolved = {**{k: v.default for k, v in table.items()}, **values}
    return next((rule.reason for rule in rules if rule.holds(resolved)), "")


def quality_knobs(table: Mapping[str, Knob], values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """What decides a config's measured quality: the effective values (a knob left out reads as its
    default) of the knobs that rebuild the model or change its quality (`Knob.quality`), sorted.
    None when `table` declares no such knob (nothing can be said about quality)."""
    names = [n for n, k in table.items() if k.rebuilds or k.quality]
    if not names:
        return None
    resolved = {**{k: v.default for k, v in table.items()}, **values}
    inert = inert_knobs(table, resolved)
    return tuple(sorted((n, resolved[n]) for n in names if n not in inert))


def inert_knobs(table: Mapping[str, Knob], values: Mapping[str, Any]) -> dict[str, str]:
    """The knobs of `table` that have no effect given `values` (a trial's resolved knobs; a knob
    left out reads as its default), each with why, e.g. "quant_scheme has no effect at quant_bits=16"."""
    resolved = {**{k: v.default for k, v in table.items()}, **values}
    out = {}
    for name, knob in table.items():
        failed = [w for w in knob.applies_when if not w.holds(resolved)]
        if failed:
            at = ", ".join(f"{w.knob}={resolved.get(w.knob)}" for w in failed)
            out[name] = f"{name} has no effect at {at}"
    return out


def effective_knobs(table: Mapping[str, Knob], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` without the knobs that have no effect given the others: what the runner measures."""
    inert = inert_knobs(table, values)
    return {k: v for k, v in values.items() if k not in inert}


TRAIN_KNOBS: dict[str, Knob] = {
    k.name: k
    for k in [
        Knob("micro_batch_size", 1, int, bounds=(1, 65_536)),
        Knob("grad_accum_steps", 1, int, bounds=(1, 65_536)),
        Knob("seq_len", 128, int, bounds=(1, 1 << 20)),
        Knob(
            "grad_checkpointing",
            "off",
            str,
            ("off", "on", "every_2", "every_4", "offload"),
            help="recompute activations: every layer (on), every N-th layer, or keep them but "
            "offload the saved activations to host memory (CUDA only)",
        ),
        Knob("amp_dtype", "float32", str, DTYPES),
        Knob("fused_optimizer", False, bool),
        Knob("optimizer", "adamw", str, ("adamw", "adamw_8bit", "adamw_cpu_offload")),
        Knob("compile", False, bool),
        Knob("dtype", None, (str, type(None)), (None, *DTYPES)),
        Knob("memory_limit_mib", 0, _NUMBER, help="cap the runner's memory; 0 = no cap", bounds=(0, 1e9)),
    ]
}

# Which runner takes which table, and the lookups by runner name, are in runners/registry.py.
_MOVED = ("RUNNER_KNOBS", "runner_knobs", "resolve_knobs")


def __getattr__(name: str) -> Any:
    """`runners.knobs.RUNNER_KNOBS` and friends, read from the registry (which imports this module)."""
    if name in _MOVED:
        from runners import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
