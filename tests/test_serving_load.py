"""benchmarks/serving_load.py: the analytic ceiling against a hand computation, configs this
build cannot take, and a --quick run on CPU end to end (curve, capacity, CSV, Markdown)."""

from __future__ import annotations

import csv

import pytest

from benchmarks.serving_load import analytic_ceiling, main, unknown_knobs


def test_analytic_ceiling_is_prefill_flops_plus_decode_bytes():
    shape = {"linear_params": 1e9, "params": 1.2e9, "layers": 10.0, "heads": 8.0, "kv_heads": 2.0, "head_dim": 64.0}
    workload = {"prompt_tokens": 100, "output_tokens": 10}
    c = analytic_ceiling(shape, workload, matmul_flops_per_s=1e14, copy_bytes_per_s=1e12, batch=4, samples=10)
    prefill_flops = 2 * 1e9 * 100 + 2 * 10 * 8 * 64 * 100**2
    kv_per_token = 2 * 10 * 2 * 64 * 2  # K and V, layers, kv heads, head_dim, bf16
    decode_bytes = 10 * 1.2e9 * 2 / 4 + kv_per_token * (10 * 100 + 45)  # contexts 100..109
    assert c["prefill_ms"] == pytest.approx(prefill_flops / 1e14 * 1e3)
    assert c["decode_ms"] == pytest.approx(decode_bytes / 1e12 * 1e3)
    assert c["ceiling_rps"] == pytest.approx(1 / (prefill_flops / 1e14 + decode_bytes / 1e12))


def test_configs_this_build_cannot_take_say_why():
    assert "['warp_drive'] not in this build" in unknown_knobs({"batch_size": 8, "warp_drive": True})
    assert unknown_knobs({"kv_cache": "telepathic"}).startswith("kv_cache: must be one of")
    assert unknown_knobs({"batch_size": 8, "kv_cache": "static"}) == ""


@pytest.mark.slow
def test_quick_run_writes_curve_capacity_and_summary(tmp_path):
    args = ["--quick", "--configs", "fast_dynamic,hf", "--rates", "8", "--capacity-range", "1,16", "--tolerance", "0.5",
            "--max-duration-s", "6"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    capacity = list(csv.DictReader((tmp_path / "capacity.csv").open()))
    assert [r["config"] for r in capacity] == ["hf", "fast_dynamic"]  # in the table's order
    for row in capacity:  # measured, or a reason; never an empty row
        assert row["status"] == "ok" or row["status"].startswith(("no capacity: ", "infeasible: ")), row
        assert float(row["ceiling_rps"]) > 0
    fast = capacity[1]
    assert fast["status"] == "ok" or fast["status"].startswith("no capacity"), fast
    # The search probes the top of the range first: met there (a quiet machine) it is done in one
    # probe; otherwise it bisects, so a capacity below the top took at least two.
    assert int(fast["probes"]) >= 1
    if fast["status"] == "ok" and float(fast["capacity_rps"]) < 16:
        assert int(fast["probes"]) >= 2
    curve = list(csv.DictReader((tmp_path / "curve.csv").open()))
    point = next(r for r in curve if r["config"] == "fast_dynamic")
    assert float(point["rate_rps"]) == 8.0 and float(point["measured_requests"]) > 0
    text = (tmp_path / "summary.md").read_text()
    assert "## Capacity at the SLO" in text and "| fast_dynamic | chat |" in text and "ceiling_rps" in text
