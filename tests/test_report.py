"""lora_lab.report: a small study of tiny-model runs is built in-process, the report is written, and the numbers in
its tables are checked against the runs themselves (MLflow and trials.csv, read independently of the report)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "data.max_train_examples=64",
    "data.max_val_examples=16",
    "trainer.progress=false",
    "tracking.system_metrics=false",
    "tracking.experiment=report_test",
]
STUDIES = {
    "t_lora": """
overrides:
  - lora.alpha=8
  - lora.targets=[all-linear]
space:
  lora.r: {type: categorical, choices: [2, 8]}
  optim.lr: {type: categorical, choices: [3.0e-3, 3.0e-2]}
sampler: grid
pruner: none
n_trials: 4
compare_full: false
""",
    "t_full": """
overrides:
  - method=full
space:
  optim.lr: {type: categorical, choices: [3.0e-4, 3.0e-3]}
sampler: grid
pruner: none
n_trials: 2
compare_full: false
""",
    "t_targets": """
overrides:
  - lora.alpha=8
  - optim.lr=1.0e-2
space:
  lora.targets: {type: categorical, choices: [attn, mlp]}
  lora.r: {type: map, of: lora.targets, map: {attn: 4, mlp: 3}}
sampler: grid
pruner: none
n_trials: 2
compare_full: false
""",
}
# Tiny Llama (hidden 64, 4 heads, 2 KV heads -> k/v out 32, MLP 128, 2 layers): sum of d_in + d_out per layer.
ATTN_DIMS = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)
MLP_DIMS = 3 * (64 + 128)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three tiny studies (LoRA r x LR, full-FT LR, targets at two ranks) and the report on all of them."""
    from lora_lab.report.__main__ import main
    from lora_lab.sweep import cli

    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LAB_OUTPUTS", str(root / "outputs"))
        for name, text in STUDIES.items():
            path = root / f"{name}.yaml"
            path.write_text(f"name: {name}\n" + text)
            assert cli.main([f"sweep={path}", *TINY]) == 0
        uri = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
        out = root / "report"
        args = ["--experiment", "report_test", "--tracking-uri", uri, "--out", str(out)]
        for name in STUDIES:
            args += ["--study", name]
        assert main(args) == 0
        yield {"root": root, "uri": uri, "out": out, "studies": root / "outputs" / "studies"}


def mlflow_runs(uri: str, study: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("report_test")
    return [
        r
        for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`lora_lab.study` = '{study}'")
        if r.data.tags.get("lora_lab.kind") == "trial"
    ]


def trials(study: dict, name: str) -> list[dict[str, str]]:
    with open(study["studies"] / name / "trials.csv") as f:
        return [r for r in csv.DictReader(f) if r["state"] == "COMPLETE"]


def table(study: dict, name: str) -> list[dict[str, str]]:
    from lora_lab.report.render import read_csv

    return read_csv(study["out"] / f"{name}.csv")


def argmin_lr(rows: list[dict[str, str]]) -> float:
    best = min(rows, key=lambda r: float(r["value_val_loss"]))
    return float(best["optim.lr"])


def test_files_written_and_attached(study):
    import mlflow

    out = study["out"]
    for name in ("methods", "targets", "ranks", "lr", "capacity", "batch", "params", "compute", "merge"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
        assert "From " in (out / f"{name}.md").read_text() or name in ("params", "batch")  # captions name their runs
    for png in ("lr_curves", "loss_curves", "pareto"):
        assert (out / f"{png}.png").stat().st_size > 5000
    assert "\\begin{tabular}" in (out / "lr.tex").read_text()
    client = mlflow.MlflowClient(tracking_uri=study["uri"])
    parent = mlflow_runs(study["uri"], "t_lora")[0].data.tags["mlflow.parentRunId"]
    attached = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"report.md", "lr.csv", "params.tex", "lr_curves.png"} <= attached


def test_lr_table_best_lr_and_ratio(study):
    lora, full = trials(study, "t_lora"), trials(study, "t_full")
    assert len(lora) == 4 and len(full) == 2
    rows = {r["curve"]: r for r in table(study, "lr")}
    best_full = argmin_lr(full)
    assert float(rows["full FT"]["best LR"]) == pytest.approx(best_full)
    for r in (2, 8):
        best = argmin_lr([t for t in lora if int(t["lora.r"]) == r])
        row = rows[f"LoRA r={r}"]
        assert float(row["best LR"]) == pytest.approx(best)
        assert float(row["best LR / best full-FT LR"]) == pytest.approx(best / best_full)
        assert float(row["best val loss"]) == pytest.approx(
            min(float(t["value_val_loss"]) for t in lora if int(t["lora.r"]) == r)
        )
    spread = rows["spread of best LoRA LR across ranks (max/min)"]
    b2, b8 = (argmin_lr([t for t in lora if int(t["lora.r"]) == r]) for r in (2, 8))
    assert float(spread["best LR / best full-FT LR"]) == pytest.approx(max(b2, b8) / min(b2, b8))


def test_capacity_table_follows_the_runs(study):
    lora, full = trials(study, "t_lora"), trials(study, "t_full")
    rows = {r["curve (best LR)"].split(" (lr")[0]: r for r in table(study, "capacity")}
    best_full = min(float(t["value_val_loss"]) for t in full)
    for r in (2, 8):
        best = min(float(t["value_val_loss"]) for t in lora if int(t["lora.r"]) == r)
        assert float(rows[f"LoRA r={r}"]["val loss @ step 4"]) == pytest.approx(
            best
        )  # the last evaluation is the final one
        assert float(rows[f"LoRA r={r}"]["gap to full FT at the last step"]) == pytest.approx(best - best_full)
    assert "val loss @ step 2" in rows["full FT"]


def test_methods_and_ranks_match_mlflow(study):
    runs = mlflow_runs(study["uri"], "t_lora") + mlflow_runs(study["uri"], "t_targets")
    full = mlflow_runs(study["uri"], "t_full")
    rows = {r["method"]: r for r in table(study, "methods")}
    best_lora = min(runs, key=lambda r: r.data.metrics["loss/val"])
    assert float(rows["LoRA (best)"]["val loss"]) == pytest.approx(best_lora.data.metrics["loss/val"])
    assert int(rows["LoRA (best)"]["# trainable params"]) == int(best_lora.data.metrics["params/trainable"])
    best_full = min(full, key=lambda r: r.data.metrics["loss/val"])
    assert float(rows["full FT"]["val loss"]) == pytest.approx(best_full.data.metrics["loss/val"])
    assert int(rows["full FT"]["# trainable params"]) == int(best_full.data.metrics["params/total"])
    ranks = {r["weights adapted"]: r for r in table(study, "ranks")}
    lora = mlflow_runs(study["uri"], "t_lora")
    for r in (2, 8):
        cell = min(x.data.metrics["loss/val"] for x in lora if x.data.params["lora.r"] == str(r))
        assert float(ranks["all linear"][f"r={r}"]) == pytest.approx(cell)
        assert int(ranks["all linear"][f"r={r} params"]) == r * (ATTN_DIMS + MLP_DIMS) * 2


def test_targets_table_matched_counts(study):
    rows = {r["weights adapted"]: r for r in table(study, "targets")}
    assert set(rows) == {"attention", "MLP"}
    assert int(rows["attention"]["# trainable params"]) == 4 * ATTN_DIMS * 2
    assert int(rows["MLP"]["# trainable params"]) == 3 * MLP_DIMS * 2
    for name, run in (
        (
            n,
            [
                x
                for x in mlflow_runs(study["uri"], "t_targets")
                if ("attn" if n == "attention" else "mlp") in x.data.params["lora.targets"]
            ][0],
        )
        for n in rows
    ):
        assert float(rows[name]["best single run"]) == pytest.approx(run.data.metrics["loss/val"])


def test_params_table_counts_from_config(study):
    rows = table(study, "params")
    tiny = {r["LoRA config"]: r for r in rows if r["model"] == "tiny"}
    for r in (2, 8):
        row = tiny[f"all linear r={r}"]
        assert int(row["ours, without lm_head"]) == r * (ATTN_DIMS + MLP_DIMS) * 2
        assert row["config count = logged"] == "yes"
    assert int(tiny["attention r=4"]["ours, without lm_head"]) == 4 * ATTN_DIMS * 2
    llama = {r["LoRA config"]: r for r in rows if r["model"] == "Llama-3.1-8B"}
    assert set(llama) == {"MLP r=256", "attention r=256", "all linear r=256", "MLP r=128"}
    for row in llama.values():  # the table's own numbers equal the published ones, to the digits published
        assert row["ours without / with lm_head"] == row["published without / with lm_head"]
    assert int(llama["MLP r=256"]["ours, without lm_head"]) == 256 * 3 * (4096 + 14336) * 32


def test_llama31_8b_published_counts():
    """From its config alone (meta device): 0.453B/0.218B/0.671B/0.226B without lm_head, 0.49/0.25/0.70/0.24B with."""
    from lora_lab.report.tables import llama31_8b_config, lora_param_count

    cfg = llama31_8b_config()
    for (targets, r), without, with_head in (
        ((("mlp",), 256), 0.453, 0.49),
        ((("attn",), 256), 0.218, 0.25),
        ((("all-linear",), 256), 0.671, 0.70),
        ((("mlp",), 128), 0.226, 0.24),
    ):
        n = lora_param_count(cfg, list(targets), r)
        assert round(n / 1e9, 3) == without
        assert round(lora_param_count(cfg, list(targets), r, include_head=True) / 1e9, 2) == with_head
    h, i, kv, layers = 4096, 14336, 1024, 32  # by hand: r (d_in + d_out) per matrix
    assert lora_param_count(cfg, ["mlp"], 256) == 256 * 3 * (h + i) * layers
    assert lora_param_count(cfg, ["attn"], 256) == 256 * (2 * (h + h) + 2 * (h + kv)) * layers


def test_compute_and_merge_match_runs(study):
    from lora_lab.report.tables import model_config
    from lora_lab.shapes import step_flops

    lora = mlflow_runs(study["uri"], "t_lora")
    full = mlflow_runs(study["uri"], "t_full")
    rows = {r["LoRA config"]: r for r in table(study, "compute")}
    r8 = [x for x in lora if x.data.params["lora.r"] == "8"]
    t_lora = statistics.median(x.data.metrics["perf/time_per_step_s"] for x in r8)
    t_full = statistics.median(x.data.metrics["perf/time_per_step_s"] for x in full)
    assert float(rows["all linear r=8"]["measured ratio"]) == pytest.approx(t_lora / t_full)
    cfg = model_config("tiny")
    theory = step_flops(cfg, 4, 48, 8) / step_flops(cfg, 4, 48, None)
    assert float(rows["all linear r=8"]["FLOPs ratio, this model (theory)"]) == pytest.approx(theory)
    merge = {r["precision"]: r for r in table(study, "merge")}
    all_lora = lora + mlflow_runs(study["uri"], "t_targets")
    # precision=auto: fp32 on the CPU, bf16 where the study trained on CUDA
    ran, other = (
        ("bf16", "fp32") if all(x.data.tags["device"].startswith("cuda") for x in all_lora) else ("fp32", "bf16")
    )
    assert float(merge[ran]["max |logit diff|"]) == pytest.approx(
        max(x.data.metrics["merge/max_abs_logit_diff"] for x in all_lora)
    )
    assert int(merge[ran]["LoRA runs"]) == len(all_lora)
    assert other not in merge or merge[other]["LoRA runs"] == "0"


def test_merge_table_reads_precision_auto_on_cuda_as_bf16() -> None:
    # trainer.device=auto, precision=auto: a run that resolved to CUDA computed in bf16 and must not be pooled with
    # the CPU's fp32 runs (the merge's logit differences are orders apart).
    from report_fixture import RUNS

    from lora_lab.report.runs import OK_STATE, Run
    from lora_lab.report.tables import table_merge

    fixture = RUNS[2]  # a completed LoRA trial with a merge check
    runs = [
        Run(run_id=device, parent="", state=OK_STATE, rec=fixture.record(device=device)[1])
        for device in ("cpu", "cuda:0", "cuda")
    ]
    rows = {row["precision"]: row for row in table_merge(runs).rows}
    assert rows["fp32"]["runs"] == 1 and rows["bf16"]["runs"] == 2


def test_missing_study_or_experiment_exits_2(study, capsys):
    from lora_lab.report.__main__ import main

    assert main(["--tracking-uri", study["uri"], "--study", "no_such_study", "--out", str(study["root"] / "x")]) == 2
    assert "no_such_study" in capsys.readouterr().err
    assert main(["--tracking-uri", study["uri"], "--experiment", "no_such_experiment"]) == 2
    assert main(["--tracking-uri", f"sqlite:///{study['root'] / 'nothing.db'}", "--study", "t_lora"]) == 2
    assert main(["best-lr", "--tracking-uri", study["uri"], "--study", "t_full"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(argmin_lr(trials(study, "t_full")))
