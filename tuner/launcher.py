"""Run one trial in a child process and classify what happened.

ok          the runner measured the config
infeasible  a deterministic, config-caused failure (OOM, a knob this device cannot run)
fail        infrastructure: the child crashed, hung past its timeout, or wrote no result

The child is `python -m runners.child`; the tuner never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from runners.contract import DEFAULT_MAX_DURATION_S, TrialConfig, TrialResult

STDERR_TAIL_CHARS = 4000
# The child's environment variable holding the tuner's pid (runners.child checks it first thing).
PARENT_PID_ENV = "AUTOGLM_TUNE_PARENT_PID"

# A trial's hard wall-clock cap, derived from its workload (besides search.trial_timeout_s):
# generous upper bounds, so it only ever ends a child that cannot be doing useful work.
SETUP_BASE_S = 600.0  # interpreter, torch import, CUDA context, compile and quality eval of a small model
SETUP_PER_GPARAM_S = 150.0  # build, compress, compile, quality eval: per billion parameters
DECODE_STEP_S = 0.25  # slowest decode step (or eval forward) allowed: a 9B model on CPU
TRAIN_STEP_S = 60.0  # slowest training step allowed
WINDOW_FACTOR = 3.0  # the window may run long (overload, a CI extension, capacity probes)


@dataclass
class LaunchOutcome:
    state: Literal["ok", "infeasible", "fail"]
    result: TrialResult | None
    reason: str = ""
    stderr_tail: str = ""
    wall_s: float = 0.0
    fatal: bool = False  # the trial's own files could not be written: every later trial would fail alike


CAPACITY_PROBES = 10  # runners.capacity.DEFAULT_PROBES (the tuner does not import the runner's modules)


def trial_cap_s(config: TrialConfig) -> float:
    """Seconds after which a trial's child is killed whatever `trial_timeout_s` says.

    Setup (scaled by the model's size) plus the measurement the workload asks for: the window
    (`max_duration_s`, or requests / rate, or closed-loop rounds of decode steps), the drain of
    the longest request, and the quality evaluation; for training, its steps.
    """
    w = config.workload
    setup = SETUP_BASE_S + SETUP_PER_GPARAM_S * _approx_gparams(config.model)
    if config.runner == "glm-train":
        steps = int(w.get("warmup_steps", 0) or 0) + int(w.get("train_steps", 10) or 10)
        return setup + WINDOW_FACTOR * steps * TRAIN_STEP_S
    longest = _longest(w.get("output_tokens", 16))
    requests = int(w.get("warmup_requests", 0) or 0) + max(int(w.get("requests", 64) or 64),
                                                          int(w.get("max_requests") or 0))
    if w.get("max_duration_s"):
        window = float(w["max_duration_s"])
    elif w.get("arrival", "poisson") == "closed":
        window = math.ceil(requests / max(1, int(w.get("concurrency", 8) or 8))) * longest * DECODE_STEP_S
    elif w.get("arrival") == "trace":
        window = requests * longest * DECODE_STEP_S  # unknown gaps: as if served one by one
    else:
        window = requests / float(w.get("rate_rps", 8.0) or 8.0)
    drain = longest * DECODE_STEP_S
    quality = int(w.get("eval_sequences", 8) or 8) * DECODE_STEP_S
    if w.get("mode") == "capacity":  # a rate search: up to `capacity_probes` windows, each hard-capped
        probes = int(w.get("capacity_probes", CAPACITY_PROBES) or CAPACITY_PROBES)
        window = probes * (float(w.get("max_duration_s") or DEFAULT_MAX_DURATION_S) + drain)
    return setup + WINDOW_FACTOR * (window + drain + quality)


def _longest(spec: object) -> int:
    """The longest length a {dist: ...} (or plain int) spec can produce; 2048 if unbounded."""
    if isinstance(spec, dict):
        bound = spec.get("max", spec.get("high"))
        return int(bound) if isinstance(bound, (int, float)) and math.isfinite(bound) else 2048
    return int(spec) if isinstance(spec, (int, float)) and math.isfinite(spec) else 2048


def _approx_gparams(model: dict) -> float:
    """Billions of parameters of a preset (with its `num_layers`); 10 for a model from a path."""
    from runners.presets import PRESETS  # torch-free

    shape = PRESETS.get(model.get("preset", "glm-tiny"))
    if shape is None:
        return 10.0
    layers = int(model.get("num_layers") or shape["num_hidden_layers"])
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    attn = hidden * shape["head_dim"] * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    return (layers * (attn + 3 * hidden * inter) + 2 * shape["vocab_size"] * hidden) / 1e9


def _write_failure(workdir: Path, exc: OSError, wall_s: float = 0.0) -> LaunchOutcome:
    return LaunchOutcome("fail", None, f"cannot write the trial's files in {workdir}: "
                         f"{exc.strerror or exc} (errno {exc.errno})", wall_s=wall_s, fatal=True)


def _tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(start, path.stat().st_size - STDERR_TAIL_CHARS))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_result(result_path: Path) -> TrialResult | None:
    if not result_path.exists():
        return None
    return TrialResult.from_dict(json.loads(result_path.read_text()))


def _classify(result: TrialResult | None, returncode: int | None, stderr: str, wall_s: float) -> LaunchOutcome:
    if result is not None:
        state = "ok" if result.status == "ok" else "infeasible"
        return LaunchOutcome(state, result, result.reason, stderr, wall_s)
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        reason = f"runner killed by {name}{hint}"
    else:
        last = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = f"runner crashed (exit {returncode}): {last[-1] if last else 'no output'}"
    return LaunchOutcome("fail", None, reason, stderr, wall_s)


def _child_env(cache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this checkout's packages even when the CLI runs from elsewhere.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[PARENT_PID_ENV] = str(os.getpid())
    env.update(cache_env(env, cache_dir))
    return env


def cache_env(env: dict[str, str], cache_dir: Path | None) -> dict[str, str]:
    """Persistent compile caches for the child, under `cache_dir` (AUTOGLM_CACHE_DIR wins):
    Inductor's FX graph and autotune caches (TORCHINDUCTOR_CACHE_DIR; both on by default, the
    FX graph cache forced on here), Triton's compiled kernels (TRITON_CACHE_DIR) and the tile
    choices of our `@triton.autotune` kernels (TRITON_CACHE_AUTOTUNING, Triton >= 3.4), and our
    own (the quality reference, NVRTC images). A later process, or another study sharing the
    folder, starts warm. Variables the user set already are left alone."""
    root = env.get("AUTOGLM_CACHE_DIR") or (str(cache_dir.resolve()) if cache_dir is not None else "")
    if not root:
        return {}
    wanted = {"AUTOGLM_CACHE_DIR": root, "TORCHINDUCTOR_CACHE_DIR": str(Path(root) / "inductor"),
              "TRITON_CACHE_DIR": str(Path(root) / "triton"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
              "TRITON_CACHE_AUTOTUNING": "1"}
    return {key: value for key, value in wanted.items() if not env.get(key)}


def _timeout(trial_timeout_s: float, config: TrialConfig) -> tuple[float, str]:
    """The tighter of `search.trial_timeout_s` and the workload's hard cap, and which one it is."""
    cap = trial_cap_s(config)
    if cap < trial_timeout_s:
        return cap, " (the hard cap derived from the trial's workload; see tuner.launcher.trial_cap_s)"
    return trial_timeout_s, ""


class ProcessLauncher:
    """A fresh child process per trial: the cleanest measurement (memory starts from zero)."""

    def __init__(self, timeout_s: float, python: str = sys.executable, cache_dir: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.python = python
        self.cache_dir = cache_dir

    def run(self, config: TrialConfig, workdir: Path) -> LaunchOutcome:
        config_path, result_path, stderr_path = (workdir / "config.json", workdir / "result.json",
                                                 workdir / "stderr.log")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config.to_json())
            result_path.unlink(missing_ok=True)
            stderr = stderr_path.open("wb")
        except OSError as exc:  # read-only or full disk: a FAIL with the reason, never a traceback
            return _write_failure(workdir, exc)
        timeout_s, why = _timeout(self.timeout_s, config)
        start = time.perf_counter()
        with stderr:
            proc = subprocess.Popen(
                [self.python, "-m", "runners.child", str(config_path), str(result_path)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=_child_env(self.cache_dir),
                start_new_session=True)  # own process group: a timeout kills its helpers too
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return LaunchOutcome("fail", None, f"runner hung: no result after {timeout_s:.0f} s{why}",
                                     _tail(stderr_path), time.perf_counter() - start)
        wall_s = time.perf_counter() - start
        return _classify(_read_result(result_path), returncode, _tail(stderr_path), wall_s)

    def close(self) -> None:
        """Nothing stays running between trials."""


class WarmLauncher:
    """One long-lived child (`runners.child --serve`) that keeps built models between trials.

    Restarted after a crash, a hang, an out-of-memory trial or an infeasible trial that had
    touched CUDA, so one bad config cannot poison the measurements of the next.
    """

    def __init__(self, timeout_s: float, stderr_path: Path, python: str = sys.executable,
                 cache_dir: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.python = python
        self.cache_dir = cache_dir
        self.stderr_path = stderr_path
        self._proc: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
            self._stderr = self.stderr_path.open("ab")
            self._proc = subprocess.Popen(
                [self.python, "-m", "runners.child", "--serve"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=self._stderr, env=_child_env(self.cache_dir),
                start_new_session=True)
        return self._proc

    def run(self, config: TrialConfig, workdir: Path) -> LaunchOutcome:
        if float(config.knobs.get("memory_limit_mib", 0) or 0) > 0:
            # A memory cap is applied to the whole process and cannot be lifted again.
            return ProcessLauncher(self.timeout_s, self.python, self.cache_dir).run(config, workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config_path, result_path = workdir / "config.json", workdir / "result.json"
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config.to_json())
            result_path.unlink(missing_ok=True)
            proc = self._start()
            offset = self.stderr_path.stat().st_size
        except OSError as exc:  # read-only or full disk: a FAIL with the reason, never a traceback
            return _write_failure(workdir, exc)
        timeout_s, why = _timeout(self.timeout_s, config)
        start = time.perf_counter()
        proc.stdin.write((json.dumps({"config": str(config_path), "result": str(result_path)}) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else b""
        wall_s = time.perf_counter() - start
        if not ready:
            self.close()
            return LaunchOutcome("fail", None, f"runner hung: no result after {timeout_s:.0f} s{why}",
                                 _tail(self.stderr_path, offset), wall_s)
        if not line:  # the child died mid-trial
            returncode = proc.wait()
            self._proc = None
            return _classify(None, returncode, _tail(self.stderr_path, offset), wall_s)
        outcome = _classify(_read_result(result_path), None, _tail(self.stderr_path, offset), wall_s)
        if outcome.state == "infeasible" and (outcome.reason.startswith("out of memory")
                                               or outcome.result.info.get("cuda_touched")):
            # An OOM or a failure after CUDA was touched (a failed graph capture left the RNG
            # state unusable on an H200) can poison the process: the next trial gets a fresh one.
            # A knob refused up front (int4 on CPU) leaves it clean, so the warm models stay.
            self.close()
        return outcome

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                _kill_group(self._proc)
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
