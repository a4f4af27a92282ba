"""Trackers read known quantities: NVML parsing and units (fake module at the boundary, and real
NVML on a GPU), sleeps, allocations, cached ceilings, MBU/MFU arithmetic, the LoadGen window."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from runners.measure import ceilings as ceilings_mod
from runners.measure.ceilings import Ceilings, get_ceilings
from runners.measure.monitor import ResourceSampler
from runners.measure.nvml import NvmlReader, summarize
from runners.scheduler import RealClock
from runners.serving import roofline, serve
from runners.stats import ci_relative_width, request_latencies_ms

MIB = 1024 * 1024


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Just enough of pynvml: a board drawing `watts` steadily, the energy counter in mJ that
    integrates it, and `missing` API names that raise NotSupported like a MIG slice."""

    NVMLError = FakeNVMLError
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_POWER_INSTANT = 186

    def __init__(self, watts: float = 250.0, process_bytes: int | None = 3 * 1024 * MIB,
                 pids: tuple[int, ...] | None = None, missing: tuple[str, ...] = (),
                 init_error: str = "") -> None:
        self.watts = watts
        self.process_bytes = process_bytes
        self.pids = (os.getpid(),) if pids is None else pids
        self.missing = set(missing)
        self.init_error = init_error
        self.t0 = time.perf_counter()
        self.shutdowns = 0

    def _check(self, name: str) -> None:
        if name in self.missing:
            raise FakeNVMLError("Not Supported")

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        self._check("memory")
        return SimpleNamespace(total=80 * 1024 * MIB, used=5 * 1024 * MIB, free=75 * 1024 * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        self._check("processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=self.process_bytes) for pid in self.pids]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._check("power")
        return int(self.watts * 1000)  # mW

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[SimpleNamespace]:
        self._check("fields")
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=int(self.watts * 1000)))]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self._check("energy")
        return int(1e9 + self.watts * (time.perf_counter() - self.t0) * 1000)  # mJ since "boot"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        self._check("utilization")
        return SimpleNamespace(gpu=97, memory=41)

    def nvmlDeviceGetClockInfo(self, handle: str, kind: int) -> int:
        return 1980 if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 54


# --- NVML reader: parsing and units --------------------------------------------------------

def test_reader_converts_units():
    row = NvmlReader.open(FakeNvml(watts=312.5), index=0).read()
    assert row["power_w"] == pytest.approx(312.5)  # mW -> W
    assert row["power_instant_w"] == pytest.approx(312.5)
    assert row["energy_j"] >= 1e6  # mJ -> J: 1e9 mJ is 1e6 J
    assert row["energy_j"] < 1e6 + 1e4
    assert row["process_used_mib"] == pytest.approx(3072.0)  # bytes -> MiB
    assert row["gpu_used_mib"] == pytest.approx(5120.0)
    assert (row["sm_util_pct"], row["mem_util_pct"]) == (97.0, 41.0)
    assert (row["sm_clock_mhz"], row["mem_clock_mhz"], row["temperature_c"]) == (1980.0, 2619.0, 54.0)


def test_unsupported_fields_drop_out_with_reason_and_are_not_asked_again():
    nvml = FakeNvml(missing=("power", "fields", "energy", "utilization"))
    reader = NvmlReader.open(nvml, index=0)
    rows = [reader.read(), reader.read()]
    for row in rows:
        assert not {"power_w", "power_instant_w", "energy_j", "sm_util_pct"} & set(row)
        assert "process_used_mib" in row
    assert "Not Supported" in reader.unavailable["power_w"]
    assert "Not Supported" in reader.unavailable["energy_j"]
    nvml.missing.clear()  # a field that failed once stays out
    assert "power_w" not in reader.read()


def _timeline(reader: NvmlReader, n: int, dt: float) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"t_s": i * dt, **reader.read()})
        time.sleep(dt)
    return rows


def test_summary_absent_metrics_never_zero():
    reader = NvmlReader.open(FakeNvml(missing=("power", "fields", "energy", "processes")), index=0)
    metrics, missing, _ = summarize(_timeline(reader, 3, 0.01), tokens=100, unavailable=reader.unavailable)
    assert not {"peak_memory_mib", "mean_power_w", "energy_j_per_tok"} & set(metrics)
    assert "Not Supported" in missing["peak_memory_mib"]
    assert "Not Supported" in missing["mean_power_w"]
    assert "Not Supported" in missing["energy_j_per_tok"]


def test_summary_energy_counter_and_power_integral_agree():
    reader = NvmlReader.open(FakeNvml(watts=200.0), index=0)
    samples = []
    t0 = time.perf_counter()
    for _ in range(12):  # real time stamps: the fake counter integrates real time too
        samples.append({"t_s": time.perf_counter() - t0, **reader.read()})
        time.sleep(0.02)
    metrics, missing, info = summarize(samples, tokens=50, unavailable=reader.unavailable)
    assert metrics["mean_power_w"] == pytest.approx(200.0)
    duration = samples[-1]["t_s"] - samples[0]["t_s"]
    assert metrics["energy_j_per_tok"] == pytest.approx(200.0 * duration / 50, rel=0.05)
    assert info["energy_counter_vs_integral"] == pytest.approx(1.0, abs=0.05)
    assert info["energy_source"] == "counter"
    assert metrics["peak_memory_mib"] == pytest.approx(3072.0)


def test_energy_falls_back_to_power_integral_without_counter():
    reader = NvmlReader.open(FakeNvml(watts=100.0, missing=("energy",)), index=0)
    metrics, _, info = summarize(_timeline(reader, 5, 0.01), tokens=10, unavailable=reader.unavailable)
    assert metrics["energy_j_per_tok"] == pytest.approx(100.0 * 0.04 / 10)
    assert info["energy_source"].endswith("integral")


def test_process_memory_pid_namespace():
    lone = NvmlReader.open(FakeNvml(pids=(424242,)), index=0)
    assert lone.read()["process_used_mib"] == pytest.approx(3072.0)
    assert "PID namespace" in lone.notes["process_used_mib"]
    crowded = NvmlReader.open(FakeNvml(pids=(424242, 424243)), index=0)
    assert "process_used_mib" not in crowded.read()
    assert "more than one process" in crowded.unavailable["process_used_mib"]
    hidden = NvmlReader.open(FakeNvml(process_bytes=None), index=0)  # pynvml's N/A
    assert "process_used_mib" not in hidden.read()
    assert "N/A" in hidden.unavailable["process_used_mib"]


# --- ResourceSampler with the fake NVML ----------------------------------------------------

def test_sampler_with_fake_nvml_builds_timeline_and_metrics():
    nvml = FakeNvml(watts=250.0)
    with ResourceSampler("cpu", interval_s=0.02, nvml=nvml) as sampler:
        time.sleep(0.3)
    metrics, missing = sampler.summary(tokens=100)
    assert len(sampler.samples) >= 10
    assert {"t_s", "rss_mib", "power_w", "energy_j", "process_used_mib"} <= set(sampler.samples[0])
    assert metrics["mean_power_w"] == pytest.approx(250.0)
    window_s = sampler.samples[-1]["t_s"] - sampler.samples[0]["t_s"]
    assert window_s == pytest.approx(0.3, abs=0.1)
    assert metrics["energy_j_per_tok"] == pytest.approx(250.0 * window_s / 100, rel=0.05)
    assert metrics["peak_memory_mib"] == pytest.approx(3072.0)
    assert nvml.shutdowns == 1
    assert "torch_peak_reserved_mib" in missing  # no CUDA allocator on CPU


def test_sampler_when_nvml_cannot_start():
    with ResourceSampler("cpu", interval_s=0.02, nvml=FakeNvml(init_error="Driver Not Loaded")) as sampler:
        time.sleep(0.05)
    metrics, missing = sampler.summary(tokens=10)
    assert "mean_power_w" not in metrics and "energy_j_per_tok" not in metrics
    assert "Driver Not Loaded" in missing["mean_power_w"]


def test_cpu_sampler_reports_rss_and_no_nvml_metrics():
    with ResourceSampler("cpu", interval_s=0.02) as sampler:
        time.sleep(0.05)
    metrics, missing = sampler.summary(tokens=10)
    assert metrics["peak_memory_mib"] > 0
    assert "NVML" in missing["mean_power_w"] and "NVML" in missing["energy_j_per_tok"]


def test_child_process_sampler_returns_rows_and_reasons():
    # No NVML on this machine (or a GPU-less one): the child still samples RSS on its grid and
    # reports why NVML is missing; on a GPU machine the gpu test covers the NVML rows.
    with ResourceSampler("cpu", interval_s=0.025, out_of_process=True) as sampler:
        time.sleep(0.25)
    metrics, missing = sampler.summary(tokens=10)
    assert sampler.samples[0]["t_s"] == pytest.approx(0.0, abs=1e-3)
    assert sampler.samples[-1]["t_s"] == pytest.approx(0.25, abs=0.05)
    assert sampler.info["sample_interval_median_s"] == pytest.approx(0.025, abs=0.005)
    assert metrics["peak_memory_mib"] > 0  # this process's RSS, read by the child
    if "mean_power_w" not in metrics:
        assert missing["mean_power_w"]


# --- known quantities ------------------------------------------------------------------------

def test_clock_reads_a_known_sleep():
    clock = RealClock()
    t0 = clock.now()
    time.sleep(0.2)
    assert clock.now() - t0 == pytest.approx(0.2, abs=0.03)
    clock.sleep_until(clock.now() + 0.1)
    assert clock.now() - t0 == pytest.approx(0.3, abs=0.04)


def test_sampler_interval_and_window_length():
    with ResourceSampler("cpu", interval_s=0.025) as sampler:
        time.sleep(0.2)
    sampler.summary()
    assert sampler.samples[-1]["t_s"] == pytest.approx(0.2, abs=0.03)
    assert sampler.info["sample_interval_median_s"] == pytest.approx(0.025, abs=0.01)


def test_sampler_sees_an_allocation_of_known_size():
    size_mib = 256
    with ResourceSampler("cpu", interval_s=0.01) as sampler:
        base = sampler.samples[0]["rss_mib"]
        block = np.ones(size_mib * MIB, dtype=np.uint8)  # touched, so resident
        time.sleep(0.05)
    del block
    metrics, _ = sampler.summary()
    assert metrics["peak_memory_mib"] - base == pytest.approx(size_mib, rel=0.1)


# --- ceilings --------------------------------------------------------------------------------

def test_ceilings_measured_once_then_cached(tmp_path, monkeypatch):
    calls = []
    real = ceilings_mod.measure

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ceilings_mod, "measure", counting)
    first = get_ceilings("cpu", tmp_path)
    second = get_ceilings("cpu", tmp_path)
    assert len(calls) == 1 and first == second
    assert first.copy_bytes_per_s > 1e8 and first.matmul_flops_per_s > 1e8
    assert (tmp_path / "ceilings.json").exists()
    monkeypatch.setattr(ceilings_mod, "identify", lambda device: ("Other CPU", "other driver"))
    monkeypatch.setattr(ceilings_mod, "measure", lambda device, name, driver: calls.append(name) or Ceilings(
        1e9, 1e9, name, driver, "2026-01-01T00:00:00+00:00"))
    assert get_ceilings("cpu", tmp_path).device_name == "Other CPU"  # another key measures again
    assert len(calls) == 2
    assert get_ceilings("cpu", tmp_path, refresh=True) and len(calls) == 3


def test_ceilings_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_TUNE_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(ceilings_mod, "measure", lambda device, name, driver: Ceilings(
        1e9, 1e9, name, driver, "2026-01-01T00:00:00+00:00"))
    get_ceilings("cpu")
    assert (tmp_path / "env-cache" / "ceilings.json").exists()


def test_roofline_arithmetic_and_absence():
    ceil = Ceilings(2e12, 5e14, "fake", "fake", "now")
    metrics, missing = roofline({"bytes_read": 1e12, "flops": 1e14}, 2.0, ceil, "")
    assert metrics == {"mbu": pytest.approx(0.25), "mfu": pytest.approx(0.1)}
    metrics, missing = roofline({"bytes_read": 1e12}, 2.0, None, "no ceilings here")
    assert metrics == {} and missing["mbu"] == "no ceilings here"


# --- serve: MBU/MFU from counters, LoadGen window extension ----------------------------------

@dataclass
class _SyntheticEngine:
    """Returns step times with lognormal jitter without sleeping; counts known work."""

    device: str = "cpu"
    seed: int = 0
    bytes_per_step: float = 1e9
    flops_per_token: float = 1e9

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.work = {"decode_steps": 0.0, "tokens": 0.0, "bytes_read": 0.0, "flops": 0.0}
        self.lock = threading.Lock()

    def counters(self) -> dict[str, float]:
        return dict(self.work)

    def run_batch(self, requests, clock):
        steps = max(r.output_tokens for r in requests)
        self.work["decode_steps"] += steps
        self.work["bytes_read"] += steps * self.bytes_per_step
        self.work["flops"] += steps * len(requests) * self.flops_per_token
        now = clock.now()
        gaps = self.rng.lognormal(np.log(1e-4), 0.3, size=steps)  # sub-ms: the test never waits long
        return list(now + np.cumsum(gaps))


def test_serve_derives_mbu_mfu_from_counter_deltas():
    ceil = Ceilings(1e12, 1e12, "fake", "fake", "now")
    engine = _SyntheticEngine()
    workload = {"arrival": "closed", "concurrency": 4, "requests": 40, "warmup_requests": 4,
                "prompt_tokens": 8, "output_tokens": 4}
    outcome = serve(engine, "cpu", workload, {"batch_size": 4, "batch_timeout_ms": 1.0}, 0, {}, ceilings=ceil)
    work = outcome.info["engine_work"]
    assert work["decode_steps"] == 40  # 10 batches x 4 steps: the warm-up is not in the window
    window = outcome.info["window_s"]
    assert outcome.metrics["mbu"] == pytest.approx(work["bytes_read"] / window / 1e12)
    assert outcome.metrics["mfu"] == pytest.approx(work["flops"] / window / 1e12)


def test_window_extends_until_p99_ci_is_narrow():
    workload = {"arrival": "closed", "concurrency": 8, "requests": 50, "max_requests": 20000,
                "max_duration_s": 20, "target_p99_ci_ratio": 0.25, "warmup_requests": 0,
                "prompt_tokens": 8, "output_tokens": {"dist": "uniform", "low": 2, "high": 30}}
    ceil = Ceilings(1e12, 1e12, "fake", "fake", "now")
    outcome = serve(_SyntheticEngine(), "cpu", workload, {"batch_size": 8, "batch_timeout_ms": 1.0}, 0, {},
                    ceilings=ceil)
    n = int(outcome.metrics["measured_requests"])
    at_end = outcome.info["requests_at_window_end"]
    assert 368 <= at_end <= n < 20000  # p99 has an upper bound only from 368 samples at 95 %
    # The rule's promise: the requests measured when it ended the window have a p99 CI within 0.25.
    seen = request_latencies_ms(outcome.timings[:at_end])["latency"]
    assert ci_relative_width(seen, 0.99) <= 0.25
    assert outcome.info["window_end"].startswith("latency p99 CI within 0.25 of p99")
    # The requests issued before it and served after (the drain) are in the metrics; when they
    # widen the reported CI past the target, the window's end says so, with the reported width.
    m = outcome.metrics
    reported = (m["latency_p99_ms_ci_high"] - m["latency_p99_ms_ci_low"]) / m["latency_p99_ms"]
    if reported > 0.25:
        assert f"{reported:.2g} with the {n - at_end} requests" in outcome.info["window_end"]


def test_window_stops_at_max_duration():
    workload = {"arrival": "closed", "concurrency": 8, "requests": 50, "max_requests": 50000,
                "max_duration_s": 0.2, "target_p99_ci_ratio": 0.0001, "warmup_requests": 0,
                "prompt_tokens": 8, "output_tokens": 4}
    ceil = Ceilings(1e12, 1e12, "fake", "fake", "now")
    t0 = time.perf_counter()
    outcome = serve(_SyntheticEngine(), "cpu", workload, {"batch_size": 8, "batch_timeout_ms": 1.0}, 0, {},
                    ceilings=ceil)
    assert time.perf_counter() - t0 < 10
    assert outcome.info["window_end"] == "max_duration_s reached"
    assert outcome.metrics["measured_requests"] < 50000


# --- real NVML on the GPU machine ------------------------------------------------------------

@pytest.mark.gpu
def test_real_nvml_around_gpu_work():
    import torch

    device = "cuda:0"
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    with ResourceSampler(device, interval_s=0.025) as sampler:
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
    metrics, missing = sampler.summary(tokens=1000)
    info = sampler.info
    assert metrics["torch_peak_reserved_mib"] >= 128  # the 8192^2 bf16 operand and result
    assert metrics["peak_memory_mib"] > metrics["torch_peak_reserved_mib"], missing  # + CUDA context
    assert 0 < info["nvml_minus_torch_reserved_mib"] < 4096
    assert metrics["mean_power_w"] > 50
    assert metrics["energy_j_per_tok"] > 0
    assert info["energy_counter_vs_integral"] == pytest.approx(1.0, abs=0.25)  # 2 s: edges matter
    row = sampler.samples[len(sampler.samples) // 2]
    assert row["sm_util_pct"] > 50 and row["sm_clock_mhz"] > 100 and row["temperature_c"] > 0
    print({k: round(v, 2) for k, v in metrics.items()}, info)


@pytest.mark.gpu
def test_real_ceilings_on_gpu(tmp_path):
    ceil = get_ceilings("cuda:0", tmp_path)
    print(ceil)
    assert ceil.copy_bytes_per_s > 5e11  # any datacentre GPU copies faster than 0.5 TB/s
    assert ceil.matmul_flops_per_s > 5e13


def test_open_loop_overload_is_flagged():
    ceil = Ceilings(1e12, 1e12, "fake", "fake", "now")

    class SlowEngine(_SyntheticEngine):
        def run_batch(self, requests, clock):  # 5 ms per request, one at a time: 200 req/s at most
            time.sleep(0.005)
            return [clock.now()] * max(r.output_tokens for r in requests)

    base = {"requests": 60, "warmup_requests": 0, "prompt_tokens": 8, "output_tokens": 1, "arrival": "constant"}
    knobs = {"batch_size": 1, "batch_timeout_ms": 0.0}
    fast = serve(SlowEngine(), "cpu", {**base, "rate_rps": 50.0}, knobs, 0, {}, ceilings=ceil)
    slow = serve(SlowEngine(), "cpu", {**base, "rate_rps": 2000.0}, knobs, 0, {}, ceilings=ceil)
    assert fast.info["overloaded"] is False and fast.info["offered_rps"] == pytest.approx(50.0)
    assert slow.info["overloaded"] is True


def test_a_long_request_that_keeps_up_is_not_overloaded():
    # 40 req/s for 1 s of arrivals, each finishing 0.8 s after it arrives (no queue): the window
    # lasts ~1.8 s, so requests / window is ~0.55 of the offered rate, but departures keep pace.
    from runners.scheduler import RequestTiming
    from runners.serving import load_check

    def timing(i: int, latency: float) -> RequestTiming:
        return RequestTiming(i, i / 40, i / 40, i / 40 + 0.05, i / 40 + latency, 8, 16, i, 1)

    kept = [timing(i, 0.8) for i in range(41)]
    check = load_check(kept, {"request_throughput_rps": 41 / 1.8}, closed=False)
    assert check["offered_rps"] == pytest.approx(40.0) and check["served_rps"] == pytest.approx(40.0)
    assert check["overloaded"] is False
    # Served one at a time, 0.05 s each (20 req/s): finishes spread over 2 s, half the offered rate.
    queued = [RequestTiming(i, i / 40, 0.05 * i, 0.05 * i + 0.01, 0.05 * (i + 1), 8, 16, i, 1) for i in range(41)]
    check = load_check(queued, {"request_throughput_rps": 20.0}, closed=False)
    assert check["served_rps"] == pytest.approx(20.0) and check["overloaded"] is True
    # One batch: every request finishes at one instant; no departure rate, nothing fell behind.
    batch = [RequestTiming(i, i / 40, 1.0, 1.1, 2.0, 8, 16, 0, 41) for i in range(41)]
    assert load_check(batch, {"request_throughput_rps": 20.5}, closed=False) == {
        "offered_rps": pytest.approx(40.0), "served_rps": None, "overloaded": False}


def test_spread_latencies_that_keep_up_are_not_overloaded():
    # The H200 capacity probe's shape: 44 req/s for 10 s, no queue, each request 0.3 s of
    # prefill plus 16 ms for each of 16-256 output tokens. The span of all finishes ends with the
    # longest request of the last seconds (441 / ~11.5 s: 0.86 of the offered rate); the interior
    # rates agree. Slowed to 36 req/s of service, the queue grows and the flag is raised.
    import random

    from runners.scheduler import RequestTiming
    from runners.serving import load_check

    rng = random.Random(0)
    latencies = [0.3 + 0.016 * min(256, max(16, rng.lognormvariate(4.5, 0.6))) for _ in range(441)]
    arrivals = [i / 44 for i in range(441)]
    kept = [RequestTiming(i, a, a, a + 0.3, a + lat, 256, 96, i, 1) for i, (a, lat) in enumerate(zip(arrivals, latencies, strict=True))]
    whole_span = (len(kept) - 1) / (max(t.finish_s for t in kept) - min(t.finish_s for t in kept))
    assert whole_span < 0.9 * 44  # the old rule would have called this overloaded
    check = load_check(kept, {}, closed=False)
    assert check["offered_rps"] == pytest.approx(44.0)
    assert check["served_rps"] == pytest.approx(44.0, rel=0.06) and check["overloaded"] is False
    # One server draining at 36 req/s: request i starts when it arrives or when i - 1 ends.
    ends: list[float] = []
    for a in arrivals:
        ends.append(max(a, ends[-1] if ends else 0.0) + 1 / 36)
    queued = [RequestTiming(i, a, e - 1 / 36, e, e + 0.3, 256, 96, i, 1) for i, (a, e) in enumerate(zip(arrivals, ends, strict=True))]
    check = load_check(queued, {}, closed=False)
    assert check["served_rps"] == pytest.approx(36.0, rel=0.02) and check["overloaded"] is True


def test_a_short_window_needs_a_larger_deficit_to_be_overloaded():
    # Two servers, 2.6 s (+-40 %) a request, Poisson arrivals at 0.66 req/s (86 % load): stable.
    # Over 20 requests the interior rates scatter: this seed reads 0.83 of the offered rate, which
    # the 10 % rule called overloaded (the H200 long-context bf16 probe read 0.886). Over 200
    # requests the same system reads within 10 %, and a real deficit is still flagged.
    import random

    from runners.scheduler import RequestTiming
    from runners.serving import interior_rate, load_check, overload_margin

    def window(n: int, seed: int, servers: int = 2) -> list[RequestTiming]:
        rng, t, free, out = random.Random(seed), 0.0, [0.0] * servers, []
        for i in range(n):
            t += rng.expovariate(0.66)
            k = min(range(servers), key=free.__getitem__)
            start = max(t, free[k])
            free[k] = start + 2.6 * rng.uniform(0.6, 1.4)
            out.append(RequestTiming(i, t, start, start + 0.4, free[k], 6000, 256, i, 1))
        return out

    def ratio(timings: list[RequestTiming]) -> float:
        return interior_rate([x.finish_s for x in timings]) / interior_rate([x.arrival_s for x in timings])

    short = next(w for w in (window(20, s) for s in range(50)) if 0.75 < ratio(w) < 0.9)
    assert overload_margin(20) == pytest.approx(1.2 / 15**0.5) and overload_margin(441) == 0.1
    assert load_check(short, {}, closed=False)["overloaded"] is False
    assert load_check(window(200, 0), {}, closed=False)["overloaded"] is False
    assert load_check(window(200, 0, servers=1), {}, closed=False)["overloaded"] is True  # 172 % load


def test_step_timer_durations_count_from_start():
    from runners.measure.monitor import StepTimer
    from tests.test_scheduler import FakeClock

    clock = FakeClock()
    clock.t = 10.0
    timer = StepTimer("cpu", clock).start()
    for t in (11.0, 13.0, 13.5):
        clock.t = t
        timer.mark()
    assert timer.times() == [11.0, 13.0, 13.5]
    assert timer.durations_ms() == pytest.approx([1000.0, 2000.0, 500.0])


@pytest.mark.gpu
def test_the_cuda_timer_agrees_with_the_step_timer_and_the_host_clock():
    import torch

    from runners.measure.cuda_timer import cuda_seconds
    from runners.measure.monitor import StepTimer

    def spin() -> None:
        torch.cuda._sleep(20_000_000)  # a kernel that spins 2e7 cycles: ~10 ms at 2 GHz

    spin()
    torch.cuda.synchronize()
    one = cuda_seconds(spin)
    assert 1e-3 < one < 1.0
    assert cuda_seconds(spin, calls=4) == pytest.approx(one, rel=0.2)  # per call
    t0 = time.perf_counter()
    timer = StepTimer("cuda:0", RealClock()).start()
    for _ in range(3):
        spin()
        timer.mark()
    steps_s = [d / 1e3 for d in timer.durations_ms()]
    wall_s = time.perf_counter() - t0
    assert steps_s == pytest.approx([one] * 3, rel=0.2)
    assert sum(steps_s) <= wall_s
