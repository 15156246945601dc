"""The LoRA config through build()/fit(): a seq_cls head that trains, is checkpointed and saved with the adapter;
DoRA and PiSSA runs end to end (tiny model, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_lab import adaptations, lora, train
from lora_lab.config import ConfigError, compose

TINY_CLS = [
    "model=tiny",
    "model.task=seq_cls",
    "data=tiny_sentiment",
    "data.format=classification",
    "trainer=smoke",
    "trainer.progress=false",
    "tracking=off",
]


def test_seq_cls_head_trains_is_checkpointed_resumed_and_saved(outputs: Path, tmp_path: Path) -> None:
    common = [*TINY_CLS, "trainer.max_steps=6", "trainer.eval_every=2", "trainer.checkpoint_every=2", "optim.lr=3e-3"]
    _, cfg = compose([*common, f"output_dir={tmp_path / 'straight'}"])
    session = train.build(cfg)
    assert lora.modules_to_save_of(session.model) == ["score"]  # the task head, found from the model
    assert session.model.score.weight.requires_grad
    head0 = session.model.score.weight.detach().clone()
    straight = session.fit()
    assert not torch.equal(session.model.score.weight.detach().cpu(), head0)  # the head learned (fit may use CUDA)
    session.close()
    adapter = tmp_path / "straight" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in safetensors.torch.load_file(adapter / "adapter_model.safetensors")

    class Interrupt(Exception):
        pass

    def stop_at_4(event: train.EvalEvent) -> None:
        if event.step == 4:
            raise Interrupt

    _, cfg = compose([*common, f"output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(Interrupt):
        train.build_and_fit(cfg, on_eval=stop_at_4)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-0000002" / "weights.safetensors"
    assert "score.weight" in safetensors.torch.load_file(ckpt)
    _, cfg = compose([*common, f"output_dir={tmp_path / 'resumed'}", "trainer.resume=true"])
    resumed = train.build_and_fit(cfg)
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in straight.history]
    assert resumed.val_loss == straight.val_loss


def test_empty_modules_to_save_keeps_the_head_frozen(outputs: Path) -> None:
    _, cfg = compose([*TINY_CLS, "lora.modules_to_save=[]"])
    session = train.build(cfg)
    assert not session.model.score.weight.requires_grad and lora.modules_to_save_of(session.model) == []
    assert adaptations.lora_targets(session.model, cfg.lora, cfg.model.task) == session.wrapped


@pytest.mark.parametrize("choice", ["lora=dora", "lora=pissa", "lora=olora"])
def test_variants_train_and_merge_exactly(outputs: Path, choice: str) -> None:
    _, cfg = compose(
        [
            "model=tiny",
            "data=tiny_sentiment",
            "trainer=smoke",
            "trainer.progress=false",
            "tracking=off",
            choice,
            "optim.lr=3e-3",
        ]
    )
    result = train.build_and_fit(cfg)
    assert result.status == "completed" and result.val_loss < result.base_val_loss
    # merged == unmerged: within 1e-4 in fp32 (the CPU), within the bf16 tolerance under CUDA's bf16
    assert result.merge_ok and result.max_abs_logit_diff <= result.merge_tol
    assert result.merge_tol == 1e-4 or result.identity.device != "cpu"


@pytest.mark.parametrize(
    "override, key",
    [
        ("lora.variant=vera", "lora.variant"),
        ("lora.init=loftq", "lora.init"),
        ("lora=dora lora.init=pissa", "lora.init"),
    ],
)
def test_bad_lora_choices_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        compose(override.split())
