"""A run as typed records: who it is, what a person chose, what it measured step by step and at the end.

train.py produces a `RunRecord`; tracking.py renders it into MLflow (params, grouped metric names, tags, a
description); report.py and sweep.py read it back, from MLflow or from metrics.json, into the same types. Every field
carries its unit, a one-line description and, for numbers, the MLflow metric it is logged as, so adding a metric is
adding one field here, and a renamed or unknown field fails loudly (`RecordError`) wherever a record is read.

This module imports nothing else from lora_lab: it is the vocabulary the other modules share.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

SCHEMA = 2  # metrics.json layout: results flat at the top, then identity, settings, history and evals


class RecordError(ValueError):
    """A record read back (metrics.json, MLflow) has a field this code does not know, or lacks one it needs."""


def spec(
    unit: str,
    doc: str,
    key: Optional[str] = None,
    *,
    curve: Optional[str] = None,
    default: Any = dataclasses.MISSING,
    sparse: bool = False,
) -> Any:
    """A record field with its unit, one-line description and MLflow metric name.

    `key`: the metric the value is logged as. `curve`: the value is the last point of that per-step metric (logged
    once, as the curve; no separate final metric). `sparse`: measured by some runs only (a quantized base's): left
    out of metrics.json while None, so the records of every other run keep their layout.
    """
    meta = {"unit": unit, "doc": doc, "key": key, "curve": curve, "sparse": sparse}
    return field(default=default, metadata=meta)


def describe(cls: type) -> list[tuple[str, str, str, Optional[str]]]:
    """(field, unit, description, MLflow metric) of every field of a record type: the documentation of a record."""
    return [
        (
            f.name,
            f.metadata.get("unit", ""),
            f.metadata.get("doc", ""),
            f.metadata.get("key") or f.metadata.get("curve"),
        )
        for f in fields(cls)
    ]


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """cls(**data), failing with the offending names when data has a field cls lacks or lacks a required one."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecordError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    required = {
        f.name
        for f in fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise RecordError(f"{where}: {cls.__name__} field(s) {missing} missing")
    return cls(**data)


# ----------------------------------------------------------------------------------------------- identity


@dataclass(kw_only=True)
class Identity:
    """Which run this is: MLflow shows it as the run's name and tags."""

    kind: str = spec(
        "",
        "'run' (python -m lora_lab.train), 'trial' (a sweep trial) or 'compare' (a study's "
        "best-LoRA or full-FT comparison run)",
    )
    name: str = spec(
        "", "the run's name: <study>/trial-<n>, <study>/rerun-trial-<n>, <study>/full-ft-lr<lr>, or method-model-data"
    )
    study: str = spec("", "the study the run belongs to ('' for a single run)", default="")
    trial: Optional[int] = spec("", "the trial's number in its study", default=None)
    model: str = spec("", "model.name: a packaged model, a hub id or 'tiny'")
    data: str = spec("", "data.name: the task")
    device: str = spec("", "the torch device it trained on")
    output_dir: str = spec("", "the folder with its config.yaml, metrics.json and adapter")


# ----------------------------------------------------------------------------------------------- settings

# The settings every run has, as MLflow param names; the method's own fields and every other override given come on
# top. Values are written as JSON (strings bare), so a param reads back to the value that was set.
# trainer.devices: a setting every run has since issue 22, but not required of MLflow runs logged before it.
DEVICES_PARAM = "trainer.devices"
SETTINGS_PARAMS = {
    "method": "method",
    "model": "model.name",
    "data": "data.name",
    "seed": "seed",
    "lr": "optim.lr",
    "batch_size": "trainer.batch_size",
    "grad_accum": "trainer.grad_accum",
    "max_steps": "trainer.max_steps",
    "max_length": "data.max_length",
    "precision": "trainer.precision",
    "device": "trainer.device",
}


@dataclass(kw_only=True)
class Settings:
    """The resolved config as a person chose it: the settings every run has, the method's own fields (its config
    group's: lora.*, bitfit.*, ...; none for full fine-tuning and IA3) and every other override given. Derived values
    (parameter counts, folders) are not here."""

    method: str = spec("", "the method: lora, full (every weight trains), bitfit, ia3, adapter, prompt or prefix")
    model: str = spec("", "model.name")
    data: str = spec("", "data.name")
    seed: int = spec("", "seed of the init and the data order")
    lr: float = spec("1/step", "peak learning rate as used: optim.lr, or optim.lr_mult x optim.ref_lr")
    batch_size: int = spec("examples", "examples per micro-batch (trainer.batch_size)")
    grad_accum: int = spec("micro-batches", "micro-batches per optimizer step (trainer.grad_accum)")
    max_steps: int = spec("steps", "optimizer steps (trainer.max_steps)")
    max_length: int = spec("tokens", "tokens per example (data.max_length)")
    precision: str = spec("", "trainer.precision: auto, fp32 or bf16")
    device: str = spec("", "trainer.device as set: auto, cpu or cuda")
    devices: int = spec(
        "processes",
        "trainer.devices: processes (one device each) that trained the run; the global batch is "
        "batch_size x grad_accum x devices. Recorded (metrics.json, the MLflow param) only when > 1: a 1-process "
        "run's record is what it was before the setting existed",
        default=1,
    )
    method_fields: dict[str, Any] = spec("", "the method's own fields by path (lora.r, lora.alpha, ...)", default=None)
    overrides: dict[str, Any] = spec(
        "", "every other setting given on the command line or by the study, by path", default=None
    )

    def __post_init__(self) -> None:
        self.method_fields = dict(self.method_fields or {})
        self.overrides = dict(self.overrides or {})

    @property
    def batch(self) -> int:
        """Examples per optimizer step, over every process: the global batch."""
        return self.batch_size * self.grad_accum * self.devices

    def get(self, path: str) -> Any:
        """A setting by its config path (`lora.r`, `optim.lr`, `data.name`), None when not set."""
        for name, p in SETTINGS_PARAMS.items():
            if p == path:
                return getattr(self, name)
        if path in self.method_fields:
            return self.method_fields[path]
        return self.overrides.get(path)

    def to_json(self) -> dict[str, Any]:
        """metrics.json's settings section (devices only when > 1)."""
        out = dataclasses.asdict(self)
        if self.devices == 1:
            del out["devices"]
        return out

    def params(self) -> dict[str, str]:
        """MLflow params: the settings by config path, values as JSON (strings bare)."""
        out = {p: getattr(self, name) for name, p in SETTINGS_PARAMS.items()}
        if self.devices != 1:
            out[DEVICES_PARAM] = self.devices
        out.update(self.method_fields)
        out.update({k: v for k, v in self.overrides.items() if k not in out})
        return {k: param_text(v) for k, v in out.items()}

    @classmethod
    def from_params(cls, params: dict[str, str], method_group: Optional[str]) -> "Settings":
        """Back from MLflow params (what `params()` wrote); `method_group` is the config group of the method's own
        fields (lora_lab.adaptations knows it; None: the method has none). Fails naming a missing setting."""
        by_path = {p: name for name, p in SETTINGS_PARAMS.items()}
        missing = sorted(p for p in by_path if p not in params)
        if missing:
            raise RecordError(
                f"MLflow params: setting(s) {missing} missing; was the run logged before issue 12's "
                f"records? (params present: {sorted(params)[:12]})"
            )
        typed = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for path, name in by_path.items():
            v = param_value(params[path])
            kind = typed[name]
            values[name] = (
                float(v) if kind == "float" else int(v) if kind == "int" else str(v) if v is not None else None
            )
        own = {k: param_value(v) for k, v in params.items() if method_group and k.startswith(method_group + ".")}
        rest = {k: param_value(v) for k, v in params.items() if k not in by_path and k not in own}
        devices = int(rest.pop(DEVICES_PARAM, 1))  # runs logged before trainer.devices ran on one process
        return cls(**values, devices=devices, method_fields=own, overrides=rest)


def param_text(value: Any) -> str:
    """A setting's value as an MLflow param: strings bare, everything else JSON (`8`, `0.0003`, `["q_proj"]`)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's limit on a param value


def param_value(text: str) -> Any:
    """The inverse of `param_text`: JSON where it parses, else the bare string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


# ----------------------------------------------------------------------------------------------- per-step points


@dataclass(kw_only=True)
class TrainPoint:
    """One optimizer step."""

    step: int = spec("steps", "optimizer steps done")
    train_loss: float = spec("nats/token", "training loss of this step's batch", "loss/train")
    lr: float = spec("1/step", "learning rate used at this step", "optim/lr")


@dataclass(kw_only=True)
class EvalPoint:
    """One evaluation on the validation rows (step 0: the base model, before any training)."""

    step: int = spec("steps", "optimizer steps done")
    val_loss: float = spec("nats/token", "validation loss (token-weighted mean)", "loss/val")
    accuracy: Optional[float] = spec("fraction", "validation accuracy (labelled tasks)", "eval/accuracy", default=None)
    train_loss: Optional[float] = spec("nats/token", "mean training loss since the previous evaluation", default=None)
    lr: Optional[float] = spec("1/step", "learning rate at this step", default=None)
    tokens_per_s: Optional[float] = spec("tokens/s", "training throughput so far", "perf/tokens_per_s", default=None)


# ----------------------------------------------------------------------------------------------- results


@dataclass(kw_only=True)
class Results:
    """What a run measured at its end. Fields with a `curve` are the last point of that per-step metric and are not
    logged a second time."""

    status: str = spec("", "'completed' or 'diverged' (trained to the end or not)")
    reason: str = spec("", "why a run did not complete", default="")
    steps: int = spec("steps", "optimizer steps done", "train/steps")
    val_loss: float = spec("nats/token", "final validation loss (NaN when not completed)", curve="loss/val")
    accuracy: Optional[float] = spec("fraction", "final validation accuracy", curve="eval/accuracy", default=None)
    # The base model's evaluation (step 0, before any training) has names of its own: logged as the curves' first
    # point, a run that trains no further (a failed trial) would show the base model's numbers as its result.
    base_val_loss: Optional[float] = spec(
        "nats/token", "validation loss of the base model (step 0, before training)", "base/loss_val", default=None
    )
    base_accuracy: Optional[float] = spec(
        "fraction", "accuracy of the base model (step 0, before training)", "base/accuracy", default=None
    )
    merged_val_loss: Optional[float] = spec(
        "nats/token",
        "validation loss with the adapter merged into the weights (a quantized base: into a dense copy of it)",
        "merge/val_loss",
        default=None,
    )
    merged_accuracy: Optional[float] = spec(
        "fraction", "accuracy with the adapter merged", "merge/accuracy", default=None
    )
    max_abs_logit_diff: Optional[float] = spec(
        "logits", "max |merged - unmerged logit| on the probe rows", "merge/max_abs_logit_diff", default=None
    )
    merge_ok: Optional[bool] = spec(
        "1 = yes", "the merged model's logits matched the unmerged ones within merge_tol", "merge/ok", default=None
    )
    merge_tol: Optional[float] = spec(
        "logits", "tolerance of the merge check, from the evaluation precision", "merge/tolerance", default=None
    )
    # A quantized base (model.quantize, or a pre-quantized checkpoint) is merged twice: into a dense copy of the
    # dequantized base (the merge_* fields above: what a user serves, what export.merged writes) and into the
    # quantized weights, re-quantized (these: what peft's merge_and_unload does on a 4-bit base).
    requant_merged_val_loss: Optional[float] = spec(
        "nats/token",
        "validation loss with the adapter merged into the quantized base and re-quantized",
        "merge_requant/val_loss",
        default=None,
        sparse=True,
    )
    requant_merged_accuracy: Optional[float] = spec(
        "fraction", "accuracy merged and re-quantized", "merge_requant/accuracy", default=None, sparse=True
    )
    requant_max_abs_logit_diff: Optional[float] = spec(
        "logits",
        "max |merged and re-quantized - unmerged logit| on the probe rows",
        "merge_requant/max_abs_logit_diff",
        default=None,
        sparse=True,
    )
    frozen_bytes_per_param: Optional[float] = spec(
        "bytes/parameter",
        "bytes per parameter of the quantized linear weights, measured from the tensors (quantization state included)",
        "size/frozen_bytes_per_param",
        default=None,
        sparse=True,
    )
    trainable_params: int = spec("parameters", "parameters that train", "params/trainable")
    total_params: int = spec("parameters", "parameters of the model (adapters included)", "params/total")
    adapter_bytes: Optional[int] = spec("bytes", "size of the saved adapter", "size/adapter_bytes", default=None)
    checkpoint_bytes: Optional[int] = spec(
        "bytes", "what a user keeps: the adapter (LoRA) or all weights (full FT)", "size/checkpoint_bytes", default=None
    )
    peak_mem_bytes: int = spec(
        "bytes", "peak memory: CUDA allocator peak, or the process's RSS on CPU", "perf/peak_mem_bytes"
    )
    time_per_step_s: float = spec(
        "s", "median time per optimizer step (the first step left out)", "perf/time_per_step_s"
    )
    tokens_per_s: float = spec("tokens/s", "training tokens per second of training time", curve="perf/tokens_per_s")
    train_time_s: float = spec("s", "time in optimizer steps (forward, backward, update)", "time/train_s")
    eval_time_s: float = spec("s", "time in evaluations, the merge and the merged evaluation", "time/eval_s")
    setup_time_s: float = spec("s", "model + data + LoRA, before the first step", "time/setup_s")
    inference_latency_s: Optional[float] = spec(
        "s",
        "median time of one forward over an evaluation batch after training (merged where the method merges)",
        "perf/inference_latency_s",
        default=None,
    )

    @classmethod
    def field_of(cls, name: str) -> dataclasses.Field:
        """The Results field `name` (an objective, a column); RecordError naming the known ones otherwise."""
        for f in fields(Results):
            if f.name == name:
                return f
        raise RecordError(f"no result named {name!r}; known: {[f.name for f in fields(Results)]}")

    @classmethod
    def metric(cls, name: str) -> str:
        """The MLflow metric the result `name` is logged as (val_loss -> loss/val, its curve's last point)."""
        f = cls.field_of(name)
        return f.metadata.get("key") or f.metadata["curve"]

    def value(self, name: str) -> Any:
        """A result by name, failing loudly on an unknown one (sweep objectives, report columns)."""
        return getattr(self, Results.field_of(name).name)

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass(kw_only=True)
class RunRecord(Results):
    """A whole run: its results (flat, as above), who it is, what was chosen and its curves."""

    identity: Identity
    settings: Settings
    history: list[TrainPoint] = field(default_factory=list)  # every optimizer step
    evals: list[EvalPoint] = field(default_factory=list)  # every evaluation, step 0 first when eval_at_start

    def results(self) -> dict[str, Any]:
        """The Results fields as a dict (sparse ones only where measured)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(Results)
            if not (f.metadata.get("sparse") and getattr(self, f.name) is None)
        }

    def to_json(self) -> dict[str, Any]:
        """metrics.json: results flat at the top (what most readers want), then the rest."""
        return {
            "schema": SCHEMA,
            **self.results(),
            "identity": dataclasses.asdict(self.identity),
            "settings": self.settings.to_json(),
            "history": [dataclasses.asdict(p) for p in self.history],
            "evals": [dataclasses.asdict(p) for p in self.evals],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "metrics.json") -> "RunRecord":
        """Back from `to_json()`; RecordError naming the field when the layout is another one."""
        data = dict(data)
        schema = data.pop("schema", None)
        if schema != SCHEMA:
            raise RecordError(f"{where}: schema {schema!r}, expected {SCHEMA} (written by another lora_lab version)")
        try:
            parts = {k: data.pop(k) for k in ("identity", "settings", "history", "evals")}
        except KeyError as exc:
            raise RecordError(f"{where}: section {exc.args[0]!r} missing") from None
        results = build(Results, data, where)
        return cls(
            **dataclasses.asdict(results),
            identity=build(Identity, parts["identity"], f"{where}: identity"),
            settings=build(Settings, parts["settings"], f"{where}: settings"),
            history=[build(TrainPoint, p, f"{where}: history") for p in parts["history"]],
            evals=[build(EvalPoint, p, f"{where}: evals") for p in parts["evals"]],
        )


@dataclass(kw_only=True)
class Stop:
    """Where a run that did not train to its last step stopped (logged on its MLflow run, beside its reason tag)."""

    nonfinite_step: Optional[int] = spec(
        "steps", "the step at which a diverged run's loss was not finite", "stop/nonfinite_step", default=None
    )
    pruned_step: Optional[int] = spec(
        "steps", "the evaluation step at which the pruner stopped the trial", "stop/pruned_step", default=None
    )


@dataclass(kw_only=True)
class StudyAnswer:
    """What a study found, logged on its parent run: its best trial, and the full fine-tuning run it is compared with
    (the best LR of the comparison). None: not measured (no trial completed, no full-FT run)."""

    best_val_loss: Optional[float] = spec("nats/token", "the best trial's final validation loss", "best/loss_val")
    best_accuracy: Optional[float] = spec("fraction", "the best trial's final accuracy", "best/accuracy", default=None)
    best_trainable_params: Optional[int] = spec(
        "parameters", "parameters the best trial trains", "best/params_trainable"
    )
    best_params_share: Optional[float] = spec(
        "fraction",
        "the best trial's trainable parameters / full fine-tuning's (without a full-FT run: / the model's total)",
        "best/params_share",
    )
    full_val_loss: Optional[float] = spec(
        "nats/token", "full fine-tuning's final validation loss, at its best LR", "full/loss_val", default=None
    )
    full_accuracy: Optional[float] = spec(
        "fraction", "full fine-tuning's final accuracy", "full/accuracy", default=None
    )
    full_lr: Optional[float] = spec(
        "1/step", "the full-FT LR chosen (the best of sweep.full_lr_grid)", "full/lr", default=None
    )
    full_trainable_params: Optional[int] = spec(
        "parameters", "parameters full fine-tuning trains (all of them)", "full/params_trainable", default=None
    )
    delta_val_loss: Optional[float] = spec(
        "nats/token",
        "best trial's val loss - full FT's (below 0: the best trial beats full fine-tuning)",
        "delta/loss_val_vs_full",
        default=None,
    )

    def metrics(self) -> dict[str, float]:
        """The measured values as MLflow metrics, by name."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and math.isfinite(float(value)):
                out[f.metadata["key"]] = float(value)
        return out


@dataclass(kw_only=True)
class StudyThroughput:
    """How well a study's trial phase used its devices (logged on the study's parent run)."""

    trials: int = spec("trials", "trials finished (complete, pruned or failed) by this invocation of the study")
    wall_s: float = spec("s", "wall time of this invocation's trial phase (all workers, no comparison runs)")
    trials_per_hour: float = spec("trials/h", "trials finished per hour of wall time", "perf/trials_per_hour")
    busy_share: float = spec(
        "fraction", "time inside training steps and evaluations / wall time, mean over devices", "perf/busy_share"
    )
    overhead_share: Optional[float] = spec(
        "fraction",
        "time outside training steps and evaluations / trial wall time, over every timed trial of the study",
        "perf/overhead_share",
        default=None,
    )
    per_device: dict[str, float] = field(default_factory=dict)  # device -> its busy share


def result_metrics(results: Results) -> dict[str, float]:
    """The results MLflow logs as metrics, by metric name (curve values are logged with their curve)."""
    out = {}
    for f in fields(Results):
        key, value = f.metadata.get("key"), getattr(results, f.name)
        if key and value is not None:
            out[key] = float(value)
    return out


def results_from_metrics(metrics: dict[str, float], status: str, reason: str) -> Results:
    """Results back from MLflow: `metrics` the latest value of each metric (a curve's value: its last point).

    A result with neither a metric nor a curve value is None; a required one missing fails loudly.
    """
    values: dict[str, Any] = {"status": status, "reason": reason}
    for f in fields(Results):
        if f.name in values:
            continue
        key, curve = f.metadata.get("key"), f.metadata.get("curve")
        if key:
            v = metrics.get(key)
        else:
            v = metrics.get(curve) if status == "completed" or curve != "loss/val" else float("nan")
        if v is not None and f.type in ("int", "Optional[int]"):
            v = int(v)
        elif v is not None and f.type == "Optional[bool]":
            v = bool(v)
        if v is None and f.default is dataclasses.MISSING:
            # A run that stopped early (diverged at its first steps) may have logged no point of a curve at all.
            if f.name == "val_loss" or (curve and status != "completed"):
                v = float("nan")
            else:
                raise RecordError(
                    f"MLflow metrics: result {f.name!r} (metric {key or curve!r}) missing; "
                    f"metrics present: {sorted(metrics)}"
                )
        values[f.name] = v
    return Results(**values)


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)
