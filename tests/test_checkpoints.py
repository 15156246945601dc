"""Checkpoints carry a manifest (size and SHA-256 of each file); a damaged one is set aside with the reason and the
run resumes from the newest good one, or from step 0, instead of failing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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


def _rewrite_manifest(path: Path) -> None:
    # As a buggy writer or a hand edit would leave it: the manifest agrees with the files, so only the weights'
    # names and shapes can tell.
    import hashlib
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_checkpoint_missing_a_layer_is_set_aside_naming_it(tmp_path: Path, method: str) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "run"
    assert build_and_fit(compose([*TINY, f"method={method}", f"output_dir={folder}"])[1]).completed
    root = folder / "checkpoints"
    shutil.copytree(root / "step-0000004", root / "step-0000002")  # an older good checkpoint left behind
    weights = load_file(str(root / "step-0000004" / "weights.safetensors"))
    gone = [k for k in weights if "layers.1." in k]  # the whole second layer
    save_file({k: v for k, v in weights.items() if k not in gone}, str(root / "step-0000004" / "weights.safetensors"))
    _rewrite_manifest(root / "step-0000004")

    session = build(compose([*TINY, f"method={method}", f"output_dir={folder}"])[1])
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    optimizer, scheduler = session.make_optimizer()
    ckpt = Checkpointer(root, session.model, optimizer, scheduler, full=method == "full")
    state = ckpt.load_latest()
    assert state is not None and ckpt.loaded == root / "step-0000002"
    (bad,) = list((root / "bad").iterdir())
    reason = (bad / "REASON").read_text()
    assert bad.name.startswith("step-0000004") and f"{len(gone)} tensor(s) missing: " in reason
    assert "model.layers.1." in reason and "more" in reason
    if method == "full":  # the older checkpoint's weights were loaded whole, none of the bad one's half-way
        saved = load_file(str(root / "step-0000002" / "weights.safetensors"))
        assert all(torch.equal(session.model.state_dict()[k], v) for k, v in saved.items())
        assert any(not torch.equal(before[k], v) for k, v in saved.items())
