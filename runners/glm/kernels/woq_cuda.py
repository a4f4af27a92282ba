"""Batch-1 GEMVs for the packed int8 / int4 weights in CUDA C (`woq_gemv.cu`), compiled at run time.

NVRTC (through `torch.cuda._compile_kernel`, shipped with torch's CUDA wheels) compiles the
source once per variant and device, so no CUDA toolkit or build step is needed. Each variant
fixes rows per warp, warps per block, 16-byte loads in flight per lane and how many warps split
K; the fastest one per weight shape is chosen by timing
them all (inside a CUDA graph, weights from HBM as in decode) the first time a shape is seen
outside a CUDA-graph capture.
`woq.warm_up` makes that first time the model's set-up.

Inside a CUDA-graph capture (the decode step) on sm_90+, the kernels are launched with
programmatic dependent launch (`cuda_launch`): a GEMV's blocks start while the previous kernel
drains and request their first weights before waiting for its activations, which hides part of
the fixed cost per call that dominates the small (17-19 MB) projections.

Only one activation row: several rows go to the Triton matmul (`woq_triton`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from runners.glm.kernels import cuda_launch
from runners.glm.kernels.kernel_cache import compile_kernel
from runners.measure.cuda_timer import cuda_seconds

_SOURCE = Path(__file__).with_name("woq_gemv.cu")


class Variant(NamedTuple):
    rows: int  # output rows per warp
    warps: int  # warps per block
    unroll: int  # 16-byte chunks per lane and row in flight
    ksplit: int = 1  # warps of a block sharing rows, each taking every ksplit-th 512-byte run of K

    @property
    def rows_per_block(self) -> int:
        return self.rows * self.warps // self.ksplit


V = Variant
# Few long rows (down_proj: K = 13696) want K split over warps; many short rows (gate_up,
# lm_head) more rows per warp; timing decides per shape.
INT8_VARIANTS = (V(2, 4, 4), V(4, 4, 2), V(1, 4, 8), V(1, 8, 8), V(4, 2, 2), V(2, 8, 4, 2), V(1, 8, 8, 2),
                 V(1, 8, 8, 4), V(2, 8, 4, 4), V(4, 8, 2, 4))
INT4_VARIANTS = (V(4, 4, 2), V(2, 4, 4), V(8, 4, 2), V(2, 8, 4), V(4, 2, 4), V(8, 2, 2), V(4, 8, 2, 2),
                 V(4, 8, 2, 4), V(2, 8, 4, 4), V(8, 8, 1, 4))

_chosen: dict[tuple, Variant] = {}
_timings: dict[tuple, dict[Variant, float]] = {}


def can_run(x: torch.Tensor, k: int, group: int | None = None) -> bool:
    """The kernels read 16-byte chunks: K (and half an int4 group) in whole chunks, x aligned."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.data_ptr() % 16 == 0):
        return False
    return k % 16 == 0 if group is None else (k % 32 == 0 and group % 32 == 0)


def compile_error(bits: int) -> str | None:
    """Why the `bits`-bit kernel cannot be compiled here (None when it can): no NVRTC, no GPU.
    The compiled variant is cached, so the model's first call does not compile it again."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    name, variants = ("int8_gemv", INT8_VARIANTS) if bits == 8 else ("int4_gemv", INT4_VARIANTS)
    try:
        _kernel(name, variants[0], False, False, False, torch.cuda.current_device())
    except Exception as exc:  # noqa: BLE001 - NVRTC/driver errors come as several types
        return f"NVRTC could not compile the GEMV kernels: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    return None


@functools.cache
def _kernel(name: str, variant: Variant, fp16: bool, norm: bool, gated: bool, device: int) -> Callable[..., None]:
    defines = "".join(f"#define {field.upper()} {value}\n" for field, value in variant._asdict().items())
    defines += f"#define X_FP16 {int(fp16)}\n#define NORM {int(norm)}\n#define GATED {int(gated)}\n"
    with torch.cuda.device(device):  # the module is loaded into this device's context
        return compile_kernel(defines + _SOURCE.read_text(), name, nvcc_options=["-std=c++17"])  # cached on disk


class Fusion(NamedTuple):
    """What the GEMV fuses: an rmsnorm of its input (`norm` weight [K], `eps`), and a residual
    [N] added to its output or (`gated`: rows stored as interleaved gate/up pairs) SwiGLU of its
    output, silu(gate) * up per pair, N / 2 values."""
    norm: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None
    gated: bool = False

    def args(self, x: torch.Tensor) -> list[torch.Tensor | float | int]:
        # Unused pointers still need a valid tensor; the kernel reads them only when told to.
        return [x if self.norm is None else self.norm, float(self.eps),
                x if self.residual is None else self.residual, int(self.residual is not None)]


NO_FUSION = Fusion()


Weights = tuple[torch.Tensor, ...]


def graph_seconds(issue: Callable[[], None], replays: int = 3) -> float:
    """Seconds per replay of the kernels `issue` launches, captured once in a CUDA graph (so no
    host launch cost is timed; warm up and compile before calling)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        issue()
    graph.replay()
    return cuda_seconds(graph.replay, replays)


def _time_variants(launch: Callable[[Variant, Weights], None], variants: tuple[Variant, ...],
                   weights: Weights, device: torch.device) -> dict[Variant, float]:
    """Mean time per call (ms) of each variant, as decode sees it: calls back to back inside a
    CUDA graph, cycling over copies of the weight that together exceed twice the L2 cache, so
    the bytes come from HBM."""
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    extra = min(7, max(0, -(-2 * l2_bytes // nbytes) - 1))
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(extra)]
    calls = max(8, 2 * len(copies))
    times = {}
    for variant in variants:
        for copy in copies:  # compile, load and warm before the capture
            launch(variant, copy)

        def issue(variant: Variant = variant) -> None:
            for i in range(calls):
                launch(variant, copies[i % len(copies)])

        times[variant] = graph_seconds(issue) * 1e3 / calls
    return times


def _variant_for(key: tuple, variants: tuple[Variant, ...], launch: Callable[[Variant, Weights], None],
                 weights: Weights, device: torch.device) -> Variant:
    if key in _chosen:
        return _chosen[key]
    if torch.cuda.is_current_stream_capturing():
        return variants[0]  # no timing inside a capture; woq.warm_up tunes before it
    with torch.cuda.device(device):
        times = _timings[key] = _time_variants(launch, variants, weights, device)
    _chosen[key] = min(times, key=times.__getitem__)
    return _chosen[key]


def _gemv(name: str, variants: tuple[Variant, ...], x: torch.Tensor, weights: Weights, sizes: list[int],
          fusion: Fusion, variant: Variant | None) -> torch.Tensor:
    """Launch kernel `name` (args: x, weights, out, sizes, fusion) with the tuned or given variant."""
    n = weights[0].shape[0]
    out = torch.empty((1, n // 2 if fusion.gated else n), dtype=x.dtype, device=x.device)
    fp16, device = x.dtype == torch.float16, x.device.index
    extra = fusion.args(x)
    if fusion.gated:  # a gate/up pair is one warp's: an even number of rows per warp
        variants = tuple(v for v in variants if v.rows % 2 == 0)

    def launch(variant: Variant, weights: Weights) -> None:
        kernel = _kernel(name, variant, fp16, fusion.norm is not None, fusion.gated, device)
        grid, block = (-(-n // variant.rows_per_block), 1, 1), (32 * variant.warps, 1, 1)
        args = [x, *weights, out, *sizes, *extra]
        with torch.cuda.device(device):  # the current stream is that of the tensors' device
            cuda_launch.launch(kernel, grid, block, args, device)

    key = (name, *sizes, fusion.gated, fp16, device)
    launch(variant or _variant_for(key, variants, launch, weights, x.device), weights)
    return out


def int8_gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, fusion: Fusion = NO_FUSION,
              variant: Variant | None = None) -> torch.Tensor:
    """x [1, K] @ (qdata [N, K] * scale[:, None])^T -> [1, N] (N / 2 when `fusion.gated`), in x's
    dtype, with `fusion`; `variant` forces one instead of the tuned choice (tests)."""
    return _gemv("int8_gemv", INT8_VARIANTS, x, (qdata, scale), list(qdata.shape), fusion, variant)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              fusion: Fusion = NO_FUSION, variant: Variant | None = None) -> torch.Tensor:
    """x [1, K] @ dequant(packed [N, K/2], scale/zero [N, K/G])^T -> [1, N] (N / 2 when
    `fusion.gated`), in x's dtype, with `fusion`; `variant` as in `int8_gemv`."""
    n, k = packed.shape[0], packed.shape[1] * 2
    return _gemv("int4_gemv", INT4_VARIANTS, x, (packed, scale, zero), [n, k, k // scale.shape[1]], fusion, variant)


def chosen_variants() -> dict[str, str]:
    """The variant timing chose per kernel and shape, with the fastest and slowest time (for
    benchmark notes)."""
    report = {}
    for key, variant in _chosen.items():
        times = _timings[key]
        report["/".join(map(str, key[:-2]))] = (f"{tuple(variant)} {times[variant] * 1e3:.1f} us "
                                                f"(slowest {max(times.values()) * 1e3:.1f} us)")
    return report
