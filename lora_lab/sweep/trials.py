"""A trial's own data: its typed attributes (stored as Optuna user_attrs), why it failed, and the verdict on its run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import optuna

from lora_lab.config import SweepConfig
from lora_lab.records import RunRecord

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


class TrialFailed(Exception):
    """A trial ended without a usable objective (diverged, oom, an error); `reason` goes on the trial and its run."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def verdict(spec: SweepConfig, result: RunRecord) -> tuple[str, str]:
    """A finished run's trial state and reason: COMPLETE only with a finite value for every objective (Optuna takes
    +-inf as COMPLETE; here it is a failed trial)."""
    if result.status != "completed":
        return "FAIL", f"{result.status}: {result.reason}"
    for name in spec.objectives:
        value = result.value(name)
        if value is None or not math.isfinite(float(value)):
            return "FAIL", f"diverged: objective {name} is {value}"
    return "COMPLETE", ""


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
