"""A 4-bit / 8-bit frozen base through bitsandbytes (model.quantize, lora_lab/quant.py): LoRA trains on it with the
base frozen and packed, its weights cost what QLoRA says, methods that train the base are refused, DoRA/PiSSA/OLoRA
read the dequantized weight, the merge is measured twice (dense and re-quantized), adapters move both ways between
lora_lab and peft on a bitsandbytes base, a run resumes, and a warm worker gives a fresh run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_lab import adaptations, bases, lora, quant, records, train
from lora_lab.config import ConfigError, ModelConfig, TinyModelConfig, compose
from lora_lab.models import ModelError, load_model
from lora_lab.records import RunRecord
from lora_lab.train.build import build, build_and_fit
from lora_lab.train.warm import Warm

bnb = pytest.importorskip("bitsandbytes")

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "tracking=off",
    "lora.r=4",
    "optim.lr=3e-3",
]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11], [8, 1, 64, 200, 9, 33, 2, 120]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb_lora(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_B.default.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_on_a_4bit_base_trains_only_the_adapter_and_the_base_stays_packed() -> None:
    model, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    q = quant.quantization_of(model)
    assert q == "nf4" and len(bases.quantized_modules(model)) == 14  # 2 layers x 7 projections
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32  # no head packed
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in model.named_modules()
              if bases.is_quantized(m)}  # fmt: skip
    lora.apply_lora(model, r=4, alpha=8)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        # B starts at zero, so A's first gradient is zero too; from the second step on both move.
        assert all(g is not None and (g.abs().sum() > 0 or (step == 0 and n.endswith("lora_A"))) for n, g in
                   grads.items())  # fmt: skip
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    for name, (data, absmax) in packed.items():
        layer = model.get_submodule(name).base_layer
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8, name
        assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.quant_state.absmax, absmax), name
    # The LoRA layer's forward is the 4-bit layer's plus the update (the composed path, never the fused GEMM).
    wrapped = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    assert torch.allclose(wrapped(x), wrapped.base_layer(x) + wrapped.scaling * x @ wrapped.lora_A.t() @
                          wrapped.lora_B.t(), atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("how, low, high", [("nf4", 0.5, 0.52), ("fp4", 0.5, 0.52), ("int8", 1.0, 1.01)])
def test_frozen_linear_weights_cost_what_qlora_and_llm_int8_say(how: str, low: float, high: float) -> None:
    # Wide enough that per-layer constants (a 4-bit layer's code book share, int8's one fp32 scale per row: 4 / d_in
    # bytes a parameter) are what they are on real models; measured from the stored tensors.
    shape = TinyModelConfig(hidden_size=512, num_layers=1, num_heads=8, num_kv_heads=4, intermediate_size=1024)
    model, _ = load_model(ModelConfig(name="tiny", tiny=shape, quantize=how))
    nbytes, n = quant.frozen_bytes(model)
    assert n == 4 * 512 * 512 - 2 * 512 * 256 + 3 * 512 * 1024  # q, o: 512x512; k, v: 512x256 (GQA); the MLP
    assert low < nbytes / n <= high, nbytes / n
    counted = lora.count_parameters(model).total  # a packed weight counts as the matrix it stands for
    assert counted == sum(p.numel() for p in load_model(ModelConfig(name="tiny", tiny=shape))[0].parameters())


def test_full_fine_tuning_and_bitfit_are_refused_on_a_quantized_base(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = train.main([*TINY, "method=full", "model.quantize=nf4", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.quantize=nf4" in err and "method=full" in err
    assert not out.exists()
    _, cfg = compose([*TINY, "method=bitfit", "model.quantize=int8", f"output_dir={out}"])
    with pytest.raises(ConfigError, match="method=bitfit with model.quantize=int8"):
        build(cfg)
    assert {m.name for m in adaptations.METHODS.values() if m.trains_base} == {"full", "bitfit"}


def test_dora_pissa_and_olora_start_from_the_dequantized_weight() -> None:
    model, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    w0 = bases.base_of(model.model.layers[0].mlp.up_proj).dense().clone()  # (128, 64)
    before = _logits(model)
    lora.apply_lora(model, r=4, alpha=8, variant="dora", targets=["mlp"])
    layer = model.model.layers[0].mlp.up_proj
    assert torch.allclose(layer.lora_magnitude_vector, w0.norm(dim=1), atol=1e-6)
    assert torch.allclose(_logits(model), before, atol=1e-5)  # DoRA starts at the base model
    for init in ("pissa", "olora"):
        model, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
        lora.apply_lora(model, r=4, alpha=8, init=init, targets=["mlp"])
        layer = model.model.layers[0].mlp.up_proj
        residual = layer.base.dense()  # W0 - scaling B A, re-quantized to 4 bits
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        rebuilt = residual + layer.scaling * layer.lora_B @ layer.lora_A
        # Only the residual's 4-bit rounding separates them: far below the weight itself.
        assert (rebuilt - w0).abs().mean() < 0.15 * w0.abs().mean(), init
        if init == "pissa":  # A, B hold W0's top singular directions
            s = torch.linalg.svdvals(w0)[:4]
            assert torch.allclose(torch.linalg.svdvals(layer.scaling * layer.lora_B @ layer.lora_A)[:4], s, rtol=1e-4)


def test_a_quantized_runs_merge_is_measured_dense_and_requantized(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train.main([*TINY, "model.quantize=nf4", "export.merged=true", f"output_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # Dense: the update folded into the dequantized weights computes what the unmerged adapter does.
    assert m["max_abs_logit_diff"] <= 1e-4 and m["merge_ok"] and abs(m["merged_val_loss"] - m["val_loss"]) < 1e-5
    # Re-quantized: rounding W0 + dW to 4 bits again moves the logits far more than the dense merge.
    assert m["requant_max_abs_logit_diff"] > 100 * max(m["max_abs_logit_diff"], 1e-6)
    assert m["requant_merged_val_loss"] != m["val_loss"] and m["requant_merged_accuracy"] is not None
    assert 0.5 < m["frozen_bytes_per_param"] < 0.55  # the tiny model's 64-wide layers: the code books show
    # What MLflow logs of a run (tracking.finish logs records.result_metrics): the new names, for this run only.
    metrics = records.result_metrics(RunRecord.from_json(m))
    assert {"merge_requant/val_loss", "merge_requant/max_abs_logit_diff", "size/frozen_bytes_per_param"} <= set(metrics)
    # export.merged writes the dense merge: a plain float model, no quantization_config, the merged logits.
    from transformers import AutoModelForCausalLM

    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    served = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert not bases.quantized_modules(served)
    model, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    lora.load_adapter(model, out / "adapter")
    assert torch.allclose(_logits(served), _logits(model), atol=1e-4)


def test_the_dense_copy_of_a_compiled_model_runs_its_own_layers() -> None:
    model, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    model.model.layers[0].compile()  # as trainer.compile does; compiles lazily, at the first call (never made here)
    dense = quant.dense_copy(model)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in dense.modules())
    assert not bases.quantized_modules(dense) and bases.quantized_modules(model)
    with torch.no_grad():
        dense.model.layers[0].mlp.down_proj.weight.zero_()  # the copy's own weights decide its output
    layer0 = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    assert torch.equal(dense.model.layers[0].mlp(x), torch.zeros(1, 3, 64)) and layer0(x).abs().max() > 0


def test_an_unquantized_runs_record_has_no_quantized_fields(tmp_path: Path) -> None:
    record = build_and_fit(compose([*TINY, "trainer.max_steps=2", f"output_dir={tmp_path}"])[1])
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert record.requant_merged_val_loss is None and record.frozen_bytes_per_param is None
    assert not [k for k in data if k.startswith("requant") or k == "frozen_bytes_per_param"]
    assert not [k for k in records.result_metrics(record) if k.startswith("merge_requant") or "frozen" in k]


def _bnb_base(folder: Path) -> torch.nn.Module:
    """The tiny model as transformers loads it through bitsandbytes (what peft users fine-tune)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    _no_repack(model)
    return model


def _no_repack(model: torch.nn.Module) -> None:
    for m in model.modules():  # as lora_lab does: no bf16 repacking of the weights on an eval forward
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


# Both sides hold the same packed weights (asserted) and compute dequant(W) x + scaling B A x in fp32: only the
# order of the sums differs, as in tests/test_peft_interop.py's float case.
ATOL = 1e-5


def test_adapters_move_both_ways_between_lora_lab_and_peft_on_a_4bit_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    float_model, _ = load_model(ModelConfig(name="tiny"))
    float_model.save_pretrained(tmp_path / "base")
    ours, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    theirs_base = _bnb_base(tmp_path / "base")
    a, b = ours.model.layers[1].mlp.down_proj, theirs_base.model.layers[1].mlp.down_proj
    assert torch.equal(a.weight.data, b.weight.data)  # the same quantization of the same weights
    # lora_lab -> peft
    lora.apply_lora(ours, r=4, alpha=8)
    _perturb_lora(ours)
    lora.save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "ours")
    assert isinstance(in_peft.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert (_logits(ours) - _logits(load_model(ModelConfig(name="tiny", quantize="nf4"))[0])).abs().max() > 1e-2
    assert torch.allclose(_logits(in_peft), _logits(ours), atol=ATOL)
    # The re-quantized merge is peft's merge_and_unload on a 4-bit base: the same 4-bit weights come out.
    lora.merge(ours)
    served = in_peft.merge_and_unload()
    _no_repack(served)
    assert torch.equal(
        served.model.layers[0].mlp.up_proj.weight.data, ours.model.layers[0].mlp.up_proj.base.weight.data
    )
    assert torch.allclose(_logits(served), _logits(ours), atol=ATOL)
    lora.unmerge(ours)
    # peft QLoRA -> lora_lab
    qlora = peft.get_peft_model(
        _bnb_base(tmp_path / "base"),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    _perturb_lora(qlora, seed=1)
    qlora.save_pretrained(tmp_path / "peft")
    mine, _ = load_model(ModelConfig(name="tiny", quantize="nf4"))
    lora.load_adapter(mine, tmp_path / "peft")
    assert isinstance(mine.model.layers[0].self_attn.v_proj.base_layer, bnb.nn.Linear4bit)
    assert torch.allclose(_logits(mine), _logits(qlora), atol=ATOL)
    # A pre-quantized checkpoint (config.json with a quantization_config) loads as it is, packed weights and all.
    saved = tmp_path / "prequantized"
    _bnb_base(tmp_path / "base").save_pretrained(saved)
    load_model(ModelConfig(name="tiny"))[1].save_pretrained(saved)
    pre, _ = load_model(ModelConfig(name=str(saved)))
    assert quant.quantization_of(pre) == "nf4" and torch.equal(
        pre.model.layers[1].mlp.down_proj.weight.data, a.weight.data
    )
    with pytest.raises(ModelError, match="model.quantize=int8"):
        load_model(ModelConfig(name=str(saved), quantize="int8"))
    _, cfg = compose([*TINY, "method=full", f"model.name={saved}", f"output_dir={tmp_path / 'full'}"])
    with pytest.raises(ConfigError, match="method=full with the pre-quantized model.name"):
        adaptations.of("full").apply(pre, cfg)


@pytest.mark.parametrize("task,how", [("causal_lm", "nf4"), ("causal_lm", "int8"), ("seq_cls", "fp4")])
def test_a_saved_model_is_quantized_as_it_loads_into_what_quantizing_after_the_load_gives(
    task: str, how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # From a folder (packaged, local or hub), the frozen linears are quantized weight by weight as they load: the
    # host never holds the float model. It must be the very model quantize_model makes of the float one.
    float_model, tokenizer = load_model(ModelConfig(name="tiny", task=task))
    float_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with caplog.at_level("INFO", logger="lora_lab.models"):
        on_load, _ = load_model(ModelConfig(name=str(tmp_path / "base"), task=task, quantize=how))
    assert f"quantized to {how} as they loaded" in caplog.text and "pre-quantized" not in caplog.text
    after, _ = load_model(ModelConfig(name=str(tmp_path / "base"), task=task))
    quant.quantize_model(after, how)
    assert quant.quantization_of(on_load) == how
    names = bases.quantized_modules(on_load)
    assert names == bases.quantized_modules(after) and len(names) == 14  # every projection, no head
    for name in names:
        a, b = on_load.get_submodule(name).weight, after.get_submodule(name).weight
        assert torch.equal(a.data, b.data), name
        if how == "int8":
            assert torch.equal(a.SCB, b.SCB), name
    head = "score" if task == "seq_cls" else "lm_head"
    assert type(on_load.get_submodule(head)) is torch.nn.Linear  # heads stay in the model's dtype
    assert torch.equal(_logits(on_load), _logits(after))
    assert quant.frozen_bytes(on_load) == quant.frozen_bytes(after)


def _mapped_ranges(path_part: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped files whose path contains `path_part` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if path_part in line:
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_quantized_model_keeps_no_weight_in_the_checkpoints_mapped_file(tmp_path: Path) -> None:
    # from_pretrained leaves the weights it does not convert as views of the memory-mapped safetensors: the mapping
    # (and every page of it the quantization read) would stay resident beside the 4-bit copies for the whole run.
    float_model, tokenizer = load_model(ModelConfig(name="tiny"))
    folder = tmp_path / "checkpoint-to-map"
    float_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plain, _ = load_model(ModelConfig(name=str(folder)))
    mapped = _mapped_ranges("checkpoint-to-map")

    def in_file(model: torch.nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in mapped)]

    assert in_file(plain)  # the float model reads its weights from the mapping (nothing copied): the check sees it
    del plain
    quantized, _ = load_model(ModelConfig(name=str(folder), quantize="nf4"))
    mapped = _mapped_ranges("checkpoint-to-map")
    assert in_file(quantized) == []


def test_a_quantized_run_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path: Path) -> None:
    common = [*TINY, "model.quantize=nf4", "lora.init=pissa", "trainer.max_steps=6", "trainer.eval_at_start=false"]
    common += ["trainer.eval_every=2", "trainer.checkpoint_every=2"]  # the evaluation at a step runs before its save
    straight = build_and_fit(compose([*common, f"output_dir={tmp_path / 'straight'}"])[1])

    class Stop(Exception):
        pass

    def stop_at_4(event) -> None:
        if event.step == 4:
            raise Stop

    stopped = tmp_path / "stopped"
    with pytest.raises(Stop):
        build_and_fit(compose([*common, f"output_dir={stopped}"])[1], on_eval=stop_at_4)
    assert (stopped / "checkpoints" / "step-0000002" / "manifest.json").is_file()
    seen: list[int] = []
    resumed = build_and_fit(
        compose([*common, f"output_dir={stopped}", "trainer.resume=true"])[1], on_eval=lambda e: seen.append(e.step)
    )
    assert seen == [4, 6] and resumed.steps == 6  # it went on from step 2: no evaluation at step 2 again
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in straight.history]


def test_a_warm_worker_restores_a_quantized_base_exactly(tmp_path: Path) -> None:
    # PiSSA re-quantizes its residual into the base and the merge check re-quantizes W0 + dW: both undone.
    common = [*TINY, "model.quantize=nf4", "trainer.max_steps=4", "trainer.eval_at_start=false"]
    warm = Warm()
    for i, extra in enumerate([["lora.init=pissa", "seed=1"], ["lora.r=8", "seed=2"]]):
        session = build(compose([*common, *extra, f"output_dir={tmp_path / str(i)}"])[1], warm=warm)
        try:
            result = session.fit()
        finally:
            session.close()
            warm.give_back()
    assert warm.hits == 1 and warm.misses == 1
    fresh = build_and_fit(compose([*common, "lora.r=8", "seed=2", f"output_dir={tmp_path / 'fresh'}"])[1])
    assert result.val_loss == pytest.approx(fresh.val_loss, abs=1e-6, rel=0)
    assert result.requant_merged_val_loss == pytest.approx(fresh.requant_merged_val_loss, abs=1e-6, rel=0)


def test_nf4_lora_lands_close_to_fp32_lora_on_the_tiny_task(tmp_path: Path) -> None:
    # Same seed, data and budget; the tiny model's 4-bit base moves its loss at step 0 as much as training does,
    # so the bound is on what training reaches, measured: |NF4 - fp32| final val loss.
    common = [*TINY, "trainer.max_steps=16", "trainer.eval_every=16"]
    fp32 = build_and_fit(compose([*common, f"output_dir={tmp_path / 'fp32'}"])[1])
    nf4 = build_and_fit(compose([*common, "model.quantize=nf4", f"output_dir={tmp_path / 'nf4'}"])[1])
    assert abs(nf4.val_loss - fp32.val_loss) < 0.05, (nf4.val_loss, fp32.val_loss)
    assert nf4.base_val_loss != fp32.base_val_loss  # the base really was quantized


def test_the_report_merge_table_has_a_dense_and_a_requantized_row_for_a_quantized_base() -> None:
    from report_fixture import RUNS

    from lora_lab.report.runs import OK_STATE, Run
    from lora_lab.report.tables import table_merge

    plain = RUNS[2].record()[1]  # a completed LoRA trial with a merge check
    quantized = RUNS[2].record()[1]
    quantized.settings.overrides["model.quantize"] = "nf4"
    quantized.requant_max_abs_logit_diff, quantized.requant_merged_val_loss = 0.25, quantized.val_loss + 0.01
    runs = [Run(run_id=str(i), parent="", state=OK_STATE, rec=r) for i, r in enumerate([plain, quantized])]
    table = table_merge(runs)
    rows = {row["precision"]: row for row in table.rows}
    assert rows["fp32"]["runs"] == 1 and rows["fp32"]["max_logit_diff"] == plain.max_abs_logit_diff
    assert rows["fp32, nf4 base, dense merge"]["max_logit_diff"] == quantized.max_abs_logit_diff
    again = rows["fp32, nf4 base, re-quantized merge"]
    assert again["max_logit_diff"] == 0.25 and again["max_dloss"] == pytest.approx(0.01)
    assert "re-quantized" in table.caption


def test_bench_core_builds_a_quantized_lora_row_and_measures_its_frozen_bytes() -> None:
    # The pieces of `python -m lora_lab.bench core --quantize nf4 --quantize int8` (the whole run takes ~20 s).
    from lora_lab.bench import core as bench
    from lora_lab.shapes import shape_config

    base = bench._base_model(shape_config("tiny"), 0, torch.device("cpu"), torch.float32)
    rows = {k: bench._make(k, base) for k in ("lora_lab", "lora_lab@nf4", "lora_lab@int8")}
    assert bench._frozen_bytes_per_param(rows["lora_lab"]) == 4.0  # fp32 weights on the CPU
    assert 0.5 < bench._frozen_bytes_per_param(rows["lora_lab@nf4"]) < 0.55
    assert 1.0 < bench._frozen_bytes_per_param(rows["lora_lab@int8"]) < 1.1
    ids = torch.randint(0, 100, (2, 8))
    for k, model in rows.items():
        bench._stepper(model, ids)()  # a training step runs; only the adapter trains
        assert lora.wrapped_modules(model) and not [n for n, p in model.named_parameters() if p.requires_grad and
                                                    "lora_" not in n], k  # fmt: skip


def test_the_report_precision_table_puts_each_base_at_its_best_lr_beside_qlora() -> None:
    from report_fixture import RUNS

    from lora_lab.report.runs import OK_STATE, Run
    from lora_lab.report.tables import table_precision

    def run(quantize: str, lr: float, seed: int, loss: float, frozen: float | None = None) -> Run:
        rec = RUNS[2].record()[1]  # a completed LoRA trial
        rec.settings.lr, rec.settings.seed = lr, seed
        if quantize != "none":
            rec.settings.overrides["model.quantize"] = quantize
            rec.frozen_bytes_per_param, rec.requant_max_abs_logit_diff = frozen, 0.5
        rec.val_loss = loss
        return Run(run_id=f"{quantize}{lr}{seed}", parent="", state=OK_STATE, rec=rec)

    runs = [
        run("nf4", 3e-4, 0, 1.30, 0.516),
        run("nf4", 3e-4, 1, 1.20, 0.516),
        run("nf4", 1e-3, 0, 1.40, 0.516),
        run("none", 1e-4, 0, 1.10),
        run("none", 3e-4, 0, 1.00),
    ]
    table = table_precision(runs)
    first, nf4 = table.rows
    assert first["base"] == "16-bit (fp32)" and first["lr"] == "3e-4" and first["frozen"] == 4.0
    assert first["vs_16bit"] is None and "MMLU 53.0" in first["published"]
    assert nf4["base"] == "nf4" and nf4["lr"] == "3e-4" and nf4["runs"] == "2 of 3"
    assert nf4["val_loss"].startswith("1.2500 ± ") and nf4["vs_16bit"] == pytest.approx(0.25)
    assert nf4["frozen"] == pytest.approx(0.516) and nf4["merge"].endswith(" / 5.0e-01")
    assert "NF4 + double quantization: MMLU 53.1" in nf4["published"] and "QLoRA" in table.caption


def test_a_quantized_study_compares_with_full_fine_tuning_of_the_unquantized_base(
    outputs: Path, tmp_path: Path
) -> None:
    # Full fine-tuning cannot train a 4-bit base (method=full with model.quantize is refused): a QLoRA study's
    # comparison trains the same model unquantized, QLoRA's own yardstick, and its preflight says nothing against it.
    from lora_lab.sweep import cli

    study = tmp_path / "qstudy.yaml"
    study.write_text(
        f"# python -m lora_lab.sweep sweep={study}\nname: qstudy\noverrides: [model.quantize=nf4, lora.r=4]\n"
        "space:\n  optim.lr: {type: categorical, choices: [3.0e-3]}\nsampler: grid\npruner: none\nn_trials: 1\n"
        "compare_full: true\nfull_lr_grid: [1.0e-3]\n"
    )
    run = [f"sweep={study}", *TINY[:4], "trainer.num_threads=1", "tracking.system_metrics=false"]
    assert cli.main(run) == 0
    compared = {p.name.split("-")[0]: p for p in (outputs / "studies" / "qstudy" / "compare").iterdir()}
    lora_rerun = json.loads((compared["rerun"] / "metrics.json").read_text())
    full = json.loads((compared["full"] / "metrics.json").read_text())
    assert lora_rerun["frozen_bytes_per_param"] < 0.6  # the LoRA side keeps its NF4 base
    assert full["status"] == "completed" and full.get("frozen_bytes_per_param") is None
    assert "quantize: none" in (compared["full"] / "config.yaml").read_text()
