"""`python -m lora_lab.bench sweep` at a tiny size: both runs happen, and the JSON has every field the table prints
(timings are not checked: the benchmark prints them, a test does not judge them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_lab.bench.__main__ import main


def test_bench_sweep_tiny_writes_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res" / "sweep.json"
    keep = str(tmp_path / "k")
    assert main(["sweep", "--trials", "2", "--steps", "2", "--out", str(out), "--keep", keep, "--cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["bench"] == "sweep" and res["trials"] == 2 and res["steps"] == 2
    cold, warm = res["modes"]["cold_1"], res["modes"]["warm_n"]
    for mode in (cold, warm):
        assert mode["trials"] == 2 and mode["states"] == ["COMPLETE"]
        for key in ("wall_s", "command_s", "trials_per_hour", "outside_share", "outside_s_per_trial"):
            assert isinstance(mode[key], float) and mode[key] > 0, key
        assert sorted(mode["values"]) == ["0", "1"]
    assert "sweep.warm=false" in cold["args"] and "sweep.trials_per_device=1" in cold["args"]
    assert "sweep.warm=true" in warm["args"] and "sweep.trials_per_device=2" in warm["args"]  # CPU: 2 per device
    assert cold["warm_trials"] == 0 and warm["warm_trials"] == 2  # each worker preloads: both trials come warm
    assert cold["workers"] == 1 and warm["workers"] == 2
    assert res["ratios"]["trials_per_hour_warm_n_over_cold_1"] == pytest.approx(
        warm["trials_per_hour"] / cold["trials_per_hour"]
    )
    # Same trial numbers, same parameters (random sampler, per-trial seeds): warm workers give the cold numbers.
    assert res["max_abs_val_loss_diff"] == pytest.approx(0.0, abs=1e-6)
    printed = capsys.readouterr().out
    assert "trials/hour" in printed and "outside train+eval" in printed and "warm/cold" in printed


def test_bench_sweep_cuda_study_can_come_warm() -> None:
    # On CUDA the study is trainer=gpu on the SmolLM2 shape, but not compiled: a warm worker drops compiled models,
    # so a compiled study would load every trial in both modes and measure nothing.
    from lora_lab.bench.sweep import study_args
    from lora_lab.config import compose

    overrides = [a for a in study_args(4, None, cuda=True) if not a.startswith("sweep")]
    _, cfg = compose(overrides)
    assert cfg.trainer.device == "cuda" and cfg.trainer.precision == "bf16" and cfg.trainer.compile is False
    assert cfg.model.tiny.hidden_size == 576 and cfg.model.tiny.num_layers == 30
    _, cpu = compose([a for a in study_args(4, None, cuda=False) if not a.startswith("sweep")])
    assert cpu.trainer.device == "cpu"
