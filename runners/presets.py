"""Model presets: GLM config shapes by name. Torch-free so the tuner can validate names.

`arch` picks the transformers class: `glm` -> GlmForCausalLM (GLM-4), `glm4` ->
Glm4ForCausalLM (GLM-4-0414, with post-norms).
"""

from __future__ import annotations

from typing import Any

# glm-4-9b: GlmConfig() defaults (hidden 4096, 40 layers, 32 heads, 2 KV heads, head_dim 128,
# intermediate 13696, vocab 151552); the smaller ones keep its proportions (GQA, partial rotary).
PRESETS: dict[str, dict[str, Any]] = {
    "glm-tiny": {
        "arch": "glm",
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
    },
    "glm-small": {
        "arch": "glm",
        "vocab_size": 32768,
        "hidden_size": 1024,
        "intermediate_size": 3424,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 8192,
    },
    "glm-1b": {
        "arch": "glm",
        "vocab_size": 151552,
        "hidden_size": 2048,
        "intermediate_size": 6848,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 8192,
    },
    "glm-4-9b": {
        "arch": "glm",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 131072,
    },
    "glm-4-9b-0414": {
        "arch": "glm4",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 32768,
    },
}
