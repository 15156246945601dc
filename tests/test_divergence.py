"""Divergence is more than a non-finite loss (issue 24, item 11): a loss far worse than knowing nothing, or a model
whose output no longer depends on its input, ends the run "diverged" with the numbers; a normal run never does."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lora_lab.config import compose
from lora_lab.train.build import build_and_fit
from lora_lab.train.cli import main
from lora_lab.train.divergence import FLOOR_NATS, Divergence

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking=off"]


def _fit(tmp_path: Path, *overrides: str):
    return build_and_fit(compose([*TINY, f"output_dir={tmp_path / 'run'}", *overrides])[1])


def test_the_ceiling_is_far_above_a_uniform_guess_and_the_base_model() -> None:
    d = Divergence(259, "prompted")
    assert d.ceiling == pytest.approx(math.log(259) + FLOOR_NATS)
    d.set_base(5.6139)  # the random tiny model is a little worse than uniform: the worse one is the reference
    assert d.ceiling == pytest.approx(5.6139 + FLOOR_NATS)
    big = Divergence(49152, "chat", base_val_loss=2.1)  # a real vocabulary: uniform (10.8) is the reference
    assert big.ceiling == pytest.approx(2 * math.log(49152))
    assert big.training([{"step": 3, "train_loss": 20.0}]) == ""
    reason = big.training([{"step": 3, "train_loss": 9.0}, {"step": 4, "train_loss": 322160.0}])
    assert reason.startswith("training loss 322160 at step 4 is far worse than knowing nothing")
    assert "ln(49152) = 10.8" in reason and "the base model 2.1000" in reason
    assert big.training([{"step": 5, "train_loss": float("nan")}]) == "non-finite training loss at step 5"


def test_an_overfit_two_class_head_is_not_divergence() -> None:
    # Overconfident errors on a held-out set push a binary head's val loss well above ln 2: still a result.
    d = Divergence(2, "classification", base_val_loss=0.71)
    assert d.validation(20, 3.5) == ""
    assert "far worse than knowing nothing" in d.validation(20, 50.0)
    assert d.validation(20, float("inf")) == "non-finite validation loss at step 20"


def test_lora_at_lr_50_collapses_and_is_caught(tmp_path: Path) -> None:
    # The weights blow up into constant activations: every logit 0, the val loss exactly ln(V), better than the
    # random base model's, so a study would have picked it as its best trial.
    result = _fit(tmp_path, "optim.lr=50")
    assert result.status == "diverged" and math.isnan(result.val_loss)
    # At which evaluation (step 4 or 8) the blown-up weights reach constant activations depends on the CPU's float
    # rounding (AVX2 and AVX-512 kernels differ in the last bits, and lr=50 amplifies them): either is caught.
    assert re.match(r"the model collapsed at step [48]: every validation input gets the same prediction", result.reason)
    assert "ln(259) = 5.5568" in result.reason and "the base model 5.6139" in result.reason


def test_full_finetuning_at_lr_50_is_caught_with_its_numbers(tmp_path: Path) -> None:
    result = _fit(tmp_path, "method=full", "optim.lr=50")
    assert result.status == "diverged"
    assert "training loss" in result.reason and "far worse than knowing nothing" in result.reason
    assert "diverged above 12.52" in result.reason
    assert result.steps >= 2  # the finite steps it made stay in its history


def test_the_cli_exits_3_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*TINY, "method=full", "optim.lr=50", f"output_dir={tmp_path / 'run'}"]) == 3
    assert "run diverged: training loss" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "full", "ia3"])
def test_a_normal_run_at_the_default_lr_never_diverges(tmp_path: Path, method: str) -> None:
    result = _fit(tmp_path, f"method={method}", "trainer.max_steps=12", "trainer.eval_every=2")
    assert result.status == "completed", result.reason
    assert all(e.val_loss < 12 for e in result.evals)
