"""One training run from Hydra configs: the loop, its evaluation, checkpoints, and the CLI with MLflow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab import adaptations, lora
from lora_lab.config import compose
from lora_lab.data import TaskData
from lora_lab.files import atomic_write_text
from lora_lab.train.batches import to_device
from lora_lab.train.build import build, build_and_fit
from lora_lab.train.cli import main
from lora_lab.train.evaluate import sequence_logprobs
from lora_lab.train.finish import merged
from lora_lab.train.loop import EvalEvent
from lora_lab.train.session import Session

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false"]


def mlflow_runs(outputs: Path) -> list:
    import mlflow

    db = outputs / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_cli_run_writes_metrics_config_adapter_and_mlflow_run(outputs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs))
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.train", *TINY, "lora.r=4", f"output_dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("trainable_params", "total_params", "val_loss", "merged_val_loss", "max_abs_logit_diff", "status"):
        assert key in metrics, key
    assert metrics["status"] == "completed" and metrics["steps"] == 8
    assert metrics["merge_ok"] is True and metrics["max_abs_logit_diff"] <= metrics["merge_tol"]
    if metrics["identity"]["device"] == "cpu":  # fp32: the merge changes nothing measurable
        assert abs(metrics["val_loss"] - metrics["merged_val_loss"]) < 1e-4
        assert metrics["max_abs_logit_diff"] < 1e-4
    # tiny Llama, d=64, GQA k/v out = 32, MLP 128, 2 layers, all-linear r=4:
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert metrics["trainable_params"] == 2 * per_layer
    assert (run_dir / "config.yaml").read_text().count("r: 4") == 1
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    runs = mlflow_runs(outputs)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["method"] == "lora"
    assert run.data.metrics["params/trainable"] == metrics["trainable_params"]
    assert run.data.tags["method"] == "lora" and run.data.tags["model"] == "tiny" and "version.torch" in run.data.tags
    assert math.isclose(run.data.metrics["loss/val"], metrics["val_loss"], rel_tol=1e-6)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "loss/train")
    assert [m.step for m in history] == list(range(1, 9))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "adapter", "loss_curve.png"} <= artifacts


@pytest.mark.parametrize(
    "override,needle",
    [
        ("lora.rr=1", "lora.rr"),
        ("lora.r=x", "lora.r"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("optim.lr=-1", "optim.lr"),
        ("model.name=no-such/model-xyz", "model.name"),
        ("data.name=no_such_dataset_xyz", "data.name"),
        ("lora.targets=[no_such_proj]", "no_such_proj"),
        ("tracking.uri=bogus://nowhere", "tracking.uri"),
    ],
)
def test_bad_input_exits_2_and_creates_no_mlflow_run(
    outputs: Path, override: str, needle: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([*TINY, override]) == 2
    assert needle in capsys.readouterr().err
    assert mlflow_runs(outputs) == []
    assert not (outputs / "runs").exists()  # no half-made run folder either


def test_dataset_without_text_column_and_empty_dataset(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n".join(json.dumps({"review": f"text {i}", "label": i % 2}) for i in range(20)) + "\n")
    assert main([*TINY, f"data.name={wrong}"]) == 2
    err = capsys.readouterr().err
    assert "data.text_column" in err and "review" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([*TINY, f"data.name={empty}"]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert mlflow_runs(outputs) == []


def test_lora_learns_and_only_lora_changes(outputs: Path) -> None:
    _, cfg = compose([*TINY, "tracking=off", "trainer.max_steps=30", "trainer.eval_every=10", "optim.lr=3e-3"])
    session = build(cfg)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    after = {}

    def snapshot(event: EvalEvent) -> None:  # before the end-of-run merge, which rounds base weights
        if event.step == 30:
            after.update({k: v.detach().cpu().clone() for k, v in session.model.state_dict().items()})

    result = session.fit(snapshot)
    assert result.status == "completed"
    assert result.base_val_loss is not None and result.val_loss < result.base_val_loss - 0.5
    # Compared in the stored dtype: under bf16 precision (CUDA's default) the frozen weights are kept in bf16.
    changed = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert [e.step for e in result.evals] == [0, 10, 20, 30]


def test_merge_check_compares_real_logits(outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The merged-vs-unmerged check reuses the final and the merged evaluations' logits: a merge that adds the update
    # twice must show up in it (and in the merged val loss), while the real merge stays at rounding level.
    _, cfg = compose([*TINY, "tracking=off", "optim.lr=1e-2"])
    honest = build_and_fit(cfg)
    assert honest.max_abs_logit_diff is not None and honest.merge_ok is True

    def merge_twice(model: torch.nn.Module) -> None:
        for layer in model.modules():
            if isinstance(layer, lora.LoraLayer):
                layer.merge()
                layer._add_to_weight(+1.0)  # the bug: the update folded in twice

    def unmerge_twice(model: torch.nn.Module) -> None:
        for layer in model.modules():
            if isinstance(layer, lora.LoraLayer):
                layer._add_to_weight(-1.0)
                layer.unmerge()

    monkeypatch.setattr(lora, "merge", merge_twice)
    monkeypatch.setattr(lora, "unmerge", unmerge_twice)
    faulty = build_and_fit(cfg)
    assert faulty.val_loss == pytest.approx(honest.val_loss, rel=1e-5)  # the same training
    assert faulty.max_abs_logit_diff > 1e-3 and faulty.merge_ok is False
    assert faulty.merged_val_loss != pytest.approx(honest.merged_val_loss, rel=1e-4)


def test_full_finetuning_trains_every_weight(outputs: Path) -> None:
    _, cfg = compose([*TINY, "tracking=off", "method=full", "optim.lr=1e-3"])
    result = build_and_fit(cfg)
    assert result.status == "completed" and result.merged_val_loss is None
    assert result.trainable_params == result.total_params
    assert result.val_loss < result.base_val_loss


def test_resume_after_interruption_matches_uninterrupted_run(outputs: Path, tmp_path: Path) -> None:
    common = [
        *TINY,
        "tracking=off",
        "trainer.max_steps=8",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "lora.dropout=0.1",
    ]  # dropout: the RNG state must be restored too
    _, cfg = compose([*common, f"output_dir={tmp_path / 'straight'}"])
    straight = build_and_fit(cfg)

    class Interrupt(Exception):
        pass

    def stop_at_6(event: EvalEvent) -> None:
        if event.step == 6:
            raise Interrupt

    _, cfg = compose([*common, f"output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(Interrupt):
        build_and_fit(cfg, on_eval=stop_at_6)
    latest = (tmp_path / "resumed" / "checkpoints" / "LATEST").read_text()
    assert latest == "step-0000004"  # the step-6 checkpoint was never written: the eval stopped first
    _, cfg = compose([*common, f"output_dir={tmp_path / 'resumed'}", "trainer.resume=true"])
    resumed = build_and_fit(cfg)
    assert resumed.steps == 8
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in straight.history]
    assert resumed.val_loss == straight.val_loss


def test_diverging_run_ends_with_status_not_traceback(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    code = main([*TINY, "optim.lr=1e20", "optim.grad_clip=0", "trainer.max_steps=6"])
    assert code == 3
    assert "diverged" in capsys.readouterr().err
    runs = mlflow_runs(outputs)
    assert len(runs) == 1 and runs[0].info.status == "FAILED" and runs[0].data.tags["lora_lab.state"] == "FAIL"


def test_export_merged_loads_with_plain_transformers(outputs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    # fp32 on every device: the test is about exactness of the export, not bf16 rounding.
    _, cfg = compose(
        [
            *TINY,
            "tracking=off",
            "export.merged=true",
            "optim.lr=1e-2",
            "trainer.precision=fp32",
            f"output_dir={tmp_path / 'm'}",
        ]
    )
    session = build(cfg)
    session.fit()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    session.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, session.model.cpu()(ids).logits, atol=1e-5, rtol=1e-5)


class FixedLM(torch.nn.Module):
    """A 'language model' whose next-token distribution is the same everywhere: log p(5)=log 0.7, log p(7)=log 0.2."""

    def __init__(self, vocab: int = 10) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        probs = torch.full((vocab,), 0.1 / (vocab - 2))
        probs[5], probs[7] = 0.7, 0.2
        self.logits = probs.log()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> object:
        class Out:
            logits = self.logits.expand(*input_ids.shape, -1).clone()

        return Out()


def test_prompted_accuracy_on_a_hand_made_case(outputs: Path) -> None:
    import datasets

    # Label words: class 0 -> [5], class 1 -> [7, 5]. Scores: class 0 = log .7; class 1 = log .2 + log .7.
    # The model therefore always answers class 0: accuracy = share of class-0 rows = 2/3.
    rows = [{"prompt_ids": [1, 2], "class_label": c, "input_ids": [1, 2], "labels": [-100, -100]} for c in (0, 0, 1)]
    val = datasets.Dataset.from_list(rows)
    data = TaskData(
        train=val,
        val=val,
        format="prompted",
        pad_id=0,
        label_token_ids=[[5], [7, 5]],
        source="hand",
        fingerprint="hand",
    )
    _, cfg = compose([*TINY, "tracking=off"])
    session = Session(cfg, FixedLM(), None, data, torch.device("cpu"), [], 0.0, Path("."))
    metrics = session.evaluate()
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # Loss: token-weighted mean of -log p over the true label's tokens: (2 * -log .7 + -log .2 - log .7) / 4.
    expected = (3 * -math.log(0.7) - math.log(0.2)) / 4
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_prompted_single_token_path_equals_the_general_path(outputs: Path) -> None:
    # The tiny byte tokenizer makes label words multi-token; one-byte words take the fast path. Scores must agree
    # with scoring each candidate by a full forward (the general path), on a real (tiny) trained model.
    _, cfg = compose([*TINY, "tracking=off", "data.label_words=[n,p]", "trainer.max_steps=4", "optim.lr=1e-2"])
    session = build(cfg)
    session.fit()
    assert all(len(w) == 1 for w in session.data.label_token_ids)
    session.model.eval()
    fast = session.evaluate()
    general = _general_prompted_eval(session)  # right-padded full forwards, one per label word
    # fp32: the same numbers to 1e-4. bf16 (CUDA's default): other batch shapes round differently, a near-tie may flip.
    bf16 = session.autocast_dtype is not None
    assert fast["accuracy"] == pytest.approx(general["accuracy"], abs=1.5 / len(session.data.val) if bf16 else 1e-9)
    assert fast["val_loss"] == pytest.approx(general["val_loss"], rel=1e-2 if bf16 else 1e-4)


def _general_prompted_eval(session: Session) -> dict[str, float]:
    from lora_lab.data import collate

    rows = [session.data.val[i] for i in range(len(session.data.val))]
    scores = []
    with torch.no_grad():
        for word in session.data.label_token_ids:
            batch = to_device(collate(rows, session.data.pad_id, candidate=word), session.device)
            logits = session.evaluator.forward_logits(session.model, batch)  # on the run's device, in its precision
            lp, _ = sequence_logprobs(logits.float(), batch["labels"])
            scores.append(lp.cpu())
    scores = torch.stack(scores, 1)  # (N, K)
    truth = torch.tensor([r["class_label"] for r in rows])
    correct = (scores.argmax(1) == truth).float().mean().item()
    return {"val_loss": -scores.gather(1, truth[:, None]).mean().item(), "accuracy": correct}


def test_sequence_logprobs_shifts_like_transformers() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 9]])
    lp, n = sequence_logprobs(logits, labels)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert n.tolist() == [2, 3]
    assert (-lp.sum()).item() == pytest.approx(ref.item(), rel=1e-5)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_merged_block_folds_once_and_unfolds_whatever_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(lora, "merge", lambda model: calls.append("merge"))
    monkeypatch.setattr(lora, "unmerge", lambda model: calls.append("unmerge"))
    block = merged(torch.nn.Linear(2, 2), adaptations.of("lora"))
    with pytest.raises(RuntimeError, match="inside"):
        with block:
            with block:  # entering again folds nothing twice; only the outer exit unfolds
                assert calls == ["merge"]
            assert calls == ["merge"]
            raise RuntimeError("an error inside the block")
    assert calls == ["merge", "unmerge"] and block.depth == 0
    block.__exit__(None, None, None)  # an extra exit does nothing
    assert calls == ["merge", "unmerge"]

    def half_merge(model: torch.nn.Module) -> None:
        calls.append("half")
        raise ValueError("cannot merge")

    monkeypatch.setattr(lora, "merge", half_merge)
    calls.clear()
    with pytest.raises(ValueError, match="cannot merge"), merged(torch.nn.Linear(2, 2), adaptations.of("lora")):
        pass
    assert calls == ["half", "unmerge"]  # a merge that failed part-way is undone


def test_merged_block_restores_the_weights_of_a_real_model(build_tiny) -> None:
    model = build_tiny("llama")
    lora.apply_lora(model, r=4, alpha=8)
    for layer in model.modules():
        if isinstance(layer, lora.LoraLayer):
            torch.nn.init.normal_(layer.lora_B)  # a non-zero update, so merging changes the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged(model, adaptations.of("lora")):
        assert all(m.merged for m in model.modules() if isinstance(m, lora.LoraLayer))
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if isinstance(m, lora.LoraLayer))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
