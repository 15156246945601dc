"""Every use of Optuna's private internals, in one place (brief, rule 11); the rest of lora_lab uses its public API.

The sweep pops WAITING trials itself (an exact budget across workers and hosts) instead of calling `optimize()`, so it
needs what `optimize()` does inside: pop a waiting trial atomically, run the heartbeat thread, and reach a trial's
storage by id. tests/test_optuna_internals.py checks each function against the installed Optuna; pyproject.toml
allows `optuna>=4.0,<6`, and `SUPPORTED` below is the range these were written and tested for.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import optuna

SUPPORTED = ((4, 0), (6, 0))  # [low, high): Optuna versions whose internals match these functions


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
    """Atomically take one WAITING trial (RUNNING from now on, for this process), or None. The study's per-thread
    cache of trials is dropped first, or trials enqueued by other processes since the last read stay invisible."""
    study._thread_local.cached_all_trials = None
    return study._pop_waiting_trial_id()


def heartbeats_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (RDB storage with heartbeat_interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage(study))


@contextlib.contextmanager
def heartbeat(study: optuna.Study, tid: int) -> Iterator[Any]:
    """Send heartbeats for trial `tid` while the block runs (what `optimize()` does around each trial)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(tid, storage(study)) as thread:
        yield thread
