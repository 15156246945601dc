"""A study's Optuna storage: which one, opened so that a lost database, a full disk or a torn journal says so.

Which one: sweep.storage, else the embedded default on one machine (the SQLite file <outputs>/optuna.db for one
process, the journal file <outputs>/studies/<name>/study.journal for several; a study stays where it was created).
Every storage call goes through GuardedStorage: a database server (PostgreSQL) that stops answering is retried until
sweep.storage_deadline_s has passed since its first unanswered call (a restart within it costs nothing), then
StorageError names the database (host, port, name; no password). A local file (SQLite, journal) that cannot be written
(a full disk) is a StorageError naming the file and the cause at once: waiting would not free the disk. A journal
whose last record was cut short (an append on a full disk) is repaired when it is opened: the torn tail goes to a file
beside it, every complete record stays, and the log says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna
from optuna.storages import BaseStorage

from lora_lab.config import ConfigError
from lora_lab.errors import first_line
from lora_lab.files import atomic_write, disk_full
from lora_lab.sweep import optuna_internals as internals
from lora_lab.sweep.optuna_internals import HeartbeatStorage

log = logging.getLogger("lora_lab")

JOURNAL_NAME = "study.journal"  # the embedded default for several processes, in the study's folder


class StorageError(RuntimeError):
    """The study's storage cannot be used: a database that has not answered for sweep.storage_deadline_s, or a local
    file (SQLite, journal) that cannot be written. The message names the storage and the cause; the study stops
    (exit 1) and the same command resumes it once the storage is back."""

    run_state = "FAIL"  # how a tracked run this stops ends (train's TrainingRun reads it)


# ----------------------------------------------------------------------------------------------- which storage


def journal_path(url: str) -> Path:
    """The file of a journal URL: journal:///abs/path (extra slashes ignored) or journal:relative/path."""
    raw = url[len("journal:") :]
    raw = raw[2:] if raw.startswith("//") else raw
    return Path("/" + raw.lstrip("/") if raw.startswith("/") else raw)


def embedded_url(name: str, outputs: Path, study_dir: Path, processes: int) -> tuple[str, str]:
    """The storage of a study without sweep.storage, and a line for the log ("" when there is nothing to say).

    A study found in the SQLite file resumes there (however many processes: SQLite serialises them, with heartbeats);
    a study with a journal file in its folder resumes from it; a new study of several processes gets that journal
    file; one process, the SQLite file."""
    db, journal = outputs / "optuna.db", study_dir / JOURNAL_NAME
    if internals.sqlite_has_study(db, name):
        return f"sqlite:///{db}", ""
    if journal.is_file():
        return f"journal://{journal}", f"study {name}: its storage is the journal file {journal}"
    if processes > 1:
        return (
            f"journal://{journal}",
            f"study {name}: {processes} processes on this machine share the journal file {journal} (sweep.storage "
            "unset; across hosts give sweep.storage=postgresql://...)",
        )
    return f"sqlite:///{db}", ""


def describe(url: str) -> str:
    """The storage as a person names it: the PostgreSQL database with its host and port (never the password), the
    SQLite file or the journal file."""
    if url.startswith("journal:"):
        return f"journal file {journal_path(url)}"
    if url.startswith("sqlite:///"):
        return f"SQLite file {url[len('sqlite:///') :]}"
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL: say what it is without repeating it
        return "the database of sweep.storage"
    pg = u.get_backend_name() == "postgresql"
    port = u.port or (5432 if pg else None)
    where = f"{u.host or 'localhost'}" + (f":{port}" if port else "")
    return f"{'PostgreSQL' if pg else u.get_backend_name()} database {u.database!r} on {where}" + (
        f" (user {u.username})" if u.username else ""
    )


def safe_url(url: str) -> str:
    """The URL without its password (for logs, tags and messages)."""
    if url.startswith(("journal:", "sqlite:")):
        return url
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return "<sweep.storage>"


def open_storage(url: str, deadline_s: float, heartbeat_s: int, grace_s: int, lost: Any) -> BaseStorage:
    """The study's storage behind a GuardedStorage; `lost` is the callback for trials whose heartbeat went stale.
    ConfigError (exit 2, nothing created) when it cannot be opened at all."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return GuardedStorage(JournalStorage(JournalFileBackend(str(path))), url, deadline_s)
    if url.startswith("sqlite:///"):
        # SQLite serialises writers; wait for the lock instead of failing with "database is locked".
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        # A dead connection is found at checkout, and a host that does not answer is given up on after 10 s a try.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        rdb = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_s,
            grace_period=grace_s,
            heartbeat_stale_trial_callback=lost,
        )
    except Exception as exc:
        raise ConfigError(
            f"sweep.storage={safe_url(url)!r}: cannot open it, {describe(url)} ({cause_line(exc)})"
        ) from None
    return GuardedStorage(internals.cached(rdb), url, deadline_s)


# ----------------------------------------------------------------------------------------------- journal repair


def repair_journal(path: Path) -> None:
    """Set aside a torn tail of the journal `path`: a last record cut short (no newline) or a last line that is not a
    record (a cut record with a later append glued on). Optuna skips such a tail when it reads, and the next append
    makes it unreadable for good ("Expecting ':' delimiter"): the tail goes to `<name>.torn-<time>-<pid>` beside it
    and the journal ends at its last complete record, which is exactly the study Optuna read. A line that is not a
    record with records after it cannot be dropped safely (later records number trials after it): ConfigError (exit
    2) naming the file, the line and the ways out. Under the journal's own lock, so no append is cut in half here."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's JournalFileBackend takes around every append
    lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        offset, cut, bad = 0, None, None
        for number, line in enumerate(lines, start=1):
            if cut is not None:  # a broken line with more after it
                raise ConfigError(
                    f"sweep.storage: the journal file {path} is damaged at line {bad[0]} of {len(lines)} "
                    f"({bad[1]}), with {len(lines) - bad[0]} records after it; it cannot be repaired safely. Restore "
                    f"it from a backup; or keep the study as it was before line {bad[0]} (later trials are lost): "
                    f"`head -n {bad[0] - 1} {path} > {path}.fixed && mv {path}.fixed {path}`; or start a new study "
                    "with another sweep.name"
                )
            problem = None
            if not line.endswith(b"\n"):
                problem = "cut short: no end of line"
            else:
                try:
                    json.loads(line)
                except ValueError as exc:
                    problem = f"not a record: {first_line(exc)}"
            if problem is not None:
                cut, bad = offset, (number, problem)
            offset += len(line)
        if cut is None:
            return
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            atomic_write(aside, data[cut:])
        except OSError as exc:
            raise ConfigError(
                f"sweep.storage: the journal file {path} ends in a torn record (line {bad[0]}, {bad[1]}), and it "
                f"could not be set aside: {exc}. Free space and run the command again"
            ) from None
        os.truncate(path, cut)
        log.warning(
            "journal file %s: its last record was torn (line %d, %s; %d bytes, a write cut short, e.g. by a full "
            "disk): moved to %s; the study goes on from its %d complete records",
            path,
            bad[0],
            bad[1],
            len(data) - cut,
            aside,
            bad[0] - 1,
        )
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------- guarded calls


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from (cause, else context), outermost first."""
    out: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception `exc` was raised from explicitly (`raise ... from`): what a library wrapped (SQLite's
    "database or disk is full" under SQLAlchemy's and Optuna's errors), not what was being handled at the time."""
    seen = [exc]
    while exc.__cause__ is not None and all(exc.__cause__ is not e for e in seen):
        exc = exc.__cause__
        seen.append(exc)
    return exc


def cause_line(exc: BaseException) -> str:
    """`exc` in one line, by its root cause: 'OperationalError: database or disk is full'."""
    return first_line(root_cause(exc), with_type=True)


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the database did not answer (refused, reset, closed, shut down), not that it refused the
    request: what a restart or a network blip raises, and what a retry can get past."""
    import sqlalchemy.exc as sa

    for e in chain(exc):
        if isinstance(e, sa.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError)):
            return True
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in ("OperationalError", "InterfaceError"):
            return True
    return False


def no_space(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full (ENOSPC, a quota, SQLite's "database or disk is full")."""
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "disk is full" in str(e)
        for e in chain(exc)
    )


class _Guard:
    """The behaviour of GuardedStorage (below): every storage call through `call`."""

    def __init__(self, inner: BaseStorage, url: str, deadline_s: float) -> None:
        self.inner, self.url, self.deadline_s = inner, url, deadline_s
        self.where = describe(url)
        local = url.startswith(("sqlite:", "journal:"))
        self.file: Optional[Path] = (
            journal_path(url) if url.startswith("journal:") else Path(url[len("sqlite:///") :]) if local else None
        )
        self.retry = not local  # a server can come back; a full local disk does not free itself
        self._down_since: Optional[float] = None  # time.time() of the first unanswered call of this outage
        self._beat_warned = False
        self._mutex = threading.Lock()  # the heartbeat thread calls too

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """inner.name(*args, **kwargs); a lost database retried until the deadline; errors that name the storage."""
        return self.guarded(getattr(self.inner, name), *args, **kwargs)

    def guarded(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), a read or write of this storage's database, under `call`'s retries and errors."""
        delay = 0.25
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if self.retry and connection_lost(exc):
                    since = self._went_away(exc)
                    left = since + self.deadline_s - time.time()
                    if left > 0:
                        time.sleep(min(delay, left))
                        delay = min(2 * delay, 2.0)
                        continue
                    raise StorageError(self._unreachable(since, exc)) from None
                refused = self._refused(exc)
                if refused is not None:
                    raise refused from None
                raise
            self._answered()
            return result

    def _went_away(self, exc: BaseException) -> float:
        with self._mutex:
            if self._down_since is None:
                self._down_since = time.time()
                log.warning(
                    "%s not answering (%s); retrying for up to sweep.storage_deadline_s=%g s",
                    self.where,
                    cause_line(exc),
                    self.deadline_s,
                )
            return self._down_since

    def _answered(self) -> None:
        if self._down_since is None:
            return
        with self._mutex:
            if self._down_since is not None:
                log.warning("%s answers again (after %.0f s)", self.where, time.time() - self._down_since)
                self._down_since, self._beat_warned = None, False

    def _unreachable(self, since: float, exc: BaseException) -> str:
        return (
            f"{self.where} has not answered since {time.strftime('%H:%M:%S', time.localtime(since))} (more than "
            f"sweep.storage_deadline_s={self.deadline_s:g} s; {cause_line(exc)}): "
            "the study stops here. Start the database again and run the same command to resume"
        )

    def _refused(self, exc: BaseException) -> Optional[StorageError]:
        """A StorageError for a write the storage refused: a full disk under a local file, an OS error, or Optuna's
        StorageInternalError (whose own text blames "invalid data in the commit" for everything); None for the
        errors Optuna uses to answer (a finished trial, an unknown study)."""
        root = cause_line(exc)
        if self.file is not None and (no_space(exc) or (isinstance(exc, OSError) and disk_full(self.file.parent))):
            return StorageError(
                f"{self.where}: cannot write it: no space left on device ({root}); "
                "the study in it is as it was before this write. Free space and run the same command again "
                "to resume"
            )
        if isinstance(exc, (OSError, optuna.exceptions.StorageInternalError)):
            return StorageError(f"{self.where}: {root}")
        return None

    # -- heartbeats: a missed one only risks the trial being retried elsewhere; never an error in their thread --

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.call("record_heartbeat", trial_id)
        except Exception as exc:  # noqa: BLE001 - the heartbeat thread must not die with a traceback
            if not self._beat_warned:
                self._beat_warned = True
                log.warning("heartbeat of a trial not recorded: %s", first_line(exc))

    def get_heartbeat_interval(self) -> Optional[int]:
        return self.inner.get_heartbeat_interval() if isinstance(self.inner, HeartbeatStorage) else None

    def get_heartbeat_stale_trial_callback(self) -> Optional[Callable[..., None]]:
        return self.inner.get_heartbeat_stale_trial_callback() if isinstance(self.inner, HeartbeatStorage) else None


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: _Guard, *args: Any, **kwargs: Any) -> Any:
        return self.call(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The guarded storage's {name} (see _Guard.call)."
    return method


# Every method Optuna's storages have, through _Guard.call (the heartbeat's own three are _Guard's).
_DELEGATED = sorted(
    ({n for n in dir(BaseStorage) if not n.startswith("_")} | {"_get_stale_trial_ids"})
    - {"record_heartbeat", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback"}
)
GuardedStorage = type(
    "GuardedStorage",
    (_Guard, BaseStorage, HeartbeatStorage),
    {
        "__doc__": "An Optuna storage that forwards every call to `inner` through _Guard.call: bounded retries on a "
        "database that went away, StorageError naming the storage for what cannot be retried.",
        "__module__": __name__,
        **{name: _delegate(name) for name in _DELEGATED},
    },
)


@contextlib.contextmanager
def advisory_lock(url: str, key: int, deadline_s: float) -> Iterator[None]:
    """PostgreSQL's advisory lock `key` for the body (serialises budget top-ups across hosts); a database that does
    not answer is retried until `deadline_s`, then StorageError."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
    start = time.time()
    try:
        while True:
            try:
                conn = engine.connect()
            except Exception as exc:
                if not connection_lost(exc) or time.time() - start > deadline_s:
                    raise StorageError(f"{describe(url)}: cannot take the study's lock ({cause_line(exc)})") from None
                time.sleep(1.0)
                continue
            with conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):  # a lost connection releases the lock by itself
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return
    finally:
        engine.dispose()
