"""Several workers on one study: the claim lock, the heartbeat, GPU pinning, one process per GPU.

Optuna does the distributed bookkeeping (storages, heartbeats, `fail_stale_trials`,
`RetryHeartbeatStaleTrialCallback`); this module adds only what an ask/tell loop with a global
budget needs on top of it:
- `ClaimLock`: "count the budget, then ask" is one atomic step across all workers. Without it,
  two workers that both see N-1 counted trials both ask, and a study of N trials runs N+1.
- `Heartbeat`: Optuna records heartbeats only inside `Study.optimize`; our loop launches the
  runner itself, so it beats the same way while the runner works.
- `run_on_gpus`: one forked worker per GPU, each pinned with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import optuna
from optuna.storages import JournalStorage, RDBStorage

from tuner.errors import UsageError
from tuner.storage import TrialHandle, heartbeat_interval, journal_path, sqlite_path, storage_kind

_GPU_TOKEN = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")


# ---------------------------------------------------------------- the claim lock


class ClaimLock:
    """Serialises the claim step (recover stale trials, count, ask) of all workers of a study.

    PostgreSQL: a transaction-scoped advisory lock, so it is shared by every host and released
    by the server if the worker dies holding it. Journal/SQLite: `flock` on a file beside the
    storage, released by the kernel if the process dies.
    """

    def __init__(self, storage_url: str, storage: optuna.storages.BaseStorage, study: str) -> None:
        self._study = study
        self._engine = storage.engine if isinstance(storage, RDBStorage) else None
        self._path = _lock_file(storage_url, storage)
        self._release: Callable[[], None] | None = None

    def __enter__(self) -> ClaimLock:
        if self._engine is not None and self._engine.dialect.name == "postgresql":
            self._release = self._lock_postgres()
        elif self._path is not None:
            self._release = self._lock_file()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _lock_postgres(self) -> Callable[[], None]:
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(f"autoglm-tune claim {self._study}".encode()).digest()[:8],
                             "big", signed=True)
        conn = self._engine.connect()
        txn = conn.begin()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

        def release() -> None:
            txn.commit()  # ends the transaction, which releases the lock
            conn.close()

        return release

    def _lock_file(self) -> Callable[[], None]:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)

        def release() -> None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        return release


def _lock_file(storage_url: str, storage: optuna.storages.BaseStorage) -> Path | None:
    # Not the journal's own `<file>.lock`: Optuna's open-lock creates and deletes that one.
    kind = storage_kind(storage_url)
    if kind == "journal" and isinstance(storage, JournalStorage):
        return Path(f"{journal_path(storage_url)}.claims.lock")
    if kind == "sqlite":
        path = sqlite_path(storage_url)
        return Path(f"{path}.claims.lock") if path is not None else None
    return None


# ---------------------------------------------------------------- the heartbeat


class Heartbeat:
    """Records the trial's heartbeat every interval while the runner works (heartbeat storages only).

    What `Study.optimize` does with its heartbeat thread; a worker killed mid-trial stops
    beating, and after the grace period the next claim of any worker fails the trial and
    `RetryHeartbeatStaleTrialCallback` queues it again.
    """

    def __init__(self, trial: TrialHandle) -> None:
        self._trial = trial
        self._interval = heartbeat_interval(trial.storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._interval:
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self._trial.trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._trial.record_heartbeat()
            except Exception:  # noqa: BLE001 - a database blip must not end the trial;
                pass  # a long outage makes it stale, and it is retried elsewhere


# ---------------------------------------------------------------- GPUs


def parse_gpus(text: str) -> list[str]:
    """`0,1,3` (or GPU UUIDs) -> ['0', '1', '3']; bad or repeated ids are a usage error."""
    gpus = [g.strip() for g in text.split(",")]
    for gpu in gpus:
        if not _GPU_TOKEN.match(gpu):
            raise UsageError(f"--gpus {text}: {gpu!r} is not a GPU index or UUID (e.g. --gpus 0,1)")
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {text}: each GPU once")
    return gpus


def physical_gpu(device: str, visible: str | None) -> str | None:
    """The host's id of the GPU that `device` selects under CUDA_VISIBLE_DEVICES, None on CPU.

    `auto` counts as `cuda` where an NVIDIA device node exists (the tuner never imports torch;
    each trial's `environment` records what the runner really used).
    """
    if device == "cpu" or (device == "auto" and not Path("/dev/nvidiactl").exists()):
        return None
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if visible is None:
        return str(index)
    tokens = [t.strip() for t in visible.split(",") if t.strip()]
    return tokens[index] if index < len(tokens) else None


def worker_identity(device: str) -> dict[str, Any]:
    """What a trial records about where it ran, beside the owner host/pid (filterable)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"device": device, "gpu": physical_gpu(device, visible), "cuda_visible_devices": visible}


class PrefixedStream:
    """Prefixes each line, so the progress of several GPU workers in one terminal stays readable."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
        self._line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self._prefix if self._line_start else "") + piece)
            self._line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def run_on_gpus(gpus: list[str], work: Callable[[str], int]) -> int:
    """Run `work(gpu)` in one forked process per GPU, each pinned to its GPU; combined exit code.

    Forked, not spawned: a worker is this same program (including runners registered in it).
    The tuner never initialises CUDA, so forking is safe; the runner children it starts inherit
    the pinned CUDA_VISIBLE_DEVICES.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_pinned, args=(work, gpu), name=f"autoglm-tune gpu {gpu}") for gpu in gpus]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        # Ctrl-C reached the whole process group: each worker hands its trial back, then exits.
        for proc in procs:
            proc.join()
        raise
    codes = [proc.exitcode for proc in procs]
    if all(code == 0 for code in codes):
        return 0
    return 2 if 2 in codes else 1


def _pinned(work: Callable[[str], int], gpu: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    sys.exit(work(gpu))
