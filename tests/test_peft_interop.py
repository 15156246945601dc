"""Adapters move both ways between lora_lab and peft (peft is a test-only dependency)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lab import lora

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
    [("llama", {"targets": ["all-linear"]}), ("gpt2", {"targets": ["all-linear"]}),
     ("llama", {"targets": ["attn"], "rslora": True})],
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
    [("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
     ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
     ("llama", {"target_modules": "all-linear", "use_rslora": True})],
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
