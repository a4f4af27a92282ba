"""Several workers on one study through a real PostgreSQL on 127.0.0.1 (issue 8).

A session fixture runs Debian's `initdb` + `pg_ctl start` in a temporary folder (as the
unprivileged `postgres` user when the tests run as root), listening on 127.0.0.1 on a free port,
and stops it at the end. Each test gets its own database. Skipped, with the reason, only where the
server binaries or psycopg2 are not installed (`.ci/run` installs both).
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.fault_runner import FAULT_KNOBS, FAULT_RUNNER
from tests.test_distributed import (
    check_claims_are_atomic,
    check_exact_budget,
    check_kill_recovered,
    wait_for,
    write_space,
)
from tuner.storage import open_storage

HEARTBEAT = ("--heartbeat-s", "1")  # grace = 4 beats: a killed worker's trial is stale after ~4 s


def _server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(root: Path) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as `postgres`, which owns the folder."""
    if os.geteuid() != 0:
        return []
    try:
        shutil.chown(root, "postgres", "postgres")
    except LookupError:
        pytest.skip("running as root and there is no `postgres` user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_server():
    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg2", reason="psycopg2 not installed (pip install psycopg2-binary)")
    root = Path(tempfile.mkdtemp(prefix="autoglm-pg-"))  # not under pytest's 0700 root-only tree
    run_as = _as_server_user(root)
    data, port = root / "data", _free_port()
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200 "
               f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                        "-t", "60", "-o", options, "start"], check=True, capture_output=True, timeout=90)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fault_registered(monkeypatch):
    from runners.knobs import RUNNER_KNOBS

    monkeypatch.setitem(RUNNER_KNOBS, FAULT_RUNNER, FAULT_KNOBS)


@pytest.fixture
def pg_url(postgres_server):
    """A fresh database per test, so studies and trial numbers start from scratch."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(f"{postgres_server.replace('+psycopg2', '')}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"{postgres_server}/{name}"


def test_three_postgres_workers_run_the_exact_budget(pg_url, in_tmp, fault_registered):
    check_exact_budget(pg_url, in_tmp, workers=3, trials=9, extra=HEARTBEAT)


def test_postgres_worker_killed_mid_trial_is_failed_by_heartbeat_and_retried(pg_url, in_tmp, fault_registered):
    failed, retry = check_kill_recovered(pg_url, in_tmp, workers=3, trials=6, extra=HEARTBEAT)
    # Optuna's heartbeat path: fail_stale_trials failed it, RetryHeartbeatStaleTrialCallback queued
    # the copy (its retry history names the failed trial); the tuner never saw an outcome.
    assert "outcome" not in failed.user_attrs
    assert retry.system_attrs["retry_history"] == [failed.number]


def test_postgres_claims_are_atomic(pg_url, in_tmp, fault_registered):
    space = write_space(in_tmp / "race.yaml", "race", trials=1, sleep_s=0)
    check_claims_are_atomic(pg_url, in_tmp, space)


def test_hosts_starting_at_once_on_a_fresh_database_all_open_it(pg_url):
    """A job array starts every host at the same moment; the first open creates Optuna's
    tables, and without the schema lock the others fail on CREATE TABLE."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_open_at_once, args=(pg_url, start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0] * 4


def _open_at_once(url: str, start) -> None:
    start.wait(30)
    try:
        open_storage(url)
    except Exception:  # noqa: BLE001 - any failure is the test's failure
        os._exit(1)
    os._exit(0)


def test_study_run_and_worker_share_one_postgres_study(pg_url, in_tmp, fault_registered):
    """The documented two-host recipe on one machine: `--space` on the first host creates the
    study and works on it; `worker --study` on the second joins it by name."""
    space = write_space(in_tmp / "hosts.yaml", "hosts", trials=6, sleep_s=0.5)
    storage = open_storage(pg_url)
    base = [sys.executable, "-m", "tests.fault_runner"]
    first = subprocess.Popen([*base, "--space", str(space), "--storage", pg_url, "--quiet", *HEARTBEAT])
    wait_for(lambda: any(s.study_name == "hosts" for s in storage.get_all_studies()), 60,
             "the first host to create the study")
    second = subprocess.run([*base, "worker", "--study", "hosts", "--storage", pg_url, "--quiet", *HEARTBEAT],
                            timeout=90)
    assert second.returncode == 0 and first.wait(90) == 0
    trials = optuna.load_study(study_name="hosts", storage=storage).get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
