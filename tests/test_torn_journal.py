"""A journal whose last record was cut mid-write is repaired on open: the torn bytes are moved
aside, every complete record is kept, and the study resumes (at every byte offset)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import TrialState

from tests.fault_runner import FAULT_RUNNER
from tuner.storage import open_storage, repair_torn_tail

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> bytes:
    """A journal of one study with three COMPLETE trials."""
    path = tmp_path_factory.mktemp("journal") / "optuna.journal"
    study = optuna.create_study(study_name="torn", storage=open_storage(str(path)),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective, n_trials=3)
    return path.read_bytes()


def _complete(path: Path) -> dict[int, float]:
    study = optuna.load_study(study_name="torn", storage=open_storage(str(path)))
    return {t.number: t.value for t in study.get_trials() if t.state == TrialState.COMPLETE}


def test_torn_at_every_offset_of_the_last_record(healthy, tmp_path, capfd):
    body, last = healthy[:-1].rsplit(b"\n", 1)
    body += b"\n"
    last += b"\n"
    before = _complete_of(healthy, tmp_path)
    for cut in range(len(last)):  # every proper prefix of the last record, newline included
        path = tmp_path / f"cut{cut}.journal"
        path.write_bytes(body + last[:cut])
        storage = open_storage(str(path))
        err = capfd.readouterr().err
        if cut == 0:
            assert err == "" and path.read_bytes() == body  # nothing torn: nothing to say
        elif cut == len(last) - 1:  # the whole record but its newline: completed, not dropped
            assert "completed it" in err and path.read_bytes() == body + last
        else:
            assert err.count("\n") == 1 and "moved a torn last record" in err, (cut, err)
            assert path.read_bytes() == body
            (aside,) = tmp_path.glob(f"cut{cut}.journal.torn-*")
            assert aside.read_bytes() == last[:cut]  # the torn bytes are kept, aside
        study = optuna.load_study(study_name="torn", storage=storage)
        done = {t.number: t.value for t in study.get_trials() if t.state == TrialState.COMPLETE}
        lost = set(before) - set(done)  # at most the trial whose completion was the torn record
        assert lost <= {max(before)} and all(done[n] == before[n] for n in done if n in before)
        assert not lost or cut < len(last) - 1
        study.optimize(_objective, n_trials=1)  # appending works, and the journal stays readable
        assert len(_complete(path)) == len(done) + 1


def _complete_of(data: bytes, tmp_path: Path) -> dict[int, float]:
    path = tmp_path / "whole.journal"
    path.write_bytes(data)
    return _complete(path)


def test_a_garbage_last_line_is_moved_aside(healthy, tmp_path, capfd):
    path = tmp_path / "garbage.journal"
    path.write_bytes(healthy + b'{"op_code": 4, "tri\x00\n')
    open_storage(str(path))
    assert "moved a torn last record" in capfd.readouterr().err
    assert path.read_bytes() == healthy
    assert len(_complete(path)) == 3


def test_a_writer_holding_the_lock_is_not_torn(healthy, tmp_path):
    """A second worker mid-append holds the journal lock; the repair waits for it and finds the
    record complete, so two workers on one journal never cut each other's records."""
    path = tmp_path / "shared.journal"
    body, last = healthy[:-1].rsplit(b"\n", 1)
    path.write_bytes(body + b"\n")
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    with path.open("ab") as handle:
        handle.write(last[:10])  # the other worker's write, half done
        handle.flush()
        moved = []
        repair = threading.Thread(target=lambda: moved.append(repair_torn_tail(path, JournalFileOpenLock(str(path)))))
        repair.start()
        time.sleep(0.3)
        assert repair.is_alive()  # waiting on the lock
        handle.write(last[10:] + b"\n")
    lock.release()
    repair.join(timeout=10)
    assert moved == [0] and path.read_bytes() == healthy


def _space(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "study": "torn", "runner": FAULT_RUNNER, "device": "cpu",
        "params": {"x": {"type": "float", "low": 0.5, "high": 2.0}},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}],
        "search": {"sampler": "random", "trials": 3, "seed": 0, "trial_timeout_s": 60, "baseline": False},
    }))
    return path


@pytest.mark.slow
def test_the_cli_resumes_a_torn_journal(in_tmp):
    """The real CLI (fault runner): a study of 3, its last record torn at a few offsets, resumed to 4."""
    journal = in_tmp / "runs" / "optuna.journal"
    command = [sys.executable, "-m", "tests.fault_runner", "--space", str(_space(in_tmp / "s.yaml")), "--quiet"]
    assert subprocess.run(command, timeout=120).returncode == 0
    whole = journal.read_bytes()
    done = _complete(journal)
    body, last = whole[:-1].rsplit(b"\n", 1)
    for cut in (1, len(last) // 2, len(last)):
        journal.write_bytes(body + b"\n" + last[:cut])
        run = subprocess.run([*command, "--trials", "4"], timeout=120, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr and "journal" in run.stderr
        after = _complete(journal)
        assert len(after) == 4
        assert all(after[k] == v for k, v in done.items() if k in after)
        journal.write_bytes(whole)
