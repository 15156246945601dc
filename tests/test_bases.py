"""lora_lab.bases: how a LoRA layer reaches its frozen base layer. nn.Linear and GPT-2's Conv1D give the same dense
(out, in) weight, write-back round-trips, the forward is the module's; a new kind of base (here a toy int8 layer, as
a 4-bit/8-bit base will be) is one more entry in bases.KINDS and needs nothing else from lora.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lab import bases, lora, targets

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def pair(d_in: int = 5, d_out: int = 7) -> tuple[nn.Linear, nn.Module]:
    """A Linear and a Conv1D computing the same map (the Conv1D stores the Linear's weight transposed)."""
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out)
    conv = Conv1D(d_out, d_in)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_linear_and_conv1d_give_the_same_dense_weight_shape_and_dtype():
    linear, conv = pair()
    lb, cb = bases.base_of(linear), bases.base_of(conv)
    assert isinstance(lb, bases.LinearBase) and isinstance(cb, bases.Conv1DBase)
    assert (lb.fan_in_fan_out, cb.fan_in_fan_out) == (False, True)
    assert (lb.in_features, lb.out_features) == (cb.in_features, cb.out_features) == (5, 7)
    assert torch.equal(lb.dense(), cb.dense()) and lb.dense().shape == (7, 5)
    assert lb.dense() is linear.weight and cb.weight is conv.weight and cb.bias is conv.bias  # views, no copies
    assert lb.dtype == cb.dtype == torch.float32 and lb.device == cb.device == torch.device("cpu")
    conv.to(torch.float64)
    assert cb.dtype == torch.float64 and cb.dense().dtype == torch.float64  # read from the module, never cached


def test_forward_is_the_modules_own():
    linear, conv = pair()
    x = torch.randn(2, 3, 5)
    for module in (linear, conv):
        assert torch.equal(bases.base_of(module).forward(x), module(x))
    torch.testing.assert_close(bases.base_of(conv).forward(x), linear(x))


def test_write_back_round_trips_in_the_stored_layout_and_dtype():
    linear, conv = pair()
    for module in (linear, conv):
        base = bases.base_of(module)
        stored = module.weight.detach().clone()
        with torch.no_grad():
            base.write(base.dense().clone())
        assert torch.equal(module.weight, stored)  # dense -> write is the identity
        new = torch.arange(35, dtype=torch.float64).view(7, 5)  # (out, in), another dtype
        with torch.no_grad():
            base.write(new)
        assert module.weight.dtype == torch.float32 and torch.equal(base.dense(), new.float())
        assert module.weight.shape == ((5, 7) if base.fan_in_fan_out else (7, 5))


def test_only_known_kinds_are_bases():
    assert bases.adaptable(nn.Linear(2, 2)) and bases.adaptable(Conv1D(2, 2))
    assert not bases.adaptable(nn.Embedding(4, 2)) and not bases.adaptable(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="cannot wrap a Embedding"):
        bases.base_of(nn.Embedding(4, 2))
    with pytest.raises(TypeError, match="Embedding"):
        lora.LoraLayer(nn.Embedding(4, 2), r=1, alpha=1)


def test_a_lora_layers_base_follows_its_base_layer_through_copies():
    import copy

    layer = lora.LoraLayer(pair()[1], r=2, alpha=4)
    assert layer.base.module is layer.base_layer
    twin = copy.deepcopy(layer)  # warm workers, tests and bench copy models: the view must move with the module
    assert twin.base.module is twin.base_layer and twin.base_layer is not layer.base_layer
    with torch.no_grad():
        twin.base.write(torch.zeros(7, 5))
    assert twin.base_layer.weight.abs().sum() == 0 and layer.base_layer.weight.abs().sum() > 0


def test_lora_on_conv1d_equals_lora_on_the_same_linear():
    linear, conv = pair()
    layers = []
    for module in (linear, conv):
        torch.manual_seed(1)
        layer = lora.LoraLayer(module, r=2, alpha=4)
        with torch.no_grad():
            layer.lora_B.normal_()
        layers.append(layer)
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(layers[0](x), layers[1](x))
        for layer in layers:
            layer.merge()
        torch.testing.assert_close(layers[0].base.dense(), layers[1].base.dense())
        torch.testing.assert_close(layers[0](x), layers[1](x))


class Int8Linear(nn.Module):
    """A toy quantized linear: int8 weight (out, in) with a per-row fp32 scale; forward dequantizes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


class Int8Base(bases.LinearBase):
    """The toy int8 layer as a base: dense() dequantizes, write() quantizes again (new per-row scales)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, Int8Linear)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def dense(self) -> torch.Tensor:
        return self.module.weight.float() * self.module.scale

    def write(self, weight: torch.Tensor) -> None:
        w = weight.float()
        self.module.scale.copy_(w.abs().amax(dim=1, keepdim=True) / 127)
        self.module.weight.copy_(torch.round(w / self.module.scale).to(torch.int8))


def test_a_new_base_kind_is_one_more_entry(monkeypatch):
    monkeypatch.setattr(bases, "KINDS", [Int8Base, *bases.KINDS])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    model[2] = Int8Linear(model[2])
    assert targets.resolve_targets(model) == ["0", "2"]  # targeting sees the new kind too
    lora.apply_lora(model, r=2, alpha=4)
    layer = model[2]
    assert isinstance(layer.base, Int8Base) and layer.lora_A.dtype == torch.float32
    assert lora.count_parameters(model).modules[1] == ("2", 6, 4, 2, 2 * (6 + 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        base_out = model(x)
        layer.lora_B.normal_(std=0.5)
        adapted = model(x)  # an int8 weight is no GEMM operand: the composed path, base forward + LoRA term
        h = model[1](model[0](x))
        expected = nn.functional.linear(h, layer.base.dense(), layer.bias) + layer.scaling * h @ layer.lora_A.T @ (
            layer.lora_B.T
        )
        torch.testing.assert_close(adapted, expected)
        assert (adapted - base_out).abs().max() > 1e-2
        lora.merge(model)  # through dense() and write(): re-quantized, so equal up to the int8 rounding
        assert layer.base_layer.weight.dtype == torch.int8
        torch.testing.assert_close(model(x), adapted, atol=0.05, rtol=0)
