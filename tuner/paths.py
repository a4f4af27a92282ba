"""Output folders: checked up front (before anything is created) and kept inside `--out`.

A study name becomes a folder name (`runs/<study>/`), so it is validated as a name (see
`tuner.space.study_name_problem`); every artifact path is then resolved and checked to lie
under its output folder, so no name, symlink or `..` can write elsewhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tuner.errors import UsageError

RUNS_DIR = Path("runs")
NAME_MAX_BYTES = 255  # longest file name on common Linux filesystems


def default_out(study: str, *parts: str) -> Path:
    """`runs/<study>/...` for a validated study name, checked to stay under `runs/`."""
    return inside(RUNS_DIR, study, *parts)


def inside(base: Path, *parts: str) -> Path:
    """`base/parts...`, refused unless it resolves to a path under `base` itself."""
    path = base.joinpath(*parts)
    root = base.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UsageError(f"{path}: resolves to {resolved}, outside {root}")
    return path


def out_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a writable folder, or None; creates nothing."""
    text = str(path)
    if not text or "\x00" in text:
        return "not a usable path"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES for part in path.parts):
        return f"a path component is longer than {NAME_MAX_BYTES} bytes"
    existing = path
    while True:
        try:
            mode = existing.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if existing.parent == existing:
                return "no existing parent folder"
            existing = existing.parent
        except OSError as exc:
            return f"cannot be used ({exc.strerror})"
    if not stat.S_ISDIR(mode):
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    problem = out_dir_problem(path)
    if problem:
        raise UsageError(f"{flag} {path}: {problem}")
    return path
