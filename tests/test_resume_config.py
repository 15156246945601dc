"""Resuming with a changed config (issue 24, item 10): a checkpoint keeps the config it was trained with; a resume
that changes what is trained is refused (exit 2, naming the keys, nothing logged), one that changes only where or
how it runs goes on, and extending a constant-LR run's max_steps continues it exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_lab.config import compose
from lora_lab.train.build import build_and_fit
from lora_lab.train.checkpoint import ResumeMismatch, config_record, resume_changes
from lora_lab.train.cli import main

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.max_steps=6",
    "trainer.eval_every=6",
    "trainer.checkpoint_every=2",
    "trainer.eval_at_start=false",
]


def _cfg(*overrides: str):
    return compose([*TINY, "tracking=off", *overrides])[1]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "run"
    assert build_and_fit(_cfg(f"output_dir={folder}")).completed
    return folder


def test_a_checkpoint_keeps_the_config_it_was_trained_with(checkpointed: Path) -> None:
    saved = json.loads((checkpointed / "checkpoints" / "step-0000004" / "config.json").read_text())
    assert saved["optim"]["lr"] == 3e-4 and saved["method"] == "lora" and saved["lora"]["r"] == 8
    manifest = json.loads((checkpointed / "checkpoints" / "step-0000004" / "manifest.json").read_text())
    assert "config.json" in manifest["files"]


def test_resume_with_a_changed_lr_exits_2_naming_it(
    checkpointed: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(checkpointed, folder)
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path / "outputs"))
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    code = main(
        [*TINY, "tracking.system_metrics=false", f"output_dir={folder}", "trainer.resume=true", "optim.lr=0.03"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "lora_lab.train: error: trainer.resume=true: the checkpoint in" in err
    assert "optim.lr: 0.0003 -> 0.03" in err and "Traceback" not in err
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # refused before any MLflow run
    after = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.name != ".owner.lock")
    assert after == before  # config.yaml not overwritten, no checkpoint set aside


def test_what_counts_as_a_change() -> None:
    saved = config_record(_cfg())
    same_run = _cfg(
        "trainer.resume=true",
        "output_dir=/tmp/elsewhere",
        "trainer.eval_every=3",
        "trainer.num_threads=1",
        "trainer.checkpoint_every=1",
        "trainer.sync_every=2",
        "tracking.experiment=other",
        "export.merged=true",
        "bitfit.add_missing=false",  # another method's field: LoRA never reads it
        "trainer.max_steps=20",  # constant schedule: extending is a resume
    )
    assert resume_changes(saved, same_run, step=4) == []
    changed = _cfg("lora.alpha=32", "seed=3", "model.tiny.seed=1", "data.max_length=40", "trainer.batch_size=2")
    keys = [c.split(":")[0] for c in resume_changes(saved, changed, step=4)]
    assert keys == [
        "data.max_length",
        "lora.alpha",
        "model.tiny.seed",
        "seed",
        "trainer.batch_size x trainer.grad_accum",
    ]
    # An out-of-memory retry's split of the same examples per step (half the micro-batch, twice the accumulation)
    # resumes the same run.
    b = saved["trainer"]["batch_size"]
    assert resume_changes(saved, _cfg(f"trainer.batch_size={b // 2}", "trainer.grad_accum=2"), step=4) == []
    assert resume_changes(saved, _cfg("method=full"), step=4) == ["method: 'lora' -> 'full'"]
    (short,) = resume_changes(saved, _cfg("trainer.max_steps=3"), step=4)
    assert short == "trainer.max_steps: 3 is below the checkpoint's step 4"
    cosine = config_record(_cfg("optim.schedule=cosine"))
    (why,) = resume_changes(cosine, _cfg("optim.schedule=cosine", "trainer.max_steps=20"), step=4)
    assert why.startswith("trainer.max_steps: 6 -> 20 (optim.schedule=cosine sets every step's LR")


def test_the_loop_refuses_too(checkpointed: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(checkpointed, folder)
    with pytest.raises(ResumeMismatch, match="lora.r: 8 -> 4"):
        build_and_fit(_cfg(f"output_dir={folder}", "trainer.resume=true", "lora.r=4"))
    assert not (folder / "checkpoints" / "bad").exists()  # a good checkpoint is never set aside for a config


def test_extending_max_steps_of_a_constant_lr_run_continues_it_exactly(tmp_path: Path) -> None:
    straight = build_and_fit(_cfg(f"output_dir={tmp_path / 'straight'}", "trainer.max_steps=8"))
    short = tmp_path / "short"
    assert build_and_fit(_cfg(f"output_dir={short}", "trainer.max_steps=4")).completed  # checkpoint at step 2
    extended = build_and_fit(_cfg(f"output_dir={short}", "trainer.max_steps=8", "trainer.resume=true"))
    assert extended.steps == 8
    assert [p.train_loss for p in extended.history] == [p.train_loss for p in straight.history]
    assert extended.val_loss == straight.val_loss
