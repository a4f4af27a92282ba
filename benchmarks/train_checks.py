"""Two follow-up checks of the training runner on a GPU (questions the study left open).

    python benchmarks/train_checks.py

1. Paired optimizer run: adamw vs adamw_8bit, all else equal (glm-4-9b shape, 4 layers, bf16,
   micro 3, seq 1024): per-step losses and speed, to see whether the 8-bit optimizer alone
   explains the much lower train_loss seen in the study.
2. `grad_checkpointing=offload` with `compile` on CUDA, bypassing the runner's infeasibility rule
   (measured on CPU only): does torch.compile's backward accept save_on_cpu's tensors here?
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runners.contract import TrialConfig  # noqa: E402
from runners.glm.model import build_model  # noqa: E402
from runners.registry import resolve_knobs  # noqa: E402
from runners.train import GlmTrainRunner, TrainStep, batches  # noqa: E402
from runners.train_plan import make_plan  # noqa: E402


def paired_optimizers() -> None:
    for optimizer in ("adamw", "adamw_8bit"):
        config = TrialConfig("glm-train", {"preset": "glm-4-9b", "num_layers": 4}, "cuda",
                             {"train_steps": 6, "warmup_steps": 3},
                             {"optimizer": optimizer, "amp_dtype": "bfloat16", "micro_batch_size": 3,
                              "seq_len": 1024})
        result = GlmTrainRunner().run(config)
        m = result.metrics
        print(f"{optimizer}: first loss {result.info['first_loss']:.3f} last {m['train_loss']:.4f} "
              f"tok/s {m['train_tokens_s']:.0f} peak {m['train_peak_memory_mib']:.0f} MiB "
              f"alloc {m['torch_peak_allocated_mib']:.0f} MiB", flush=True)
        torch.cuda.empty_cache()


def offload_with_compile() -> None:
    model_spec = {"preset": "glm-tiny", "num_layers": 4}
    plan = make_plan(resolve_knobs("glm-train", {"grad_checkpointing": "offload", "micro_batch_size": 4,
                                                 "seq_len": 256}), model_spec, "cuda:0")
    plan = dataclasses.replace(plan, compile=True)  # the combination the runner refuses
    model = build_model(model_spec, plan.weight_dtype, "cuda:0", seed=0).train()
    step = TrainStep(model, plan, "cuda:0")
    data = batches(plan, model.config.vocab_size, seed=0, device="cuda:0")
    try:
        losses = [float(step(next(data))) for _ in range(3)]
        print(f"offload+compile on CUDA ran: losses {losses}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the outcome is what we report
        print(f"offload+compile on CUDA failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        traceback.print_exc(limit=2)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    paired_optimizers()
    offload_with_compile()
