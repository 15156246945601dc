"""The study's storage (lora_lab/sweep/storage.py): bounded retries on a database that went away, errors that name the
storage (never a password), a full local disk said at once, Optuna's own answers passed through, heartbeats that
never raise, and which embedded storage a study gets. Servers for real: tests/test_sweep_servers.py."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from lora_lab.sweep.storage import GuardedStorage, StorageError, describe, embedded_url, safe_url

PG = "postgresql+psycopg2://alice:s3cret@db.example:5433/optuna"


class Flaky:
    """A storage whose calls fail `failures` times with `error()`, then answer."""

    def __init__(self, failures: int, error) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def get_all_studies(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return ["answer"]

    record_heartbeat = get_all_studies


def _raise(error):
    def make():
        try:
            raise error
        except BaseException as exc:
            return exc

    return make


def storage_error_from(cause: BaseException):
    def make():
        try:
            raise cause
        except BaseException as exc:
            try:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
            except optuna.exceptions.StorageInternalError as wrapped:
                return wrapped

    return make


def test_a_database_back_within_the_deadline_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    inner = Flaky(2, storage_error_from(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("refused"))))
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        assert GuardedStorage(inner, PG, deadline_s=30).get_all_studies() == ["answer"]
    assert inner.calls == 3
    assert "PostgreSQL database 'optuna' on db.example:5433 (user alice) not answering" in caplog.text
    assert "answers again" in caplog.text and "s3cret" not in caplog.text


def test_a_database_gone_past_the_deadline_is_one_error_naming_it_without_its_password() -> None:
    inner = Flaky(10**6, storage_error_from(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("refused"))))
    with pytest.raises(StorageError) as info:
        GuardedStorage(inner, PG, deadline_s=0.6).get_all_studies()
    msg = str(info.value)
    assert msg.startswith("PostgreSQL database 'optuna' on db.example:5433 (user alice) has not answered since ")
    assert "sweep.storage_deadline_s=0.6 s" in msg and "run the same command to resume" in msg
    assert "s3cret" not in msg and "invalid data" not in msg
    assert 2 <= inner.calls < 20  # retried with a growing pause, not spun


def test_a_full_disk_under_sqlite_is_said_at_once(tmp_path: Path) -> None:
    inner = Flaky(1, storage_error_from(sqlite3.OperationalError("database or disk is full")))
    db = tmp_path / "optuna.db"
    with pytest.raises(StorageError) as info:
        GuardedStorage(inner, f"sqlite:///{db}", deadline_s=60).get_all_studies()
    assert inner.calls == 1  # no retry: waiting frees no disk
    assert str(info.value).startswith(f"SQLite file {db}: cannot write it: no space left on device")
    assert "OperationalError: database or disk is full" in str(info.value)
    journal = Flaky(1, _raise(OSError(28, "No space left on device")))
    with pytest.raises(StorageError, match=f"journal file {tmp_path / 'j'}: cannot write it: no space left"):
        GuardedStorage(journal, f"journal://{tmp_path / 'j'}", deadline_s=60).get_all_studies()


def test_optunas_own_answers_pass_through_unchanged() -> None:
    for error in (KeyError("no study"), optuna.exceptions.UpdateFinishedTrialError("finished")):
        inner = Flaky(1, _raise(error))
        with pytest.raises(type(error)):
            GuardedStorage(inner, PG, deadline_s=60).get_all_studies()
        assert inner.calls == 1


def test_a_heartbeat_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    inner = Flaky(10**6, storage_error_from(sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("refused"))))
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        GuardedStorage(inner, PG, deadline_s=0.3).record_heartbeat(1)
        GuardedStorage(inner, PG, deadline_s=0.3).record_heartbeat(1)
    assert "heartbeat of a trial not recorded" in caplog.text


def test_storages_are_named_for_people() -> None:
    assert describe(PG) == "PostgreSQL database 'optuna' on db.example:5433 (user alice)"
    assert describe("postgresql://h/db") == "PostgreSQL database 'db' on h:5432"
    assert describe("sqlite:////out/optuna.db") == "SQLite file /out/optuna.db"
    assert describe("journal:///out/s.journal") == "journal file /out/s.journal"
    assert safe_url(PG) == "postgresql+psycopg2://alice:***@db.example:5433/optuna"


def test_which_embedded_storage_a_study_gets(tmp_path: Path) -> None:
    out, folder = tmp_path / "out", tmp_path / "out" / "studies" / "s"
    assert embedded_url("s", out, folder, processes=1) == (f"sqlite:///{out / 'optuna.db'}", "")
    url, note = embedded_url("s", out, folder, processes=2)
    assert url == f"journal://{folder / 'study.journal'}" and "2 processes on this machine share" in note
    folder.mkdir(parents=True)
    (folder / "study.journal").write_text("")
    assert embedded_url("s", out, folder, processes=1)[0] == url  # a journal study resumes from its journal
    optuna.create_study(study_name="s", storage=f"sqlite:///{out / 'optuna.db'}")
    assert embedded_url("s", out, folder, processes=4) == (f"sqlite:///{out / 'optuna.db'}", "")  # stays in SQLite
