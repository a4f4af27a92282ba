"""Where a running trial is, as JSON lines the tuner can poll: `<artifact_dir>/progress.jsonl`.

The trial runs in a child process, so progress crosses the process boundary as plain data:
one line per phase change (`{"t": ..., "phase": "build"}`) and, while the window is measured,
throttled request counts (`{"t": ..., "done": 12, "total": 64}`). No torch, no Optuna: a
runner calls `start(config.artifact_dir)` once, then `report_phase` / `report_requests`.
Nothing here may ever fail a trial, so write errors are swallowed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PROGRESS_FILE = "progress.jsonl"
PHASES = ("build", "compile", "quality", "measure")
# Request counts are written at most this often (the window can finish thousands of requests).
MIN_INTERVAL_S = 0.2

_path: Path | None = None
_last_requests_t = 0.0


def start(artifact_dir: str | Path | None) -> None:
    """Begin a fresh progress file for this trial (a warm process runs many trials)."""
    global _path, _last_requests_t
    _last_requests_t = 0.0
    _path = Path(artifact_dir) / PROGRESS_FILE if artifact_dir else None
    if _path is not None:
        try:
            _path.write_text("")
        except OSError:
            _path = None


def _write(record: dict[str, object]) -> None:
    if _path is None:
        return
    try:
        with _path.open("a") as handle:
            handle.write(json.dumps({"t": time.time(), **record}) + "\n")
    except OSError:
        pass


def report_phase(phase: str) -> None:
    """The trial entered `phase` (one of PHASES)."""
    _write({"phase": phase})


def report_requests(done: int, total: int) -> None:
    """`done` of `total` measured requests are finished; throttled except for the last."""
    global _last_requests_t
    now = time.monotonic()
    if done < total and now - _last_requests_t < MIN_INTERVAL_S:
        return
    _last_requests_t = now
    _write({"done": int(done), "total": int(total)})
