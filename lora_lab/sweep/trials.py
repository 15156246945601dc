"""A trial's own data: its typed attributes (stored as Optuna user_attrs), why it failed, and the verdict on its run."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import optuna

from lora_lab.config import SweepConfig
from lora_lab.errors import first_line
from lora_lab.records import RunRecord
from lora_lab.sweep.storage import chain

AnyTrial = Union[optuna.Trial, optuna.trial.FrozenTrial]


@dataclass
class TrialAttrs:
    """Everything lora_lab keeps on an Optuna trial, typed; None = not recorded.

    The field names are the keys stored in the study's user_attrs, unchanged since before this class existed: studies
    in SQLite, journal files or PostgreSQL resume as they are, and bench_sweep reads the same keys. TrialAttrs.write is
    the one writer, TrialAttrs.read the one reader; both refuse a key that is not a field, naming it.
    """

    # Who ran it and what it ran: set when a worker takes the trial (study.py's fingerprint, host:pid).
    fingerprint: Optional[str] = None
    worker: Optional[str] = None
    derived: Optional[dict[str, Any]] = None  # tied, map and fixed space entries' values (search.suggest)
    overrides: Optional[list[str]] = None  # sampled + derived overrides, as run (after an OOM: the smaller batch)
    output_dir: Optional[str] = None
    device: Optional[str] = None  # host:cpu, host:cuda:<physical index>
    warm: Optional[bool] = None  # the model came from this worker's last trial
    # Where its wall time went (trials that completed or were pruned).
    train_time_s: Optional[float] = None
    eval_time_s: Optional[float] = None
    overhead_s: Optional[float] = None  # wall_s - train_time_s - eval_time_s: compose, load, logging
    wall_s: Optional[float] = None
    # What a completed trial measured: records.Results fields of the same names (RESULTS).
    trainable_params: Optional[int] = None
    total_params: Optional[int] = None
    val_loss: Optional[float] = None
    merged_val_loss: Optional[float] = None
    accuracy: Optional[float] = None
    time_per_step_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    max_abs_logit_diff: Optional[float] = None
    checkpoint_bytes: Optional[int] = None
    # Why it ended as it did.
    fail_reason: Optional[str] = None
    prune_reason: Optional[str] = None
    retried_because: Optional[str] = None  # on a retry: which trial it replaces and why

    @classmethod
    def read(cls, source: Union[AnyTrial, Mapping[str, Any]]) -> "TrialAttrs":
        """A trial's attributes (a live or frozen trial, or its user_attrs dict); ValueError naming unknown keys."""
        attrs = source if isinstance(source, Mapping) else source.user_attrs
        check_keys(attrs, "stored on trial" + (f" {source.number}" if hasattr(source, "number") else ""))
        return cls(**attrs)

    @staticmethod
    def write(trial: AnyTrial, **values: Any) -> None:
        """Set these attributes on `trial` (a live trial, or a frozen one about to be copied into a retry); values
        are stored as given, None included. TypeError naming a key that is not a field."""
        try:
            check_keys(values, "written")
        except ValueError as exc:
            raise TypeError(str(exc)) from None
        for key, value in values.items():
            trial.set_user_attr(key, value)

    @staticmethod
    def for_retry(because: str) -> dict[str, Any]:
        """What a retry's attributes change from the trial it replaces: why it is retried, and who ran it and how it
        ended cleared (NOT_RETRIED); a retry's worker is whoever pops it next. A copied host:pid would name the dead
        worker as the retry's owner, and another worker's recover_orphans would fail the retry in the moment between
        its pop and its new worker writing itself."""
        return {**dict.fromkeys(NOT_RETRIED), "retried_because": because}

    def require(self, *names: str) -> tuple[Any, ...]:
        """The values of `names`; KeyError naming those that were never recorded."""
        check_keys(dict.fromkeys(names), "asked for")
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise KeyError(f"trial attributes not recorded: {', '.join(missing)}")
        return tuple(getattr(self, n) for n in names)

    def stored(self) -> dict[str, Any]:
        """The recorded attributes as user_attrs (for a trial created from this one)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


KEYS = tuple(f.name for f in dataclasses.fields(TrialAttrs))
# Who ran a trial and how it ended: not carried into its retry, which has not run yet (TrialAttrs.for_retry).
NOT_RETRIED = ("worker", "device", "warm", "fail_reason", "prune_reason")
# The results a completed trial records, read from its records.RunRecord by these names.
RESULTS = (
    "trainable_params",
    "total_params",
    "val_loss",
    "merged_val_loss",
    "accuracy",
    "time_per_step_s",
    "peak_mem_bytes",
    "max_abs_logit_diff",
    "checkpoint_bytes",
)


def check_keys(attrs: Mapping[str, Any], how: str) -> None:
    """ValueError naming each key of `attrs` that is not a TrialAttrs field."""
    unknown = [k for k in attrs if k not in KEYS]
    if unknown:
        raise ValueError(
            f"unknown trial attribute {', '.join(repr(k) for k in unknown)} {how}; known: {', '.join(KEYS)}"
        )


class FailureKind(enum.Enum):
    """How a trial failed. Its stored reason (fail_reason, the run's reason tag) reads as it always has."""

    DIVERGED = "diverged"  # the run stopped on a non-finite loss, or an objective is not a finite number
    OOM = "oom"  # out of memory (is_oom), also after the retry with half the micro-batch
    CONFIG = "config"  # the trial's composed configuration is refused (ConfigError)
    ERROR = "error"  # any other exception
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: retried at once, from its checkpoints
    # A rank of the trial's process group (sweep.devices_per_trial) died, hung or never joined: retried with the same
    # parameters, from its checkpoints, like a trial whose worker died (sweep.max_retry).
    RANK = "rank"
    # What every later trial would meet too: the study stops, the trial is retried first when it resumes.
    TRACKING = "tracking"  # the tracking server stayed away past tracking.deadline_s (tracking.TrackingUnreachable)
    DISK = "disk"  # a write the disk refused: full, over quota, read-only (files.WriteError, ENOSPC...)

    @property
    def retried(self) -> bool:
        """Whether a trial failing this way is retried with the same parameters (counted against max_retry): the
        cause was one process of the trial, not its configuration."""
        return self == FailureKind.RANK

    @property
    def stops_study(self) -> bool:
        """Whether a trial failing this way stops the study (the cause is outside the trial: a server, the disk)."""
        return self in (FailureKind.TRACKING, FailureKind.DISK)


@dataclass(frozen=True)
class Failure:
    """Why a trial failed: its kind, the reason stored on it, and for an exception that exception's type name."""

    kind: FailureKind
    reason: str
    error: str = ""

    @property
    def signature(self) -> tuple[FailureKind, str]:
        """What "failed the same way" compares: the kind, and for an exception (oom aside) its type."""
        return self.kind, "" if self.kind == FailureKind.OOM else self.error

    @classmethod
    def diverged(cls, reason: str) -> "Failure":
        return cls(FailureKind.DIVERGED, reason)

    @classmethod
    def interrupted(cls, exc: BaseException) -> "Failure":
        return cls(FailureKind.INTERRUPTED, str(exc), type(exc).__name__)

    @classmethod
    def of(cls, exc: BaseException, folder: Optional[Path] = None) -> "Failure":
        """The failure an exception out of a trial is: a rank of its process group lost, the tracking server lost, a
        write the disk refused (or any error while the disk under `folder`, the trial's, is full), oom by its type
        (is_oom), a refused configuration, or an error; the reason is its first line (at most 1000 characters)."""
        from lora_lab.config import ConfigError
        from lora_lab.tracking import TrackingUnreachable
        from lora_lab.train.distributed import RankFailed

        if isinstance(exc, RankFailed):
            return cls(FailureKind.RANK, first_line(exc)[:1000], type(exc).__name__)
        if isinstance(exc, TrackingUnreachable):
            return cls(FailureKind.TRACKING, first_line(exc)[:1000], type(exc).__name__)
        refused = refused_write(exc, folder)
        if refused is not None:
            return cls(FailureKind.DISK, refused[:1000], type(exc).__name__)
        oom = is_oom(exc)
        kind = FailureKind.OOM if oom else FailureKind.CONFIG if isinstance(exc, ConfigError) else FailureKind.ERROR
        text = f"oom: {first_line(exc)}" if oom else first_line(exc, with_type=True)
        return cls(kind, text[:1000], type(exc).__name__)


def refused_write(exc: BaseException, folder: Optional[Path] = None) -> Optional[str]:
    """Why the disk refused a write, if that is what `exc` (or what it was raised from) says: a files.WriteError
    (it names the path), an OSError of a full disk, a quota or a read-only file system; or any error while the disk
    under `folder` is full (safetensors, SQLite and MLflow's errors do not always say). None otherwise."""
    import errno

    from lora_lab.files import WriteError, disk_full

    full = (errno.ENOSPC, errno.EDQUOT)
    for e in chain(exc):
        if isinstance(e, WriteError):
            return ("disk full: " if e.errno in full else "") + first_line(e)
        if isinstance(e, OSError) and e.errno in (*full, errno.EROFS):
            text = f"{e.strerror}: {e.filename}" if e.filename else first_line(e, with_type=True)
            return ("disk full: " if e.errno in full else "") + text
    if folder is not None and disk_full(folder):
        return f"disk full: no space left under {folder} ({first_line(exc, with_type=True)})"
    return None


class TrialFailed(Exception):
    """A trial ended without a usable objective; its `failure` goes on the trial and its run."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


@dataclass(frozen=True)
class Verdict:
    """A finished run's trial state: COMPLETE, or FAIL with its failure. Judged once per trial (verdict())."""

    failure: Optional[Failure] = None

    @property
    def state(self) -> str:
        return "COMPLETE" if self.failure is None else "FAIL"

    def outcome(self) -> tuple[str, str]:
        """(state, reason), as the trial's MLflow run records it (train.tracked.fit_tracked's verdict)."""
        return self.state, self.failure.reason if self.failure else ""


def verdict(spec: SweepConfig, result: RunRecord) -> Verdict:
    """COMPLETE only with a finite value for every objective (Optuna takes +-inf as COMPLETE; here it is a failed
    trial); a run that did not complete (records: status 'diverged') FAILs with its reason."""
    if result.status != "completed":
        return Verdict(Failure.diverged(f"{result.status}: {result.reason}"))
    for name in spec.objectives:
        value = result.value(name)
        if value is None or not math.isfinite(float(value)):
            return Verdict(Failure.diverged(f"diverged: objective {name} is {value}"))
    return Verdict()


CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation (HIP's hipErrorOutOfMemory has the same number)


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is torch running out of device memory, by type.

    torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class): the CUDA caching allocator, also past
    torch.cuda.set_per_process_memory_fraction (the cap of a worker sharing its GPU). torch.AcceleratorError with
    error_code cudaErrorMemoryAllocation: a CUDA call that allocates outside that allocator (pinned host memory,
    a library's own cudaMalloc) failing, "CUDA error: out of memory". Not out of memory: any other RuntimeError, even
    one whose message says so (a message is not a type), and the CPU allocator's failure, a plain RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), which halving the micro-batch was never meant to retry; on Linux
    a process out of host memory is mostly ended by the kernel's OOM killer, with no exception at all.
    """
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            if getattr(exc, "error_code", None) == CUDA_ERROR_MEMORY_ALLOCATION:
                return True
        exc = exc.__cause__
    return False
