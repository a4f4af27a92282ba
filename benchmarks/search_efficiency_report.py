"""The output of `benchmarks/search_efficiency.py`: the Plotly figure of hypervolume against trials
and the Markdown tables for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any

BUDGET_SHARES = (0.05, 0.10, 0.15, 0.20)


def budget_points(g: dict[str, Any], share: float) -> int:
    return max(1, round(share * g["points"]))


def figure(all_results: dict[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(all_results)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[
        f"{n}: {all_results[n]['grid']['points']} points" for n in names])
    for col, name in enumerate(names, start=1):
        res = all_results[name]
        points = res["grid"]["points"]
        for sampler, row in res["samplers"].items():
            curve = row["median_curve"]
            x = [100 * (i + 1) / points for i in range(len(curve))]
            fig.add_trace(go.Scatter(x=x, y=curve, mode="lines", name=sampler, legendgroup=sampler,
                                     showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="trials, % of the grid", row=1, col=col)
        fig.update_yaxes(title_text="feasible hypervolume / grid's", range=[0, 1.02], row=1, col=col)
    fig.update_layout(title="Search efficiency: median over seeds (replayed grids)")
    return fig


def markdown(all_results: dict[str, Any]) -> str:
    lines = []
    for name, res in all_results.items():
        g = res["grid"]
        at10 = budget_points(g, 0.10)
        lines += [f"### Grid `{name}`: {g['points']} points, {g['feasible_points']} feasible; objectives "
                  f"{', '.join(g['objectives'])}; median over {res['seeds']} seeds", "",
                  f"`auto` chose `{res['auto_choice']['sampler']}` ({res['auto_choice']['why']}).", "",
                  *([f"An oracle reaches 95 % of the grid's hypervolume with {g['oracle_points_to_95']} of its points ("
                     + ("no sampler can in fewer trials" if g.get("oracle_exact") else "greedy's count: fewer points may do")
                     + f"; the 10 % budget is {at10}).", ""]
                    if g.get("oracle_points_to_95") else []),
                  "| sampler | " + " | ".join(f"HV at {s:.0%} ({budget_points(g, s)} trials)" for s in BUDGET_SHARES)
                  + " | trials to 95 % | worst-point reference: HV at 10 % / trials to 95 % "
                  "| infeasible trials in the first 10 % (mean) |", "|---" * (len(BUDGET_SHARES) + 4) + "|"]
        for sampler, row in res["samplers"].items():
            cells = [f"{100 * row['median_at'][f'{s:.0%}']:.1f} %" if f"{s:.0%}" in row["median_at"] else "—"
                     for s in BUDGET_SHARES]
            reach, wreach = row["trials_to_95"], row["worst_reference_trials_to_95"]
            lines.append(f"| {sampler} | " + " | ".join(cells) + f" | {reach or '> ' + str(res['trials'])} | "
                         f"{100 * row['worst_reference_at_10%']:.1f} % / {wreach or '> ' + str(res['trials'])} | "
                         f"{row['infeasible_at_10%']:.1f} of {at10} |")
        lines.append("")
        if "must_show" in res:
            m = res["must_show"]
            lines += [f"Must-show: `auto` reaches 95 % in {m['auto_trials_to_95'] or 'more than ' + str(res['trials'])} "
                      f"trials (limit {m['limit_10pct']}, 10 %): {'met' if m['auto_95_within_10pct'] else 'NOT met'}; "
                      f"beats random at every budget 5-20 %: {'met' if m['auto_beats_random_5_to_20pct'] else 'NOT met'}"
                      + (f" (not at {m['budgets_not_beaten']})" if m["budgets_not_beaten"] else "") + ".", ""]
        if "hidden" in res:
            lines += [f"Infeasible trials recorded as constraints (what the tuner does) vs hidden from the sampler "
                      f"(FAIL, no constraints), at 10 % of the grid ({at10} trials):", "",
                      "| sampler | median HV, constraints | median HV, hidden | infeasible trials, constraints "
                      "| infeasible trials, hidden |", "|---|---|---|---|---|"]
            for sampler, row in res["hidden"].items():
                lines.append(f"| {sampler} | {100 * row['with']:.1f} % | {100 * row['hidden']:.1f} % | "
                             f"{row['infeasible_with']:.1f} | {row['infeasible_hidden']:.1f} |")
            lines.append("")
        if "warm_start" in res:
            w = res["warm_start"]
            lines += [f"Warm start (`auto`, {w['seeds']} seeds): a cold study's median HV after 30 trials is "
                      f"{100 * w['cold_30_median']:.1f} %. Warm-started from an earlier 30-trial study:"]
            for mode in ("identical", "overlapping"):
                if mode not in w:
                    continue
                curve = w[mode]["median_curve"]
                reach = w[mode]["trials_to_cold_30"]
                lines.append(f"- {mode}: reaches it after {reach if reach else 'more than ' + str(len(curve))} of its own "
                             f"trials (median HV after 1 / 5 / 10: {100 * curve[0]:.1f} / {100 * curve[4]:.1f} / "
                             f"{100 * curve[-1]:.1f} %)" + (f"; earlier space narrowed to {w['narrowed_params']}"
                                                            if mode == "overlapping" else ""))
            lines.append("")
        for par in res.get("parallel", []):
            need = par["four_workers_trials"]
            lines.append(f"Parallel (`{par['sampler']}`, {par['seeds']} seeds): 1 worker reaches a median "
                         f"{100 * par['one_worker_median']:.1f} % in {par['one_worker_trials']} trials; 4 simulated "
                         f"workers need {need if need else 'more than ' + str(len(par['median_curve_4']))} trials"
                         + (f" ({par['ratio']:.2f}x)" if par["ratio"] else "") + ".")
        lines.append("")
    return "\n".join(lines)
