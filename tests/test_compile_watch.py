"""The in-window compile detector: a window that compiles is re-measured, then `contaminated`."""

from __future__ import annotations

import optuna
import pytest
import torch

from runners.compile_watch import GRAPH_CAPTURES, CompileWatch, measure_clean
from runners.contract import TrialResult
from runners.serving import serve
from tuner.study import record_window_flags

WORKLOAD = {"arrival": "closed", "concurrency": 2, "requests": 6, "warmup_requests": 2,
            "prompt_tokens": 4, "output_tokens": 2}
KNOBS = {"batch_size": 2, "batch_timeout_ms": 1.0}


def _compiled_double():
    # dynamic=False: every new shape is a recompile (no automatic dynamic shapes); backend
    # "eager" keeps the test free of a C++ toolchain while Dynamo still traces each frame.
    return torch.compile(lambda x: x * 2, backend="eager", dynamic=False)


class RecompilingEngine:
    """Runs a compiled function on a tensor of a new length for its first `compiling_calls`
    batches (a shape the set-up did not prepare), then on a length already seen."""

    device = "cpu"

    def __init__(self, compiling_calls: int) -> None:
        self.fn = _compiled_double()
        self.calls = 0
        self.compiling_calls = compiling_calls
        self.captures = 0.0

    def counters(self) -> dict[str, float]:
        return {GRAPH_CAPTURES: self.captures}

    def run_batch(self, requests, clock):
        self.calls += 1
        length = self.calls if self.calls <= self.compiling_calls else 1
        self.fn(torch.ones(length))
        now = clock.now()
        return [now + 1e-4 * (i + 1) for i in range(max(r.output_tokens for r in requests))]


@pytest.fixture(autouse=True)
def _room_for_recompiles(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1000)
    torch._dynamo.reset()


def test_watch_sees_a_recompile_and_not_a_guard_hit():
    fn = _compiled_double()
    fn(torch.ones(3))  # compiled before the window
    with CompileWatch() as clean:
        fn(torch.ones(3))
    assert clean.events == {} and not clean.compiled
    with CompileWatch() as dirty:
        fn(torch.ones(5))  # a shape not seen: Dynamo compiles again
    assert dirty.events["frames_compiled"] == 1
    assert dirty.events["graphs_compiled"] == 1


def test_watch_counts_engine_graph_captures():
    engine = RecompilingEngine(compiling_calls=0)
    with CompileWatch(engine) as watch:
        engine.captures += 2
    assert watch.events == {GRAPH_CAPTURES: 2.0}


def _serve(engine):
    return serve(engine, "cpu", WORKLOAD, KNOBS, 0, {}, ceilings=None, sample_resources=False)


def test_a_window_that_keeps_compiling_is_contaminated():
    engine = RecompilingEngine(compiling_calls=10_000)  # every batch a new shape
    outcome = measure_clean(lambda: _serve(engine), lambda o: o.info)
    assert outcome.info["compile_events"]["frames_compiled"] >= 1
    contaminated = outcome.info["contaminated"]
    assert contaminated["first_window"]["frames_compiled"] >= 1
    assert contaminated["second_window"] == outcome.info["compile_events"]


def test_a_window_that_compiled_once_is_measured_again_clean():
    # Warm-up takes batches 1-2; batches 3-4 of the first window compile new shapes, and the
    # re-measured window (batch length 1, seen in warm-up) compiles nothing.
    engine = RecompilingEngine(compiling_calls=4)
    calls = []

    def measure():
        calls.append(1)
        return _serve(engine)

    outcome = measure_clean(measure, lambda o: o.info)
    assert len(calls) == 2
    assert outcome.info["compile_events"] == {}
    assert outcome.info["remeasured"]["first_window_events"]["frames_compiled"] >= 1
    assert "contaminated" not in outcome.info


def test_a_clean_window_is_measured_once():
    engine = RecompilingEngine(compiling_calls=0)
    calls = []
    outcome = measure_clean(lambda: calls.append(1) or _serve(engine), lambda o: o.info)
    assert calls == [1] and outcome.info["compile_events"] == {} and "remeasured" not in outcome.info


def test_the_tuner_stores_contaminated_on_the_trial():
    study = optuna.create_study()
    trial = study.ask()
    evidence = {"first_window": {"frames_compiled": 3.0}, "second_window": {"frames_compiled": 1.0}}
    result = TrialResult("ok", {"x": 1.0}, info={"contaminated": evidence, "host_busy": {}})
    record_window_flags(trial, result.info)
    study.tell(trial, 1.0)
    attrs = study.trials[0].user_attrs
    assert attrs["contaminated"] == evidence
    assert "host_busy" not in attrs  # empty evidence is no flag


# --- host_busy: other processes on the CPU / GPU during the window ---------------------------

def test_cpu_neighbours_from_cpu_seconds():
    from runners.host_load import cpu_neighbours

    # 10 s window on 2 cores: the machine worked 14 CPU-s, this process 9 -> others 0.5 cores
    busy = cpu_neighbours(machine_s=14.0, own_s=9.0, window_s=10.0, cores=2)
    assert busy["other_cpu_cores"] == pytest.approx(0.5) and busy["cores"] == 2
    assert cpu_neighbours(machine_s=12.0, own_s=9.0, window_s=10.0, cores=2) == {}  # 0.3 cores: quiet
    # on 16 cores the bar is a quarter of the machine (4 cores)
    assert cpu_neighbours(machine_s=30.0, own_s=0.0, window_s=10.0, cores=16) == {}
    assert cpu_neighbours(machine_s=50.0, own_s=0.0, window_s=10.0, cores=16)["other_cpu_cores"] == 5.0


class _Nvml:
    """NVML's process list of one GPU: this process and whatever `others` holds."""

    def __init__(self, others):
        import os
        from types import SimpleNamespace

        self.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**30)] + [
            SimpleNamespace(pid=pid, usedGpuMemory=mib * 2**20) for pid, mib in others]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.procs


def test_gpu_neighbours_from_nvml_process_list():
    from runners.host_load import gpu_neighbours

    assert gpu_neighbours("cuda:0", _Nvml([])) == {}
    busy = gpu_neighbours("cuda:0", _Nvml([(4242, 512)]))
    assert busy == {"other_gpu_processes": [{"pid": 4242, "used_mib": 512.0}]}
