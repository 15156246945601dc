"""Checkpoints carry a manifest (size and SHA-256 of each file); a damaged one is set aside with the reason and the
run resumes from the newest good one, or from step 0, instead of failing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_lab.config import compose
from lora_lab.train.build import build, build_and_fit
from lora_lab.train.checkpoint import Checkpointer

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.max_steps=6",
    "trainer.eval_every=6",
    "trainer.checkpoint_every=2",
    "trainer.eval_at_start=false",
    "tracking=off",
]


def _cfg(folder: Path, resume: bool = False):
    return compose([*TINY, f"output_dir={folder}", f"trainer.resume={str(resume).lower()}"])[1]


def _checkpointer(folder: Path) -> Checkpointer:
    session = build(_cfg(folder))
    optimizer, scheduler = session.make_optimizer()
    return Checkpointer(folder / "checkpoints", session.model, optimizer, scheduler, full=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    assert build_and_fit(_cfg(folder)).completed
    assert (folder / "checkpoints" / "step-0000004" / "manifest.json").is_file()
    return folder


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors is missing"),
        (lambda p: (p / "optim.pt").write_bytes((p / "optim.pt").read_bytes()[:100]), "optim.pt has 100 bytes"),
        (lambda p: (p / "state.json").write_text('{"step": 5, "history": [], "evals": []}'), "state.json"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json"),
    ],
)
def test_damaged_checkpoint_is_set_aside_and_the_previous_good_one_loads(
    damage, reason: str, trained: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    root = folder / "checkpoints"
    shutil.copytree(root / "step-0000004", root / "step-0000002")  # an older good checkpoint left behind
    damage(root / "step-0000004")
    ckpt = _checkpointer(folder)
    state = ckpt.load_latest()
    assert state is not None and ckpt.loaded == root / "step-0000002"
    (bad,) = list((root / "bad").iterdir())
    assert bad.name.startswith("step-0000004") and reason in (bad / "REASON").read_text()
    assert not (root / "step-0000004").exists()


def test_only_a_damaged_checkpoint_restarts_from_step_0_and_the_run_completes(trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    (folder / "metrics.json").unlink()
    (folder / "checkpoints" / "step-0000004" / "weights.safetensors").unlink()  # the example
    result = build_and_fit(_cfg(folder, resume=True))
    assert result.completed and result.steps == 6
    assert (folder / "checkpoints" / "bad").is_dir()


@pytest.mark.parametrize("method", ["ia3", "adapter", "prefix"])
def test_methods_resume_from_their_checkpoints_as_if_never_stopped(tmp_path: Path, method: str) -> None:
    # Checkpoints of the comparison methods hold what trains (their own parameters): a resumed run continues exactly.
    common = [*TINY, f"method={method}", "optim.lr=1e-2"]
    straight = build_and_fit(compose([*common, f"output_dir={tmp_path / 'straight'}"])[1])

    class Stop(Exception):
        pass

    def stop_at_4(event) -> None:
        if event.step == 4:
            raise Stop

    stopped = tmp_path / "stopped"
    with pytest.raises(Stop):
        build_and_fit(compose([*common, "trainer.eval_every=2", f"output_dir={stopped}"])[1], on_eval=stop_at_4)
    resumed = build_and_fit(compose([*common, f"output_dir={stopped}", "trainer.resume=true"])[1])
    assert resumed.steps == 6
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in straight.history]
