"""The engine family's base: what each engine runs (plain data), the one selection function that
picks an engine for a trial's knobs or says why none runs them, the protocol a trial drives, and
the static-batch `run_batch` the batch engines share.

Members: `hf` (transformers' loop, `engines/hf.py`, and its per-iteration batching,
`engines/continuous.py`) and `fast` (`engines/fast.py`, static KV and CUDA-graph decode; for
`scheduler: continuous` or a non-static KV policy its slot pool, `engines/slots.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from runners.contract import InfeasibleConfig
from runners.glm.work import WorkCounter
from runners.knobs import FAST_ENGINE_TOGETHER, INFER_KNOBS, refused_together
from runners.measure.monitor import StepTimer
from runners.scheduler import Clock, Engine
from runners.workload import Request

PromptFn = Callable[[Request], list[int]]
PrefixLenFn = Callable[[Request], int]


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters): how an engine records why a
    compile or a capture failed."""
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class Capabilities:
    """What one engine runs. The selection below reads it; each engine class carries its own."""

    name: str
    schedulers: tuple[str, ...]
    kv_policies: tuple[str, ...]
    kv_bits: tuple[int, ...]  # of kv_cache=quantized
    continuous_kv_policies: tuple[str, ...]  # the KV policies scheduler=continuous runs on
    decode_attention: tuple[str, ...]
    prefix_cache: bool  # prefix_cache != off
    compiles: bool  # compile=true: Inductor + CUDA-graph decode step
    chunked_prefill: bool  # prefill_chunk_tokens > 0
    slot_pool: bool  # kv_slots, kv_memory_mib, decode_length_step
    teacher_forced_scoring: bool  # quality scored through the engine's own KV path


CAPABILITIES: dict[str, Capabilities] = {
    "fast": Capabilities("fast", schedulers=("dynamic", "continuous"),
                         kv_policies=("static", "quantized", "offloaded"), kv_bits=(8,),
                         continuous_kv_policies=("static", "quantized", "offloaded"),
                         decode_attention=("torch", "cuda"), prefix_cache=True, compiles=True,
                         chunked_prefill=True, slot_pool=True, teacher_forced_scoring=True),
    "hf": Capabilities("hf", schedulers=("dynamic", "continuous"),
                       kv_policies=("dynamic", "static", "offloaded", "quantized"), kv_bits=(2, 4),
                       continuous_kv_policies=("dynamic",), decode_attention=("torch",), prefix_cache=False,
                       compiles=False, chunked_prefill=False, slot_pool=False, teacher_forced_scoring=True),
}


_WARMUP_STREAMS: dict[str, Any] = {}


def warmup_stream(device: Any) -> Any:
    """The one side stream per device that every engine warms its steps up on before capture.

    One, not a new stream per capture: cuBLAS keeps a workspace (32 MiB on Hopper) for each
    stream it has run on, for the life of the process, so a stream per captured shape grew a
    warm process by ~400 MiB after one continuous trial's 256-row pool (H200, 2026-12-01), and
    the next trials' peak memory read it.
    """
    key = str(torch.device(device))
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[key]


def select_engine(knobs: dict[str, Any], device: str) -> str:
    """The one place that decides which engine runs a trial: `fast` or `hf` (the `engine` knob),
    or raises InfeasibleConfig naming why the pairing cannot run.

    fast: `FastGlm` with static KV buffers and CUDA-graph decode (H200, glm-4-9b, batch 1: 5.0
    ms/step compiled, 8.4 ms without compile, vs 51 ms in transformers' eager loop;
    BENCHMARKS.md). scheduler=dynamic runs `FastEngine.run_batch` (static KV) or the slot pool's
    `run_batch` (quantized KV); scheduler=continuous runs the slot pool
    (`runners.glm.engines.slots.SlotEngine`), with every fast KV policy.
    hf: transformers' own loop (`HFEngine` / `runners.glm.engines.continuous`) with its Cache objects.
    auto: fast wherever the other knobs allow, else hf.
    """
    want = knobs.get("engine", "auto")
    fast_reason = refusal("fast", knobs, device)
    if want == "fast":
        if fast_reason:
            raise InfeasibleConfig(f"engine=fast: {fast_reason}")
        return "fast"
    hf_reason = refusal("hf", knobs, device)
    if want == "hf":
        if hf_reason:
            raise InfeasibleConfig(f"engine=hf: {hf_reason}")
        return "hf"
    if want != "auto":
        raise InfeasibleConfig(f"unknown engine {want!r}")
    if not fast_reason:
        return "fast"
    if not hf_reason:
        return "hf"
    raise InfeasibleConfig(f"neither engine runs these knobs: fast engine: {fast_reason}; hf engine: {hf_reason}")


def refusal(engine: str, knobs: dict[str, Any], device: str) -> str:
    """Why `engine` cannot run these knobs on `device` ('' when it can)."""
    scheduler, caps = knobs.get("scheduler", "dynamic"), CAPABILITIES[engine]
    if scheduler not in caps.schedulers:
        return f"scheduler={scheduler} is not one of the {engine} engine's ({', '.join(caps.schedulers)})"
    return _fast_refusal(knobs, device) if engine == "fast" else _hf_refusal(knobs, device)


def _fast_refusal(knobs: dict[str, Any], device: str) -> str:
    caps = CAPABILITIES["fast"]
    kv = knobs["kv_cache"]
    if kv not in caps.kv_policies:
        return f"kv_cache={kv} is transformers' growing DynamicCache, which only engine=hf runs"
    if kv == "quantized" and int(knobs["kv_bits"]) not in caps.kv_bits:
        return (f"kv_cache=quantized on the fast engine stores int8 codes with per-(token, head) scales: "
                f"kv_bits=8 only, not {knobs['kv_bits']} (engine=hf has quanto's 2/4-bit cache)")
    if int(knobs.get("prefill_chunk_tokens", 0)) < 0 or int(knobs.get("kv_slots", 0)) < 0 \
            or int(knobs.get("prefill_group_tokens", 0)) < 0:
        return "prefill_chunk_tokens, prefill_group_tokens and kv_slots must be >= 0"
    if float(knobs.get("kv_memory_mib", 0)) < 0:
        return "kv_memory_mib must be >= 0"
    # The combinations refused on any device are declared once, where the tuner reads them too.
    together = refused_together(FAST_ENGINE_TOGETHER, INFER_KNOBS, knobs)
    if together:
        return together
    if kv == "offloaded" and not device.startswith("cuda"):
        return "kv_cache=offloaded parks preempted sequences in pinned host memory: needs a CUDA device"
    if knobs["compile"] and not device.startswith("cuda"):
        return ("compile=true captures the decode step in CUDA graphs; this device has none "
                "(on CPU the static-cache engine runs eager with compile=false)")
    if knobs["decode_attention"] == "cuda":
        return decode_attention_refusal(device)
    return ""


def _groups_asked(knobs: dict[str, Any]) -> bool:
    """A `prefill_group_tokens` other than its default: only the slot pool reads it."""
    default = INFER_KNOBS["prefill_group_tokens"].default
    return int(knobs.get("prefill_group_tokens", default)) != default


def _hf_refusal(knobs: dict[str, Any], device: str) -> str:
    caps = CAPABILITIES["hf"]
    kv = knobs["kv_cache"]
    if knobs["decode_attention"] not in caps.decode_attention:
        return (f"decode_attention={knobs['decode_attention']} is a kernel of the static-KV fast engine; "
                f"transformers' loop runs its own attention (use engine=fast, kv_cache=static)")
    if knobs["compile"] and not caps.compiles:
        return (f"compile=true compiles the static-KV decode step into CUDA graphs; kv_cache={kv} in "
                f"transformers' loop runs eagerly (use kv_cache=static)")
    if knobs["prefix_cache"] != "off" and not caps.prefix_cache:
        return f"prefix_cache reuses KV in the static-KV fast engine; kv_cache={kv} has none (use kv_cache=static)"
    if int(knobs.get("prefill_chunk_tokens", 0)) and not caps.chunked_prefill:
        return "prefill_chunk_tokens is the fast engine's chunked prefill (use engine=fast, scheduler=continuous)"
    if _groups_asked(knobs) and not caps.slot_pool:
        return "prefill_group_tokens sizes the fast engine's slot-pool prefill passes (use engine=fast)"
    pool_knobs = (int(knobs.get("kv_slots", 0)) or int(knobs.get("decode_length_step", 0))
                  or float(knobs.get("kv_memory_mib", 0)))
    if pool_knobs and not caps.slot_pool:
        return "kv_slots, kv_memory_mib and decode_length_step shape the fast engine's KV slot pool (use engine=fast)"
    if kv == "offloaded" and not device.startswith("cuda"):
        return "kv_cache=offloaded moves GPU KV to CPU memory: needs a CUDA device"
    if kv == "quantized" and int(knobs["kv_bits"]) not in caps.kv_bits:
        return f"kv_cache=quantized in transformers' loop is quanto's 2/4-bit cache, not kv_bits={knobs['kv_bits']}"
    if knobs.get("scheduler", "dynamic") == "continuous" and kv not in caps.continuous_kv_policies:
        return continuous_kv_refusal(kv)
    return ""


def continuous_kv_refusal(kv_cache: str) -> str:
    """Why transformers' loop cannot batch per iteration on `kv_cache` ('' when it can)."""
    if kv_cache in CAPABILITIES["hf"].continuous_kv_policies:
        return ""
    return f"scheduler=continuous in transformers' loop runs on kv_cache=dynamic only, not {kv_cache}"


def decode_attention_refusal(device: str) -> str:
    """Why the `decode_attention=cuda` kernel cannot run on `device` ('' when it can)."""
    if not device.startswith("cuda"):
        return "decode_attention=cuda is a CUDA kernel; not on CPU (use decode_attention=torch)"
    from runners.glm.kernels import decode_attention  # compiles the kernel (NVRTC) on first use

    with torch.cuda.device(torch.device(device)):
        reason = decode_attention.compile_error()
    return f"decode_attention=cuda: {reason}" if reason else ""


@dataclass(frozen=True)
class TrialPlan:
    """The shapes a trial can reach, from its knobs and workload spec: what `prepare_trial`
    compiles and captures before any measured window."""

    batch_size: int
    requests: int  # warm-up + the most a window serves
    max_prompt: int
    max_output: int
    eval_rows: int
    eval_tokens: int
    kv_slots: int = 0
    kv_memory_mib: float = 0.0
    prefix_lens: tuple[int, ...] = ()  # cached prefix lengths prefill can start after


class TrialEngine(Engine, Protocol):
    """What the glm-infer runner drives: the scheduler's `Engine`, plus set-up and scoring."""

    capabilities: Capabilities
    # Quality is scored before the compile phase (a broken bound skips graphs and window).
    quality_first: bool

    def begin_trial(self, prompt_fn: PromptFn, prefix_len_fn: PrefixLenFn | None, prefix_policy: str,
                    prefix_budget_mib: float) -> None: ...

    def prepare_trial(self, plan: TrialPlan) -> None:
        """Compile/capture every shape the plan can reach (nothing for an eager engine)."""
        ...

    def compile_seconds(self) -> float:
        """Cumulative compile + capture seconds of this engine (0 for an eager one)."""
        ...

    def compile_info(self, since_s: float) -> dict[str, Any]:
        """The trial's compile facts (`compile_s` since `since_s`, buckets); {} when eager."""
        ...

    def pool_info(self) -> dict[str, Any] | None:
        """The KV slot pool's size, where the engine has one."""
        ...

    def teacher_forced_log_probs(self, ids: torch.Tensor, prefill_tokens: int) -> torch.Tensor:
        """Log-probs [N, T, V] (float32) through this engine's KV path: the first `prefill_tokens`
        prefilled, the rest fed one token at a time."""
        ...


class StaticBatchEngine:
    """`Engine.run_batch` of the engines that decode a whole batch at once (`HFEngine`,
    `FastEngine`): each subclass yields the batch's steps from `batch_steps`."""

    device: str
    prompt_fn: PromptFn
    work: WorkCounter

    def run_batch(self, requests: Sequence[Request], clock: Clock) -> list[float]:
        prompts = [self.prompt_fn(r) for r in requests]
        new_tokens = max(r.output_tokens for r in requests)
        # Per-step events and one sync per batch: a sync per step would stall kernel launches.
        timer = StepTimer(self.device, clock).start()
        for _ in self.batch_steps(requests, prompts, new_tokens):
            timer.mark()
        times = timer.times()
        self.work.add_batch(len(prompts), max(len(p) for p in prompts), new_tokens)
        return times

    def batch_steps(self, requests: Sequence[Request], prompts: list[list[int]],
                    new_tokens: int) -> Iterator[torch.Tensor]:
        """Greedy generation of the batch; yields each step's tokens [B, 1], prefill's first."""
        raise NotImplementedError
