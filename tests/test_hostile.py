"""Hostile but plausible input and faults: names that are paths, storages and folders that
cannot work, children outliving a killed tuner, a trial cap, write failures mid-study."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from runners.contract import TrialConfig
from tests.fault_runner import FAULT_RUNNER
from tuner import launcher
from tuner.cli import main
from tuner.errors import UsageError
from tuner.paths import inside
from tuner.space import STUDY_NAME_MAX, study_name_problem
from tuner.storage import open_storage

SPACE = {"study": "hostile", "model": {"preset": "glm-tiny"}, "device": "cpu",
         "workload": {"rate_rps": 50, "requests": 8, "prompt_tokens": 8, "output_tokens": 4},
         "params": {"batch_size": {"type": "int", "low": 1, "high": 8}},
         "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}], "search": {"trials": 2}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _created(root: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in keep)


BAD_NAMES = ["../escaped", "/abs/path", "..", ".", "a/b", "a\x01b", "x" * (STUDY_NAME_MAX + 1), "", "naïve",
             "a b", "a\nb", "-", "~root"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_study_names_are_names(name):
    assert name in ("-",) or study_name_problem(name)  # "-" is a legal (if odd) name
    assert study_name_problem("glm-4_9b.v2") is None and study_name_problem("x" * STUDY_NAME_MAX) is None


@pytest.mark.parametrize("name", ["../escaped", "/abs/path", "..", "a\x01b", "x" * 300])
def test_study_flag_refused_before_anything_is_created(in_tmp, capsys, name):
    space = _write(in_tmp / "s.yaml", SPACE)
    assert main(["--space", str(space), "--study", name]) == 2
    assert main(["report", "--study", name]) == 2
    assert main(["worker", "--study", name]) == 2
    err = capsys.readouterr().err
    assert err.count("--study") == 3 and "Traceback" not in err
    assert _created(in_tmp, {"s.yaml"}) == []
    bad = _write(in_tmp / "s.yaml", {**SPACE, "study": name})
    assert main(["--space", str(bad)]) == 2 and "s.yaml: study:" in capsys.readouterr().err
    assert _created(in_tmp, {"s.yaml"}) == []


def test_artifact_paths_stay_under_their_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert inside(out, "trial_00001") == out / "trial_00001"
    (out / "trial_00002").symlink_to(tmp_path)  # a planted link out of the folder
    for parts in (("trial_00002",), ("..", "x"), ("/etc",)):
        with pytest.raises(UsageError, match="outside"):
            inside(out, *parts)


def _missing_pg_driver() -> str | None:
    for scheme, module in (("postgresql+psycopg", "psycopg"), ("postgresql", "psycopg2")):
        if importlib.util.find_spec(module) is None:
            return f"{scheme}://u:secret@localhost/db"
    return None


def test_storages_and_folders_that_cannot_work_are_refused_up_front(in_tmp, capsys):
    space = _write(in_tmp / "s.yaml", SPACE)
    fifo = in_tmp / "fifo.journal"
    os.mkfifo(fifo)
    (in_tmp / "a_file").write_text("x")
    cases = [("--storage", "sqlite:///", "no file named"), ("--storage", "sqlite://", "unsupported URL"),
             ("--storage", "/dev/full", "not a regular file"), ("--storage", str(fifo), "not a regular file"),
             ("--storage", str(in_tmp), "not a regular file"),
             ("--storage", str(in_tmp / "a_file" / "j.journal"), "not a folder"),
             ("--storage", "postgresql://u@host:notaport/db", "malformed URL"),
             ("--storage", str(in_tmp / "a_file"), "not an Optuna journal"),  # never "repaired" (cut)
             ("--storage", f"sqlite:///{in_tmp / 'a_file'}", "not an SQLite database"),
             ("--out", "/dev/full", "not a folder"), ("--out", str(in_tmp / "a_file" / "sub"), "not a folder"),
             ("--out", str(in_tmp / ("n" * 300)), "longer than 255")]
    missing = _missing_pg_driver()
    if missing:
        cases.append(("--storage", missing, "is not installed"))
    for flag, value, why in cases:
        assert main(["--space", str(space), flag, value]) == 2, (flag, value)
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and "secret" not in err, (flag, value, err)
    assert _created(in_tmp, {"s.yaml", "fifo.journal", "a_file"}) == []
    assert (in_tmp / "a_file").read_text() == "x"
    assert main(["report", "--study", "x", "--storage", str(fifo)]) == 2  # a reader does not hang either


# ---------------------------------------------------------------- children and the tuner


def _fault_space(path: Path, trials: int = 2, **fixed: object) -> Path:
    return _write(path, {
        "study": "orphans", "runner": FAULT_RUNNER, "device": "cpu",
        "params": {"x": {"type": "float", "low": 0.5, "high": 2.0}}, "fixed": fixed,
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}],
        "search": {"sampler": "random", "trials": trials, "seed": 0, "trial_timeout_s": 120, "baseline": False}})


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in proc.children(recursive=True) if "runners.child" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.3])
def test_kill_9_of_the_tuner_leaves_no_child(in_tmp, delay_s):
    """kill -9 right after (or shortly after) the trial's child appears: it is gone 2 s later."""
    space = _fault_space(in_tmp / "s.yaml", sleep_s=60)
    tuner = subprocess.Popen([sys.executable, "-m", "tests.fault_runner", "--space", str(space), "--quiet"],
                             start_new_session=True)
    watched = psutil.Process(tuner.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline:
        children = _children(watched)
    assert children, "no trial child started"
    time.sleep(delay_s)
    os.kill(tuner.pid, signal.SIGKILL)
    tuner.wait()
    time.sleep(2.0)
    assert _alive([c.pid for c in children]) == []


def test_a_child_whose_tuner_is_already_gone_exits_at_once(tmp_path):
    """The pid check right after the prctl: a child started for a tuner that has died meanwhile."""
    env = {**os.environ, launcher.PARENT_PID_ENV: "1"}  # not our parent: as if re-parented to init
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-m", "runners.child", "c.json", "r.json"], env=env, cwd=tmp_path,
                           timeout=30, capture_output=True)
    assert child.returncode == 3 and time.monotonic() - started < 10
    assert not (tmp_path / "r.json").exists()


def test_the_child_binds_before_importing_anything_heavy():
    text = (Path(launcher.__file__).resolve().parent.parent / "runners" / "child.py").read_text()
    head = text[:text.index("_bind_to_parent()\n\nimport json")]
    assert "import torch" not in head and "from runners" not in head and "PR_SET_PDEATHSIG" in head


# ---------------------------------------------------------------- the hard cap and write failures


def _config(**workload: object) -> TrialConfig:
    return TrialConfig(runner="glm-infer", model={"preset": "glm-tiny"}, device="cpu", workload=dict(workload),
                       knobs={}, seed=0, artifact_dir="/tmp/x", trial_number=0, study="s")


def test_trial_cap_follows_the_workload():
    small = launcher.trial_cap_s(_config(requests=8, rate_rps=50, output_tokens=4))
    slow = launcher.trial_cap_s(_config(requests=800, rate_rps=1, output_tokens=4))
    assert launcher.SETUP_BASE_S < small < slow
    assert slow - small == pytest.approx(launcher.WINDOW_FACTOR * (800 / 1 - 8 / 50), rel=1e-6)
    bounded = launcher.trial_cap_s(_config(requests=800, rate_rps=1, max_duration_s=10, output_tokens=4))
    assert small < bounded < slow
    big = TrialConfig(**{**_config(requests=8, rate_rps=50).__dict__, "model": {"preset": "glm-4-9b"}})
    assert launcher.trial_cap_s(big) > small + 1000  # a 9B model is allowed a longer build


def test_a_hung_child_is_killed_at_the_hard_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "SETUP_BASE_S", 1.5)
    monkeypatch.setattr(launcher, "WINDOW_FACTOR", 0.0)
    config = TrialConfig(runner=FAULT_RUNNER, model={"preset": "glm-tiny"}, device="cpu", workload={},
                         knobs={"mode": "hang"}, seed=0, artifact_dir=str(tmp_path), trial_number=0, study="s")
    started = time.monotonic()
    outcome = launcher.ProcessLauncher(timeout_s=3600).run(config, tmp_path)
    assert outcome.state == "fail" and "hard cap" in outcome.reason
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_write_failure_mid_study_fails_the_trial_and_stops(in_tmp):
    """Trial 1's folder cannot be created (a file is in the way, as a full or read-only disk
    would refuse it): that trial is FAIL with the reason, the study stops with exit 1, no
    traceback, nothing left RUNNING."""
    space = _fault_space(in_tmp / "s.yaml", trials=3)
    out = in_tmp / "out"
    out.mkdir()
    (out / "trial_00001").write_text("in the way")
    run = subprocess.run([sys.executable, "-m", "tests.fault_runner", "--space", str(space), "--out", str(out),
                          "--quiet", "--storage", str(in_tmp / "j.journal")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="orphans", storage=open_storage(str(in_tmp / "j.journal"))).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert "cannot write the trial's files" in trials[1].user_attrs["fail_reason"]
    # Once the disk is fixed, the same command finishes the budget; the failed write used none of it.
    (out / "trial_00001").unlink()
    again = subprocess.run(run.args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="orphans", storage=open_storage(str(in_tmp / "j.journal"))).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    assert trials[2].params == trials[1].params  # the failed trial's config ran again
