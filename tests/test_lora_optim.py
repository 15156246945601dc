"""optim.adamw: the trainer's and the bench's AdamW is torch's fused one on the CPU too, with the per-tensor loop's
numerics; the LoRA node's gradients match the composed ops it replaces."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lab import lora, optim, train
from lora_lab.config import compose


def _tiny_lora() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lora.apply_lora(model, r=4, alpha=8, targets=("all-linear",))
    with torch.no_grad():  # B = 0 at init: move it so that every parameter gets a gradient from step 1
        for name in lora.wrapped_modules(model):
            model.get_submodule(name).lora_B.normal_(0, 0.1)
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 3) -> torch.Tensor:
    trainable = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        model(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)  # as the trainer does
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in trainable])


def test_fused_adamw_matches_the_per_tensor_loop() -> None:
    model = _tiny_lora()
    x = torch.randn(10, 16)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    fused_model, loop_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = optim.adamw(optim.param_groups(fused_model, lr=1e-2, lr_ratio=4.0, weight_decay=0.1), **kw)
    assert fused.defaults["fused"] is True  # CPU tensors: fused, not torch's CPU default (the Python for-loop)
    loop = torch.optim.AdamW(
        optim.param_groups(loop_model, lr=1e-2, lr_ratio=4.0, weight_decay=0.1), foreach=False, **kw
    )
    start = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    got, want = _train(fused_model, fused, x), _train(loop_model, loop, x)
    assert (want - start).abs().max() > 1e-2  # the weights moved: the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_adamw_falls_back_where_fused_is_unavailable() -> None:
    p = nn.Parameter(torch.zeros(3, device="meta"))
    assert optim.adamw([p], lr=1e-3).defaults["fused"] is None  # torch's own choice, no error


def test_trainer_builds_the_fused_optimizer(outputs: Path) -> None:
    _, cfg = compose(["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking=off"])
    session = train.build(cfg)
    try:
        optimizer, _ = session.make_optimizer()
        assert optimizer.defaults["fused"] is True
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(lora.wrapped_modules(session.model)) * 2
    finally:
        session.close()


@pytest.mark.parametrize("bias", [True, False])
def test_fused_node_gradients_match_composed_ops(bias: bool) -> None:
    torch.manual_seed(0)
    layer = lora.LoraLayer(nn.Linear(12, 20, bias=bias), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 20)
    layer(x).backward(g)
    got = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
    a, b = layer.lora_A.detach().requires_grad_(True), layer.lora_B.detach().requires_grad_(True)
    x2 = x.detach().requires_grad_(True)
    ref = layer.base_layer(x2) + layer.scaling * (x2 @ a.t()) @ b.t()
    ref.backward(g)
    for have, want in zip(got, [x2.grad, a.grad, b.grad]):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
