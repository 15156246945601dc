"""When a run has diverged: a non-finite loss, a finite loss far worse than knowing nothing, or a collapsed model.

A model that knows nothing and says so predicts uniformly over the V answers its loss is over (the classes of a
classification head; the vocabulary for every token-level format, the prompted label words included, since their
log-probabilities are read off the whole vocabulary): its loss is ln(V). The base model's validation loss, where
the run evaluated it (trainer.eval_at_start), is the other yardstick. A run whose training or validation loss goes
above

    ceiling = reference + max(reference, ln 1000),   reference = max(ln V, the base model's val loss)

has diverged: the true answer then gets, on geometric average, under a thousandth of the probability that a uniform
guess (or the base model) gives it, and where the reference is above ln 1000 nats (large vocabularies), under its
square (for V tokens: below 1/V^2). Training that works never gets there: even a run at a too-high LR that merely
learns badly stays near the reference (measured on the tiny model: 5.6 at most against a ceiling of 12.5), while a
run whose weights blew up sits orders of magnitude above it (full fine-tuning at lr=50: 316,482).

A model can also blow up into constant outputs, every input getting the same prediction (LoRA at lr=50 on the tiny
model: all logits 0, val loss exactly ln V, which is *better* than the random base model's). The evaluator sees that
on its probe rows (`Evaluator.collapsed`); this module words it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

FLOOR_NATS = math.log(1000)  # the least margin above the reference: a thousandth of its probability


def answer_count(model: Any, data_format: str) -> Optional[int]:
    """V: how many answers the run's loss is over (classes for classification, else the vocabulary); None when the
    model's config does not say (then only non-finite losses count as divergence)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_labels" if data_format == "classification" else "vocab_size", None)
    return n if isinstance(n, int) and n >= 2 else None


class Divergence:
    """The ceiling of one run's losses and the reasons a run diverged, as `records.RunRecord.reason` reads them.

    `answers`: V (answer_count); `base_val_loss`: the base model's validation loss, set when it is known."""

    def __init__(self, answers: Optional[int], data_format: str, base_val_loss: Optional[float] = None) -> None:
        self.answers = answers
        self.kind = "classes" if data_format == "classification" else "vocabulary tokens"
        self.uniform = math.log(answers) if answers else None
        self.base_val_loss: Optional[float] = None
        self.set_base(base_val_loss)

    def set_base(self, base_val_loss: Optional[float]) -> None:
        """The base model's validation loss (step 0), where the run evaluated it."""
        ok = base_val_loss is not None and math.isfinite(base_val_loss)
        self.base_val_loss = base_val_loss if ok else None

    @property
    def ceiling(self) -> Optional[float]:
        """The loss above which the run has diverged (None: V unknown and no base model loss)."""
        known = [v for v in (self.uniform, self.base_val_loss) if v is not None]
        if not known:
            return None
        reference = max(known)
        return reference + max(reference, FLOOR_NATS)

    def yardsticks(self) -> str:
        """What the ceiling comes from, in words."""
        parts = []
        if self.uniform is not None:
            parts.append(
                f"a uniform guess over {self.answers} {self.kind} scores ln({self.answers}) = {self.uniform:.4f}"
            )
        if self.base_val_loss is not None:
            parts.append(f"the base model {self.base_val_loss:.4f}")
        return ", ".join(parts)

    def training(self, points: list[dict[str, float]]) -> str:
        """'' when every training loss of `points` ({step, train_loss}) is finite and under the ceiling, else why
        the run diverged (at the first one that is not)."""
        ceiling = self.ceiling
        for p in points:
            loss = p["train_loss"]
            if not math.isfinite(loss):
                return f"non-finite training loss at step {int(p['step'])}"
            if ceiling is not None and loss > ceiling:
                return self._too_high("training", loss, int(p["step"]), ceiling)
        return ""

    def validation(self, step: int, val_loss: float, collapsed: bool = False) -> str:
        """'' when the validation loss of `step` is finite, under the ceiling and the model not collapsed, else why
        the run diverged."""
        if not math.isfinite(val_loss):
            return f"non-finite validation loss at step {step}"
        ceiling = self.ceiling
        if ceiling is not None and val_loss > ceiling:
            return self._too_high("validation", val_loss, step, ceiling)
        if collapsed:
            yardstick = f"; {self.yardsticks()}" if self.yardsticks() else ""
            return (
                f"the model collapsed at step {step}: every validation input gets the same prediction "
                f"(val loss {val_loss:.4f}{yardstick}): the weights blew up, the LR is too high"
            )
        return ""

    def _too_high(self, which: str, loss: float, step: int, ceiling: float) -> str:
        return (
            f"{which} loss {loss:.6g} at step {step} is far worse than knowing nothing ({self.yardsticks()}; "
            f"diverged above {ceiling:.4f}): the LR is too high"
        )
