"""A trial's typed data (lora_lab/sweep/trials.py): its attributes round-trip through Optuna's storage under the keys
existing studies hold, unknown and missing keys are named, failures get their kind, and out of memory is recognised
by the exception's type, never by its message."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from lora_lab.sweep.trials import KEYS, TrialAttrs

# The user_attrs keys that studies written before TrialAttrs existed hold (SQLite, journal, PostgreSQL): renaming one
# would leave a resumed study's trials without it. trials.csv's columns are pinned by tests/test_golden_behaviour.py.
STORED_KEYS = {
    "fingerprint",
    "worker",
    "derived",
    "overrides",
    "output_dir",
    "device",
    "warm",
    "train_time_s",
    "eval_time_s",
    "overhead_s",
    "wall_s",
    "trainable_params",
    "total_params",
    "val_loss",
    "merged_val_loss",
    "accuracy",
    "time_per_step_s",
    "peak_mem_bytes",
    "max_abs_logit_diff",
    "checkpoint_bytes",
    "fail_reason",
    "prune_reason",
    "retried_because",
}

RECORD = TrialAttrs(
    fingerprint="0123456789abcdef",
    worker="host:42",
    derived={"lora.alpha": 16.0},
    overrides=["lora.r=8", "optim.lr=0.0003", "lora.alpha=16.0"],
    output_dir="/tmp/studies/s/trials/0000",
    device="host:cuda:1",
    warm=True,
    train_time_s=1.5,
    eval_time_s=0.25,
    overhead_s=0.125,
    wall_s=1.875,
    trainable_params=1024,
    total_params=100_000,
    val_loss=2.5,
    merged_val_loss=2.5,
    accuracy=None,
    time_per_step_s=0.01,
    peak_mem_bytes=2**30,
    max_abs_logit_diff=1e-6,
    checkpoint_bytes=4096,
    fail_reason=None,
    prune_reason=None,
    retried_because="trial 3: worker lost: no heartbeat (killed or preempted)",
)


def test_the_stored_keys_are_the_ones_existing_studies_hold() -> None:
    assert set(KEYS) == STORED_KEYS


@pytest.mark.parametrize("storage", ["memory", "sqlite", "journal"])
def test_write_then_read_back_gives_the_same_record(storage: str, tmp_path: Path) -> None:
    if storage == "sqlite":
        store = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    elif storage == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        store = JournalStorage(JournalFileBackend(str(tmp_path / "o.journal")))
    else:
        store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=store, study_name="s")
    trial = study.ask()
    values = {k: v for k, v in vars(RECORD).items() if v is not None}
    TrialAttrs.write(trial, **values)
    TrialAttrs.write(trial, accuracy=None)  # stored as given: None too
    study.tell(trial, 1.0)
    (frozen,) = optuna.load_study(study_name="s", storage=store).get_trials()
    assert TrialAttrs.read(frozen) == RECORD
    assert TrialAttrs.read(frozen.user_attrs) == RECORD
    assert set(frozen.user_attrs) == set(values) | {"accuracy"}  # under the very keys, nothing added
    assert RECORD.stored() == values  # what a retry copies: the recorded ones


def test_an_unknown_key_is_named_on_write_and_on_read() -> None:
    trial = optuna.create_study().ask()
    with pytest.raises(TypeError, match="'peak_memory'.*known: fingerprint"):
        TrialAttrs.write(trial, peak_memory=1)
    assert trial.user_attrs == {}  # nothing written when one key is wrong
    trial.set_user_attr("bogus", 1)  # e.g. by hand, or by another tool
    with pytest.raises(ValueError, match="'bogus' stored on trial 0"):
        TrialAttrs.read(trial)


def test_a_missing_attribute_is_named() -> None:
    attrs = TrialAttrs(train_time_s=1.0)
    assert attrs.require("train_time_s") == (1.0,)
    with pytest.raises(KeyError, match="eval_time_s, wall_s"):
        attrs.require("train_time_s", "eval_time_s", "wall_s")
    with pytest.raises(ValueError, match="'walltime'"):
        attrs.require("walltime")
    assert TrialAttrs.read({}) == TrialAttrs()  # a trial nobody wrote to: every attribute not recorded
