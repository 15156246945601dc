"""Adapters move both ways between lora_lab and peft (peft is a test-only dependency)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lab import lora, targets

peft = pytest.importorskip("peft")

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_b(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", {"targets": ["all-linear"]}),
        ("gpt2", {"targets": ["all-linear"]}),
        ("llama", {"targets": ["attn"], "rslora": True}),
    ],
)
def test_lora_lab_adapter_loads_in_peft(build_tiny, tiny_ids, tmp_path, kind, kwargs):
    model = build_tiny(kind)
    base_out = logits(model, tiny_ids)
    lora.apply_lora(model, r=4, alpha=8, **kwargs)
    perturb_b(model)
    ours = logits(model, tiny_ids)
    assert (ours - base_out).abs().max() > 1e-3
    lora.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path).eval()
    assert torch.allclose(logits(theirs, tiny_ids), ours, atol=ATOL)


@pytest.mark.parametrize(
    "kind, cfg",
    [
        ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
        ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
        ("llama", {"target_modules": "all-linear", "use_rslora": True}),
    ],
)
def test_peft_adapter_loads_in_lora_lab(build_tiny, tiny_ids, tmp_path, kind, cfg):
    pm = peft.get_peft_model(build_tiny(kind), peft.LoraConfig(r=4, lora_alpha=8, **cfg)).eval()
    perturb_b(pm)
    theirs = logits(pm, tiny_ids)
    pm.save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    model = build_tiny(kind)
    base_out = logits(model, tiny_ids)
    assert (theirs - base_out).abs().max() > 1e-3
    names = lora.load_adapter(model, tmp_path)
    peft_names = sorted(n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted("base_model.model." + n for n in names) == peft_names
    layer = next(m for m in model.modules() if isinstance(m, lora.LoraLayer))
    assert layer.rslora is bool(saved_cfg.get("use_rslora"))
    assert torch.allclose(logits(model, tiny_ids), theirs, atol=ATOL)


def perturb_all(model, seed=0, std=0.2):
    """B perturbed (and DoRA's magnitude, and A) so every trained tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + torch.rand(p.shape, generator=g) * 0.5)


def lab_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lora.LoraLayer)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_both_ways_and_exact_merge(build_tiny, tiny_ids, tmp_path, kind):
    model = build_tiny(kind)
    base_out = logits(model, tiny_ids)
    lora.apply_lora(model, r=4, alpha=8, variant="dora", targets=["attn"])
    assert torch.allclose(logits(model, tiny_ids), base_out, atol=ATOL)  # m = ||W0||, B = 0: the base model
    perturb_all(model)
    ours = logits(model, tiny_ids)
    assert (ours - base_out).abs().max() > 1e-3
    c = lora.count_parameters(model)
    assert all(n == r * (i + o) + o for _, i, o, r, n in c.modules)  # + one magnitude per output
    lora.save_adapter(model, tmp_path / "lab")
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path / "lab").eval()
    assert json.loads((tmp_path / "lab" / "adapter_config.json").read_text())["use_dora"] is True
    assert torch.allclose(logits(theirs, tiny_ids), ours, atol=ATOL)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    lora.merge(model)
    assert torch.allclose(logits(model, tiny_ids), ours, atol=ATOL)
    with lora.disable_adapters(model):
        assert torch.allclose(logits(model, tiny_ids), base_out, atol=ATOL)
    lora.unmerge(model)
    assert all(torch.allclose(weights[n], p, atol=1e-6) for n, p in model.state_dict().items())
    theirs.merge_and_unload()
    assert torch.allclose(logits(theirs, tiny_ids), ours, atol=ATOL)
    # peft -> lora_lab
    cfg = {"target_modules": ["c_attn"], "fan_in_fan_out": True}
    if kind == "llama":
        cfg = {"target_modules": ["q_proj", "v_proj"]}
    pm = peft.get_peft_model(build_tiny(kind), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **cfg)).eval()
    perturb_all(pm, seed=1)
    pm.save_pretrained(tmp_path / "peft")
    fresh = build_tiny(kind)
    lora.load_adapter(fresh, tmp_path / "peft")
    assert all(m.variant == "dora" for m in lab_layers(fresh).values())
    assert torch.allclose(logits(fresh, tiny_ids), logits(pm, tiny_ids), atol=ATOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_matches_peft_and_saves_as_plain_lora(build_tiny, tiny_ids, tmp_path, init):
    base_out = logits(build_tiny("llama"), tiny_ids)
    model = build_tiny("llama")
    lora.apply_lora(model, r=4, alpha=8, init=init, targets=["q_proj", "down_proj"])
    pm = peft.get_peft_model(
        build_tiny("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj", "down_proj"]),
    ).eval()
    ours = dict(model.named_parameters())
    for n, p in pm.named_parameters():  # same A, B and the same residual weights
        key = n.removeprefix("base_model.model.").replace(".default", "").replace(".lora_A.weight", ".lora_A")
        key = key.replace(".lora_B.weight", ".lora_B")
        assert torch.allclose(ours[key], p, atol=ATOL), key
    assert torch.allclose(logits(model, tiny_ids), base_out, atol=ATOL)  # residual + B A = W0
    perturb_all(model)
    trained = logits(model, tiny_ids)
    with lora.disable_adapters(model):  # the original model, not the residual
        assert torch.allclose(logits(model, tiny_ids), base_out, atol=ATOL)
    lora.save_adapter(model, tmp_path / "lab")
    saved = json.loads((tmp_path / "lab" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)  # rank 2r against W0
    theirs = peft.PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "lab").eval()
    assert torch.allclose(logits(theirs, tiny_ids), trained, atol=ATOL)
    fresh = build_tiny("llama")
    lora.load_adapter(fresh, tmp_path / "lab")
    assert torch.allclose(logits(fresh, tiny_ids), trained, atol=ATOL)
    # peft's own conversion (path_initial_model_for_weight_conversion) loads in lora_lab on the original base
    pm.save_pretrained(tmp_path / "init")
    perturb_all(pm, seed=2)
    their_trained = logits(pm, tiny_ids)
    pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    fresh = build_tiny("llama")
    lora.load_adapter(fresh, tmp_path / "conv")
    assert torch.allclose(logits(fresh, tiny_ids), their_trained, atol=ATOL)
    # ... and peft's unconverted adapter too: lora_lab redoes the init on the base, then loads A and B
    pm.save_pretrained(tmp_path / "raw")
    fresh = build_tiny("llama")
    lora.load_adapter(fresh, tmp_path / "raw")
    assert all(m.init == init for m in lab_layers(fresh).values())
    assert torch.allclose(logits(fresh, tiny_ids), their_trained, atol=ATOL)


def test_modules_to_save_head_both_ways(build_tiny, tiny_ids, tmp_path):
    model = build_tiny("bert")  # BertForSequenceClassification: fresh classifier
    lora.apply_lora(model, r=4, alpha=8, targets=["attn"], modules_to_save=targets.head_modules(model))
    perturb_all(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    ours = logits(model, tiny_ids)
    lora.save_adapter(model, tmp_path / "lab")
    saved = json.loads((tmp_path / "lab" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
    other_head = build_tiny("bert", seed=5)  # a different head init, the same backbone
    other_head.bert.load_state_dict(build_tiny("bert").bert.state_dict())
    theirs = peft.PeftModel.from_pretrained(other_head, tmp_path / "lab").eval()
    assert torch.allclose(logits(theirs, tiny_ids), ours, atol=ATOL)
    pm = peft.get_peft_model(
        build_tiny("bert"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    ).eval()
    perturb_all(pm, seed=3)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    pm.save_pretrained(tmp_path / "peft")
    fresh = build_tiny("bert", seed=5)
    with torch.no_grad():
        fresh.bert.load_state_dict(build_tiny("bert").bert.state_dict())
    lora.load_adapter(fresh, tmp_path / "peft")  # modules_to_save ['classifier', 'score']: 'score' is not in BERT
    assert lora.modules_to_save_of(fresh) == ["classifier"]
    assert fresh.classifier.weight.requires_grad
    assert torch.allclose(logits(fresh, tiny_ids), logits(pm, tiny_ids), atol=ATOL)


def test_layers_to_transform_on_an_encoder_decoder_both_ways(tmp_path):
    import transformers

    cfg = transformers.T5Config(
        d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, vocab_size=96, decoder_start_token_id=0
    )

    def t5():
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(cfg).eval()

    ids = {"input_ids": torch.arange(1, 9).view(2, 4), "decoder_input_ids": torch.arange(2, 8).view(2, 3)}

    def out(m):
        with torch.no_grad():
            return m(**ids).logits

    model = t5()
    lora.apply_lora(model, r=2, alpha=4, targets=["q", "v", "wo"], layers=[1])
    perturb_all(model)
    ours = out(model)
    lora.save_adapter(model, tmp_path / "lab")
    theirs = peft.PeftModel.from_pretrained(t5(), tmp_path / "lab").eval()
    assert torch.allclose(out(theirs), ours, atol=ATOL)
    pm = peft.get_peft_model(
        t5(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wo"], layers_to_transform=[1])
    ).eval()
    perturb_all(pm, seed=4)
    pm.save_pretrained(tmp_path / "peft")
    fresh = t5()
    names = lora.load_adapter(fresh, tmp_path / "peft")
    assert names == sorted(lora.wrapped_modules(model), key=names.index) and all(".block.1." in n for n in names)
    assert torch.allclose(out(fresh), out(pm), atol=ATOL)
