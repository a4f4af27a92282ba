"""Reports: pandas frames, Pareto sets and Plotly figures read from Optuna storage.

Reads results only; never writes to a study. `frames` turns a study into DataFrames (CSV and
Parquet round-trip), `figures` holds one function per Plotly figure (shared by `app.py` and
`report.html`), `html` writes the self-contained report, `cli` is `autoglm-tune report`,
`dashboard` is `autoglm-tune dashboard`.
"""

from __future__ import annotations

from reports.frames import pareto_frame, read_table, trials_frame, write_table

__all__ = ["pareto_frame", "read_table", "trials_frame", "write_table"]
