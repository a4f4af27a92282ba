"""One trial in detail: its outcome, metrics against ceilings and the reference, evidence
(latency distribution, resource timeline), config and environment."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from reports import figures as figs
from reports import frames as fr
from runners.contract import METRICS
from tuner import record
from tuner.space import Objective
from ui.data import artifact, draw, fmt, trial_attrs

QUALITY = ("kl_divergence", "top1_agreement", "perplexity")
EFFICIENCY = ("mbu", "mfu", "mean_power_w", "energy_j_per_tok")
LATENCY = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "latency_p50_ms", "latency_p99_ms")


def trial_label(frame: pd.DataFrame) -> dict[int, str]:
    labels = {}
    for row in frame.itertuples():
        tags = [row.category] + (["baseline"] if row.baseline else [])
        labels[int(row.number)] = f"#{row.number} · {', '.join(tags)}"
    return labels

def metric_table(metrics: dict[str, float], unavailable: dict[str, str]) -> pd.DataFrame:
    rows = []
    for name in METRICS:
        if name.endswith(("_ci_low", "_ci_high")):
            continue
        if name in metrics:
            ci = (metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high"))
            ci_text = "" if ci == (None, None) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"
            rows.append({"metric": name, "value": fmt(float(metrics[name])), "unit": METRICS[name][0],
                         "95% CI": ci_text, "note": ""})
        elif name in unavailable:
            rows.append({"metric": name, "value": "—", "unit": METRICS[name][0], "95% CI": "", "note": unavailable[name]})
    return pd.DataFrame(rows)

def with_unit(name: str, value: float) -> str:
    unit = METRICS.get(name, ("", ""))[0]
    if unit == "ratio":  # MBU, MFU, top-1 agreement read best as percentages
        return f"{value * 100:.3g} %"
    return f"{fmt(value)} {unit}".strip()

def metric_tiles(metrics: dict[str, float], names: list[str]) -> None:
    present = [n for n in names if n in metrics]
    for start in range(0, len(present), 4):
        for col, n in zip(st.columns(4), present[start:start + 4], strict=False):
            col.metric(n, with_unit(n, float(metrics[n])))

def outcome_banner(data: dict[str, Any], row: pd.Series) -> None:
    attrs = data["user_attrs"]
    if data["state"] == "RUNNING":
        owner = record.OWNER.get(attrs) or {}
        st.info(f"Running on {owner.get('host', '?')} (pid {owner.get('pid', '?')}) since {row['datetime_start']}.")
    elif data["state"] == "FAIL":
        st.error(f"Failed: {row['reason'] or 'no reason recorded'}")
        if record.STDERR_TAIL.get(attrs):
            st.code(record.STDERR_TAIL.get(attrs), language="text")
    elif row["category"] == fr.INFEASIBLE:
        st.warning(f"Infeasible: {row['reason']}")
    for note in (row.get("overloaded"), row.get("stopped_early")):
        if isinstance(note, str) and note:  # the window fell behind its load, or was cut short
            st.warning(note[0].upper() + note[1:])

def trial_detail(url: str, name: str, frame: pd.DataFrame, objs: list[Objective]) -> None:
    labels = trial_label(frame)
    if not labels:
        st.info("No trial matches the filters.")
        return
    if st.session_state.get("trial") not in labels:
        st.session_state["trial"] = int(next(iter(frame.loc[frame["pareto"].astype(bool), "number"]), next(iter(labels))))
    number = st.selectbox("Trial", list(labels), format_func=labels.get, key="trial")
    data = trial_attrs(url, name, int(number))
    row = frame[frame["number"] == number].iloc[0]
    attrs = data["user_attrs"]
    st.subheader(f"Trial #{number}")
    outcome_banner(data, row)
    metrics = record.metrics(attrs)
    if metrics:
        metric_tiles(metrics, [o.metric for o in objs] + [m for m in LATENCY if m not in [o.metric for o in objs]])
        st.markdown("**Efficiency vs measured ceilings**")
        metric_tiles(metrics, list(EFFICIENCY))
        ceilings = ((record.INFO.get(attrs) or {}).get("serving") or {}).get("ceilings")
        if ceilings:
            st.caption("ceilings: " + ", ".join(f"{k} {fmt(v)}" for k, v in ceilings.items()))
        st.markdown("**Quality vs the unoptimised reference**")
        metric_tiles(metrics, list(QUALITY))
        with st.expander("All metrics (and why some are absent)"):
            st.dataframe(metric_table(metrics, record.UNAVAILABLE.get(attrs) or {}), hide_index=True)
    trial_evidence(url, name, [int(number)])
    left, right = st.columns(2)
    with left.expander("Resolved config", expanded=False):
        st.json(record.CONFIG.get(attrs) or data["params"])
    with right.expander("Environment and worker", expanded=False):
        st.json({"environment": record.ENVIRONMENT.get(attrs), "owner": record.OWNER.get(attrs),
                 "constraints": data["constraints"], "artifact_dir": record.ARTIFACT_DIR.get(attrs)})
    if data["state"] != "FAIL" and record.STDERR_TAIL.get(attrs):
        with st.expander("stderr tail"):
            st.code(record.STDERR_TAIL.get(attrs), language="text")

def trial_evidence(url: str, name: str, numbers: list[int]) -> None:
    requests = artifact(url, name, tuple(numbers), "requests")
    kind = st.radio("Latency view", ["CDF", "histogram"], horizontal=True, key=f"latency_kind_{len(numbers) > 1}")
    draw(figs.latency_figure, requests, "cdf" if kind == "CDF" else "hist", key=f"latency_{numbers}")
    draw(figs.timeline_figure, artifact(url, name, tuple(numbers), "timeline"), key=f"timeline_{numbers}")
