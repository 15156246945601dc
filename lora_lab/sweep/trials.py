"""A trial's own data: why it failed, and the verdict on a finished run."""

from __future__ import annotations

import math

from lora_lab.config import SweepConfig
from lora_lab.records import RunRecord


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
