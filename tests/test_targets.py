"""lora_lab.targets: the one repeated-block finder (what the methods adapt per layer, what regional compilation and
later activation checkpointing work on) and LoRA layers recognised without importing lora; peft_io's key mapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lab import lora, peft_io, targets

BLOCKS = {
    "llama": ("model.layers", "LlamaDecoderLayer"),
    "gpt2": ("transformer.h", "GPT2Block"),
    "bert": ("bert.encoder.layer", "BertLayer"),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_repeated_blocks_are_the_layer_list(build_tiny, kind):
    model = build_tiny(kind)
    stack, block_type = BLOCKS[kind]
    blocks = targets.repeated_blocks(model)
    assert [n for n, _ in blocks] == [f"{stack}.0", f"{stack}.1"]
    assert all(b is model.get_submodule(n) and type(b).__name__ == block_type for n, b in blocks)
    assert targets.repeated_blocks(model, min_blocks=2) == blocks  # what regional compilation asks for
    lora.apply_lora(model, r=2, alpha=4)  # wrapping linears inside the blocks changes nothing
    assert [n for n, _ in targets.repeated_blocks(model)] == [f"{stack}.0", f"{stack}.1"]


def test_repeated_blocks_rules(build_tiny):
    with pytest.raises(ValueError, match="LlamaForCausalLM: no list of repeated layers"):
        targets.repeated_blocks(build_tiny("llama"), min_blocks=3)
    with pytest.raises(ValueError, match="Sequential: no list of repeated layers"):
        targets.repeated_blocks(nn.Sequential(nn.Linear(2, 2)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])  # most parameters, but not one type
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(), nn.ReLU()])  # one type, no parameters: no layer stack
            self.one = nn.ModuleList([nn.Linear(8, 8)])
            self.pair = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    net = Net()
    assert [n for n, _ in targets.repeated_blocks(net)] == ["one.0"]
    assert [n for n, _ in targets.repeated_blocks(net, min_blocks=2)] == ["pair.0", "pair.1"]


def test_lora_layers_are_recognised_by_shape(build_tiny):
    model = build_tiny("gpt2")
    lora.apply_lora(model, r=2, alpha=4, targets=["c_attn"])
    linears = targets.linear_modules(model)
    layer = model.transformer.h[0].attn.c_attn
    assert targets.is_lora_layer(layer) and linears["transformer.h.0.attn.c_attn"] is layer
    assert not any(n.endswith(".base_layer") for n in linears)  # the wrapped base is not a target of its own
    assert not targets.is_lora_layer(layer.base_layer) and targets.is_linear(layer.base_layer)
    assert targets.head_modules(model) == ["lm_head"]  # tied to the embedding, found as before
    assert targets.inside("a.b.c", ["a.b"]) and not targets.inside("a.bc", ["a.b"])


def test_peft_keys_both_ways():
    assert peft_io.lora_key("m.q.lora_A") == "base_model.model.m.q.lora_A.weight"
    assert peft_io.lora_key("m.q.lora_magnitude_vector") == "base_model.model.m.q.lora_magnitude_vector"
    assert peft_io.lora_key("classifier.weight") == "base_model.model.classifier.weight"
    for theirs, ours in [
        ("base_model.model.m.q.lora_A.default.weight", "base_model.model.m.q.lora_A.weight"),
        ("base_model.model.m.q.lora_magnitude_vector.default.weight", "base_model.model.m.q.lora_magnitude_vector"),
        ("base_model.model.classifier.modules_to_save.default.weight", "base_model.model.classifier.weight"),
    ]:
        assert peft_io.normalize_key(theirs) == ours == peft_io.normalize_key(ours)
    key, t = peft_io.ia3_tensor("m.k_proj.ia3_l", torch.ones(4), feedforward=False)
    assert key == "base_model.model.m.k_proj.ia3_l" and t.shape == (4, 1)
    assert peft_io.ia3_tensor("m.down.ia3_l", torch.ones(4), feedforward=True)[1].shape == (1, 4)
    assert peft_io.ia3_parameter(key) == "m.k_proj.ia3_l" == peft_io.ia3_parameter("base_model.model.m.k_proj.weight")
