"""Compression knobs on a built model: magnitude sparsity, then torchao quantisation.

Whatever the device cannot run raises `InfeasibleConfig` with the reason; nothing is faked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runners.contract import InfeasibleConfig
from runners.glm import woq


def linear_layers(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The decoder's Linear layers; the output projection only when asked."""
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_lm_head or m is not head)]


@torch.no_grad()
def prune_unstructured(weight: torch.Tensor, ratio: float) -> None:
    """Zero the `ratio` fraction of entries with the smallest magnitude, in place."""
    count = int(round(ratio * weight.numel()))
    if count == 0:
        return
    threshold = weight.abs().flatten().float().kthvalue(count).values
    weight.masked_fill_(weight.abs() <= threshold.to(weight.dtype), 0)


@torch.no_grad()
def prune_2_4(weight: torch.Tensor) -> None:
    """Keep the 2 largest-magnitude entries of every 4 along the input dimension, in place."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    groups.scatter_(-1, drop, 0)


def apply_sparsity(model: nn.Module, knobs: dict[str, Any], device: str) -> dict[str, float]:
    """Prune the decoder's Linear weights; 2:4 also converts them to the semi-structured layout
    (cuSPARSELt/CUTLASS), unless fp8 quantisation follows and packs them itself."""
    ratio = float(knobs.get("sparsity", 0.0))
    kind = knobs.get("sparsity_kind", "unstructured")
    if not 0.0 <= ratio < 1.0:
        raise InfeasibleConfig(f"sparsity must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return {"sparsity_measured": 0.0}
    layers = linear_layers(model, include_lm_head=False)
    if kind == "unstructured":
        for _, layer in layers:
            prune_unstructured(layer.weight, ratio)
        zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
        return {"sparsity_measured": zeros / sum(layer.weight.numel() for _, layer in layers)}
    _check_2_4(layers, ratio, device, knobs)
    for _, layer in layers:
        prune_2_4(layer.weight)
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
    measured = zeros / sum(layer.weight.numel() for _, layer in layers)
    if not _fp8_follows(knobs):
        _to_semi_structured(layers)
    return {"sparsity_measured": measured}


def _fp8_follows(knobs: dict[str, Any]) -> bool:
    return int(knobs.get("quant_bits", 16)) == 8 and knobs.get("quant_scheme") == "fp8"


def _check_2_4(layers: list[tuple[str, nn.Linear]], ratio: float, device: str, knobs: dict[str, Any]) -> None:
    if abs(ratio - 0.5) > 1e-9:
        raise InfeasibleConfig(f"sparsity_kind=2:4 prunes exactly 50% of weights; set sparsity 0.5, not {ratio}")
    if not device.startswith("cuda"):
        raise InfeasibleConfig("sparsity_kind=2:4 needs CUDA semi-structured kernels (cuSPARSELt/CUTLASS); not on CPU")
    if int(knobs.get("quant_bits", 16)) != 16 and not _fp8_follows(knobs):
        raise InfeasibleConfig("2:4 sparsity combines only with fp8 here (torchao's CUTLASS fp8 2:4 kernel, SM90); "
                               f"no kernel path for quant_bits={knobs.get('quant_bits')} "
                               f"{knobs.get('quant_scheme')} + 2:4")
    for name, layer in layers:
        if layer.in_features % 64 or layer.out_features % 64:
            raise InfeasibleConfig(f"2:4 kernels need dims that are multiples of 64; {name} is "
                                   f"{layer.out_features}x{layer.in_features}")


def _to_semi_structured(layers: list[tuple[str, nn.Linear]]) -> None:
    try:
        from torch.sparse import to_sparse_semi_structured
        for _, layer in layers:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    except (RuntimeError, NotImplementedError) as exc:
        raise InfeasibleConfig(f"2:4 semi-structured sparsity is not supported here: {exc}") from None


def quant_config(knobs: dict[str, Any], device: str) -> Any | None:
    """The torchao config for the quant knobs, or None for 16 bits (no quantisation).

    `set_inductor_config=False`: torchao would otherwise flip global Inductor flags as a side
    effect, so one trial's compile settings would leak into the next in a warm process; the
    fast engine sets the flags it wants itself.
    """
    bits = int(knobs.get("quant_bits", 16))
    scheme = knobs.get("quant_scheme", "weight_only")
    if bits == 16:
        return None
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as exc:
        raise InfeasibleConfig(f"quant_bits={bits} needs torchao ({exc})") from None
    if bits == 8 and scheme == "fp8":
        return _fp8_config(knobs, device, Float8DynamicActivationFloat8WeightConfig, PerRow)
    if bits == 8:
        if scheme == "dynamic_activation":
            return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme != "weight_only":
        raise InfeasibleConfig(f"quant_bits=4 exists only as weight_only here, not {scheme}")
    if not device.startswith("cuda"):
        # torchao's CPU int4 path needs the `mslk` kernel package, absent from our images.
        raise InfeasibleConfig("quant_bits=4 (int4 weight-only) needs CUDA tinygemm kernels; not on CPU")
    return Int4WeightOnlyConfig(group_size=int(knobs.get("quant_group_size", 128)),
                                int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def _fp8_config(knobs: dict[str, Any], device: str, config_cls: Any, per_row: Any) -> Any:
    import torch

    if not device.startswith("cuda"):
        raise InfeasibleConfig("quant_scheme=fp8 needs a CUDA GPU with fp8 tensor cores (SM 8.9+)")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise InfeasibleConfig("quant_scheme=fp8 needs fp8 tensor cores (SM 8.9+)")
    if knobs.get("sparsity_kind") == "2:4" and float(knobs.get("sparsity", 0.0)) > 0:
        from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat

        # Weights already pruned 2:4; torchao packs them for its CUTLASS fp8 sparse GEMM (SM90).
        return config_cls(granularity=per_row(), packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA,
                          set_inductor_config=False)
    return config_cls(granularity=per_row(), set_inductor_config=False)


def apply_quantization(model: nn.Module, knobs: dict[str, Any], device: str) -> None:
    # quant_kernel triton / cuda: our packed layout, named after the kernel that runs one row
    if knobs.get("quant_kernel", "torchao") in woq.GEMV_KERNELS and int(knobs.get("quant_bits", 16)) != 16:
        _apply_packed(model, knobs, device)
        return
    config = quant_config(knobs, device)
    if config is None:
        return
    from torchao.quantization import quantize_

    targets = {id(m) for _, m in linear_layers(model, bool(knobs.get("quantize_lm_head", False)))}
    try:
        quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in targets)
    except (RuntimeError, NotImplementedError, ImportError, AssertionError, ValueError) as exc:
        raise InfeasibleConfig(
            f"quant_bits={knobs.get('quant_bits')} ({knobs.get('quant_scheme')}) cannot run on {device}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _apply_packed(model: nn.Module, knobs: dict[str, Any], device: str) -> None:
    """int8/int4 weight-only in our packed layout (torchao computes the scales and integer
    values), run by our kernels: Triton's (`woq_triton`), with `quant_kernel: cuda` the CUDA
    GEMVs of `woq_cuda` for single rows; then autotuned for every shape."""
    kernel = knobs["quant_kernel"]
    bits, scheme = int(knobs["quant_bits"]), knobs.get("quant_scheme", "weight_only")
    if scheme != "weight_only":
        raise InfeasibleConfig(f"quant_kernel={kernel} has int8/int4 weight-only kernels only, not {scheme}")
    if not device.startswith("cuda"):
        raise InfeasibleConfig(f"quant_kernel={kernel} runs GPU kernels; not on CPU (use quant_kernel=torchao)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise InfeasibleConfig(f"quant_kernel={kernel} needs the `triton` package, absent here") from None
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise InfeasibleConfig(f"quant_kernel={kernel} kernels take bf16/fp16 activations, not {dtype}")
    if kernel == "cuda":
        from runners.glm import woq_cuda

        with torch.cuda.device(torch.device(device)):
            reason = woq_cuda.compile_error(bits)
        if reason:
            raise InfeasibleConfig(f"quant_kernel=cuda: {reason}")
    group = int(knobs.get("quant_group_size", 128))
    layers = linear_layers(model, bool(knobs.get("quantize_lm_head", False)))
    for name, layer in layers:
        if bits == 4 and layer.in_features % group:
            raise InfeasibleConfig(f"int4 group size {group} does not divide {name}'s {layer.in_features} inputs")
    woq.pack_linears(model, layers, bits, group, gemv=kernel)
    woq.warm_up(model, dtype)
