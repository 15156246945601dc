"""The one module that touches Optuna's private internals, checked against the installed Optuna (pyproject allows
optuna>=4.0; SUPPORTED is the range these internals were written for)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from lora_lab.sweep import optuna_internals as internals


def test_installed_optuna_is_in_the_supported_range() -> None:
    assert internals.version_supported(), f"optuna {optuna.__version__} outside {internals.SUPPORTED}: recheck"
    assert internals.version_supported("4.0.0") and internals.version_supported("5.9.1")
    assert not internals.version_supported("3.6.1") and not internals.version_supported("6.0.0")


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=2)
    return optuna.create_study(study_name="s", storage=storage)


def test_pop_waiting_trials_once_each_and_read_them_back(study: optuna.Study) -> None:
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({"x": 2.0})
    other = optuna.load_study(study_name="s", storage=internals.storage(study))  # another worker's view
    first, second = internals.pop_waiting_trial_id(study), internals.pop_waiting_trial_id(other)
    assert first is not None and second is not None and first != second
    assert internals.pop_waiting_trial_id(study) is None
    assert [internals.trial_number(study, t) for t in (first, second)] == [0, 1]
    trial = optuna.Trial(study, second)
    assert internals.trial_id(trial) == second
    trial.study.set_user_attr("k", 1)
    internals.storage(study).set_trial_system_attr(second, "failed_trial", 0)  # set elsewhere, seen by frozen()
    frozen = internals.frozen(trial)
    assert frozen.number == 1 and frozen.system_attrs["failed_trial"] == 0
    assert frozen.state == optuna.trial.TrialState.RUNNING


def test_heartbeat_keeps_a_running_trial_alive(study: optuna.Study) -> None:
    assert internals.heartbeats_enabled(study)
    study.enqueue_trial({})
    tid = internals.pop_waiting_trial_id(study)
    with internals.heartbeat(study, tid):
        time.sleep(3)
        optuna.storages.fail_stale_trials(study)
        assert study.get_trials()[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(3)  # no heartbeat for longer than the grace period: stale
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL
    assert not internals.heartbeats_enabled(optuna.create_study())
