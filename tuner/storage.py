"""Storage URLs: an Optuna journal file by default, SQLite or PostgreSQL on request."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from tuner.errors import UsageError

DEFAULT_STORAGE = "runs/optuna.journal"


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


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """Open (creating files/tables as needed) the storage behind `url`."""
    kind = storage_kind(url)
    if kind == "journal":
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on any POSIX filesystem, symlink locks not on all network mounts.
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    kwargs = {}
    if kind == "postgresql" and heartbeat_s:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        kwargs = {"heartbeat_interval": heartbeat_s, "grace_period": 4 * heartbeat_s,
                  "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2)}
    return RDBStorage(url, **kwargs)


def open_existing_storage(url: str) -> optuna.storages.BaseStorage:
    """For readers: refuse to create a journal file that does not exist."""
    if storage_kind(url) == "journal" and not journal_path(url).exists():
        raise UsageError(f"--storage {url}: no such journal file (run a study first)")
    if storage_kind(url) == "sqlite" and not Path(url.removeprefix("sqlite:///")).exists():
        raise UsageError(f"--storage {url}: no such SQLite file")
    return open_storage(url)
