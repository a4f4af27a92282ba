"""Compression knobs on a built model: sparsity (magnitude or activation-aware Wanda), then
torchao quantisation.

Whatever the device cannot run raises `InfeasibleConfig` with the reason; nothing is faked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from runners.contract import InfeasibleConfig
from runners.glm import woq

# Wanda calibration (Sun et al. 2023 use 128 x 2048 tokens of C4; a few thousand tokens already
# rank input channels stably for the sizes here).
CALIBRATION_SEQUENCES = 16
CALIBRATION_TOKENS = 256
# () -> (calibration ids [sequences, tokens], where they come from)
Calibration = Callable[[], tuple[torch.Tensor, str]]


def linear_layers(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The decoder's Linear layers; the output projection only when asked."""
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_lm_head or m is not head)]


@torch.no_grad()
def prune_unstructured(weight: torch.Tensor, ratio: float, scores: torch.Tensor | None = None) -> None:
    """Zero a `ratio` fraction of `weight` in place.

    Magnitude (no `scores`): the entries of smallest |W| over the whole layer. Wanda (`scores`
    = |W| * ||x||, [out, in]): the entries of smallest score within each output row, as Wanda
    compares weights feeding the same output.
    """
    if scores is None:
        count = int(round(ratio * weight.numel()))
        if count == 0:
            return
        magnitudes = weight.abs().flatten().float()
        # The count-th smallest |W|. On CUDA kthvalue selects within one thread block per slice,
        # and a layer is one slice (glm-4-9b: ~45 s for the decoder); a device-wide sort is ~50 ms.
        threshold = (torch.sort(magnitudes).values[count - 1] if magnitudes.is_cuda
                     else magnitudes.kthvalue(count).values)
        weight.masked_fill_(weight.abs() <= threshold.to(weight.dtype), 0)
        return
    per_row = int(round(ratio * weight.shape[1]))
    if per_row == 0:
        return
    drop = scores.argsort(dim=1)[:, :per_row]  # [out, per_row]
    weight.scatter_(1, drop, 0)


@torch.no_grad()
def prune_2_4(weight: torch.Tensor, scores: torch.Tensor | None = None) -> None:
    """Keep the 2 entries of largest score (default |W|) of every 4 along the input dimension, in place."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // 4, 4)
    ranked = (weight.abs() if scores is None else scores).view(out_features, in_features // 4, 4)
    drop = ranked.argsort(dim=-1)[..., :2]
    groups.scatter_(-1, drop, 0)


class _Enough(Exception):
    """Ends a calibration forward once it reaches a layer whose inputs are not wanted yet."""


class _InputNorms(TorchFunctionMode):
    """Sums of squares of each input channel of the chosen Linear weights, over every `F.linear`
    call they appear in: works for transformers' modules and for FastGlm's functional layers
    alike. A call with one of the `stop` weights ends the forward (`_Enough`)."""

    def __init__(self, weights: dict[int, str], stop: set[int]) -> None:
        super().__init__()
        self.weights, self.stop = weights, stop
        self.sums: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.linear and len(args) > 1 and id(args[1]) in self.stop:
            raise _Enough
        if func is F.linear and len(args) > 1 and id(args[1]) in self.weights:
            name = self.weights[id(args[1])]
            x = args[0].detach().float()  # [..., in]
            squares = x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # [in]
            self.sums[name] = self.sums[name] + squares if name in self.sums else squares
        return func(*args, **(kwargs or {}))


def decoder_blocks(layers: list[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """The Linear layers grouped by decoder layer (`...layers.<i>....` in transformers' and
    FastGlm's names alike), in layer order; a Linear outside the layers forms a group first."""
    groups: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, layer in layers:
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        groups.setdefault(int(found.group(1)) if found else -1, []).append((name, layer))
    return [groups[index] for index in sorted(groups)]


@torch.inference_mode()
def input_norms(model: nn.Module, layers: list[tuple[str, nn.Linear]], ids: torch.Tensor,
                stop_at: Sequence[tuple[str, nn.Linear]] = ()) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens of each input channel j of each layer, {name: [in]};
    each forward ends at the first of `stop_at` (later layers: their inputs are not needed)."""
    recorder = _InputNorms({id(layer.weight): name for name, layer in layers},
                           {id(layer.weight) for _, layer in stop_at})
    with recorder:
        for chunk in ids.split(4):  # chunk: [<=4, T]
            try:
                _calibration_forward(model, chunk)
            except _Enough:
                pass
    missing = [name for name, _ in layers if name not in recorder.sums]
    if missing:
        raise RuntimeError(f"wanda: no calibration input reached {missing[:3]}")
    return {name: total.sqrt() for name, total in recorder.sums.items()}


def _calibration_forward(model: nn.Module, ids: torch.Tensor) -> None:
    """A teacher-forced pass over ids [B, T] through every decoder layer."""
    if not hasattr(model, "run_layers"):  # transformers' GlmForCausalLM / Glm4ForCausalLM
        model(input_ids=ids, use_cache=False)
        return
    from runners.glm.fast_model import attention_bias

    batch, seq = ids.shape
    dims, weight = model.dims, model.final_norm
    caches = [torch.zeros(batch, dims.num_kv_heads, seq, dims.head_dim, dtype=weight.dtype, device=weight.device)
              for _ in range(2 * len(model.layers))]
    positions = torch.arange(seq, device=ids.device)
    bias = attention_bias(positions, torch.zeros(batch, dtype=torch.long, device=ids.device), seq, weight.dtype)
    model.run_layers(ids, positions.expand(batch, seq), positions, bias, caches[::2], caches[1::2], seq)


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j||, [out, in] in float32 (one layer at a time: float32 copies of every
    layer at once would be twice a bf16 model's size)."""
    return weight.detach().abs().float() * norm[None].to(weight.device)


def apply_sparsity(model: nn.Module, knobs: dict[str, Any], device: str,
                   calibration: Calibration | None = None) -> dict[str, Any]:
    """Prune the decoder's Linear weights (`prune_weights`); 2:4 also converts them to the
    semi-structured layout (cuSPARSELt/CUTLASS), unless fp8 quantisation follows and packs them
    itself. 2:4 without a kernel path for this device, shape or quantisation is infeasible."""
    ratio = float(knobs.get("sparsity", 0.0))
    kind = knobs.get("sparsity_kind", "unstructured")
    if ratio and kind != "unstructured":
        _check_2_4(linear_layers(model, include_lm_head=False), device, knobs)
    info = prune_weights(model, knobs, device, calibration)
    if ratio and kind != "unstructured" and not _fp8_follows(knobs):
        _to_semi_structured(linear_layers(model, include_lm_head=False))
    return info


def prune_weights(model: nn.Module, knobs: dict[str, Any], device: str,
                  calibration: Calibration | None = None) -> dict[str, Any]:
    """Zero weights in place as `sparsity`, `sparsity_kind` and `sparsity_method` say; the weights
    stay dense (no kernel conversion).

    `sparsity_method: wanda` scores weights by |W| * ||x|| with the input norms of calibration
    passes (`calibration()`, training text; seeded random ids when none is given or known), one
    decoder layer at a time over the partly pruned model.
    """
    ratio = float(knobs.get("sparsity", 0.0))
    kind = knobs.get("sparsity_kind", "unstructured")
    method = knobs.get("sparsity_method", "magnitude")
    if not 0.0 <= ratio < 1.0:
        raise InfeasibleConfig(f"sparsity must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return {"sparsity_measured": 0.0}
    if kind != "unstructured":
        _refuse_2_4_ratio(ratio)
    layers = linear_layers(model, include_lm_head=False)
    info: dict[str, Any] = {"sparsity_method": method}
    if method == "wanda":
        ids, info["sparsity_calibration"] = (calibration or _random_calibration(model, device))()
        # Layer by layer, as Wanda's own procedure: each decoder layer's input norms come from
        # the model with every earlier layer already pruned, so a layer's scores see the
        # activations it will really get (one-shot norms of the dense model do not).
        blocks = decoder_blocks(layers)
        for index, block in enumerate(blocks):
            norms = input_norms(model, block, ids, stop_at=[x for later in blocks[index + 1:] for x in later])
            for name, layer in block:
                _prune(layer, kind, ratio, wanda_scores(layer.weight, norms[name]))
    else:
        for _, layer in layers:
            _prune(layer, kind, ratio, None)
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
    info["sparsity_measured"] = zeros / sum(layer.weight.numel() for _, layer in layers)
    return info


def _prune(layer: nn.Linear, kind: str, ratio: float, scores: torch.Tensor | None) -> None:
    if kind == "unstructured":
        prune_unstructured(layer.weight, ratio, scores)
    else:
        prune_2_4(layer.weight, scores)


def _random_calibration(model: nn.Module, device: str) -> Calibration:
    from runners.glm.quality import eval_batch

    def ids() -> tuple[torch.Tensor, str]:
        vocab = int(model.config.vocab_size)
        return (eval_batch(vocab, CALIBRATION_SEQUENCES, CALIBRATION_TOKENS, 7919, device),
                f"{CALIBRATION_SEQUENCES}x{CALIBRATION_TOKENS} seeded random token ids (no calibration text given)")
    return ids


def _fp8_follows(knobs: dict[str, Any]) -> bool:
    return int(knobs.get("quant_bits", 16)) == 8 and knobs.get("quant_scheme") == "fp8"


def refuse_sparsity_knobs(knobs: dict[str, Any], device: str) -> None:
    """The sparsity refusals that need no model, so a trial can be refused before it builds one:
    2:4 at a ratio other than 0.5, on a device without its kernels, or with a quantisation that
    has no 2:4 kernel path."""
    ratio = float(knobs.get("sparsity", 0.0))
    if not ratio or knobs.get("sparsity_kind", "unstructured") == "unstructured":
        return
    _refuse_2_4_ratio(ratio)
    if not device.startswith("cuda"):
        raise InfeasibleConfig("sparsity_kind=2:4 needs CUDA semi-structured kernels (cuSPARSELt/CUTLASS); not on CPU")
    if int(knobs.get("quant_bits", 16)) != 16 and not _fp8_follows(knobs):
        raise InfeasibleConfig("2:4 sparsity combines only with fp8 here (torchao's CUTLASS fp8 2:4 kernel, SM90); "
                               f"no kernel path for quant_bits={knobs.get('quant_bits')} "
                               f"{knobs.get('quant_scheme')} + 2:4")


def _refuse_2_4_ratio(ratio: float) -> None:
    if abs(ratio - 0.5) > 1e-9:
        raise InfeasibleConfig(f"sparsity_kind=2:4 prunes exactly 50% of weights; set sparsity 0.5, not {ratio}")


def _check_2_4(layers: list[tuple[str, nn.Linear]], device: str, knobs: dict[str, Any]) -> None:
    refuse_sparsity_knobs(knobs, device)
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
        from runners.glm.kernels import woq_cuda

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
    # Their kernels autotune in the compile phase (`woq.warm_up`, called by the runner after the
    # quality pass): a stack that breaks a quality bound skips it.
