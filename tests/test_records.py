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
    # The base model has names of its own: never a point of the run's loss/val or eval/accuracy curves.
    assert metrics["base/loss_val"] == 0.9 and metrics["base/accuracy"] == 0.5
    latest = {**metrics, "loss/val": 0.5, "eval/accuracy": 0.75, "perf/tokens_per_s": 1000.0}
    back = records.results_from_metrics(latest, "completed", "")
    assert back == Results(**rec.results())
    no_base = {k: v for k, v in latest.items() if not k.startswith("base/")}
    diverged = records.results_from_metrics(no_base, "diverged", "nan")
    assert math.isnan(diverged.val_loss) and diverged.base_val_loss is None
    with pytest.raises(RecordError, match="perf/peak_mem_bytes"):
        records.results_from_metrics({k: v for k, v in latest.items() if k != "perf/peak_mem_bytes"}, "completed", "")
    full = dataclasses.replace(rec.settings, method="full", method_fields={})
    assert not any(k.startswith("lora.") for k in full.params())
    with pytest.raises(RecordError, match="optim.lr"):
        Settings.from_params({k: v for k, v in params.items() if k != "optim.lr"}, method_group="lora")


def test_every_field_has_a_unit_and_a_description() -> None:
    for cls in (Identity, Settings, TrainPoint, EvalPoint, Results, records.Stop, records.StudyAnswer):
        for name, unit, doc, _key in records.describe(cls):
            assert doc, f"{cls.__name__}.{name} has no description"
            assert unit or cls in (Identity, Settings) or name in ("status", "reason"), f"{cls.__name__}.{name}"
    keys = [
        key for cls in (Results, records.Stop, records.StudyAnswer) for _, _, _, key in records.describe(cls) if key
    ]
    assert all("/" in k for k in keys)  # grouped names: loss/..., merge/..., perf/...
    assert len(keys) == len(set(keys))  # one name, one meaning


def _logged(tmp_path, rec: RunRecord, state: str, *, finish: bool) -> None:
    """`rec` through tracking.TrainingRun as train logs it: each evaluation, then (unless pruned) the results."""
    from lora_lab import tracking
    from lora_lab.config import TrackingConfig
    from lora_lab.train import EvalEvent

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False)
    with tracking.TrainingRun(cfg, rec.identity, rec.settings, start_metrics={"params/trainable": 10.0}) as run:
        for e in rec.evals:
            metrics = {k: v for k, v in dataclasses.asdict(e).items() if k != "step" and v is not None}
            points = [dataclasses.asdict(p) for p in rec.history if e.step - 2 < p.step <= e.step]
            run.on_eval(EvalEvent(e.step, rec.settings.max_steps, metrics, points))
        if finish:
            run.finish(rec)
        run.set_outcome(state, rec.reason)


def test_curves_are_honest_in_mlflow_and_read_back_the_same(tmp_path, monkeypatch) -> None:
    """The base model's evaluation is logged as base/*, never as a run's loss/val point; a diverged run logs the
    steps it made and where its loss went non-finite; a pruned one where it was pruned. Read back (tracking.read_runs,
    what the report reads), the records start with the base model's evaluation as metrics.json's do."""
    import mlflow

    from lora_lab import tracking

    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path))
    done = record()
    diverged = dataclasses.replace(
        record(),
        identity=dataclasses.replace(done.identity, name="s/trial-4", trial=4),
        status="diverged",
        reason="non-finite training loss at step 3",
        steps=2,
        val_loss=float("nan"),
        accuracy=None,
        merged_val_loss=None,
        history=done.history[:2],
        evals=done.evals[:1],  # the base model only: it diverged before its first evaluation
    )
    pruned = dataclasses.replace(
        record(),
        identity=dataclasses.replace(done.identity, name="s/trial-5", trial=5),
        evals=[done.evals[0], EvalPoint(step=2, val_loss=0.8, accuracy=0.5)],
        history=done.history[:2],
    )
    _logged(tmp_path, done, "COMPLETE", finish=True)
    _logged(tmp_path, diverged, "FAIL", finish=True)
    _logged(tmp_path, pruned, "PRUNED", finish=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lora_lab").experiment_id])}
    assert set(runs) == {"trial-3 · s", "FAIL trial-4 · s", "PRUNED trial-5 · s"}  # what tells them apart first
    for r in runs.values():
        assert r.data.metrics["base/loss_val"] == 0.9 and r.data.metrics["base/accuracy"] == 0.5
        assert 0 not in {m.step for m in client.get_metric_history(r.info.run_id, "loss/val")}
    fail = runs["FAIL trial-4 · s"]
    assert "loss/val" not in fail.data.metrics and "eval/accuracy" not in fail.data.metrics  # no base number as result
    assert [m.step for m in client.get_metric_history(fail.info.run_id, "loss/train")] == [1, 2]
    assert fail.data.metrics["stop/nonfinite_step"] == 3
    assert runs["PRUNED trial-5 · s"].data.metrics["stop/pruned_step"] == 2
    note = fail.data.tags["mlflow.note.content"]
    assert note.splitlines()[1].startswith("**No result**: non-finite training loss at step 3")
    back = {t.record.identity.name: t for t in tracking.read_runs(uri)[0]}
    assert set(back) == {"s/trial-3", "s/trial-4", "s/trial-5"}
    assert back["s/trial-3"].record.evals == done.evals  # step 0 first, as in metrics.json
    assert back["s/trial-3"].record.base_val_loss == 0.9 and back["s/trial-3"].record.val_loss == 0.5
    assert back["s/trial-4"].state == "FAIL" and math.isnan(back["s/trial-4"].record.val_loss)
    assert [e.step for e in back["s/trial-4"].record.evals] == [0]
    assert back["s/trial-5"].record.base_val_loss == 0.9 and [e.step for e in back["s/trial-5"].record.evals] == [0, 2]


def test_runs_logged_before_the_base_model_had_its_own_names_read_back_alike(tmp_path) -> None:
    """A store written by an older lora_lab: the base model's evaluation is the curves' point at step 0."""
    import mlflow
    from mlflow.entities import Metric

    from lora_lab import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    rec = record()
    exp = client.create_experiment("old")
    old = {"kind": "trial", "study": "s", "trial": "3", "state": "COMPLETE", "status": "completed"}
    run = client.create_run(exp, run_name="s/trial-3", tags={f"lora_lab.{k}": v for k, v in old.items()})
    metrics = {k: v for k, v in records.result_metrics(rec).items() if not k.startswith("base/")}
    points = [Metric(k, v, 0, rec.steps) for k, v in metrics.items()]
    points += [Metric("loss/val", e.val_loss, 0, e.step) for e in rec.evals]
    points += [Metric("eval/accuracy", e.accuracy, 0, e.step) for e in rec.evals]
    points += [Metric("perf/tokens_per_s", 1000.0, 0, rec.steps)]
    client.log_batch(run.info.run_id, metrics=points, params=[])
    for k, v in rec.settings.params().items():
        client.log_param(run.info.run_id, k, v)
    (back,) = tracking.read_runs(uri, "old")[0]
    assert back.record.identity.name == "s/trial-3"
    assert back.record.base_val_loss == 0.9 and back.record.base_accuracy == 0.5 and back.record.val_loss == 0.5
    assert [e.step for e in back.record.evals] == [0, 4]
