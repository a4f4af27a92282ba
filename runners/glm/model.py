"""Build GLM models: a preset shape with seeded random weights, or a local checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

from runners.presets import PRESETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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


def build_model(model_spec: dict[str, Any], dtype: torch.dtype, device: str, seed: int,
                attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Random init directly on `device` in `dtype` (seeded), or a local checkpoint."""
    if "path" in model_spec:
        arch_cls = GlmForCausalLM if model_spec.get("arch", "glm") == "glm" else Glm4ForCausalLM
        model = arch_cls.from_pretrained(
            model_spec["path"], dtype=dtype, device_map=device, local_files_only=True,
            attn_implementation=attn_implementation)
        return model.eval()
    config = make_config(model_spec)
    config._attn_implementation = attn_implementation
    _, model_cls = ARCHS[PRESETS[model_spec.get("preset", "glm-tiny")]["arch"]]
    torch.manual_seed(int(model_spec.get("seed", seed)))
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def model_info(model: torch.nn.Module) -> ModelInfo:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    embed_bytes = embed.numel() * embed.element_size()
    dtype_bytes = next(model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes
    return ModelInfo(params, weight_bytes, weight_bytes - embed_bytes, kv_per_token,
                     cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
