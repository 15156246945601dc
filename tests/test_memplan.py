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


# A tiny model large enough that its weights, not the fixed workspace, decide where it fits: 8 blocks of width 512.
WIDE = ["model=tiny", "model.tiny.hidden_size=512", "model.tiny.num_layers=8", "model.tiny.num_heads=8"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_plans_one_nth_of_the_ddp_plans_weights_gradients_and_optimizer_state(method: str) -> None:
    """trainer.devices=4: under DDP every device holds the whole model (and DDP's bucket copy of the trainable
    gradients); under FSDP2 each holds a quarter of the weights, gradients and AdamW state, plus the units it gathers
    whole: the root's own parameters and one block, with their trainable gradients."""
    cfg = _cfg(*WIDE, f"method={method}", "trainer.devices=4")
    one = memplan.plan(memory.plan_input(_cfg(*WIDE, f"method={method}"), CPU))
    ddp = memplan.plan(memory.plan_input(cfg, CPU, sharded=False))
    fsdp = memplan.plan(memory.plan_input(cfg, CPU, sharded=True))
    sharded = ("frozen weights", "trainable weights", "gradients", "optimizer state")
    for part in sharded:
        assert ddp.part(part) == one.part(part)  # replicated: one device's is the whole
        assert fsdp.part(part) == -(-ddp.part(part) // 4), part
    assert ddp.part("trainable weights") > 0 and (method == "full" or ddp.part("frozen weights") > 0)
    for part in ("activations", "logits and loss"):  # each device's own micro-batch, whatever the strategy
        assert fsdp.part(part) == ddp.part(part) == one.part(part)
    assert ddp.part("DDP gradient buckets") == ddp.part("gradients")
    assert "gathered units" not in {p.name for p in ddp.parts} | {p.name for p in one.parts}
    assert "DDP gradient buckets" not in {p.name for p in fsdp.parts} | {p.name for p in one.parts}

    # The gathered units are the real model's: one block's parameters and everything outside the blocks, as stored.
    from lora_lab import targets

    model = _real_model(cfg)
    block = targets.repeated_blocks(model)[0][1]
    in_blocks = {id(p) for _, b in targets.repeated_blocks(model) for p in b.parameters()}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    grads = nbytes(p for p in [*root, *block.parameters()] if p.requires_grad)
    assert fsdp.part("gathered units") == nbytes(root) + nbytes(block.parameters()) + grads
    assert sum(p.bytes for p in fsdp.parts) == fsdp.train_peak
    assert fsdp.total < ddp.total
    with pytest.raises(ValueError, match="sharded"):
        replace(fsdp.inp, quantize="nf4")


def test_parallel_auto_picks_ddp_when_the_replicated_plan_fits_a_device_else_fsdp(monkeypatch) -> None:
    """The device's capacity is faked (free_memory_of): the CPU's RAM is shared by the 2 ranks of this host."""
    from lora_lab.train import distributed

    cfg = _cfg(*WIDE, "method=full", "trainer.devices=2")
    ddp = memplan.plan(memory.plan_input(cfg, CPU, sharded=False)).total
    fsdp = memplan.plan(memory.plan_input(cfg, CPU, sharded=True)).total
    assert fsdp < ddp
    ram = {"bytes": 0}
    monkeypatch.setattr(memory, "free_memory_of", lambda device: (ram["bytes"], "a small CPU"))

    ram["bytes"] = 2 * ddp  # each rank's share fits the whole model
    assert distributed.settle_strategy(cfg, memory.auto_strategy) == "ddp"
    choice, why = memory.auto_strategy(cfg)
    assert choice == "ddp" and "it fits" in why
    assert memory.check_fits(cfg).inp.sharded is False  # the check plans what auto picked

    ram["bytes"] = 2 * fsdp  # each rank's share fits half the weights, gradients and AdamW state only: sharded
    assert distributed.settle_strategy(cfg, memory.auto_strategy) == "fsdp"
    p = memory.check_fits(cfg)
    assert p.inp.sharded and p.inp.devices == 2 and p.total == fsdp

    # An explicit trainer.parallel=ddp that cannot fit is refused, naming FSDP2 as the setting that fits.
    explicit = _cfg(*WIDE, "method=full", "trainer.devices=2", "trainer.parallel=ddp")
    with pytest.raises(memory.DoesNotFit, match=r"per device \(ddp over 2 devices\).*trainer.parallel=fsdp \("):
        memory.check_fits(explicit)

    # Where FSDP2 is refused (the chunked loss), auto keeps ddp and the check says it does not fit.
    chunked = _cfg(*WIDE, "method=full", "trainer.devices=2", "trainer.loss_chunk=64")
    assert memory.auto_strategy(chunked)[0] == "ddp"
    with pytest.raises(memory.DoesNotFit):
        memory.check_fits(chunked)

    # No plan (a model the meta device cannot build): by method, as without a plan.
    def no_plan(*a, **k):
        raise NotImplementedError("an operation meta tensors lack")

    monkeypatch.setattr(memory, "plan_input", no_plan)
    assert memory.auto_strategy(cfg)[0] == "fsdp"
    assert memory.auto_strategy(_cfg(*WIDE, "trainer.devices=2"))[0] == "ddp"  # LoRA


def test_plan_prints_the_per_device_plan_and_the_strategy(capsys) -> None:
    from lora_lab.plan.cli import main

    assert main(["model=tiny", "method=full", "trainer.devices=2", "trainer.parallel=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "per device of 2, FSDP2: weights, gradients and optimizer state sharded" in out
    assert "| gathered units |" in out and "per device (fsdp over 2)" in out
    assert "shared by 2 ranks on this host" in out
    assert main(["model=tiny", "trainer.devices=2"]) == 0  # auto: what the run would pick, and why
    out = capsys.readouterr().out
    assert "trainer.parallel=auto picks ddp: the model replicated on each device plans" in out
    assert "| DDP gradient buckets |" in out and "per device (ddp over 2)" in out
    assert main(["model=tiny", "trainer.devices=2", "trainer.parallel=fsdp", "model.quantize=nf4"]) == 2
    assert "trainer.parallel=fsdp with model.quantize=nf4" in capsys.readouterr().err
