"""The GPU path, checked on the CPU where it can be (bf16 autocast runs on CPUs too) and on CUDA where one is visible:
peak memory read after the steps, a merge check that means the same in every precision, the fused LoRA node under
autocast, tensor batches, deferred loss reads, regional compilation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_lab import lora
from lora_lab.config import compose
from lora_lab.data import collate
from lora_lab.train import loop
from lora_lab.train.batches import TrainBatches
from lora_lab.train.build import build, build_and_fit
from lora_lab.train.finish import merge_tolerance
from lora_lab.train.runtime import PeakMemory, compile_blocks

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking=off"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _merge_twice(model: torch.nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, lora.LoraLayer):
            layer.merge()
            layer._add_to_weight(+1.0)  # the bug: the update folded in twice


def _unmerge_twice(model: torch.nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, lora.LoraLayer):
            layer._add_to_weight(-1.0)
            layer.unmerge()


def test_peak_memory_is_read_after_the_steps(outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA's allocator peak is read in PeakMemory.__exit__: a result built inside the with-block reported 0 MiB.
    # This stand-in behaves like the CUDA path on any device (peak known only on exit).
    class ExitOnlyPeak(PeakMemory):
        def __enter__(self) -> "ExitOnlyPeak":
            return self

        def __exit__(self, *exc: object) -> None:
            self.peak = 123_456_789

    monkeypatch.setattr(loop, "PeakMemory", ExitOnlyPeak)  # where the loop reads it
    _, cfg = compose([*TINY, "trainer.max_steps=2"])
    assert build_and_fit(cfg).peak_mem_bytes == 123_456_789


@cuda
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "olora"])
def test_lora_init_is_the_same_on_cuda_as_on_the_cpu(init: str) -> None:
    # A warm sweep worker re-wraps a model that stayed on the GPU; a fresh trial wraps it on the CPU. Same seed,
    # same adapters, or warm trials stop giving a fresh process's numbers.
    made = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        base = torch.nn.Linear(48, 32)
        layer = lora.LoraLayer(base.to(device), r=4, alpha=8, init=init)
        torch.manual_seed(1)
        layer.reset_lora_parameters()
        made.append([t.detach().cpu() for t in (layer.lora_A, layer.lora_B, layer.base_layer.weight)])
    for cpu, gpu in zip(*made):
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_peak_memory_is_not_zero(outputs: Path) -> None:
    _, cfg = compose([*TINY, "trainer.device=cuda", "trainer.max_steps=2"])
    result = build_and_fit(cfg)
    assert result.peak_mem_bytes > 0


PRECISIONS = {
    "fp32": ["trainer.precision=fp32"],
    "bf16": ["trainer.precision=bf16"],
    # bf16 weights without autocast compute in bf16 too: the tolerance follows the weights (it read fp32's 1e-4)
    "bf16 weights": ["model.dtype=bfloat16", "trainer.precision=fp32"],
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_merge_check_passes_a_right_merge_and_fails_a_double_fold(
    outputs: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    _, cfg = compose([*TINY, *PRECISIONS[precision], "optim.lr=1e-2"])
    honest = build_and_fit(cfg)
    assert honest.merge_ok is True, (honest.max_abs_logit_diff, honest.merge_tol)
    assert honest.merge_tol == 1e-4 if precision == "fp32" else honest.merge_tol > 1e-3
    assert honest.max_abs_logit_diff <= honest.merge_tol
    monkeypatch.setattr(lora, "merge", _merge_twice)
    monkeypatch.setattr(lora, "unmerge", _unmerge_twice)
    faulty = build_and_fit(cfg)
    assert faulty.merge_ok is False, (faulty.max_abs_logit_diff, faulty.merge_tol)


def test_merge_tolerance_scales_with_dtype_and_logits() -> None:
    logits = torch.tensor([[-3.0, 12.0]])
    assert merge_tolerance(None, logits) == 1e-4
    assert merge_tolerance(torch.float32, logits) == 1e-4
    assert merge_tolerance(torch.bfloat16, logits) == pytest.approx(8 * 2**-7 * 12.0)


def test_bf16_precision_keeps_frozen_weights_bf16_and_adapters_fp32(outputs: Path) -> None:
    _, cfg = compose([*TINY, "trainer.precision=bf16"])
    session = build(cfg)
    dtypes = {n: p.dtype for n, p in session.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    result = session.fit()
    assert result.status == "completed" and result.val_loss < result.base_val_loss


def test_fused_node_under_autocast_matches_the_composed_ops() -> None:
    torch.manual_seed(0)
    layer = lora.LoraLayer(torch.nn.Linear(16, 12).to(torch.bfloat16), r=4, alpha=8)
    assert layer.lora_A.dtype == torch.float32  # adapters train in fp32 on a bf16 base, as peft's default
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grads = []
    for fused in (True, False):
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x) if fused else layer._forward_composed(x, layer.scaling, drop=False)
        assert y.dtype == torch.bfloat16
        (y.float() ** 2).sum().backward()
        grads.append((y.detach().float(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for got, want in zip(*grads):  # bf16 rounds in other places on the two paths: compare as a whole
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_tensor_batches_equal_the_collated_rows(outputs: Path) -> None:
    _, cfg = compose(TINY)
    session = build(cfg)
    data = session.data
    for multiple in (1, 16):
        batches = TrainBatches(data, 4, cfg.seed, torch.device("cpu"), pad_to_multiple=multiple)
        for micro in (0, 1, 57):
            batch, n_tok = batches.get(micro)
            want = collate([data.train[int(i)] for i in batches.rows(micro)], data.pad_id)
            width = want["input_ids"].shape[1]
            assert batch["input_ids"].shape[1] % multiple == 0 and batch["input_ids"].shape[1] >= width
            for key in ("input_ids", "attention_mask", "labels"):
                torch.testing.assert_close(batch[key][:, :width], want[key])
            assert not batch["attention_mask"][:, width:].any() and (batch["labels"][:, width:] == -100).all()
            assert n_tok == int(want["attention_mask"].sum())


@pytest.mark.parametrize("method", ["lora", "full", "prompt", "prefix"])
def test_causal_lm_batches_without_padding_mask_give_the_same_loss_and_grads(outputs: Path, method: str) -> None:
    # Training batches of a causal LM leave the padding mask out (no host read of it per forward on CUDA): the rows
    # are right-padded, so with the causal mask alone every labelled position computes what it did with the mask.
    _, cfg = compose([*TINY, f"method={method}", "trainer.precision=fp32", "trainer.device=cpu"])
    session = build(cfg)
    model = session.model.train()
    with_mask = TrainBatches(session.data, 8, cfg.seed, torch.device("cpu"), padding_mask=True)
    without = TrainBatches(session.data, 8, cfg.seed, torch.device("cpu"), padding_mask=False)
    padded = 0
    for micro in range(3):
        a, _ = with_mask.get(micro)
        b, _ = without.get(micro)
        assert "attention_mask" not in b and torch.equal(a["input_ids"], b["input_ids"])
        padded += int((a["attention_mask"] == 0).sum())
        losses, grads = [], []
        for batch in (a, b):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for ga, gb in zip(*grads):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    assert padded > 0  # the batches did have padding to hide


def test_losses_read_every_n_steps_are_the_same_losses(outputs: Path) -> None:
    runs = []
    for every in (1, 3):
        _, cfg = compose([*TINY, f"trainer.sync_every={every}", "trainer.max_steps=7", "trainer.eval_every=7"])
        runs.append(build_and_fit(cfg))
    assert [p.train_loss for p in runs[0].history] == [p.train_loss for p in runs[1].history]
    assert [p.step for p in runs[1].history] == list(range(1, 8))
    assert len(runs[1].history) == 7 and runs[0].val_loss == runs[1].val_loss


def test_divergence_between_syncs_names_the_first_bad_step(outputs: Path) -> None:
    _, cfg = compose([*TINY, "optim.lr=1e20", "optim.grad_clip=0", "trainer.max_steps=6", "trainer.sync_every=5"])
    result = build_and_fit(cfg)
    assert result.status == "diverged"
    bad = int(result.reason.rsplit(" ", 1)[-1])
    assert len(result.history) == bad - 1 and all(p.train_loss == p.train_loss for p in result.history)


def test_compiled_blocks_train_like_eager(outputs: Path) -> None:
    # Regional compilation changes how the step runs, not what it computes (fp32: to 1e-4; under bf16, CUDA's
    # default, fused kernels round differently: to 1e-2).
    from torch._dynamo.utils import counters

    results, sessions = {}, {}
    for flag in ("false", "true"):
        _, cfg = compose([*TINY, f"trainer.compile={flag}", "trainer.max_steps=4", "trainer.eval_every=4"])
        sessions[flag] = session = build(cfg)
        results[flag] = session.fit()
    eager, compiled = results["false"], results["true"]
    assert compiled.status == "completed" and compiled.merge_ok
    rel = 1e-4 if sessions["true"].autocast_dtype is None else 1e-2
    for a, b in zip(eager.history, compiled.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=rel)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=rel)
    # Latency is measured eager, as evaluations are: no compiled variant for eval mode, no_grad or the merged model.
    graphs = counters["stats"]["unique_graphs"]
    sessions["true"].inference_latency()
    assert counters["stats"]["unique_graphs"] == graphs
    for session in sessions.values():
        session.close()


def test_compile_blocks_finds_the_layer_list(build_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo as dynamo

    resets = []
    monkeypatch.setattr(dynamo, "reset", lambda: resets.append(1))
    model = build_tiny("llama")
    assert compile_blocks(model) == 2
    assert resets == [1]  # a fresh cache per run: earlier runs' variants must not use up the recompile limit
    with pytest.raises(ValueError, match="trainer.compile"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
