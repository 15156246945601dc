"""lora_lab.shapes: the one tiny shape is `model=tiny`'s (the model models builds, its vocabulary), and the named
shapes are the published ones."""

from __future__ import annotations

import pytest

from lora_lab import shapes
from lora_lab.config import ModelConfig, TinyModelConfig, compose


def test_tiny_shape_is_the_model_tiny_builds() -> None:
    from lora_lab.models import load_model, tiny_tokenizer

    assert shapes.TINY_VOCAB_SIZE == len(tiny_tokenizer())
    _, cfg = compose(["model=tiny"])
    assert cfg.model.tiny == TinyModelConfig()  # conf/model/tiny.yaml is the dataclass's defaults
    model, _ = load_model(ModelConfig(name="tiny"))
    built = model.config.to_dict()
    for key, value in shapes.SHAPE_FIELDS["tiny"].items():
        assert built[key] == value, key
    assert shapes.named_config("tiny").to_dict() == shapes.tiny_config().to_dict()


def test_tiny_overrides_build_the_named_shape() -> None:
    _, cfg = compose(shapes.tiny_overrides("smollm2-135m"))
    t = cfg.model.tiny
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (576, 30, 9, 3, 1536)
    assert shapes.tiny_fields(t)["hidden_size"] == shapes.SHAPE_FIELDS["smollm2-135m"]["hidden_size"]


def test_named_shapes() -> None:
    llama = shapes.named_config("meta-llama/Llama-3.1-8B")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers, llama.vocab_size) == (
        4096,
        14336,
        32,
        128256,
    )
    assert shapes.named_config("smollm2-135m-instruct").hidden_size == 576
    with pytest.raises(ValueError, match="no config known"):
        shapes.named_config("gpt2")
    with pytest.raises(ValueError, match="--shape"):
        shapes.shape_config("nope")


def test_step_flops_lora_costs_two_thirds_of_full_at_rank_zero() -> None:
    cfg = shapes.shape_config("llama-8b")
    full, frozen = shapes.step_flops(cfg, 1, 1, None), shapes.step_flops(cfg, 1, 1, 0)
    # One token: attention's 2*seq*h per layer is tiny beside the weights, so the ratio is the weights' 2/3.
    assert frozen / full == pytest.approx(2 / 3, rel=1e-4)
