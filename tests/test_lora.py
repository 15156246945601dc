"""Tests of lora_lab.lora on tiny Llama (GQA), BERT and GPT-2 models built from configs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from lora_lab import lora, optim, targets

ATOL = 1e-5


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Make every lora_B non-zero so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def expand(prefix: str, suffixes: list[str], n_layers: int = 2) -> set[str]:
    return {f"{prefix}.{i}.{s}" for i in range(n_layers) for s in suffixes}


LLAMA_ATTN = expand("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
LLAMA_MLP = expand("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
BERT_ATTN = expand(
    "bert.encoder.layer",
    ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
)
BERT_MLP = expand("bert.encoder.layer", ["intermediate.dense", "output.dense"])
GPT2_ATTN = expand("transformer.h", ["attn.c_attn", "attn.c_proj"])
GPT2_MLP = expand("transformer.h", ["mlp.c_fc", "mlp.c_proj"])
EXPECTED = {
    "llama": {"attn": LLAMA_ATTN, "mlp": LLAMA_MLP, "all-linear": LLAMA_ATTN | LLAMA_MLP},
    "bert": {"attn": BERT_ATTN, "mlp": BERT_MLP, "all-linear": BERT_ATTN | BERT_MLP | {"bert.pooler.dense"}},
    "gpt2": {"attn": GPT2_ATTN, "mlp": GPT2_MLP, "all-linear": GPT2_ATTN | GPT2_MLP},
}


# ------------------------------------------------------------------------------------------- targeting


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("preset", ["attn", "mlp", "all-linear"])
def test_preset_resolves_to_exact_module_set(build_tiny, kind, preset):
    model = build_tiny(kind)
    assert set(targets.resolve_targets(model, [preset])) == EXPECTED[kind][preset]
    wrapped = lora.apply_lora(model, r=2, alpha=4, targets=[preset])
    assert set(wrapped) == EXPECTED[kind][preset] == set(lora.wrapped_modules(model))


def test_suffix_regex_exclude_layers_and_head(build_tiny):
    model = build_tiny("llama")
    assert targets.resolve_targets(model, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert targets.resolve_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert targets.resolve_targets(model, target_regex=r".*\.(k|v)_proj") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"
    ]
    assert set(targets.resolve_targets(model, ["attn"], exclude=["o_proj"])) == {
        n for n in LLAMA_ATTN if not n.endswith("o_proj")
    }
    assert set(targets.resolve_targets(model, ["all-linear"], layers=[1])) == {
        n for n in LLAMA_ATTN | LLAMA_MLP if ".1." in n
    }
    assert set(targets.resolve_targets(model, ["mlp"], include_head=True)) == LLAMA_MLP | {"lm_head"}


def test_target_matching_nothing_names_it_and_lists_modules(build_tiny):
    model = build_tiny("llama")
    with pytest.raises(ValueError, match=r"'qproj'.*self_attn\.q_proj"):
        lora.apply_lora(model, r=2, alpha=4, targets=["qproj"])
    with pytest.raises(ValueError, match="target_regex"):
        lora.apply_lora(model, r=2, alpha=4, target_regex=r"nothing.*")
    with pytest.raises(ValueError, match="exclude 'nope'"):
        lora.apply_lora(model, r=2, alpha=4, exclude=["nope"])


def test_wrapping_twice_is_an_error(build_tiny):
    model = build_tiny("llama")
    lora.apply_lora(model, r=2, alpha=4, targets=["attn"])
    with pytest.raises(ValueError, match="already wrapped.*q_proj"):
        lora.apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    lora.apply_lora(model, r=2, alpha=4, targets=["mlp"])  # other modules: fine
    assert set(lora.wrapped_modules(model)) == LLAMA_ATTN | LLAMA_MLP


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"r": 0}, "r"),
        ({"r": 2.0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
    ],
)
def test_bad_hyperparameters_name_the_argument(build_tiny, kwargs, name):
    model = build_tiny("llama")
    args = {"r": 2, "alpha": 4, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{name}="):
        lora.apply_lora(model, **args)
    assert lora.wrapped_modules(model) == []


# ---------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_zero_init_equals_base_then_merge_unmerge_agree(build_tiny, tiny_ids, kind):
    model = build_tiny(kind)
    base = logits(model, tiny_ids)
    lora.apply_lora(model, r=4, alpha=8)
    assert torch.allclose(logits(model, tiny_ids), base, atol=ATOL)  # B = 0: unchanged at step 0
    perturb(model)
    unmerged = logits(model, tiny_ids)
    assert (unmerged - base).abs().max() > 1e-3
    lora.merge(model)
    merged = logits(model, tiny_ids)
    w_once = {n: p.clone() for n, p in model.state_dict().items()}
    lora.merge(model)  # idempotent
    assert all(torch.equal(w_once[n], p) for n, p in model.state_dict().items())
    assert torch.allclose(merged, unmerged, atol=ATOL)
    lora.unmerge(model)
    lora.unmerge(model)
    assert torch.allclose(logits(model, tiny_ids), unmerged, atol=ATOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_adapters_gives_base_output_merged_or_not(build_tiny, tiny_ids, kind):
    model = build_tiny(kind)
    base = logits(model, tiny_ids)
    lora.apply_lora(model, r=4, alpha=8)
    perturb(model)
    adapted = logits(model, tiny_ids)
    with lora.disable_adapters(model):
        assert torch.allclose(logits(model, tiny_ids), base, atol=ATOL)
    assert torch.allclose(logits(model, tiny_ids), adapted, atol=ATOL)
    lora.merge(model)
    with lora.disable_adapters(model):
        assert torch.allclose(logits(model, tiny_ids), base, atol=ATOL)
    assert torch.allclose(logits(model, tiny_ids), adapted, atol=ATOL)


def test_conv1d_merge_uses_fan_in_fan_out_layout(build_tiny):
    model = build_tiny("gpt2")
    lora.apply_lora(model, r=3, alpha=6, targets=["attn.c_attn"])
    perturb(model)
    layer = model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()  # stored (d_in, d_out) = (32, 96)
    assert layer.fan_in_fan_out and w0.shape == (32, 96) and layer.delta_weight().shape == (96, 32)  # (d_out, d_in)
    x = torch.randn(5, 32)
    expected = x @ w0 + layer.base_layer.bias + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=ATOL)
        lora.merge(model)
        assert torch.allclose(layer.base_layer.weight, w0 + layer.scaling * (layer.lora_B @ layer.lora_A).T, atol=ATOL)
        assert torch.allclose(layer(x), expected, atol=ATOL)


def test_unwrap_restores_base_keys_and_keeps_merged_output(build_tiny, tiny_ids):
    model = build_tiny("llama")
    keys = list(model.state_dict())
    lora.apply_lora(model, r=4, alpha=8)
    perturb(model)
    adapted = logits(model, tiny_ids)
    lora.unwrap(model)
    assert lora.wrapped_modules(model) == []
    assert not any(isinstance(m, lora.LoraLayer) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.allclose(logits(model, tiny_ids), adapted, atol=ATOL)


def test_training_changes_only_lora_parameters(build_tiny, tiny_ids):
    model = build_tiny("llama").train()
    lora.apply_lora(model, r=4, alpha=8, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad == (n.endswith(("lora_A", "lora_B"))) for n, p in model.named_parameters())
    opt = torch.optim.AdamW(optim.param_groups(model, lr=1e-2), weight_decay=0.0)
    for _ in range(3):
        model(input_ids=tiny_ids, labels=tiny_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    lora_names = {n for n in before if n.endswith(("lora_A", "lora_B"))}
    assert changed == lora_names


def test_fused_function_gradients_match_autograd():
    torch.manual_seed(0)
    for fan_in_fan_out in (False, True):
        w = torch.randn((6, 5) if fan_in_fan_out else (5, 6), dtype=torch.double, requires_grad=True)
        args = (
            torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True),
            w,
            torch.randn(5, dtype=torch.double, requires_grad=True),
            torch.randn(2, 6, dtype=torch.double, requires_grad=True),
            torch.randn(5, 2, dtype=torch.double, requires_grad=True),
            0.7,
            fan_in_fan_out,
            torch.double,
        )
        assert torch.autograd.gradcheck(lora._LoraLinearFn.apply, args)


def test_merge_refuses_non_finite(build_tiny):
    model = build_tiny("llama")
    lora.apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    layer = model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        lora.merge(model)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_rslora_and_gaussian_init():
    lin = nn.Linear(8, 8)
    plain = lora.LoraLayer(lin, r=16, alpha=32)
    rs = lora.LoraLayer(nn.Linear(8, 8), r=16, alpha=32, rslora=True, init="gaussian")
    assert plain.scaling == 2.0 and rs.scaling == pytest.approx(32 / math.sqrt(16)) == 8.0
    assert torch.count_nonzero(rs.lora_B) == 0 and 0.03 < rs.lora_A.std().item() < 0.1  # std 1/r = 0.0625


# ---------------------------------------------------------------------------------------- counting


def test_counts_equal_r_times_din_plus_dout_with_gqa(build_tiny):
    model = build_tiny("llama")
    total = sum(p.numel() for p in model.parameters())
    lora.apply_lora(model, r=4, alpha=8)
    c = lora.count_parameters(model)
    dims = {
        "q_proj": (32, 32),
        "k_proj": (32, 16),
        "v_proj": (32, 16),
        "o_proj": (32, 32),
        "gate_proj": (32, 64),
        "up_proj": (32, 64),
        "down_proj": (64, 32),
    }  # (d_in, d_out); k/v narrow (GQA)
    expected = 2 * sum(4 * (a + b) for a, b in dims.values())
    assert c.trainable == c.lora == expected == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert c.total == total + expected
    assert c.percent == pytest.approx(100 * expected / (total + expected))
    k = next(m for m in c.modules if m[0].endswith("layers.0.self_attn.k_proj"))
    assert k == ("model.layers.0.self_attn.k_proj", 32, 16, 4, 4 * 48)


def test_counts_on_meta_device_and_include_head(tiny_config):
    import transformers

    cfg = tiny_config("llama")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    lora.apply_lora(model, r=8, alpha=16, include_head=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    c = lora.count_parameters(model)
    per_layer = 8 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    head = 8 * (32 + 96)
    assert c.trainable == 2 * per_layer + head
    assert ("lm_head", 32, 96, 8, head) in c.modules


def test_total_counts_tied_weights_once(build_tiny):
    model = build_tiny("gpt2")  # lm_head tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    c = lora.count_parameters(model)
    assert c.total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert c.trainable == c.total and c.modules == []


# ------------------------------------------------------------------------------------- adapter files


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_then_load_into_fresh_model_gives_same_outputs(build_tiny, tiny_ids, tmp_path, kind):
    model = build_tiny(kind)
    lora.apply_lora(model, r=4, alpha=8, targets=["attn"], layers=[1], rslora=True)
    perturb(model)
    expected = logits(model, tiny_ids)
    lora.save_adapter(model, tmp_path, base_model_name="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert cfg["fan_in_fan_out"] is (kind == "gpt2") and cfg["layers_to_transform"] == [1]
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None and cfg["base_model_name_or_path"] == "tiny"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp left
    fresh = build_tiny(kind, seed=0)  # same base weights (not in the adapter) ...
    torch.manual_seed(99)  # ... but another seed for the LoRA init that load_adapter overwrites
    names = lora.load_adapter(fresh, tmp_path)
    assert names == lora.wrapped_modules(model)
    assert torch.allclose(logits(fresh, tiny_ids), expected, atol=ATOL)


def _saved(build_tiny, tmp_path):
    model = build_tiny("llama")
    lora.apply_lora(model, r=4, alpha=8, targets=["attn"])
    perturb(model)
    lora.save_adapter(model, tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


def test_truncated_or_corrupt_adapter_file_is_a_value_error(build_tiny, tmp_path):
    weights, _ = _saved(build_tiny, tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lora.load_adapter(build_tiny("llama"), tmp_path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lora.load_adapter(build_tiny("llama"), tmp_path)


def test_bad_json_config_is_a_value_error(build_tiny, tmp_path):
    _, config = _saved(build_tiny, tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        lora.load_adapter(build_tiny("llama"), tmp_path)


def test_mis_shaped_missing_and_unexpected_keys_are_named(build_tiny, tmp_path):
    import safetensors.torch

    weights, _ = _saved(build_tiny, tmp_path)
    good = safetensors.torch.load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    bad = dict(good, **{key: torch.zeros(16, 5)})
    safetensors.torch.save_file(bad, weights)
    with pytest.raises(ValueError, match=r"mis-shaped.*layers\.0\.self_attn\.k_proj\.lora_B"):
        lora.load_adapter(build_tiny("llama"), tmp_path)
    missing = {k: v for k, v in good.items() if k != key}
    safetensors.torch.save_file(missing, weights)
    with pytest.raises(ValueError, match=r"missing keys.*layers\.0\.self_attn\.k_proj\.lora_B"):
        lora.load_adapter(build_tiny("llama"), tmp_path)
    extra = dict(good, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)})
    safetensors.torch.save_file(extra, weights)
    with pytest.raises(ValueError, match=r"unexpected keys.*lm_head"):
        lora.load_adapter(build_tiny("llama"), tmp_path)


def test_lora_state_dict_keys(build_tiny):
    model = build_tiny("gpt2")
    lora.apply_lora(model, r=2, alpha=2, targets=["mlp.c_fc"])
    sd = lora.lora_state_dict(model)
    assert sorted(sd) == sorted(f"transformer.h.{i}.mlp.c_fc.lora_{ab}" for i in range(2) for ab in "AB")
    assert sd["transformer.h.0.mlp.c_fc.lora_A"].shape == (2, 32) and sd["transformer.h.0.mlp.c_fc.lora_B"].shape == (
        128,
        2,
    )


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("gpt2", {"r": 2, "alpha": 2}),  # Conv1D: the base's (d_in, d_out) from its (in, out) weight
        ("llama", {"r": 3, "alpha": 6, "variant": "dora", "targets": ["attn"], "modules_to_save": ["lm_head"]}),
        ("bert", {"r": 2, "alpha": 4, "layers": [1], "modules_to_save": ["classifier"]}),
    ],
)
def test_planned_state_shapes_are_the_state_dicts_after_apply(kind, kw, build_tiny):
    model = build_tiny(kind)
    planned = lora.planned_state_shapes(model, **kw)
    assert not lora.wrapped_modules(model)  # nothing wrapped by planning
    lora.apply_lora(model, **kw)
    assert planned == {k: tuple(v.shape) for k, v in lora.lora_state_dict(model).items()}


def test_a_forged_rank_in_the_config_fails_before_any_layer_is_built(build_tiny, tmp_path, monkeypatch):
    """Issue 24: r=10**9 in adapter_config.json made load_adapter allocate r x d_in per layer (256 GB) before it
    looked at the weights' shapes. The config is checked against the file's header and the model first."""
    import time

    _, config = _saved(build_tiny, tmp_path)
    forged = dict(json.loads(config.read_text()), r=10**9)
    config.write_text(json.dumps(forged))
    model = build_tiny("llama")
    built = []

    def no_layer(self, *args, **kwargs):
        built.append(kwargs.get("module_name"))
        raise AssertionError("a LoRA layer was built before the shapes were checked")

    monkeypatch.setattr(lora.LoraLayer, "__init__", no_layer)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        lora.load_adapter(model, tmp_path)
    assert time.perf_counter() - t0 < 1.0
    assert built == [] and not lora.wrapped_modules(model)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'adapter_model.safetensors'}: mis-shaped keys")
    assert (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: file (4, 32) vs model (1000000000, 32)" in msg
    )
    # A config naming a module the file has no tensors for is refused before wrapping too.
    config.write_text(json.dumps(dict(forged, r=4, target_modules=["q_proj", "gate_proj"])))
    with pytest.raises(ValueError, match=r"missing keys.*mlp\.gate_proj\.lora_A.*unexpected keys.*k_proj"):
        lora.load_adapter(model, tmp_path)
    assert built == []


# ---------------------------------------------------------------------------------------- optimizer


def test_lora_plus_param_groups(build_tiny):
    model = build_tiny("llama")
    lora.apply_lora(model, r=2, alpha=4)
    groups = optim.param_groups(model, lr=1e-3, lr_ratio=16.0, weight_decay=0.01)
    b_ids = {id(m.lora_B) for m in model.modules() if isinstance(m, lora.LoraLayer)}
    a_ids = {id(m.lora_A) for m in model.modules() if isinstance(m, lora.LoraLayer)}
    assert len(groups) == 2
    assert {id(p) for p in groups[0]["params"]} == a_ids and groups[0]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == b_ids and groups[1]["lr"] == pytest.approx(1.6e-2)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    torch.optim.AdamW(groups)  # accepted by torch
    full = build_tiny("llama")
    (g,) = optim.param_groups(full, lr=1e-3, lr_ratio=16.0)
    assert len(g["params"]) == len(list(full.parameters())) and g["lr"] == 1e-3
    with pytest.raises(ValueError, match="lr_ratio"):
        optim.param_groups(full, lr=1e-3, lr_ratio=0)


# ------------------------------------------------------------------------------------------ bench


def test_bench_tiny_writes_expected_json(tmp_path):
    from lora_lab.bench.__main__ import main

    out = tmp_path / "bench.json"
    assert main(["core", "--tiny", "--steps", "2", "--warmup", "0", "--no-memory", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    paired = res["paired"]["lora_lab_over_full"]  # per-round ratios from the same rounds as the medians
    times = res["step"]
    expected = sorted(a / b for a, b in zip(times["lora_lab"]["times_s"], times["full"]["times_s"]))
    assert (
        paired["n"] == 2
        and paired["min"] == pytest.approx(expected[0])
        and paired["max"] == pytest.approx(expected[-1])
    )
    assert {"full", "lora_lab"} <= set(res["step"])
    assert {"base", "lora_lab_unmerged", "lora_lab_merged"} <= set(res["forward"])
    for s in res["step"].values():
        assert s["median_s"] > 0 and s["gflops"] > 0 and "peak_mem_bytes" in s
    assert {"flops_lora_over_full_theory", "merged_fwd_over_base", "unmerged_fwd_over_base"} <= set(res["ratios"])
    assert 0.5 < res["ratios"]["flops_lora_over_full_theory"] < 1.5 and res["matmul_peak_gflops"] > 0
    assert "VmHWM" in res["memory_method"] or res["device"].startswith("cuda")


def test_bench_peak_memory_sees_a_known_allocation(monkeypatch):
    """The memory path, in-process: a step that allocates and fills 64 MiB must be measured as at least that."""
    from lora_lab.bench import core as bench

    size = 64 << 20
    kept: list[torch.Tensor] = []

    def stepper(model, ids):
        def step() -> None:
            kept.append(torch.ones(size // 4, dtype=torch.float32, device=ids.device))  # touched: resident

        return step

    monkeypatch.setattr(bench, "_stepper", stepper)
    if not torch.cuda.is_available() and not bench.reset_hwm():
        pytest.skip("no /proc/self/clear_refs: only the coarse ru_maxrss fallback, which cannot see this")
    peak = bench.peak_memory_child("lora_lab", "tiny", 1, 2, 8)
    assert isinstance(peak, int) and size <= peak < 4 * size, peak


# ------------------------------------------------------------------------------- wrapped layer surface


def test_wrapped_layer_exposes_weight_bias_and_features_like_the_base():
    lin = nn.Linear(8, 6)
    layer = lora.LoraLayer(lin, r=2, alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features) == (8, 6)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 == layer.lora_A.dtype  # dtype follows the base layer
    assert "weight" not in dict(layer.named_parameters())  # no duplicate key: the state_dict is unchanged
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_output_can_be_modified_in_place_and_gradients_stay_right(dropout):
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(8, 8))
    lora.apply_lora(s, r=2, alpha=4, targets=["0"], dropout=dropout)
    perturb(s)
    s.train(dropout == 0.0)  # dropout > 0 in train mode takes the composed path; eval keeps the fused one
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = s(x)
    y += 1  # raised "Output 0 of _LoraLinearFn is a view and is being modified inplace" before
    y.mul_(2)
    y.sum().backward()
    layer = s[0]
    x2 = x.detach().clone().requires_grad_(True)
    ref = (x2 @ layer.weight.T + layer.bias + layer.scaling * x2 @ layer.lora_A.T @ layer.lora_B.T + 1) * 2
    ref.sum().backward()
    assert torch.allclose(y, ref, atol=ATOL) and torch.allclose(x.grad, x2.grad, atol=ATOL)
    assert not y._is_view()
