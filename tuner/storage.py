"""Storage URLs: an Optuna journal file by default, SQLite or PostgreSQL on request.

Which storage for how many workers (see docs/distributed.md):
- journal file (default): safe for several processes on one host; a dead worker's trial is
  recovered through the owner host/pid recorded on the trial.
- SQLite: one worker only (parallel writers corrupt the trial bookkeeping).
- PostgreSQL: many hosts; the only backend with heartbeats, so a worker that dies anywhere has
  its trial failed and retried by `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from tuner.errors import UsageError
from tuner.paths import out_dir_problem

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


def check_storage(url: str, must_exist: bool = False) -> None:
    """Refuse, before anything is created, a storage that could not be opened or written.

    Journal/SQLite: the file must be a regular file (not a FIFO, a device, a folder) or be
    creatable; SQLite needs a file (an in-memory database would lose the study); PostgreSQL
    needs a parsable URL and its driver installed.
    """
    kind = storage_kind(url)
    if kind == "postgresql":
        _check_postgres(url)
        return
    path = journal_path(url) if kind == "journal" else sqlite_path(url)
    if path is None or not str(path).strip():
        raise UsageError(f"--storage {url}: no file named (an in-memory database would lose the study; "
                         f"give sqlite:///FILE.db or a journal file path)")
    problem = _file_problem(path, must_exist) or (_content_problem(path, kind) if path.exists() else None)
    if problem:
        raise UsageError(f"--storage {url}: {problem}")


def _content_problem(path: Path, kind: str) -> str | None:
    """An existing file must be what the URL says (a torn-tail repair must never cut another file)."""
    with path.open("rb") as handle:
        head = handle.read(_TAIL_CHUNK)
    if not head:
        return None
    if kind == "sqlite":
        return None if head.startswith(b"SQLite format 3\x00") else "not an SQLite database"
    first, newline, _ = head.partition(b"\n")
    looks = _is_record(first) and b'"op_code"' in first if newline else first.startswith(b'{"op_code"')
    return None if looks else "not an Optuna journal file"


def _file_problem(path: Path, must_exist: bool) -> str | None:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        if must_exist:
            return "no such file (run a study first)"
        return out_dir_problem(path.parent if str(path.parent) else Path("."))
    except OSError as exc:
        return f"cannot be used ({exc.strerror})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK | (0 if must_exist else os.W_OK)):
        return "not readable and writable"
    return None


# SQLAlchemy's driver for each URL scheme, and the package that provides it.
_PG_DRIVERS = {"postgresql": "psycopg2", "postgresql+psycopg2": "psycopg2", "postgresql+psycopg": "psycopg"}


def _check_postgres(url: str) -> None:
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.port  # noqa: B018 - a bad port only raises when read
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise UsageError(f"--storage {_redacted(url)}: malformed URL ({exc})") from None
    driver = _PG_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise UsageError(f"--storage {_redacted(url)}: unsupported driver {parsed.drivername!r} "
                         f"(use {', '.join(_PG_DRIVERS)})")
    if importlib.util.find_spec(driver) is None:
        raise UsageError(f"--storage {_redacted(url)}: the PostgreSQL driver {driver!r} is not installed "
                         f"(pip install {driver}{'-binary' if driver == 'psycopg2' else ''})")


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL too malformed to parse has no password to hide
        return url.split("@")[-1]


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
    if kind != "postgresql":
        check_storage(url)
    if kind == "journal":
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on any POSIX filesystem, symlink locks not on all network mounts.
        lock = JournalFileOpenLock(str(path))
        repair_torn_tail(path, lock)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
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
    if storage_kind(url) != "postgresql":
        check_storage(url, must_exist=True)
    return open_storage(url, heartbeat_s)


# ---------------------------------------------------------------- torn journal tails

_TAIL_CHUNK = 1 << 16


def repair_torn_tail(path: Path, lock: JournalFileOpenLock) -> int:
    """Make the journal end with a complete record before anything appends to it.

    A crash mid-write leaves a last line without its newline; Optuna skips it on read, but the
    next append would glue a record onto it and make the whole journal unreadable. Under the
    journal's own lock (so a live writer's record is never mistaken for a torn one), a tail
    that is not a complete JSON record is moved aside to `<journal>.torn-<UTC time>` and the
    journal truncated after its last complete record; a tail that is a whole record lacking
    only its newline gets the newline. Returns the number of bytes moved aside.
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    lock.acquire()
    try:
        return _repair_locked(path)
    finally:
        lock.release()


def _repair_locked(path: Path) -> int:
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start, tail = _last_lines(handle, size)
    lines = tail.split(b"\n")
    torn_from = size
    if lines[-1]:  # bytes after the last newline
        if _is_record(lines[-1]):
            _append_newline(path)
            return 0
        torn_from = size - len(lines[-1])
    elif len(lines) >= 2 and not _is_record(lines[-2]):  # a complete line that is not a record
        torn_from = size - len(lines[-2]) - 1
    if torn_from == size:
        return 0
    return _move_aside(path, torn_from, size)


def _last_lines(handle, size: int) -> tuple[int, bytes]:  # noqa: ANN001 - a binary file
    """(offset, bytes) of the file's end holding its last two lines (or the whole file)."""
    start = size
    tail = b""
    while start > 0 and tail.count(b"\n") < 3:
        start = max(0, start - _TAIL_CHUNK)
        handle.seek(start)
        tail = handle.read(size - start)
    if start > 0:  # drop the partial line at the chunk's start
        tail = tail[tail.index(b"\n") + 1:]
    return start, tail


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _append_newline(path: Path) -> None:
    with path.open("ab") as handle:
        handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    print(f"autoglm-tune: journal {path}: its last record lacked its newline (a write cut short); "
          f"completed it", file=sys.stderr)


def _move_aside(path: Path, torn_from: int, size: int) -> int:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}")
    with path.open("rb") as handle:
        handle.seek(torn_from)
        torn = handle.read()
    try:
        with aside.open("xb") as out:
            out.write(torn)
            out.flush()
            os.fsync(out.fileno())
        os.truncate(path, torn_from)
    except OSError as exc:
        print(f"autoglm-tune: journal {path}: its last {size - torn_from} bytes are a torn record, which "
              f"could not be moved aside ({exc.strerror}); reading only", file=sys.stderr)
        return 0
    print(f"autoglm-tune: journal {path}: moved a torn last record ({size - torn_from} bytes, a write cut "
          f"short) to {aside}; every complete record is kept", file=sys.stderr)
    return size - torn_from


def heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    """Seconds between heartbeats, or None where the storage has none (journal, SQLite)."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Drop pooled database connections (before forking workers: a child must not share them)."""
    if isinstance(storage, RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


# ---------------------------------------------------------------- one trial's row in the storage


@dataclass(frozen=True)
class TrialHandle:
    """A trial's row in the storage, for the writes Optuna's `Study`/`Trial` do not offer:
    failing another worker's RUNNING trial, a heartbeat, the plain `constraints` list.

    Optuna keeps a study's storage and a trial's id private (`study._storage`,
    `trial._trial_id`); `trial_handle` is the one place that reaches in for them, so an Optuna
    upgrade that renames them breaks here (the other reach into Optuna's internals is `auto`'s
    GP, tuner/gp_search.py, which says why).
    """

    storage: optuna.storages.BaseStorage
    trial_id: int

    def set_user_attr(self, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id, key, value)

    def set_system_attr(self, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(self.trial_id, key, value)

    def system_attrs(self) -> dict[str, Any]:
        return self.storage.get_trial_system_attrs(self.trial_id)

    def fail(self) -> None:
        """RUNNING -> FAIL; raises `UpdateFinishedTrialError` when it finished meanwhile."""
        self.storage.set_trial_state_values(self.trial_id, optuna.trial.TrialState.FAIL)

    def record_heartbeat(self) -> None:
        self.storage.record_heartbeat(self.trial_id)


def trial_handle(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial) -> TrialHandle:
    """The storage row of `trial` (a live `Trial` or a `FrozenTrial`) of `study`."""
    return TrialHandle(study._storage, trial._trial_id)  # Optuna's private storage and trial id
