"""Build GLM models: a preset shape with seeded random weights, or a local checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

from runners.contract import InfeasibleConfig
from runners.glm.woq import packed_linears
from runners.knobs import DTYPES as DTYPE_NAMES
from runners.presets import PRESETS

# The declared dtype names (runners/knobs.py), as torch dtypes.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
ARCHS = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}


@dataclass
class ModelInfo:
    """Sizes the roofline and memory figures are computed from."""

    params: int
    weight_bytes: int  # every parameter, as stored
    decode_weight_bytes: int  # read per decode step: all but the embedding table
    kv_bytes_per_token: int  # K and V, all layers, in the run dtype
    num_layers: int
    hidden_size: int
    vocab_size: int


def resolve_dtype(model_spec: dict[str, Any], knobs: dict[str, Any], device: str) -> torch.dtype:
    """Knob `dtype` over the model's `dtype`; default bf16 on CUDA and float32 on CPU."""
    name = knobs.get("dtype") or model_spec.get("dtype")
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def make_config(model_spec: dict[str, Any]) -> Any:
    shape = dict(PRESETS[model_spec.get("preset", "glm-tiny")])
    config_cls, _ = ARCHS[shape.pop("arch")]
    if model_spec.get("num_layers"):
        shape["num_hidden_layers"] = int(model_spec["num_layers"])
    # Random weights emit any token; ids inside the vocabulary keep the config valid, and
    # generation never stops early because the runners pass eos_token_id=-1.
    return config_cls(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def checkpoint_arch(model_spec: dict[str, Any]) -> str:
    """`glm` or `glm4` for a local checkpoint: the spec's `arch`, else its config's model_type."""
    if model_spec.get("arch"):
        return str(model_spec["arch"])
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_spec["path"], local_files_only=True).model_type
    if model_type not in ARCHS:
        raise ValueError(f"{model_spec['path']}: model_type {model_type!r} is not a GLM ({sorted(ARCHS)})")
    return model_type


def model_config(model_spec: dict[str, Any]) -> Any:
    """The transformers config of a preset or a local checkpoint (no weights loaded)."""
    if "path" in model_spec:
        config_cls = ARCHS[checkpoint_arch(model_spec)][0]
        return config_cls.from_pretrained(model_spec["path"], local_files_only=True)
    return make_config(model_spec)


def check_attn_implementation(name: str, device: str) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU; say so instead of crashing."""
    if name != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not device.startswith("cuda") or not is_flash_attn_2_available():
        raise InfeasibleConfig("attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                               "package, which this environment lacks")


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(model_spec: dict[str, Any], dtype: torch.dtype, device: str, seed: int,
                attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Random init directly on `device` in `dtype` (seeded), or a local checkpoint."""
    check_attn_implementation(attn_implementation, device)
    if "path" in model_spec:
        # A local checkpoint directory only: run time never reaches the hub.
        arch_cls = ARCHS[checkpoint_arch(model_spec)][1]
        # device_map (straight onto the device) needs `accelerate`; without it, load then move.
        placement = {"device_map": device} if _has_accelerate() else {}
        model = arch_cls.from_pretrained(
            model_spec["path"], dtype=dtype, local_files_only=True,
            attn_implementation=attn_implementation, **placement)
        return model.to(device).eval()
    config = make_config(model_spec)
    config._attn_implementation = attn_implementation
    _, model_cls = ARCHS[PRESETS[model_spec.get("preset", "glm-tiny")]["arch"]]
    torch.manual_seed(int(model_spec.get("seed", seed)))
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really occupies: torchao quantised tensors and 2:4 semi-structured
    tensors are wrapper subclasses whose `element_size()` describes the logical (dense) dtype,
    so count their inner tensors (packed data, scales, zero points, sparsity metadata)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    if tensor.layout != torch.strided:  # other sparse layouts: values + indices
        return sum(stored_bytes(t) for t in (tensor.values(), tensor.indices()))
    return tensor.numel() * tensor.element_size()


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Sizes from the stored tensors; works on transformers' GLM and on `FastGlm`."""
    cfg = model.config
    packed = packed_linears(model)  # weights held as int8/int4 buffers, not parameters
    params = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in packed)
    weight_bytes = sum(stored_bytes(p) for p in model.parameters()) + sum(m.stored_bytes() for m in packed)
    embed = model.get_input_embeddings().weight
    # The KV cache is kept in the activation dtype, whatever the weights were quantised to.
    dtype_bytes = embed.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes
    # Decode reads every weight but the embedding table (only B rows of it are gathered).
    return ModelInfo(params, weight_bytes, weight_bytes - stored_bytes(embed), kv_per_token,
                     cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
