"""The LoRA core on tiny models (hidden 16, 2 layers, vocab 128) of 15 transformers architectures built from configs:
decoder-only, encoder-only (classification), encoder-decoder, fused qkv, mixture-of-experts.

Each: forward, backward, merge/unmerge, disable, save/load and unwrap; all-linear equals peft's where peft's is
defined; output heads are found from the model and never wrapped unless asked.
"""

from __future__ import annotations

import pytest
import torch

from lora_lab import lora, targets

transformers = pytest.importorskip("transformers")

V = 128
ATOL = 1e-5
COMMON = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": V}


def _configs() -> dict[str, tuple[object, str, str]]:
    """name -> (config, auto class, kind) where kind is causal | seq2seq | seq_cls | moe."""
    t = transformers
    return {
        "llama": (t.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=2, **COMMON), "causal"),
        "qwen2": (t.Qwen2Config(hidden_size=16, intermediate_size=32, num_key_value_heads=2, **COMMON), "causal"),
        "mistral": (
            t.MistralConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=2, head_dim=4, **COMMON),
            "causal",
        ),
        "phi3": (
            t.Phi3Config(hidden_size=16, intermediate_size=32, num_key_value_heads=4, pad_token_id=0, **COMMON),
            "causal",
        ),
        "phi": (t.PhiConfig(hidden_size=16, intermediate_size=32, **COMMON), "causal"),
        "gpt2": (t.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=V, n_positions=32), "causal"),
        "gpt_neox": (t.GPTNeoXConfig(hidden_size=16, intermediate_size=32, **COMMON), "causal"),
        "falcon": (t.FalconConfig(hidden_size=16, **COMMON), "causal"),
        "bert": (t.BertConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=32, **COMMON), "seq_cls"),
        "roberta": (
            t.RobertaConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=40, **COMMON),
            "seq_cls",
        ),
        "distilbert": (
            t.DistilBertConfig(dim=16, hidden_dim=32, n_layers=2, n_heads=4, vocab_size=V, max_position_embeddings=32),
            "seq_cls",
        ),
        "t5": (
            t.T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, vocab_size=V, decoder_start_token_id=0),
            "seq2seq",
        ),
        "bart": (
            t.BartConfig(
                d_model=16,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                vocab_size=V,
                max_position_embeddings=32,
            ),
            "seq2seq",
        ),
        "mixtral": (
            t.MixtralConfig(
                hidden_size=16,
                intermediate_size=32,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                **COMMON,
            ),
            "moe",
        ),
        "qwen3_moe": (
            t.Qwen3MoeConfig(
                hidden_size=16,
                intermediate_size=32,
                moe_intermediate_size=16,
                head_dim=4,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
                **COMMON,
            ),
            "moe",
        ),
    }


CONFIGS = _configs()
ARCHS = list(CONFIGS)
# Heads each task model must report: the output embedding, or the task head around the backbone.
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"]}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg, kind = CONFIGS[arch]
    torch.manual_seed(seed)
    auto = {
        "causal": transformers.AutoModelForCausalLM,
        "moe": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }[kind]
    return auto.from_config(cfg).eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (2, 6), generator=g)
    if CONFIGS[arch][1] == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}
    return {"input_ids": ids}


def out(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch)).logits


def perturb(model: torch.nn.Module, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_all_linear(arch: str) -> tuple[set[str], set[str]]:
    """What peft's target_modules='all-linear' adapts: (modules, fused parameters it maps to target_parameters).

    task_type as the model's, so SEQ_CLS heads are kept out; DistilBERT without one (peft 0.21 raises there: its
    all-linear wraps `classifier` and then its SEQ_CLS modules_to_save refuses the wrapped layer).
    """
    peft = pytest.importorskip("peft")
    kind = CONFIGS[arch][1]
    task = {"causal": "CAUSAL_LM", "moe": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS"}[kind]
    pm = peft.get_peft_model(
        build(arch),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules="all-linear", task_type=None if arch == "distilbert" else task
        ),
    )
    prefix = "base_model.model."
    modules = {
        n[len(prefix) :]
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and not isinstance(m, peft.tuners.lora.ParamWrapper)
    }
    return modules, set(pm.peft_config["default"].target_parameters or ())


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_are_found_from_the_model_and_presets_equal_peft_all_linear(arch):
    model = build(arch)
    heads = targets.head_modules(model)
    out_emb = model.get_output_embeddings()
    expected_heads = HEADS.get(arch) or [n for n, m in model.named_modules() if m is out_emb]
    assert heads == expected_heads
    theirs, their_params = peft_all_linear(arch)
    if CONFIGS[arch][1] == "moe":
        # Experts are fused 3-D parameters. peft 0.21 maps all-linear to the attention modules plus target_parameters
        # (experts' gate_up_proj / down_proj, the router's gate.weight); lora_lab cannot adapt those, so it refuses
        # all-linear / mlp and names them, and 'attn' gives peft's module part.
        assert {"gate_up_proj", "down_proj"} <= their_params
        with pytest.raises(ValueError, match=r"'all-linear'.*fused 3-D.*experts\.gate_up_proj"):
            targets.resolve_targets(model, ["all-linear"])
        with pytest.raises(ValueError, match=r"'mlp'.*fused 3-D"):
            targets.resolve_targets(model, ["mlp"])
        with pytest.raises(ValueError, match=r"'experts'.*fused 3-D expert weights"):
            targets.resolve_targets(model, ["experts"])
        assert set(targets.resolve_targets(model, ["attn"])) == theirs
        return
    ours = set(targets.resolve_targets(model, ["all-linear"]))
    assert not their_params
    if arch == "distilbert":
        # pre_classifier and classifier are freshly initialised: heads we train in full (modules_to_save).
        theirs -= {"pre_classifier", "classifier"}
    assert ours == theirs
    assert not any(targets.inside(n, heads) for n in ours)
    attn, mlp = set(targets.resolve_targets(model, ["attn"])), set(targets.resolve_targets(model, ["mlp"]))
    assert attn and mlp and attn | mlp == ours - {n for n in ours if "pooler" in n} and not attn & mlp
    head_linears = set(targets.resolve_targets(model, ["attn"], include_head=True)) - attn
    assert head_linears and all(targets.inside(n, heads) for n in head_linears)  # only when asked


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_merge_disable_save_load_unwrap(arch, tmp_path):
    model = build(arch)
    keys = list(model.state_dict())
    base = out(model, arch)
    chosen = ["attn"] if CONFIGS[arch][1] == "moe" else ["all-linear"]
    wrapped = lora.apply_lora(model, r=2, alpha=4, targets=chosen)
    assert not set(wrapped) & set(targets.head_modules(model))
    assert torch.allclose(out(model, arch), base, atol=ATOL)  # B = 0: the base model
    perturb(model)
    adapted = out(model, arch)
    assert (adapted - base).abs().max() > 1e-4
    model.train()
    model(**inputs(arch)).logits.float().pow(2).mean().backward()
    model.eval()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    lora.merge(model)
    assert torch.allclose(out(model, arch), adapted, atol=ATOL)
    with lora.disable_adapters(model):
        assert torch.allclose(out(model, arch), base, atol=ATOL)
    lora.unmerge(model)
    with lora.disable_adapters(model):
        assert torch.allclose(out(model, arch), base, atol=ATOL)
    lora.save_adapter(model, tmp_path)
    fresh = build(arch)
    assert lora.load_adapter(fresh, tmp_path) == wrapped
    assert torch.allclose(out(fresh, arch), adapted, atol=ATOL)
    lora.unwrap(model)
    assert list(model.state_dict()) == keys
    assert torch.allclose(out(model, arch), adapted, atol=ATOL)


def test_encoder_decoder_layers_index_the_blocks_not_their_sub_layers():
    model = build("t5")
    assert targets.layer_stacks(model) == ["encoder.block", "decoder.block"]
    chosen = targets.resolve_targets(model, ["all-linear"], layers=[1])
    assert chosen and all(n.startswith(("encoder.block.1.", "decoder.block.1.")) for n in chosen)
    assert {n.split(".layer.")[1].split(".")[0] for n in chosen} == {"0", "1", "2"}  # every sub-layer of block 1
    assert set(targets.resolve_targets(model, ["q"], layers=[0], layers_pattern="block")) == {
        "encoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.1.EncDecAttention.q",
    }
    bart = build("bart")
    assert set(targets.resolve_targets(bart, ["fc1"], layers=[1])) == {
        "model.encoder.layers.1.fc1",
        "model.decoder.layers.1.fc1",
    }


def test_classification_head_trains_in_full_and_is_saved_with_the_adapter(tmp_path):
    model = build("roberta")
    lora.apply_lora(model, r=2, alpha=4, modules_to_save=targets.head_modules(model))
    assert lora.modules_to_save_of(model) == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.dense.weight", "classifier.out_proj.weight", "classifier.out_proj.bias"} <= trainable
    assert not any(isinstance(m, lora.LoraLayer) for m in model.classifier.modules())
    perturb(model)
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(0.5)
    expected = out(model, "roberta")
    keys = set(lora.lora_state_dict(model))
    assert {"classifier.dense.weight", "classifier.out_proj.bias"} <= keys
    lora.save_adapter(model, tmp_path)
    fresh = build("roberta", seed=1)  # another head init: the saved head must replace it
    with torch.no_grad():  # same backbone as `model`
        fresh.roberta.load_state_dict(build("roberta").roberta.state_dict())
    lora.load_adapter(fresh, tmp_path)
    assert torch.allclose(out(fresh, "roberta"), expected, atol=ATOL)
    with pytest.raises(ValueError, match="modules_to_save 'nope'"):
        lora.apply_lora(build("roberta"), r=2, alpha=4, modules_to_save=["nope"])
    with pytest.raises(ValueError, match="modules_to_save: lm_head.weight is tied"):
        gpt2 = build("gpt2")
        lora.apply_lora(gpt2, r=2, alpha=4, modules_to_save=["lm_head"])
