"""peft round trips for the methods peft has (prompt tuning, prefix tuning on a GQA model, IA3): a peft-saved folder
loads into lora_lab.methods with the same outputs, and a lora_lab-saved folder loads into peft with the same outputs.
Pinned to the peft layout of the installed version (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import pytest
import torch

from lora_lab import methods
from lora_lab.train import prefix_cache_factory

peft = pytest.importorskip("peft")

N = 3  # virtual tokens


def peft_config(method: str):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    return peft.IA3Config(task_type="CAUSAL_LM")


def peft_logits(model, ids, mask, method):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[:, N:] if method == "prompt" else logits  # peft keeps the virtual tokens' logits


def ours(model, method):
    kw = {"cache_factory": prefix_cache_factory(model)} if method == "prefix" else {}
    if method in ("prompt", "prefix"):
        kw["n_tokens"] = N
    getattr(methods, f"apply_{method}")(model, **kw)


def batch(tiny_ids):
    mask = torch.ones_like(tiny_ids)
    mask[1, -2:] = 0  # right padding, as in training
    return tiny_ids, mask


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_peft_saved_loads_into_lora_lab(method, build_tiny, tiny_ids, tmp_path):
    ids, mask = batch(tiny_ids)
    pm = peft.get_peft_model(build_tiny("llama"), peft_config(method))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.2 if method == "ia3" else 1.0) + (1.0 if method == "ia3" else 0.0))
    pm.eval()
    with torch.no_grad():
        expected = peft_logits(pm, ids, mask, method)
    pm.save_pretrained(tmp_path)
    model = build_tiny("llama")
    assert methods.load(model, tmp_path, cache_factory=prefix_cache_factory(model)) == method
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_lora_lab_saved_loads_into_peft(method, build_tiny, tiny_ids, tmp_path):
    ids, mask = batch(tiny_ids)
    model = build_tiny("llama")
    ours(model, method)
    with torch.no_grad():
        for p in methods.method_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
        expected = model(input_ids=ids, attention_mask=mask).logits
    methods.save(model, tmp_path, base_model_name="tiny")
    pm = peft.PeftModel.from_pretrained(build_tiny("llama"), tmp_path).eval()
    with torch.no_grad():
        got = peft_logits(pm, ids, mask, method)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
