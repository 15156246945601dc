"""The memory plan (lora_lab.memplan, lora_lab.train.memory, python -m lora_lab.plan) and the preflights that use it:
counts equal the real model's, the saved-activation formula equals what autograd saves, a 70B plan is built on the
meta device in seconds, and a run that cannot fit is refused before any weight loads with nothing written."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from lora_lab import adaptations, lora, memplan
from lora_lab.config import compose
from lora_lab.train import memory

# A ~271B-parameter model=tiny shape: 85 blocks of width 16384, MLP 53248 (a terabyte in fp32).
HUGE = [
    "model=tiny",
    "model.tiny.hidden_size=16384",
    "model.tiny.num_layers=85",
    "model.tiny.num_heads=128",
    "model.tiny.num_kv_heads=8",
    "model.tiny.intermediate_size=53248",
]
# Llama-3.1-70B's dims as model=tiny (its byte vocabulary aside).
LLAMA_70B = [
    "model=tiny",
    "model.tiny.hidden_size=8192",
    "model.tiny.num_layers=80",
    "model.tiny.num_heads=64",
    "model.tiny.num_kv_heads=8",
    "model.tiny.intermediate_size=28672",
]
CPU = torch.device("cpu")


def _cfg(*overrides: str):
    return compose(["tracking.enabled=false", *overrides])[1]


def _real_model(cfg):
    from lora_lab.models import load_model

    model, _ = load_model(cfg.model)
    adaptations.of(cfg.method).apply(model, cfg, None)
    return model


@pytest.mark.parametrize("method", ["lora", "full", "ia3", "adapter"])
def test_the_plans_trainable_count_is_the_real_models(method: str) -> None:
    cfg = _cfg("model=tiny", f"method={method}")
    inp = memory.plan_input(cfg, CPU)
    real = lora.count_parameters(_real_model(cfg))
    assert inp.trainable == real.trainable
    assert inp.trainable + inp.frozen_linear + inp.frozen_other == real.total


def test_lora_plans_below_full_fine_tuning_and_both_order_their_parts() -> None:
    lo = memplan.plan(memory.plan_input(_cfg("model=tiny", "method=lora"), CPU))
    full = memplan.plan(memory.plan_input(_cfg("model=tiny", "method=full"), CPU))
    assert lo.total < full.total
    assert lo.part("optimizer state") < full.part("optimizer state")
    assert full.part("frozen weights") == 0 and lo.part("frozen weights") > 0
    assert lo.part("activations") < full.part("activations")  # a frozen weight needs no saved input of its own
    assert sum(p.bytes for p in lo.parts) == lo.train_peak


def test_checkpointing_and_a_4bit_base_shrink_their_parts() -> None:
    inp = memory.plan_input(_cfg(*LLAMA_70B[:1], "model.tiny.hidden_size=512", "model.tiny.num_layers=8"), CPU)
    p = memplan.plan(inp)
    ck = memplan.plan(replace(inp, checkpointing=True))
    assert ck.part("activations") * 3 < p.part("activations")
    nf4 = memplan.plan(replace(inp, quantize="nf4"))
    int8 = memplan.plan(replace(inp, quantize="int8"))
    linear = inp.frozen_linear * inp.frozen_bytes
    assert nf4.part("frozen weights") == pytest.approx(
        p.part("frozen weights") - linear + inp.frozen_linear * 0.5159, rel=1e-4
    )
    assert nf4.part("frozen weights") < int8.part("frozen weights") < p.part("frozen weights")
    with pytest.raises(ValueError, match="quantize"):
        replace(inp, quantize="int3")


def test_the_activation_formula_is_what_autograd_saves() -> None:
    """block_bytes x layers plus the final norm, the log-softmax output beside it: what a training forward of the
    real tiny model saves for backward (saved_tensors_hooks, parameters excluded)."""
    for method in ("lora", "full"):
        cfg = _cfg(
            "model=tiny",
            f"method={method}",
            "model.tiny.hidden_size=96",
            "model.tiny.num_heads=6",
            "data.max_length=40",
            "trainer.batch_size=3",
        )
        inp = memory.plan_input(cfg, CPU)
        model = _real_model(cfg).train()
        ids = torch.randint(0, 259, (3, 40))
        saved = memory.saved_for_backward(model, input_ids=ids, labels=ids)
        predicted = memplan.plan(inp).part("activations") + 3 * 40 * 259 * 4  # + the saved log-softmax
        assert saved == pytest.approx(predicted, rel=0.03), method


def test_a_70b_plan_takes_seconds_and_allocates_nothing() -> None:
    cfg = _cfg(*LLAMA_70B)
    rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    inp = memory.plan_input(cfg, CPU)
    seconds = time.perf_counter() - t0
    assert inp.trainable + inp.frozen_linear + inp.frozen_other > 68e9  # ~69B parameters, none of them real
    assert seconds < 30
    assert psutil.Process().memory_info().rss - rss < 512 * 2**20  # fp32 weights alone would be 276 GB


def test_a_run_that_does_not_fit_names_the_settings_that_would() -> None:
    inp = memory.plan_input(_cfg("model=tiny", "model.tiny.hidden_size=512", "model.tiny.num_layers=8"), CPU)
    p = memplan.plan(inp)
    need = memplan.plan(replace(inp, quantize="nf4", checkpointing=True)).total
    fixes = memplan.fitting_settings(inp, need + 1)
    assert fixes and all(peak <= need + 1 for _, peak in fixes)
    assert any("trainer.gradient_checkpointing=true" in f for f, _ in fixes)
    assert p.total > need
    text = memplan.refusal(p, need + 1, "the CPU", fixes)
    assert "trainer.gradient_checkpointing=true" in text and "trainer.memory_check=false" in text
    smaller = memplan.fitting_settings(replace(inp, quantizable=False), memplan.plan(replace(inp, batch=2)).total)
    assert any("trainer.batch_size=" in f and "trainer.grad_accum=" in f for f, _ in smaller)
    assert not any("model.quantize" in f for f, _ in smaller)  # a method that trains a linear's bias or weight


def test_the_sweep_preflight_refuses_a_study_that_cannot_fit(tmp_path: Path, monkeypatch, capsys) -> None:
    import lora_lab.models
    from lora_lab.sweep.cli import main

    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path / "outputs"))

    def no_load(*a, **k):
        raise AssertionError("a weight loaded")

    monkeypatch.setattr(lora_lab.models, "load_model", no_load)
    code = main(["sweep=default", "sweep.n_trials=1", *HUGE])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "memory plan needs" in err and "study's base config" in err
    for made in ("studies", "mlflow.db", "optuna.db", "runs"):
        assert not (tmp_path / "outputs" / made).exists(), made


def test_memory_check_false_skips_the_check(monkeypatch) -> None:
    monkeypatch.setattr(memory, "free_memory_of", lambda device: (1, "a tiny device"))
    with pytest.raises(memory.DoesNotFit, match="a tiny device"):
        memory.check_fits(_cfg("model=tiny"))
    assert memory.check_fits(_cfg("model=tiny", "trainer.memory_check=false")).total > 1


def test_plan_prints_the_table(capsys) -> None:
    from lora_lab.plan.cli import main

    assert main(["model=tiny"]) == 0
    out = capsys.readouterr().out
    for part in ("frozen weights", "optimizer state", "activations", "logits and loss", "**peak**", "device"):
        assert f"| {part} |" in out
    assert main(["--shape", "llama-65b", "model.quantize=nf4", "trainer.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "lora on llama-65b (80 layers, d=8192" in out and "quantize=nf4, checkpointing=on" in out
    assert main(["model.name=/no/such/folder/or/hub/id/at/all"]) == 2


def test_train_refuses_a_270b_tiny_model_before_loading_anything(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m lora_lab.train` (its main, in this process: load_model is made to fail, so no weight can load)."""
    import lora_lab.models
    from lora_lab.train.cli import main

    outputs = tmp_path / "outputs"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(outputs))

    def no_load(*a, **k):
        raise AssertionError("a weight loaded")

    monkeypatch.setattr(lora_lab.models, "load_model", no_load)
    assert main([*HUGE, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "memory plan needs" in err and "the CPU (available RAM)" in err
    assert "no setting tried fits" in err  # 271B parameters do not fit this machine even in 4 bits
    assert not (tmp_path / "run").exists()
    assert not outputs.exists() or not any(outputs.iterdir())  # no mlflow.db, no run folder


def test_trials_per_device_auto_sizes_from_the_plan_without_a_measuring_trial(monkeypatch) -> None:
    """On CUDA (faked: no GPU here) auto divides the free memory by the plan's peak; no trial runs to measure it."""
    from types import SimpleNamespace

    import optuna

    import lora_lab.train
    from lora_lab.sweep import workers

    base = ["model=tiny", "trainer.precision=fp32"]
    cfg = _cfg(*base)
    cuda = torch.device("cuda")
    peak = memplan.plan(memory.plan_input(cfg, cuda)).total
    free = 3 * peak  # floor(0.9 * 3) = 2 per device
    st = SimpleNamespace(
        spec=SimpleNamespace(trials_per_device="auto", space={}),
        base_cfg=cfg,
        base_overrides=["tracking.enabled=false", *base],
        warm=None,
        study=optuna.create_study(),
    )
    monkeypatch.setattr(lora_lab.train, "pick_device", lambda name: cuda)
    monkeypatch.setattr(memory, "pick_device", lambda name: cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * peak))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")

    def no_trial(*a, **k):
        raise AssertionError("a measuring trial ran")

    monkeypatch.setattr(workers, "worker_loop", no_trial)
    assert workers.resolve_per_device(st) == 2
    assert st.study.user_attrs["trials_per_device"] == 2
