"""trainer.gradient_checkpointing (lora_lab/train/runtime.py checkpoint_blocks): every method gives the loss and the
gradients of the unchecked model (dropout included), the blocks keep no activations, wrapping is idempotent and
undone exactly, and a run trains to the same numbers and records the setting."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lora_lab import adaptations, targets
from lora_lab.config import compose
from lora_lab.train import build_and_fit, prefix_cache_factory
from lora_lab.train.runtime import (
    CHECKPOINTED,
    checkpoint_blocks,
    compile_blocks,
    is_checkpointed,
    set_use_cache,
    uncheckpoint_blocks,
)
from lora_lab.train.warm import Warm

# Every method, LoRA's variants among them; dropout > 0 where the method has one (LoRA's input dropout).
CASES = {
    "lora-dropout": ["method=lora", "lora.r=4", "lora.dropout=0.3"],
    "dora-rslora": ["method=lora", "lora.r=4", "lora.variant=dora", "lora.rslora=true", "lora.dropout=0.2"],
    "lora-pissa": ["method=lora", "lora.r=4", "lora.init=pissa"],
    "full": ["method=full"],
    "bitfit": ["method=bitfit"],
    "ia3": ["method=ia3"],
    "adapter": ["method=adapter", "adapter.bottleneck=4"],
    "prompt": ["method=prompt", "prompt.n_tokens=3"],
    "prefix": ["method=prefix", "prefix.n_tokens=3"],
    "prefix-projection": ["method=prefix", "prefix.n_tokens=3", "prefix.projection=true", "prefix.hidden=16"],
}


def _model(build_tiny, overrides: list[str], layers: int = 2, quantize: str = "none") -> torch.nn.Module:
    """The tiny llama (its frozen linears quantized as model.quantize says) with the method applied as a run applies
    it, its trainable weights moved off their init (B = 0 and zero biases would make most gradients zero, dropout's
    mask among them), in train mode, no KV cache."""
    _, cfg = compose(["model=tiny", *overrides])
    if layers == 2:
        model = build_tiny("llama")
    else:
        torch.manual_seed(0)
        conf = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            max_position_embeddings=64,
        )
        model = transformers.AutoModelForCausalLM.from_config(conf)
    if quantize != "none":
        from lora_lab import quant

        quant.quantize_model(model, quantize)
    adaptations.of(cfg.method).apply(model, cfg, prefix_cache_factory(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    set_use_cache(model, False)
    return model.train()


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # dropout's masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_gets_the_unchecked_loss_and_gradients(name, build_tiny, tiny_ids):
    plain = _model(build_tiny, CASES[name])
    checked = copy.deepcopy(plain)
    assert checkpoint_blocks(checked) == 2
    loss, grads = _loss_and_grads(plain, tiny_ids)
    loss_c, grads_c = _loss_and_grads(checked, tiny_ids)
    assert loss_c == pytest.approx(loss, abs=1e-6, rel=0)
    assert grads.keys() == grads_c.keys() and grads
    assert any(g.abs().sum() > 0 for g in grads.values())
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-6, rtol=0, msg=n)
    # A second step on the same model (prefix tuning's cache is rebuilt per call; RNG state moved on): still equal.
    loss2, grads2 = _loss_and_grads(plain, tiny_ids, seed=6)
    loss2_c, grads2_c = _loss_and_grads(checked, tiny_ids, seed=6)
    assert loss2_c == pytest.approx(loss2, abs=1e-6, rel=0)
    for n in grads2:
        torch.testing.assert_close(grads2_c[n], grads2[n], atol=1e-6, rtol=0, msg=n)


def test_dropout_masks_are_drawn_again_not_skipped(build_tiny, tiny_ids):
    """The equality above is no accident of dropout doing nothing: another seed gives other gradients, and so does
    dropout off, while checkpointing repeats exactly the mask its forward drew."""
    model = _model(build_tiny, CASES["lora-dropout"])
    checkpoint_blocks(model)
    _, a = _loss_and_grads(model, tiny_ids, seed=5)
    _, b = _loss_and_grads(model, tiny_ids, seed=7)
    assert any(not torch.allclose(a[n], b[n]) for n in a)
    _, again = _loss_and_grads(model, tiny_ids, seed=5)
    assert all(torch.equal(a[n], again[n]) for n in a)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor, per_block: bool = True) -> tuple[int, list[int]]:
    """Bytes of the distinct storages autograd saves for backward in one forward: in all, and inside each block
    apart from those every block saves (rotary tables, the attention mask: one copy for the model) (per_block;
    hooks on compiled blocks would only make them recompile)."""
    blocks = [b for _, b in targets.repeated_blocks(model)] if per_block else []
    total: dict[int, int] = {}
    inside: list[dict[int, int]] = [{} for _ in blocks]
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        total[s.data_ptr()] = s.nbytes()
        if current:
            inside[current[-1]][s.data_ptr()] = s.nbytes()
        return t

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        current.pop()

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        hooks.append(b.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    shared = set.intersection(*(set(d) for d in inside)) if len(inside) > 1 else set()
    return sum(total.values()), [sum(v for k, v in d.items() if k not in shared) for d in inside]


@pytest.mark.parametrize("name", ["lora-dropout", "full", "prefix"])
def test_checkpointed_blocks_keep_no_activations(name, build_tiny):
    ids = torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(0))
    model = _model(build_tiny, CASES[name], layers=6)
    plain_total, plain_blocks = _saved_bytes(model, ids)
    checkpoint_blocks(model)
    total, blocks = _saved_bytes(model, ids)
    # Unchecked, each block keeps many hidden states' worth per token; checkpointed, a block keeps its arguments
    # for the recompute (torch 2.13's checkpoint saves them): its own is its input.
    hidden = ids.numel() * 32 * 4  # one fp32 hidden state (B, T, d)
    assert min(plain_blocks) > 8 * hidden
    assert blocks == [hidden] * 6
    assert total < plain_total / 3


def test_idempotent_undone_exactly_and_survives_a_deep_copy(build_tiny, tiny_ids):
    model = _model(build_tiny, CASES["lora-dropout"])
    blocks = [b for _, b in targets.repeated_blocks(model)]
    assert not is_checkpointed(model)
    assert checkpoint_blocks(model) == checkpoint_blocks(model) == 2  # the second call wraps nothing again
    assert all(getattr(b, CHECKPOINTED) for b in blocks)
    assert all(b.lora_lab_plain_forward.__func__ is type(b).forward for b in blocks)  # one level of wrapping
    twin = copy.deepcopy(model)
    for b, t in zip(blocks, [b for _, b in targets.repeated_blocks(twin)]):
        assert t is not b and t.forward.__self__ is t and t.lora_lab_plain_forward.__self__ is t  # its own blocks
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*a, **kw):
        calls.append(kw.get("use_reentrant"))
        return original(*a, **kw)

    torch.utils.checkpoint.checkpoint = counting
    try:
        _loss_and_grads(model, tiny_ids)
        assert calls == [False, False]  # non-reentrant, once per block
        with torch.no_grad():  # evaluation: the plain forward
            model(input_ids=tiny_ids)
        model.eval()
        model(input_ids=tiny_ids)
        assert len(calls) == 2
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert uncheckpoint_blocks(model) == 2 and not is_checkpointed(model)
    assert all("forward" not in vars(b) and not hasattr(b, "lora_lab_plain_forward") for b in blocks)


def test_a_warm_worker_gets_its_model_back_unchecked(build_tiny):
    _, cfg = compose(["model=tiny", "method=lora", "trainer.gradient_checkpointing=true"])
    warm = Warm()
    warm.keep(cfg, build_tiny("llama"), None, None)
    model, _, _ = warm.take(cfg)
    checkpoint_blocks(model)
    warm.give_back()
    assert warm.entry is not None and warm.entry.model is model and not is_checkpointed(model)


def test_a_model_without_repeated_blocks_is_refused_by_name():
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing: Linear: no list of repeated layers"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


TINY_RUN = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.eval_at_start=false",
    "tracking=off",
    "lora.dropout=0.2",
]


def test_a_run_trains_to_the_same_numbers_with_checkpointing(tmp_path):
    records = []
    for on in ("false", "true"):
        _, cfg = compose([*TINY_RUN, f"trainer.gradient_checkpointing={on}", f"output_dir={tmp_path / on}"])
        records.append(build_and_fit(cfg))
    plain, checked = records
    assert [p.train_loss for p in checked.history] == pytest.approx([p.train_loss for p in plain.history], abs=1e-6)
    assert checked.val_loss == pytest.approx(plain.val_loss, abs=1e-6)


@pytest.mark.slow
def test_the_cli_records_the_setting(tmp_path):
    """`python -m lora_lab.train ... trainer.gradient_checkpointing=true` completes; the setting is in the saved
    config and among the run's MLflow params."""
    import mlflow

    out = tmp_path / "run"
    env_outputs = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "lora_lab.train", *TINY_RUN[:-2], "tracking.system_metrics=false"]
    cmd += ["trainer.gradient_checkpointing=true", f"output_dir={out}"]
    repo = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "LORA_LAB_OUTPUTS": str(env_outputs), "PYTHONPATH": str(repo)}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "activation checkpointing of 2 repeated blocks" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert "gradient_checkpointing: true" in (out / "config.yaml").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{env_outputs / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["trainer.gradient_checkpointing"] == "true"


@pytest.mark.slow
def test_compiled_blocks_hold_the_checkpoint(build_tiny):
    """trainer.compile=true with checkpointing (checkpoint inside each compiled block): the eager model's loss and
    gradients (dropout off: compiled dropout draws its own masks), and far fewer saved activations (what is left is
    each block's inputs, saved by the compiled graph, and the loss)."""
    ids = torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(0))
    eager = _model(build_tiny, ["method=lora", "lora.r=4"], layers=4)
    both = copy.deepcopy(eager)
    checkpoint_blocks(both)
    compile_blocks(both)
    loss, grads = _loss_and_grads(eager, ids)
    loss_c, grads_c = _loss_and_grads(both, ids)
    assert loss_c == pytest.approx(loss, abs=1e-5, rel=0)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert _saved_bytes(both, ids, per_block=False)[0] < 0.4 * _saved_bytes(eager, ids, per_block=False)[0]


def test_bench_checkpointing_rows_and_saved_bytes(tmp_path):
    """`python -m lora_lab.bench core --checkpointing`: each method beside itself checkpointed, ratios from the same
    rounds, and the bytes a block keeps per token: many hidden states' worth unchecked, about one hidden state (its
    input, d fp32 values) checkpointed."""
    from lora_lab.bench.__main__ import main

    out = tmp_path / "ckpt.json"
    argv = ["core", "--checkpointing", "--tiny", "--steps", "2", "--warmup", "0", "--no-memory", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert list(res["step"]) == ["lora_lab", "lora_lab+ckpt", "full", "full+ckpt"]
    assert {"time_lora_lab+ckpt_over_lora_lab", "time_full+ckpt_over_full"} == set(res["ratios"])
    times = res["step"]
    expected = sorted(a / b for a, b in zip(times["lora_lab+ckpt"]["times_s"], times["lora_lab"]["times_s"]))
    paired = res["paired"]["lora_lab+ckpt_over_lora_lab"]
    assert paired["n"] == 2 and paired["min"] == pytest.approx(expected[0])
    hidden = 4 * res["hidden_size"]
    for kind in ("lora_lab", "full"):  # the input, and the rotary tables every block shares (1 x T x head_dim, twice)
        assert hidden <= times[f"{kind}+ckpt"]["saved_per_token_layer_bytes"] <= 1.2 * hidden
        assert times[kind]["saved_per_token_layer_bytes"] > 10 * hidden


@pytest.mark.slow
def test_bench_activation_memory_follows_the_saved_tensors():
    """The bench's activation memory (fresh subprocesses, RSS high-water) of the layer stack: unchecked at least what
    the blocks keep for backward (saved bytes x tokens x layers), checkpointed less than half of it."""
    from lora_lab.bench import core as bench
    from lora_lab.shapes import shape_config

    batch, seq = 8, 256
    cfg = shape_config("tiny")
    model = bench._make("lora_lab", bench._base_model(cfg, 0, torch.device("cpu"), torch.float32), copy_base=False)
    per_token_layer = bench.saved_bytes_per_token_layer(model, torch.zeros(1, 64, dtype=torch.long))
    kept = per_token_layer * batch * seq * cfg.num_hidden_layers
    plain = bench.activation_memory("lora_lab", "tiny", batch, seq)
    checked = bench.activation_memory("lora_lab+ckpt", "tiny", batch, seq)
    assert 0.9 * kept <= plain["stack"] < 2 * kept, (plain, kept)
    assert checked["stack"] < 0.75 * plain["stack"] and checked["step"] < plain["step"], (checked, plain)


@pytest.mark.parametrize("how", ["nf4", "int8"])
def test_a_quantized_base_gets_the_unchecked_gradients(how, build_tiny, tiny_ids):
    """model.quantize: checkpointing wraps the blocks, not their linears, so LoRA over a bitsandbytes base recomputes
    to the same loss and gradients (dropout included)."""
    pytest.importorskip("bitsandbytes")
    plain = _model(build_tiny, CASES["lora-dropout"], quantize=how)
    checked = copy.deepcopy(plain)
    checkpoint_blocks(checked)
    loss, grads = _loss_and_grads(plain, tiny_ids)
    loss_c, grads_c = _loss_and_grads(checked, tiny_ids)
    assert loss_c == pytest.approx(loss, abs=1e-6, rel=0) and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-6, rtol=0, msg=n)
