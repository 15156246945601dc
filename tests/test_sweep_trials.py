"""A trial's typed data (lora_lab/sweep/trials.py): its attributes round-trip through Optuna's storage under the keys
existing studies hold, unknown and missing keys are named, failures get their kind, and out of memory is recognised
by the exception's type, never by its message."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from lora_lab.config import ConfigError, load_sweep
from lora_lab.sweep.trials import KEYS, Failure, FailureKind, TrialAttrs, is_oom, verdict

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


class Run:
    """What verdict() reads of a records.RunRecord: its status, reason and results by name."""

    def __init__(self, status: str = "completed", reason: str = "", **results: float) -> None:
        self.status, self.reason, self.results = status, reason, results

    def value(self, name: str) -> float:
        return self.results.get(name)


def test_a_diverged_trial_gets_its_kind_and_the_verdict_its_state() -> None:
    spec = load_sweep("default", [])  # one objective: val_loss
    stopped = verdict(spec, Run("diverged", "non-finite training loss at step 3"))
    assert stopped.state == "FAIL" and stopped.failure.kind == FailureKind.DIVERGED
    assert stopped.outcome() == ("FAIL", "diverged: non-finite training loss at step 3")  # the reason as before
    nan = verdict(spec, Run(val_loss=float("nan")))
    assert nan.failure.kind == FailureKind.DIVERGED and nan.failure.reason == "diverged: objective val_loss is nan"
    inf = verdict(spec, Run(val_loss=float("inf")))  # Optuna would take +inf as COMPLETE
    assert inf.state == "FAIL" and inf.failure.kind == FailureKind.DIVERGED
    ok = verdict(spec, Run(val_loss=2.0))
    assert ok.state == "COMPLETE" and ok.failure is None and ok.outcome() == ("COMPLETE", "")


def test_an_oom_trial_and_a_bad_config_trial_get_their_kinds() -> None:
    oom = Failure.of(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines"))
    assert oom.kind == FailureKind.OOM and oom.reason == "oom: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert Failure.of(torch.cuda.OutOfMemoryError("again")).kind == FailureKind.OOM  # the same class
    bad = Failure.of(ConfigError("lora.r: expected an integer >= 1, got 0"))
    assert bad.kind == FailureKind.CONFIG and bad.reason == "ConfigError: lora.r: expected an integer >= 1, got 0"
    error = Failure.of(OSError(2, "No such file or directory"))
    assert error.kind == FailureKind.ERROR and error.reason == "FileNotFoundError: [Errno 2] No such file or directory"
    assert Failure.of(ValueError("x" * 5000)).reason == "ValueError: " + "x" * 988  # first line, 1000 characters
    assert not any(
        k.stops_study for k in (FailureKind.OOM, FailureKind.CONFIG, FailureKind.ERROR, FailureKind.DIVERGED)
    )


def test_a_full_disk_and_a_lost_tracking_server_are_kinds_that_stop_the_study() -> None:
    import errno

    from lora_lab.files import WriteError
    from lora_lab.tracking import TrackingUnreachable

    full = Failure.of(OSError(errno.ENOSPC, "No space left on device", "/out/x.json"))
    assert full.kind == FailureKind.DISK and full.kind.stops_study
    assert full.reason == "disk full: No space left on device: /out/x.json"
    written = Failure.of(WriteError("/out/metrics.json", OSError(errno.ENOSPC, "No space left on device")))
    assert written.reason == "disk full: cannot write /out/metrics.json: no space left on device"
    read_only = Failure.of(WriteError("/out/m.json", OSError(errno.EROFS, "Read-only file system")))
    assert read_only.kind == FailureKind.DISK and read_only.reason == "cannot write /out/m.json: read-only file system"
    lost = Failure.of(TrackingUnreachable("tracking server http://h:1 unreachable since 10:00:00 (...)"))
    assert lost.kind == FailureKind.TRACKING and lost.kind.stops_study
    assert lost.reason == "tracking server http://h:1 unreachable since 10:00:00 (...)"


def test_any_error_on_a_full_disk_is_the_disk(tmp_path, monkeypatch) -> None:
    """Safetensors' and SQLite's errors do not always say ENOSPC: any error while the trial's disk is full is the
    disk's."""
    from lora_lab import files

    monkeypatch.setattr(files, "disk_full", lambda folder, margin=1 << 20: True)
    failure = Failure.of(RuntimeError("Error while serializing: I/O error"), folder=tmp_path)
    assert failure.kind == FailureKind.DISK
    assert (
        failure.reason
        == f"disk full: no space left under {tmp_path} (RuntimeError: Error while serializing: I/O error)"
    )
    assert Failure.of(RuntimeError("x")).kind == FailureKind.ERROR  # without the trial's folder: not judged


def test_failing_the_same_way_compares_kinds_and_exception_types() -> None:
    oom = [Failure.of(torch.OutOfMemoryError("a")), Failure.of(torch.OutOfMemoryError("b"))]
    assert oom[0].signature == oom[1].signature
    assert Failure.of(ValueError("a")).signature == Failure.of(ValueError("b")).signature
    assert Failure.of(ValueError("a")).signature != Failure.of(KeyError("a")).signature
    assert Failure.diverged("diverged: a").signature == Failure.diverged("diverged: b").signature
    assert Failure.of(ConfigError("a")).signature != Failure.of(ValueError("a")).signature


def test_oom_is_recognised_by_type_not_by_message() -> None:
    # A message is not a type: these are errors, whatever they say.
    assert not is_oom(RuntimeError("CUDA error: out of memory"))
    assert Failure.of(RuntimeError("CUDA out of memory (a message only)")).kind == FailureKind.ERROR
    assert not is_oom(ValueError("out of memory"))
    # What torch raises when the CPU allocator fails: a plain RuntimeError, not OutOfMemoryError (never retried).
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**62, dtype=torch.uint8)
    assert not isinstance(cpu.value, torch.OutOfMemoryError) and not is_oom(cpu.value)
    # CUDA: the caching allocator raises torch.OutOfMemoryError; a failing CUDA call that allocates (pinned host
    # memory, a library's cudaMalloc) raises torch.AcceleratorError with error_code cudaErrorMemoryAllocation (2).
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    accel = torch.AcceleratorError("CUDA error: out of memory")
    accel.error_code = 2
    assert is_oom(accel)
    illegal = torch.AcceleratorError("CUDA error: an illegal memory access was encountered (says out of memory)")
    illegal.error_code = 700
    assert not is_oom(illegal)
    # Raised from a real one (a wrapper's `raise ... from oom`): still out of memory.
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("compiling the step failed") from inner
    except RuntimeError as wrapped:
        assert is_oom(wrapped)
