"""Storage URLs: an Optuna journal file by default, SQLite or PostgreSQL on request.

Which storage for how many workers (see docs/distributed.md):
- journal file (default): safe for several processes on one host; a dead worker's trial is
  recovered through the owner host/pid recorded on the trial.
- SQLite: one worker only (parallel writers corrupt the trial bookkeeping).
- PostgreSQL: many hosts; the only backend with heartbeats, so a worker that dies anywhere has
  its trial failed and retried by `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from tuner.errors import UsageError

DEFAULT_STORAGE = "runs/optuna.journal"
# A worker records a heartbeat every DEFAULT_HEARTBEAT_S; silent for GRACE_BEATS beats, its
# trial is failed and retried. Several beats of grace so a busy database is not a dead worker.
DEFAULT_HEARTBEAT_S = 30
GRACE_BEATS = 4
# A config that kills its worker each time is retried this often, then left as FAIL.
MAX_RETRY = 2
_SCHEMA_LOCK_KEY = 0x6175746F676C6D  # "autoglm": one advisory-lock key for "creating Optuna's tables"


def storage_kind(url: str) -> str:
    """journal | sqlite | postgresql; anything else is a usage error."""
    if url.startswith("sqlite:///"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://")):
        return "postgresql"
    if url.startswith("journal://"):
        return "journal"
    if "://" in url:
        raise UsageError(f"--storage {url}: unsupported URL (use a journal file path, sqlite:/// or postgresql://)")
    return "journal"


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal://"))


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for an in-memory database."""
    path = url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def check_parallel(url: str, workers: int) -> None:
    """Refuse SQLite for more than one worker, before anything is created."""
    if workers > 1 and storage_kind(url) == "sqlite":
        raise UsageError(f"--storage {url}: SQLite is not safe for parallel workers (two workers can claim "
                         f"one trial); use the default journal file on one host, or postgresql:// across hosts")


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """Open (creating files/tables as needed) the storage behind `url`.

    `heartbeat_s` applies to PostgreSQL only (the default is DEFAULT_HEARTBEAT_S there): Optuna's
    heartbeat is what lets workers on other hosts detect a dead one.
    """
    kind = storage_kind(url)
    if kind == "journal":
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on any POSIX filesystem, symlink locks not on all network mounts.
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if kind == "sqlite":
        return RDBStorage(url)
    beat = heartbeat_s or DEFAULT_HEARTBEAT_S
    with _schema_lock(url), warnings.catch_warnings():
        # Heartbeats and the retry callback are "experimental" since Optuna 2.8 and the documented
        # way to run workers on many hosts; the warning would greet every worker's start.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # pool_pre_ping: a worker idles for a whole trial; the server may have dropped its connection.
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=beat,
                          grace_period=GRACE_BEATS * beat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Serialise opening a PostgreSQL storage across hosts.

    The first open creates Optuna's tables; hosts started at the same moment (a job array) would
    race on CREATE TABLE and all but one fail. A session advisory lock on a throwaway connection
    makes them take turns; the server drops it if the process dies.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def open_existing_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """For readers and joining workers: refuse to create a journal/SQLite file that does not exist."""
    if storage_kind(url) == "journal" and not journal_path(url).exists():
        raise UsageError(f"--storage {url}: no such journal file (run a study first)")
    path = sqlite_path(url) if storage_kind(url) == "sqlite" else None
    if path is not None and not path.exists():
        raise UsageError(f"--storage {url}: no such SQLite file")
    return open_storage(url, heartbeat_s)


def heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    """Seconds between heartbeats, or None where the storage has none (journal, SQLite)."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Drop pooled database connections (before forking workers: a child must not share them)."""
    if isinstance(storage, RDBStorage):
        storage.remove_session()
        storage.engine.dispose()
