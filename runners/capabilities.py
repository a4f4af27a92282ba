"""Which knob values can never run on a device, known before any trial runs.

`impossible_values(runner, device)` answers from a plain device description (`DeviceFacts`),
so it is free of torch and the tuner may call it in its own process. Only a CUDA (or `auto`)
device needs torch to be described: `python -m runners.capabilities DEVICE` prints the facts
and the impossible values as JSON, in a child process, so the tuner still never imports torch.

A value listed here fails on the device whatever the other knobs are. Combinations refused on
any device are declared as `Together` rules in runners/knobs.py (the tuner reads those too);
the rest (2:4 with int8, compile with a dynamic cache) are left to the runner's own
`InfeasibleConfig` per trial. Each reason says the same as the runner's refusal.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

# Packages whose absence rules values out, by import name.
PACKAGES = ("torchao", "triton", "optimum.quanto", "flash_attn")


@dataclass(frozen=True)
class DeviceFacts:
    """What decides feasibility: the device kind, its compute capability, installed packages."""

    device: str  # "cpu" or "cuda:K"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0)
    name: str = ""
    packages: dict[str, bool] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def has(self, package: str) -> bool:
        return self.packages.get(package, False)


def installed_packages() -> dict[str, bool]:
    """Importable or not, found without importing them (find_spec of a sub-package imports its parent)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found[name] = False
    return found


def cpu_facts() -> DeviceFacts:
    """The CPU device, described without torch."""
    return DeviceFacts("cpu", None, "cpu", installed_packages())


def describe(device: str) -> DeviceFacts:
    """The facts of `device` (auto | cpu | cuda | cuda:K); imports torch for CUDA devices."""
    if device == "cpu":
        return cpu_facts()
    import torch

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or not torch.cuda.is_available():
        return cpu_facts()
    device = "cuda:0" if device == "cuda" else device
    capability = tuple(torch.cuda.get_device_capability(device))
    return DeviceFacts(device, capability, torch.cuda.get_device_name(device), installed_packages())


def _infer_rules(facts: DeviceFacts) -> dict[str, dict[Any, str]]:
    out: dict[str, dict[Any, str]] = {}

    def no(knob: str, value: Any, reason: str) -> None:
        out.setdefault(knob, {})[value] = reason

    if not facts.cuda:
        no("quant_bits", 4, "int4 weight-only needs CUDA kernels (torchao tinygemm or ours); not on CPU")
        no("quant_scheme", "fp8", "fp8 needs a CUDA GPU with fp8 tensor cores (SM 8.9+)")
        no("sparsity_kind", "2:4", "2:4 sparsity needs CUDA semi-structured kernels (cuSPARSELt/CUTLASS); not on CPU")
        no("kv_cache", "offloaded", "kv_cache=offloaded moves GPU KV to CPU memory: needs a CUDA device")
        no("compile", True, "compile=true captures the decode step in CUDA graphs; a CPU has none")
        for kernel in ("triton", "cuda"):
            no("quant_kernel", kernel, f"quant_kernel={kernel} runs GPU kernels; not on CPU")
        no("decode_attention", "cuda", "decode_attention=cuda is a CUDA kernel; not on CPU")
        no("attn_implementation", "flash_attention_2", "flash_attention_2 needs a CUDA GPU")
    else:
        sm = f"{facts.name} is SM {facts.capability[0]}.{facts.capability[1]}" if facts.capability else ""
        if facts.capability is not None and tuple(facts.capability) < (8, 9):
            no("quant_scheme", "fp8", f"fp8 needs fp8 tensor cores (SM 8.9+); {sm}")
        if facts.capability is not None and tuple(facts.capability) < (8, 0):
            no("sparsity_kind", "2:4", f"2:4 sparse tensor cores (cuSPARSELt/CUTLASS) need SM 8.0+; {sm}")
        if not facts.has("triton"):
            for kernel in ("triton", "cuda"):
                no("quant_kernel", kernel, f"quant_kernel={kernel} needs the `triton` package, absent here")
        if not facts.has("flash_attn"):
            no("attn_implementation", "flash_attention_2", "flash_attention_2 needs the flash-attn package, absent here")
    if not facts.has("torchao"):
        for bits in (8, 4):
            no("quant_bits", bits, f"quant_bits={bits} needs torchao, absent here")
    if not facts.has("optimum.quanto"):
        no("kv_cache", "quantized", "kv_cache=quantized needs the optimum-quanto package, absent here")
    return out


def _train_rules(facts: DeviceFacts) -> dict[str, dict[Any, str]]:
    if facts.cuda:
        return {}
    return {"grad_checkpointing": {"offload": "grad_checkpointing=offload moves saved activations to host "
                                              "memory: needs a CUDA device"},
            "optimizer": {"adamw_cpu_offload": "optimizer=adamw_cpu_offload supports only CUDA/XPU devices"}}


RULES = {"glm-infer": _infer_rules, "glm-train": _train_rules}


def impossible_values(runner: str, facts: DeviceFacts) -> dict[str, dict[Any, str]]:
    """knob -> {value: reason} of the values `runner` can never run on the described device."""
    rules = RULES.get(runner)
    return rules(facts) if rules is not None else {}


def to_json(runner: str, facts: DeviceFacts) -> str:
    """The facts and impossible values; values as [value, reason] pairs (JSON keys are strings)."""
    table = impossible_values(runner, facts)
    return json.dumps({"facts": asdict(facts),
                       "impossible": {knob: [[v, why] for v, why in values.items()] for knob, values in table.items()}})


def from_json(text: str) -> tuple[DeviceFacts, dict[str, dict[Any, str]]]:
    data = json.loads(text)
    facts = data["facts"]
    capability = tuple(facts["capability"]) if facts.get("capability") else None
    table = {knob: {value: why for value, why in pairs} for knob, pairs in data["impossible"].items()}
    return DeviceFacts(facts["device"], capability, facts.get("name", ""), facts.get("packages", {})), table


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m runners.capabilities RUNNER DEVICE", file=sys.stderr)
        return 2
    runner, device = argv
    print(to_json(runner, describe(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
