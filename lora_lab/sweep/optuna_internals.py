"""Every use of Optuna's private internals, in one place (brief, rule 11); the rest of lora_lab uses its public API.

The sweep pops WAITING trials itself (an exact budget across workers and hosts) instead of calling `optimize()`, so it
needs what `optimize()` does inside: pop a waiting trial atomically, run the heartbeat thread, and reach a trial's
storage by id. tests/test_optuna_internals.py checks each function against the installed Optuna; pyproject.toml
allows `optuna>=4.0,<6`, and `SUPPORTED` below is the range these were written and tested for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from optuna.storages import _heartbeat

SUPPORTED = ((4, 0), (6, 0))

# The base class of storages with heartbeats (RDBStorage, _CachedStorage): a storage that wraps one must be one too,
# or Optuna's heartbeat thread and fail_stale_trials ignore it.
HeartbeatStorage = _heartbeat.BaseHeartbeat  # [low, high): Optuna versions whose internals match these functions


def version_supported(version: str = optuna.__version__) -> bool:
    """Whether `version` lies in SUPPORTED."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return SUPPORTED[0] <= parts < SUPPORTED[1]


def storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study object talks to (`Study._storage`)."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's id in its storage (`_trial_id`), not its number."""
    return trial._trial_id


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """A live trial as its storage has it now (attributes set by other processes included)."""
    return storage(trial.study).get_trial(trial._trial_id)


def trial_number(study: optuna.Study, tid: int) -> int:
    """The number of the trial with id `tid`."""
    return storage(study).get_trial_number_from_id(tid)


def pop_waiting_trial_id(study: optuna.Study) -> Optional[int]:
    """Atomically take one WAITING trial (RUNNING from now on, for this process), or None: retries first (a trial
    interrupted, lost with its worker or stopped by a full disk resumes before new trials start; Optuna's system
    attribute `failed_trial`), then by number. The study's per-thread cache of trials is dropped first, or trials
    enqueued by other processes since the last read stay invisible. What Study._pop_waiting_trial_id does, in this
    order: setting a WAITING trial RUNNING succeeds in one process only."""
    from optuna.trial import TrialState

    study._thread_local.cached_all_trials = None
    waiting = storage(study).get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
    for trial in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs, t.number)):
        try:
            if storage(study).set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                return trial._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:  # finished by another process since the read
            continue
    return None


def cached(rdb: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """An RDB storage behind Optuna's cache of finished trials (`_CachedStorage`), as optuna.create_study wraps a
    bare RDBStorage; the sweep wraps the storage once more (sweep.storage.GuardedStorage), which Optuna leaves as is."""
    from optuna.storages._cached_storage import _CachedStorage

    return _CachedStorage(rdb)


def sqlite_has_study(db: Path, name: str) -> bool:
    """Whether the Optuna SQLite file `db` holds a study named `name`, read-only (nothing is created or migrated).
    Optuna's table `studies` (column `study_name`) is unchanged since Optuna 1."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            return con.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error:  # empty, another schema, not a database: no study of that name in it
        return False


def heartbeats_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (RDB storage with heartbeat_interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage(study))


def unbeaten_running(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials of a database storage that have no heartbeat recorded. Optuna's fail_stale_trials judges
    only trials with one (RDBStorage._get_stale_trial_ids skips the rest), so a trial popped by a worker killed
    before its first beat stayed RUNNING for good and every later worker waited on it. The query reads Optuna's
    table `trial_heartbeats` (models.TrialHeartbeatModel, in the versions SUPPORTED) of the RDBStorage found under
    the study's storage wrappers (`inner`: the sweep's guard; `_backend`: Optuna's cache)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    rdb: Any = storage(study)
    while not isinstance(rdb, optuna.storages.RDBStorage):
        rdb = getattr(rdb, "inner", None) or getattr(rdb, "_backend", None)
        if rdb is None:  # a journal: no heartbeats
            return []
    running = rdb.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    ids = [t._trial_id for t in running]
    beat = models.TrialHeartbeatModel
    with _create_scoped_session(rdb.scoped_session) as session:
        beaten = {tid for (tid,) in session.query(beat.trial_id).filter(beat.trial_id.in_(ids))}
    return [t for t in running if t._trial_id not in beaten]


@contextlib.contextmanager
def heartbeat(study: optuna.Study, tid: int) -> Iterator[Any]:
    """Send heartbeats for trial `tid` while the block runs (what `optimize()` does around each trial)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(tid, storage(study)) as thread:
        yield thread
