"""`autoglm-tune regress`: the command line, its exit codes and its reports (Markdown, JUnit XML).

    autoglm-tune regress --init --study NAME [--storage URL] [--top K] --out baseline.yaml
    autoglm-tune regress --baseline baseline.yaml [--repeats R] [--device D] [--out DIR]
                         [--history FILE] [--update-baseline] [--from DIR] [--warm]

Exit 0: no regression; 1: a regression (or a config that no longer runs); 2: usage error,
naming the file and key (also `--init` on a study with no feasible trial); 3: host drift: the
control moved beyond its tolerance, so the other configs' flags say nothing about the code and
are not judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

import tuner.regress.rule as rr
from tuner.errors import UsageError
from tuner.regress.baseline import (
    Baseline,
    broken_references,
    init_baseline,
    load_baseline,
    updated_baseline,
    write_baseline,
)
from tuner.regress.measure import device_used, evaluate, load_measurements, mark_host_drift, measure

DEFAULT_OUT = Path("runs/regress")
EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_HOST_DRIFT = 0, 1, 2, 3


def parser() -> argparse.ArgumentParser:
    from tuner.cli import Parser

    p = Parser(prog="autoglm-tune regress", description="Re-measure a baseline's configs; exit 1 on a regression.")
    p.add_argument("--baseline", help="baseline file (YAML or JSON) to check")
    p.add_argument("--repeats", type=int, help="measurements per config (default: the file's, else 3)")
    p.add_argument("--device", help="override every config's device: auto | cpu | cuda | cuda:K")
    p.add_argument("--out", help="output folder (default runs/regress); with --init: the baseline file to write")
    p.add_argument("--history", help="history file, .csv or .parquet (default OUT/history.csv)")
    p.add_argument("--update-baseline", action="store_true", help="accept tonight's numbers as the new references")
    p.add_argument("--from", dest="from_dir",
                   help="judge a previous run's measurements (its --out folder) instead of measuring")
    p.add_argument("--consecutive", type=int, help="flagged nights in a row before a regression (overrides the file)")
    p.add_argument("--warm", action="store_true", help="one runner process for all repeats (as the tuner's --warm)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--init", action="store_true", help="write a baseline file from a study's Pareto set")
    p.add_argument("--study", help="with --init: the study")
    p.add_argument("--storage", help="with --init: storage URL (default runs/optuna.journal)")
    p.add_argument("--top", type=int, default=5, help="with --init: Pareto trials to keep (default 5)")
    return p

def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.init:
        return _init_main(args)
    if not args.baseline:
        raise UsageError("regress needs --baseline FILE (or --init --study NAME --out FILE)")
    path = Path(args.baseline)
    if not path.exists():
        raise UsageError(f"--baseline {path}: no such file")
    baseline = load_baseline(path)
    if args.consecutive is not None:
        if args.consecutive < 1:
            raise UsageError("--consecutive must be >= 1")
        baseline.rule = dataclasses.replace(baseline.rule, consecutive=args.consecutive)
    repeats = args.repeats if args.repeats is not None else baseline.repeats
    if repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if args.device and not (args.device in ("auto", "cpu", "cuda")
                            or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise UsageError(f"--device {args.device}: must be auto, cpu, cuda or cuda:K")
    out = Path(args.out) if args.out else DEFAULT_OUT
    measured = load_measurements(Path(args.from_dir), baseline) if args.from_dir else None
    return _check(baseline, args, repeats, out, measured)

def _check(baseline: Baseline, args: argparse.Namespace, repeats: int, out: Path,
           measured: pd.DataFrame | None) -> int:
    night = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    out.mkdir(parents=True, exist_ok=True)
    if measured is None:
        measured = measure(baseline, repeats, args.device, out, args.warm, args.quiet)
    measured.to_csv(out / "measurements.csv", index=False)
    history_path = Path(args.history) if args.history else out / "history.csv"
    history = rr.read_history(history_path)
    checks = mark_host_drift(baseline, evaluate(baseline, measured, history))
    device = device_used(baseline, measured, args.device)
    kept: list[str] = []
    if args.update_baseline:
        data, kept = updated_baseline(baseline, checks, measured, night)
        write_baseline(data, baseline.path)
    checks["night"], checks["baseline"], checks["device"] = night, str(baseline.path), device
    checks["accepted"] = checks["verdict"].isin(("ok", "improved", "new")) | (
        args.update_baseline & ~checks["config"].isin(kept))
    rr.append_history(history_path, checks)
    return _report(baseline, checks, out, history_path, repeats, kept, args.update_baseline, args.quiet)

def _report(baseline: Baseline, checks: pd.DataFrame, out: Path, history_path: Path, repeats: int,
            kept: list[str], updated: bool, quiet: bool) -> int:
    regressions = checks[checks["verdict"] == "regression"]
    drifted = checks[checks["verdict"] == rr.HOST_DRIFT]
    header = {"baseline": str(baseline.path), "night (UTC)": checks["night"].iloc[0],
              "device": checks["device"].iloc[0],
              "repeats": repeats, "rule": _rule_text(baseline.rule), "history": str(history_path)}
    header.update(_control_drift(baseline, checks))
    if updated:
        header["baseline updated"] = ("all configs" if not kept
                                      else f"all but {', '.join(kept)} (not measured on every repeat)")
    markdown = markdown_summary(checks, header)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    (out / "junit.xml").write_text(junit_xml(checks), encoding="utf-8")
    checks.to_csv(out / "checks.csv", index=False)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(markdown)
    if not quiet:
        print(markdown)
    drift_text = f", {len(drifted)} flag(s) set aside as host drift (exit 3)" if len(drifted) else ""
    print(f"autoglm-tune regress: {len(regressions)} regression(s) in {len(checks)} checks{drift_text}; "
          f"wrote {out / 'summary.md'}, {out / 'junit.xml'}; history {history_path}", file=sys.stderr)
    if updated:
        return EXIT_REGRESSION if kept else EXIT_OK
    if len(regressions):
        return EXIT_REGRESSION
    return EXIT_HOST_DRIFT if len(drifted) else EXIT_OK

def _rule_text(rule: rr.Rule) -> str:
    return (f"worse than tolerance and (Mann-Whitney p <= {rule.alpha:g} | robust z >= {rule.z_threshold:g} over "
            f"<= {rule.history_window} accepted nights, from {rule.min_history}); "
            f"{rule.consecutive} flagged night(s) in a row")

def _control_drift(baseline: Baseline, checks: pd.DataFrame) -> dict[str, str]:
    """The control's now/reference ratios: machine (or common-stack) drift, seen by every config."""
    control = next((e for e in baseline.entries if e.control), None)
    if control is None:
        return {}
    rows = checks[(checks["config"] == control.name) & (checks["metric"] != rr.MEASURED)]
    ratios = [f"{r.metric} ×{r.ratio:.3f}" for r in rows.itertuples() if rr.present(r.ratio)]
    return {f"control {control.name}": ", ".join(ratios) or "no ratio (no reference or not measured)"}

def _init_main(args: argparse.Namespace) -> int:
    if not args.study or not args.out:
        raise UsageError("regress --init needs --study NAME and --out FILE (.yaml or .json)")
    if args.top < 1:
        raise UsageError("--top must be >= 1")
    path = Path(args.out)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UsageError(f"--out {path}: the baseline file must end in .yaml, .yml or .json")
    data = init_baseline(args.study, args.storage, args.top)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_baseline(data, path)
    for broken in broken_references(data):
        print(f"autoglm-tune regress: warning: reference {broken} already breaks its bound; that config "
              f"will be flagged every night (drop it from {path} or relax the bound)", file=sys.stderr)
    print(f"wrote {path}: {len(data['configs'])} config(s), watching {', '.join(data['metrics'])}; "
          f"check with: autoglm-tune regress --baseline {path}")
    return 0


# ---------------------------------------------------------------- Markdown and JUnit XML


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)

def _icon(verdict: str) -> str:
    return {"regression": "❌ regression", "suspect": "⚠️ suspect", "improved": "✅ improved",
            "new": "🆕 new", "ok": "✅ ok", rr.HOST_DRIFT: "🌡️ host drift"}.get(verdict, verdict)

def markdown_summary(checks: pd.DataFrame, header: dict[str, Any]) -> str:
    """A table per run: metric, reference, now (median of repeats), ratio, verdict."""
    regressions = checks[checks["verdict"] == "regression"]
    drifted = checks[checks["verdict"] == rr.HOST_DRIFT]
    title = f"{len(regressions)} regression(s)" if len(regressions) else "no regression"
    if len(drifted):
        title += f"; host drift: {len(drifted)} flag(s) not judged (the control moved)"
    lines = [f"# autoglm-tune regress: {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| config | metric | reference | now | ratio | vs history | p | z | verdict | why |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in checks.itertuples(index=False):
        vs_history = (r.now / r.history_median if rr.present(r.history_median) and r.history_median and rr.present(r.now)
                      else None)
        lines.append(f"| {r.config} | {r.metric} | {_fmt(r.reference)} | {_fmt(r.now)} | {_fmt(r.ratio, '.3f')} | "
                     f"{_fmt(vs_history, '.3f')} | {_fmt(r.p_value, '.3g')} | {_fmt(r.z, '.2f')} | "
                     f"{_icon(r.verdict)} | {r.reason} |")
    return "\n".join(lines) + "\n"

def junit_xml(checks: pd.DataFrame, suite: str = "autoglm-tune regress") -> str:
    """One testcase per config x metric; a regression is a <failure>, host drift <skipped>, a suspect a note."""
    failures = int((checks["verdict"] == "regression").sum())
    root = ET.Element("testsuites", name=suite, tests=str(len(checks)), failures=str(failures))
    for config, rows in checks.groupby("config", sort=False):
        bad = int((rows["verdict"] == "regression").sum())
        skipped = int((rows["verdict"] == rr.HOST_DRIFT).sum())
        ts = ET.SubElement(root, "testsuite", name=str(config), tests=str(len(rows)), failures=str(bad),
                           errors="0", skipped=str(skipped))
        for r in rows.itertuples(index=False):
            case = ET.SubElement(ts, "testcase", classname=f"regress.{config}", name=str(r.metric), time="0")
            if r.metric == rr.MEASURED:
                detail = f"{_fmt(r.now)} of {_fmt(r.reference)} repeats measured. {r.reason}"
            else:
                detail = (f"reference {_fmt(r.reference)}, now {_fmt(r.now)} (repeats {r.repeats}), ratio "
                          f"{_fmt(r.ratio, '.3f')}, p {_fmt(r.p_value, '.3g')}, z {_fmt(r.z, '.2f')}: {r.reason}")
            if r.verdict == "regression":
                ET.SubElement(case, "failure", message=f"{r.metric} regressed: {r.reason}",
                              type="PerformanceRegression").text = detail
            elif r.verdict == rr.HOST_DRIFT:  # not judged: the host, not the code, moved
                ET.SubElement(case, "skipped", message=f"{r.metric}: {r.reason}").text = detail
            else:
                ET.SubElement(case, "system-out").text = f"{r.verdict}: {detail}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
