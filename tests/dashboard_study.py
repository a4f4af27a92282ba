"""One journal with the studies the dashboard tests need, made by the real runner on CPU.

- `populated`: the real GLM runner (tiny model, tiny load), 4 grid trials over batch size and
  quant bits; a tight KL bound makes the int8 trials infeasible with a measured reason.
- `running`: a copy of `populated` plus one trial left RUNNING (what a live study looks like).
- `failed`: the real runner with a trial timeout too short to load it: every trial FAILs.
- `empty`: created, no trials.

Built once per pytest process (both the AppTest and the browser test use it).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import optuna
import yaml

from tuner.cli import main as cli_main
from tuner.storage import open_storage

OBJECTIVES = [{"metric": "throughput_tok_s", "direction": "maximize"},
              {"metric": "latency_p99_ms", "direction": "minimize"},
              {"metric": "peak_memory_mib", "direction": "minimize"}]
WORKLOAD = {"arrival": "poisson", "rate_rps": 50, "requests": 8, "warmup_requests": 1, "prompt_tokens": 8,
            "output_tokens": 4, "eval_sequences": 2, "eval_tokens": 16,
            # Measure every window: a KL bound broken after set-up would otherwise skip it.
            "early_stop": False}


def _space(path: Path, study: str, trials: int, **search: object) -> Path:
    path.write_text(yaml.safe_dump({
        "study": study, "runner": "glm-infer", "model": {"preset": "glm-tiny"}, "device": "cpu",
        "workload": WORKLOAD,
        "params": {"batch_size": {"type": "categorical", "choices": [2, 8]},
                   "quant_bits": {"type": "categorical", "choices": [16, 8]}},
        "objectives": OBJECTIVES,
        # int8 weights on random GLM-tiny weights give KL ~3e-6: infeasible, but measured.
        "constraints": [{"metric": "kl_divergence", "max": 1e-6}],
        "search": {"sampler": "grid", "trials": trials, "seed": 0, **search},
    }))
    return path


def _running_copy(journal: str) -> None:
    storage = open_storage(journal)
    optuna.copy_study(from_study_name="populated", from_storage=storage, to_storage=storage,
                      to_study_name="running")
    live = optuna.load_study(study_name="running", storage=storage)
    trial = live.ask({"batch_size": optuna.distributions.CategoricalDistribution([2, 8]),
                      "quant_bits": optuna.distributions.CategoricalDistribution([16, 8])})
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid(), "gpu": "0"})
    trial.set_user_attr("config", {"knobs": dict(trial.params)})


def _empty(journal: str) -> None:
    study = optuna.create_study(study_name="empty", storage=open_storage(journal),
                                directions=[o["direction"] for o in OBJECTIVES])
    study.set_metric_names([o["metric"] for o in OBJECTIVES])


@functools.cache
def build(root: Path) -> str:
    """Make the journal under `root` (once per process); returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    journal = str(root / "optuna.journal")
    populated = _space(root / "populated.yaml", "populated", 4)
    cli_main(["--space", str(populated), "--storage", journal, "--out", str(root / "populated"), "--warm", "--quiet"])
    failed = _space(root / "failed.yaml", "failed", 2, trial_timeout_s=0.2)
    cli_main(["--space", str(failed), "--storage", journal, "--out", str(root / "failed"), "--quiet"])
    _running_copy(journal)
    _empty(journal)
    return journal
