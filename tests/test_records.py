"""lora_lab.records: a run record round-trips through metrics.json and MLflow params/metrics, every field has a unit
and a description, and a renamed or unknown field fails loudly."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lora_lab import records
from lora_lab.records import EvalPoint, Identity, RecordError, Results, RunRecord, Settings, TrainPoint


def record() -> RunRecord:
    settings = Settings(
        method="lora",
        model="tiny",
        data="tiny_sentiment",
        seed=0,
        lr=3e-3,
        batch_size=4,
        grad_accum=2,
        max_steps=4,
        max_length=48,
        precision="auto",
        device="auto",
        method_fields={
            "lora.r": 8,
            "lora.targets": ["q_proj", "v_proj"],
            "lora.target_regex": None,
            "lora.rslora": False,
            "lora.alpha": 16.0,
        },
        overrides={"trainer": "smoke", "optim.lr_mult": 10.0},
    )
    identity = Identity(
        kind="trial",
        name="s/trial-3",
        study="s",
        trial=3,
        model="tiny",
        data="tiny_sentiment",
        device="cpu",
        output_dir="/tmp/x",
    )
    return RunRecord(
        status="completed",
        steps=4,
        val_loss=0.5,
        accuracy=0.75,
        base_val_loss=0.9,
        base_accuracy=0.5,
        merged_val_loss=0.5,
        max_abs_logit_diff=1e-6,
        merge_ok=True,
        merge_tol=1e-4,
        trainable_params=10,
        total_params=100,
        peak_mem_bytes=2**20,
        time_per_step_s=0.1,
        tokens_per_s=1000.0,
        train_time_s=0.4,
        eval_time_s=0.1,
        setup_time_s=0.2,
        identity=identity,
        settings=settings,
        history=[TrainPoint(step=s, train_loss=1.0 / s, lr=3e-3) for s in range(1, 5)],
        evals=[
            EvalPoint(step=0, val_loss=0.9, accuracy=0.5),
            EvalPoint(step=4, val_loss=0.5, accuracy=0.75, tokens_per_s=1000.0),
        ],
    )


def test_metrics_json_round_trip_and_loud_failures() -> None:
    rec = record()
    text = json.dumps(rec.to_json())
    assert RunRecord.from_json(json.loads(text)) == rec
    data = json.loads(text)
    assert data["val_loss"] == 0.5 and data["schema"] == records.SCHEMA  # headline numbers flat at the top
    renamed = dict(data, final_val_loss=data.pop("val_loss"))
    with pytest.raises(RecordError, match="final_val_loss"):
        RunRecord.from_json(renamed)
    bad_point = json.loads(text)
    bad_point["history"][0]["loss"] = 1.0
    with pytest.raises(RecordError, match="history.*loss"):
        RunRecord.from_json(bad_point)
    with pytest.raises(RecordError, match="schema"):
        RunRecord.from_json({k: v for k, v in json.loads(text).items() if k != "schema"})
    with pytest.raises(RecordError, match="no result named 'val_los'"):
        rec.value("val_los")


def test_mlflow_params_and_metrics_round_trip() -> None:
    rec = record()
    params = rec.settings.params()
    assert params["lora.targets"] == '["q_proj", "v_proj"]' and params["trainer"] == "smoke"
    assert params["optim.lr"] == "0.003" and params["lora.rslora"] == "false"
    assert Settings.from_params(params, method_group="lora") == rec.settings
    metrics = records.result_metrics(rec)
    assert "loss/val" not in metrics  # the final val loss is the curve's last point, not a second metric
    assert metrics["merge/ok"] == 1.0 and metrics["params/trainable"] == 10
    latest = {**metrics, "loss/val": 0.5, "eval/accuracy": 0.75, "perf/tokens_per_s": 1000.0}
    back = records.results_from_metrics(latest, "completed", "", {"loss/val": 0.9, "eval/accuracy": 0.5})
    assert back == Results(**rec.results())
    diverged = records.results_from_metrics(latest, "diverged", "nan", None)
    assert math.isnan(diverged.val_loss) and diverged.base_val_loss is None
    with pytest.raises(RecordError, match="perf/peak_mem_bytes"):
        records.results_from_metrics({k: v for k, v in latest.items() if k != "perf/peak_mem_bytes"}, "completed", "")
    full = dataclasses.replace(rec.settings, method="full", method_fields={})
    assert not any(k.startswith("lora.") for k in full.params())
    with pytest.raises(RecordError, match="optim.lr"):
        Settings.from_params({k: v for k, v in params.items() if k != "optim.lr"}, method_group="lora")


def test_every_field_has_a_unit_and_a_description() -> None:
    for cls in (Identity, Settings, TrainPoint, EvalPoint, Results):
        for name, unit, doc, _key in records.describe(cls):
            assert doc, f"{cls.__name__}.{name} has no description"
            assert unit or cls in (Identity, Settings) or name in ("status", "reason"), f"{cls.__name__}.{name}"
    keys = [key for _, _, _, key in records.describe(Results) if key]
    assert all("/" in k for k in keys)  # grouped names: loss/..., merge/..., perf/...
