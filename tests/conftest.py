from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Child processes started by the tuner find `tests.fault_runner` through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with a fresh, empty working directory (default storage and outputs land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
