"""The methods LoRA is measured against (lora_lab/methods.py): each trains only its own parameters, counts what the
formula says (also on the meta device), starts at the base model where its init says so, scores left-padded prompts
as unpadded ones, merges exactly (IA3), saves and loads; and runs through the training loop like LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lab import methods
from lora_lab.config import compose
from lora_lab.train import build_and_fit, prefix_cache_factory

# The tiny llama of conftest: d=32, 2 layers, 4 heads, 2 key/value heads (head_dim 8), MLP width 64.
D, L, KV, HD, FF = 32, 2, 2, 8, 64
KV_DIM = KV * HD


def apply(model, method, **kw):
    if method == "prefix":
        kw.setdefault("cache_factory", prefix_cache_factory(model))
    return getattr(methods, f"apply_{method}")(model, **kw)


def formula(method, **kw) -> int:
    """Hu et al. section 5.1 style counts for the tiny llama, written out by hand."""
    if method == "bitfit":  # a zero bias on every linear of a layer: q, k, v, o, gate, up, down
        return L * (D + KV_DIM + KV_DIM + D + FF + FF + D)
    if method == "ia3":  # keys, values (outputs), the MLP intermediate (input of down_proj)
        return L * (KV_DIM + KV_DIM + FF)
    if method == "adapter":  # L_adpt x (2 d r + r + d)
        r, per_layer = kw["bottleneck"], 2 if kw["placement"] == "houlsby" else 1
        return L * per_layer * (2 * D * r + r + D)
    if method == "prompt":  # n x d
        return kw["n_tokens"] * D
    if method == "prefix":  # n x L x 2 (k, v) x kv_dim, or the reparameterisation MLP's inputs and weights
        n, width = kw["n_tokens"], L * 2 * KV_DIM
        if not kw.get("projection"):
            return n * width
        h = kw["hidden"]
        return n * KV_DIM + (KV_DIM * h + h) + (h * width + width)
    raise ValueError(method)


CASES = [
    ("bitfit", {}),
    ("ia3", {}),
    ("adapter", {"bottleneck": 4, "placement": "houlsby"}),
    ("adapter", {"bottleneck": 4, "placement": "pfeiffer"}),
    ("prompt", {"n_tokens": 3}),
    ("prefix", {"n_tokens": 3}),
    ("prefix", {"n_tokens": 3, "projection": True, "hidden": 16}),
]
IDS = [f"{m}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for m, kw in CASES]


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_parameter_count_is_the_formula_also_on_meta(method, kw, build_tiny, tiny_config):
    import transformers

    model = build_tiny("llama")
    apply(model, method, **kw)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert methods.count_method_parameters(model) == trainable == formula(method, **kw)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    apply(meta, method, **kw)
    assert methods.count_method_parameters(meta) == formula(method, **kw)


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_only_the_methods_parameters_change(method, kw, build_tiny, tiny_ids):
    model = build_tiny("llama")
    apply(model, method, **kw)
    own = set(methods.method_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=tiny_ids, labels=tiny_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= own, changed - own
    frozen = [n for n in before if n not in own]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)


@pytest.mark.parametrize("method,kw", CASES[:4], ids=IDS[:4])
def test_zero_init_methods_start_at_the_base_model(method, kw, build_tiny, tiny_ids):
    model = build_tiny("llama")
    with torch.no_grad():
        base = model(input_ids=tiny_ids).logits
        apply(model, method, **kw)
        assert torch.equal(model(input_ids=tiny_ids).logits, base)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_scoring_matches_unpadded_rows(method, build_tiny):
    """train.Session._last_token_logits left-pads prompts and passes position_ids from the mask: with virtual tokens
    or prefixes in front, each row's next-token logits must equal the row's own unpadded forward."""
    model = build_tiny("llama")
    apply(model, method, n_tokens=3)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 96, (n,), generator=g) for n in (5, 2, 4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None]).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
        # Full logits line up with the caller's tokens (virtual tokens' logits dropped) and the loss ignores them.
        out = model(input_ids=rows[0][None], labels=rows[0][None])
        assert out.logits.shape[1] == len(rows[0]) and torch.isfinite(out.loss)


def test_ia3_merge_is_exact_and_unmerge_restores_the_weights(build_tiny, tiny_ids):
    model = build_tiny("llama")
    apply(model, "ia3")
    with torch.no_grad():
        for p in methods.method_parameters(model).values():
            p.uniform_(0.5, 1.5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(input_ids=tiny_ids).logits
        methods.merge(model)
        methods.merge(model)  # idempotent
        merged = model(input_ids=tiny_ids).logits
        assert not torch.equal(
            model.model.layers[0].self_attn.k_proj.base_layer.weight,
            weights["model.layers.0.self_attn.k_proj.base_layer.weight"],
        )
        methods.unmerge(model)
        methods.unmerge(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="method=adapter: cannot be merged"):
        m2 = build_tiny("llama")
        apply(m2, "adapter")
        methods.merge(m2)


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_save_and_load_round_trip(method, kw, build_tiny, tiny_ids, tmp_path):
    model = build_tiny("llama")
    apply(model, method, **kw)
    with torch.no_grad():
        for p in methods.method_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        expected = model(input_ids=tiny_ids).logits
    methods.save(model, tmp_path, base_model_name="tiny")
    fresh = build_tiny("llama")
    assert methods.load(fresh, tmp_path, cache_factory=prefix_cache_factory(fresh)) == method
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tiny_ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method, kw, forged, key",
    [
        ("prompt", {"n_tokens": 3}, {"num_virtual_tokens": 10**9}, r"prompt_embeddings: file \(3, 32\)"),
        ("prefix", {"n_tokens": 3}, {"num_virtual_tokens": 10**9}, r"prompt_embeddings: file \(3, 64\)"),
        ("adapter", {"bottleneck": 4}, {"bottleneck": 10**9}, r"adapter_down\.weight: file \(4, 32\)"),
    ],
)
def test_a_forged_size_in_the_config_fails_before_the_method_is_built(method, kw, forged, key, build_tiny, tmp_path):
    """As LoRA's r (issue 24): a config's virtual tokens or bottleneck are checked against the file's tensor before
    anything of that size is allocated."""
    import time

    model = build_tiny("llama")
    apply(model, method, **kw)
    methods.save(model, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), **forged)))
    fresh = build_tiny("llama")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: key .*{key} vs config and model \(10{{9}}"):
        methods.load(fresh, tmp_path, cache_factory=prefix_cache_factory(fresh))
    assert time.perf_counter() - t0 < 1.0 and methods.method_of(fresh) is None


def test_bitfit_refuses_a_model_without_biases_when_asked_to(build_tiny):
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias parameters; set bitfit.add_missing"):
        methods.apply_bitfit(build_tiny("llama"), add_missing=False)
    names = methods.apply_bitfit(build_tiny("gpt2"), add_missing=False)  # GPT-2 has its own biases
    assert names and all(n.endswith(".bias") for n in names)


@pytest.mark.parametrize(
    "placement, wrapped",
    [("houlsby", ["attention.output.dense", "output.dense"]), ("pfeiffer", ["output.dense"])],
)
def test_adapters_on_bert_wrap_each_sub_layer_output_once(placement, wrapped, build_tiny, tiny_ids):
    """BERT's MLP down projection `output.dense` is also a suffix of its attention output `attention.output.dense`:
    houlsby wrapped that one twice (AttributeError: 'AdapterLinear' has no out_features), pfeiffer wrapped both."""
    base = build_tiny("bert")
    model = build_tiny("bert")
    names = methods.apply_adapter(model, bottleneck=4, placement=placement, heads=["classifier"])
    layers = len(model.bert.encoder.layer)
    assert names == [f"bert.encoder.layer.{i}.{n}" for i in range(layers) for n in wrapped]
    adapters = [n for n, m in model.named_modules() if isinstance(m, methods.AdapterLinear)]
    assert adapters == names  # once each: no adapter around an adapter
    assert all(isinstance(model.get_submodule(n).base_layer, torch.nn.Linear) for n in names)
    assert methods.count_method_parameters(model) == layers * len(wrapped) * (2 * 32 * 4 + 4 + 32)
    with torch.no_grad():
        out = model(input_ids=tiny_ids).logits  # (2, 3)
        torch.testing.assert_close(out, base(input_ids=tiny_ids).logits, atol=0, rtol=0)  # up = 0: the base model
    out = model(input_ids=tiny_ids).logits
    out.sum().backward()
    assert all(p.grad is not None for p in methods.method_parameters(model).values())


def test_ia3_on_bert_rescales_the_mlp_down_projection_only(build_tiny):
    """The input of BERT's MLP down projection is the intermediate activation IA3 rescales; the attention output
    projection (whose name ends in the same `output.dense`) is not the MLP's."""
    model = build_tiny("bert")
    targets = methods.ia3_targets(model)
    assert [(n.removeprefix("bert.encoder.layer.0."), ff) for n, ff in targets if ".layer.0." in n] == [
        ("attention.self.key", False),
        ("attention.self.value", False),
        ("output.dense", True),
    ]


def test_a_fused_attention_model_is_refused_by_name(build_tiny):
    with pytest.raises(ValueError, match="GPT2LMHeadModel: layer transformer.h.0 has no key projection"):
        methods.apply_ia3(build_tiny("gpt2"))


@pytest.mark.parametrize("method", ["ia3", "prefix"])
def test_train_runs_each_method_with_the_same_record(method, outputs):
    _, cfg = compose(
        [
            "model=tiny",
            "data=tiny_sentiment",
            "trainer=smoke",
            "tracking=off",
            "trainer.progress=false",
            f"method={method}",
        ]
    )
    result = build_and_fit(cfg)
    assert result.completed and result.steps == cfg.trainer.max_steps
    assert result.inference_latency_s is not None and result.inference_latency_s > 0
    assert result.trainable_params == methods.count_method_parameters(build_method_model(cfg))
    out = outputs / "runs"
    (run_dir,) = list(out.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_params"] == result.trainable_params
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "prefix": "PREFIX_TUNING"}[method]
    if method == "ia3":  # mergeable: the merged evaluation and its check, as for LoRA
        assert result.merge_ok is True and result.merged_val_loss is not None
    else:
        assert result.merged_val_loss is None
    assert result.settings.method == method


def build_method_model(cfg):
    from lora_lab import adaptations
    from lora_lab.models import load_model

    model, _ = load_model(cfg.model)
    adaptations.of(cfg.method).apply(model, cfg, prefix_cache_factory(model))
    return model


def test_bad_method_settings_name_the_key():
    from lora_lab.config import ConfigError

    with pytest.raises(ConfigError, match="adapter.placement"):
        compose(["method=adapter", "adapter.placement=middle"])
    with pytest.raises(ConfigError, match="prompt.n_tokens"):
        compose(["method=prompt", "prompt.n_tokens=0"])
    with pytest.raises(ConfigError, match="method: expected one of"):
        compose(["method=adapters"])


def test_report_methods_table_has_the_paper_rows_and_latency(outputs):
    from lora_lab.report.published import PUBLISHED_METHODS
    from lora_lab.report.runs import Run
    from lora_lab.report.tables import table_methods

    runs = []
    for i, extra in enumerate([["method=bitfit"], ["method=adapter", "adapter=pfeiffer", "adapter.bottleneck=4"]]):
        _, cfg = compose(["model=tiny", "data=tiny_sentiment", "trainer=smoke", "tracking=off", *extra])
        cfg.trainer.progress, cfg.trainer.max_steps, cfg.trainer.eval_every = False, 2, 2
        runs.append(Run(run_id=f"run{i}0000000", parent="", state="COMPLETE", rec=build_and_fit(cfg)))
    table = table_methods(runs)
    by_method = {row["method"]: row for row in table.rows}
    assert set(by_method) == {"BitFit", "AdapterL"}
    assert by_method["AdapterL"]["trainable_params"] == 2 * (2 * 64 * 4 + 4 + 64)  # conf/model/tiny: d=64, 2 layers
    assert by_method["BitFit"]["published"] == PUBLISHED_METHODS["BitFit"]
    assert all(row["latency_ms"] > 0 for row in table.rows)
    assert "latency_ms" in [c[0] for c in table.columns]


def test_report_methods_table_means_seeds_and_splits_lora_by_budget(outputs, tmp_path, monkeypatch):
    """Seeds of one configuration are averaged (a seed run twice counts once), the configuration with the lowest mean
    among the most-replicated ones wins, its spread is shown; beside the comparison methods LoRA has a row per target
    set and rank."""
    from dataclasses import replace

    from lora_lab.report.runs import Run
    from lora_lab.report.tables import table_methods

    recs = {}
    for name, extra in {
        "bitfit": ["method=bitfit"],
        "attn": ["lora.targets=[attn]", "lora.r=4"],
        "all": ["lora.targets=[all-linear]", "lora.r=8"],
    }.items():
        _, cfg = compose(["model=tiny", "data=tiny_sentiment", "trainer=smoke", "tracking=off", *extra])
        cfg.trainer.progress, cfg.trainer.max_steps, cfg.trainer.eval_every = False, 2, 2
        recs[name] = build_and_fit(cfg)

    def fake(name: str, lr: float, seed: int, loss: float, study: str = "s") -> Run:
        rec = recs[name]
        rec = replace(
            rec,
            val_loss=loss,
            settings=replace(rec.settings, lr=lr, seed=seed),
            identity=replace(rec.identity, study=study),
        )
        return Run(run_id=f"{name}{lr}{seed}{study}".ljust(8, "0"), parent="", state="COMPLETE", rec=rec)

    runs = [
        fake("bitfit", 1e-3, 0, 0.50),
        fake("bitfit", 1e-3, 1, 0.52),
        fake("bitfit", 1e-3, 2, 0.54),  # mean 0.52
        fake("bitfit", 3e-3, 0, 0.40),  # one seed of the LR search: lower, but not replicated, so it does not compete
        fake("bitfit", 1e-2, 0, 0.49),
        fake("bitfit", 1e-2, 1, 0.50),
        fake("bitfit", 1e-2, 2, 0.51),  # mean 0.50: the best of the three-seed configurations
        fake("bitfit", 1e-2, 1, 0.70, study="other"),  # the same seed again: its lower value counts, once
        fake("attn", 1e-3, 0, 0.60),
        fake("all", 1e-3, 0, 0.58),
        fake("all", 3e-3, 0, 0.59),
    ]
    table = table_methods(runs)
    rows = {row["method"]: row for row in table.rows}
    assert set(rows) == {"BitFit", "LoRA attention r=4", "LoRA all linear r=8"}
    assert rows["BitFit"]["val_loss"] == pytest.approx(0.50)
    assert rows["BitFit"]["settings"].startswith("lr=1e-2")
    assert rows["BitFit"]["spread"] == "± 0.0100 sd, 3 seeds [0.4900, 0.5100]"
    assert rows["LoRA all linear r=8"]["val_loss"] == pytest.approx(0.58)
    assert rows["LoRA attention r=4"]["spread"] == "1 seed"
    assert "spread" in [c[0] for c in table.columns]
    # Without replicated seeds no spread column: the one-seed layout of the golden tables stays as it was.
    assert "spread" not in [c[0] for c in table_methods([fake("bitfit", 1e-3, 0, 0.5)]).columns]
    # The plots: every method's LR U-curve under its own name, and the methods at their budgets with error bars.
    from lora_lab import plots
    from lora_lab.report import figures
    from lora_lab.report.groups import curve_groups

    monkeypatch.setattr(figures, "history", lambda uri, r: ([], []))  # loss curves read MLflow: not under test here
    drawn = {}
    monkeypatch.setattr(plots, "budget_points", lambda points, path, **kw: drawn.update(points) or path)
    curves = curve_groups(runs)
    assert set(curves) == {"BitFit", "LoRA r=8"}  # one LR for attention: no curve
    files = figures.make_plots("sqlite:///unused", runs, tmp_path)
    assert tmp_path / "methods.png" in files and (tmp_path / "lr_curves.png").is_file()
    assert drawn["BitFit"][1:] == (pytest.approx(0.50), pytest.approx(0.01, abs=1e-6))
    assert drawn["LoRA attention r=4"][2] is None


@pytest.mark.slow
def test_every_method_on_the_real_packaged_model(monkeypatch):
    """SmolLM2-135M (30 layers, 9 query / 3 key-value heads, tied embeddings): the zero-init methods start at its
    output, prompt and prefix score left-padded rows as unpadded ones through its grouped-query attention (to fp32
    rounding of logits ~20 in size: a wrong position or mask moves them by whole units), and three
    steps on one sentence lower the loss while only the method's parameters move."""
    import copy

    from lora_lab.config import ModelConfig
    from lora_lab.models import load_model

    monkeypatch.delenv("LORA_LAB_CACHE", raising=False)  # the real cache, as test_models' packaged-model test uses it
    base, tok = load_model(ModelConfig(name="smollm2-135m-instruct"))
    base.eval()
    ids = tok("The film was a delight from start to finish.", return_tensors="pt")["input_ids"]
    rows = [ids[0], ids[0, :4]]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    for method, kw in CASES:
        kw = dict(kw, n_tokens=4) if method in ("prompt", "prefix") else kw
        model = copy.deepcopy(base)
        apply(model, method, **kw)
        if method in ("bitfit", "ia3", "adapter"):
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, base_logits), method
        else:
            ids2 = torch.full((2, len(rows[0])), tok.pad_token_id)
            mask = torch.zeros_like(ids2)
            for i, r in enumerate(rows):
                ids2[i, -len(r) :], mask[i, -len(r) :] = r, 1
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                batched = model(input_ids=ids2, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
                for i, r in enumerate(rows):
                    torch.testing.assert_close(batched[i], model(input_ids=r[None]).logits[0, -1], atol=2e-3, rtol=1e-3)
        own = set(methods.method_parameters(model))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in own}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert losses[-1] < losses[0], (method, losses)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), method
