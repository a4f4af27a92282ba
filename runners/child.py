"""Entry point of the process that runs trials: `python -m runners.child`.

One-shot:  python -m runners.child CONFIG.json RESULT.json
Persistent: python -m runners.child --serve   (JSON lines on stdin: {"config": PATH,
"result": PATH}; answers one line per job on stdout), so a warm process can keep models
between trials.

A result file is written only for a trial that ran or was infeasible; any other exception
exits non-zero with the traceback on stderr, which the tuner records as a FAIL.
"""

from __future__ import annotations

import os
import sys

# The tuner's pid, set by tuner.launcher; checked before anything heavy is imported.
PARENT_PID_ENV = "AUTOGLM_TUNE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _bind_to_parent() -> None:
    """Die with the tuner, from the first instruction on.

    On Linux the kernel sends SIGKILL when the parent goes (even by kill -9); the pid check
    covers the window before the prctl, when the tuner may already have died and this process
    been re-parented. Runs before torch (or anything slow) is imported.
    """
    expected = os.environ.get(PARENT_PID_ENV, "")
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if expected.isdigit() and os.getppid() != int(expected):
        os._exit(3)  # the tuner is gone already: nobody would read our result


if __name__ == "__main__":
    _bind_to_parent()

import json  # noqa: E402 - after the binding above, on purpose
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from runners import load_runner  # noqa: E402
from runners.contract import InfeasibleConfig, TrialConfig, TrialResult  # noqa: E402

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _watch_parent() -> None:
    """Exit when the tuner that started us dies, where there is no PR_SET_PDEATHSIG (not Linux)."""
    expected = os.environ.get(PARENT_PID_ENV, "")
    parent = int(expected) if expected.isdigit() else os.getppid()

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _apply_memory_limit(config: TrialConfig) -> None:
    """The `memory_limit_mib` knob: a hard cap, so a config that needs more is an OOM."""
    limit_mib = float(config.knobs.get("memory_limit_mib", 0) or 0)
    if limit_mib <= 0:
        return
    if config.device.startswith("cuda") or config.device == "auto":
        import torch

        if torch.cuda.is_available():
            index = torch.device(config.device if config.device.startswith("cuda:") else "cuda:0").index or 0
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_mib * 2**20 / total), index)
            return
    import resource

    import psutil
    import torch

    # Start the intra-op thread pool before the cap: under a small cap OpenMP cannot create its
    # threads and aborts the process, which would read as a crash instead of an OOM.
    torch.ones(256, 256) @ torch.ones(256, 256)

    # Address space already mapped (libraries, torch) plus the allowed growth.
    cap = psutil.Process().memory_info().vms + int(limit_mib * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))


def _is_oom(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


def run_one(config_path: Path, result_path: Path) -> None:
    config = TrialConfig.from_dict(json.loads(config_path.read_text()))
    runner = load_runner(config.runner)
    _apply_memory_limit(config)
    refusal: InfeasibleConfig | None = None
    try:
        result = runner.run(config)
    except InfeasibleConfig as exc:
        result, refusal = TrialResult("infeasible", reason=str(exc)), exc
    except Exception as exc:
        if not _is_oom(exc):
            raise
        result = TrialResult("infeasible", reason=f"out of memory: {str(exc).splitlines()[0][:300]}")
        _release_cuda_memory()
    if result.status == "infeasible":
        # A failure after CUDA was touched (OOM, failed graph capture) can leave the context
        # unusable; a warm launcher restarts this process then, and only then. A refusal raised
        # by a check (a knob pairing, a ratio: no exception behind it) is a decision and leaves
        # the process clean, so the warm models stay. (On a GPU every trial after the first has
        # touched CUDA, so each refusal restarted the process: on the H200 a refusal after one
        # took 12-14 s, a fresh interpreter and model, against 0.5 s for the first.)
        result.info["cuda_touched"] = _cuda_initialized() and (refusal is None or _wraps_failure(refusal))
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(result.to_json())
    tmp.replace(result_path)  # atomic: the tuner never reads half a result


def _wraps_failure(exc: BaseException) -> bool:
    """Was this refusal raised while handling another exception (`raise ... from exc`, or inside
    an `except`, even `from None`)? Then something failed and may have left state behind."""
    return exc.__cause__ is not None or exc.__context__ is not None


def _cuda_initialized() -> bool:
    return "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized()


def _release_cuda_memory() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def serve_forever() -> None:
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so whatever a
    # runner or a native library prints cannot corrupt the replies.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        run_one(Path(job["config"]), Path(job["result"]))
        protocol.write(json.dumps({"done": job["result"]}) + "\n")
        protocol.flush()


def main(argv: list[str]) -> int:
    _watch_parent()
    try:
        if argv == ["--serve"]:
            serve_forever()
        elif len(argv) == 2:
            run_one(Path(argv[0]), Path(argv[1]))
        else:
            print("usage: python -m runners.child CONFIG.json RESULT.json | --serve", file=sys.stderr)
            return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
