"""Reports: pandas frames, Pareto sets and Plotly figures read from Optuna storage.

Reads results only; never writes to a study.
"""

from __future__ import annotations

from reports.frames import pareto_frame, trials_frame

__all__ = ["pareto_frame", "trials_frame"]
