"""Finishing a run: the merge check (`with merged(model, method):`), latency, export, and the run's record.

After the loop: a mergeable method's update is folded into the weights, the merged model evaluated and its probe
logits compared with the unmerged ones (`check_merge`), then unfolded again; the adapter (or merged model) is
exported; and what the run measured, who it is (`RunRole`, `identity_of`) and what was chosen (`settings_of`) become
its `records.RunRecord`, written as metrics.json.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lora_lab import adaptations, bases, lora, methods
from lora_lab.adaptations import Adaptation
from lora_lab.config import Config
from lora_lab.files import WriteError, atomic_dir, atomic_write_text
from lora_lab.records import EvalPoint, Identity, RunRecord, Settings, TrainPoint
from lora_lab.records import build as build_record
from lora_lab.train import distributed
from lora_lab.train.evaluate import Evaluator
from lora_lab.train.loop import Trained
from lora_lab.train.runtime import Clock, set_use_cache

# ----------------------------------------------------------------------------------------------- merge check


class merged:
    """`with merged(model, adaptation):` the method's update folded into the weights inside the block (its entry in
    lora_lab.adaptations: LoRA's lora.merge, IA3's methods.merge), taken out again on the way out, whatever happens
    inside.

    Idempotent: entering the same block again inside it folds nothing twice (only the outermost exit unfolds), and a
    merge that fails part-way is undone before its error goes on. `seconds` sums the time spent merging and
    unmerging (the merge is part of the merged evaluation's time).

    A sharded (FSDP2) model merges shard by shard, on every rank (a collective): its weights are DTensors, whose ops
    compute what the same ops on the whole tensors would (the update B @ A gathers the small factor it needs) and
    write each rank's rows back into its shards; the next forward gathers the merged weights."""

    def __init__(self, model: torch.nn.Module, adaptation: Adaptation) -> None:
        self.model, self.adaptation = model, adaptation
        self.depth = 0  # how many of this block's `with`s are open: merged while > 0
        self.seconds = 0.0

    def _fold(self) -> tuple[Callable[[torch.nn.Module], None], Callable[[torch.nn.Module], None]]:
        return self.adaptation.merge, self.adaptation.unmerge

    def __enter__(self) -> "merged":
        if self.depth == 0:
            merge, unmerge = self._fold()
            # The shards are the weights: the root stays gathered after an evaluation, and a merge written into that
            # transient copy would be lost at the next gather.
            distributed.reshard(self.model)
            t0 = time.perf_counter()
            try:
                merge(self.model)  # fp32 inside, whatever the weight dtype
            except BaseException:
                unmerge(self.model)  # per layer a no-op where nothing was folded yet
                raise
            finally:
                self.seconds += time.perf_counter() - t0
        self.depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            _, unmerge = self._fold()
            distributed.reshard(self.model)
            t0 = time.perf_counter()
            try:
                unmerge(self.model)
            finally:
                self.seconds += time.perf_counter() - t0


def merge_tolerance(eval_dtype: Optional[torch.dtype], logits: torch.Tensor) -> float:
    """How far merged logits may sit from unmerged ones when the merge is right.

    fp32 evaluation: 1e-4 (measured merges stay near 2e-4 of that on the default task). Under bf16/fp16 the merged
    weight is rounded once more than W0 + BA, and each logit carries that rounding through every layer: allow 8 units
    in the last place of the dtype at the scale of the largest logit (bf16: 6% of it). A merge that folds the
    update in twice moves logits by the whole update, far above either.
    """
    if eval_dtype is None or eval_dtype == torch.float32:
        return 1e-4
    return float(8 * torch.finfo(eval_dtype).eps * logits.abs().max().clamp(min=1.0))


@dataclass
class Requantized:
    """A quantized base's second merge: the update folded into the quantized weights and re-quantized (what peft's
    merge_and_unload does on a 4-bit base), evaluated and compared with the unmerged adapter like the dense one."""

    val_loss: float
    accuracy: Optional[float]
    max_abs_logit_diff: float


@dataclass
class MergeCheck:
    """The merged model against the unmerged one: its evaluation, the largest probe-logit difference, the
    tolerance that difference must stay within, and the merged model's inference latency. On a quantized base the
    merged model is a dense copy of the dequantized base with the update folded in (what a user serves), its
    tolerance widened by how far the unmerged dense copy already sits from the quantized model (0 for NF4/FP4, whose
    CPU and GPU kernels dequantize and multiply; LLM.int8's 8-bit activations at inference), and `requantized` is
    the merge into the quantized weights."""

    val_loss: float
    accuracy: Optional[float]
    max_abs_logit_diff: float
    tol: float
    latency_s: float
    requantized: Optional[Requantized] = None

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_logit_diff <= self.tol)


def check_merge(model: torch.nn.Module, adaptation: Adaptation, evaluator: Evaluator, trained: Trained) -> MergeCheck:
    """Fold the update in, evaluate the merged model (and its latency: what serving it costs), compare its probe
    logits with the final evaluation's, fold the update out again. A quantized base is merged twice: into a dense
    copy (dropped afterwards; the trained model is untouched) and into its own weights, re-quantized (the stored
    weights are put back exactly on the way out)."""
    evals = trained.evals
    if not evals or evals[-1]["step"] != len(trained.history) or evaluator.probe_logits is None:
        evaluator.evaluate(model)  # no evaluation of the final weights yet (a run resumed at its end): take the probe
    before = evaluator.probe_logits
    quantized = bool(bases.quantized_modules(model))
    served, kernel = model, 0.0
    if quantized:
        from lora_lab.quant import dense_copy

        served = dense_copy(model)
        # The quantized layers' own kernels need not compute exactly what the dense copy does (LLM.int8 rounds the
        # activations to 8 bits at inference): that difference, measured unmerged, is not the merge's.
        evaluator.evaluate(served)
        kernel = (evaluator.probe_logits - before).abs().max().item()
    with merged(served, adaptation) as fold:
        after = evaluator.evaluate(served)
        latency = evaluator.latency(served)
        diff = (evaluator.probe_logits - before).abs().max().item()
        tol = kernel + merge_tolerance(evaluator.dtype or methods.frozen_dtype(served), before)
    evaluator.clock.eval_s += fold.seconds
    check = MergeCheck(after["val_loss"], after.get("accuracy"), diff, tol, latency)
    if quantized:
        del served
        with merged(model, adaptation) as fold:
            requant = evaluator.evaluate(model)
            rdiff = (evaluator.probe_logits - before).abs().max().item()
        evaluator.clock.eval_s += fold.seconds
        check.requantized = Requantized(requant["val_loss"], requant.get("accuracy"), rdiff)
    return check


# ----------------------------------------------------------------------------------------------- export


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_merged(model: torch.nn.Module, tokenizer: Any, path: Path, unwrap: Callable[[torch.nn.Module], Any]) -> None:
    """Write the merged model as a plain transformers folder (`unwrap` folds the method in): no lora_lab needed to
    load it. A quantized base is merged into a dense copy of it (the dequantized weights in the compute dtype: what
    the merge check measured as the merged model), never re-quantized."""
    import copy

    if bases.quantized_modules(model):
        from lora_lab.quant import dense_copy

        plain = dense_copy(model).cpu()
    else:
        plain = copy.deepcopy(model).cpu()
    save_merged(plain, tokenizer, path, unwrap)


def save_merged(plain: torch.nn.Module, tokenizer: Any, path: Path, unwrap: Callable[[torch.nn.Module], Any]) -> None:
    """Fold the method into `plain` for good (`unwrap`, in place: a copy the caller made) and write it as a plain
    transformers folder, served with the KV cache."""
    unwrap(plain)
    set_use_cache(plain, True)
    with atomic_dir(path) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def plain_copy(cfg: Config, model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """A sharded (FSDP2) model as one plain module on rank 0's CPU (None on the other ranks): the run's model built
    again on the meta device with its method applied, every weight gathered from the shards into it (FSDP2 cannot be
    deep-copied), and its buffers, which FSDP2 leaves whole on every rank (the non-persistent ones too: rotary
    frequencies, PiSSA's initial factors), copied from rank 0's. A collective: every rank calls it."""
    from lora_lab.models import meta_model

    state = distributed.gathered_state_dict(model)
    if not distributed.is_main():
        return None
    plain = meta_model(cfg.model)
    # No prefix cache factory: only a method that unwraps into plain weights is copied here, and none of them
    # hands keys and values to attention.
    adaptations.of(cfg.method).apply(plain, cfg)
    plain.load_state_dict(state, strict=True, assign=True)  # the gathered tensors themselves, in their dtypes
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # assign gave each tied name its own gathered copy: one tensor again, as trained
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    return plain


def export_trained(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Write a model that trained every weight as a plain transformers folder, as it is (no copy: a full fine-tune's
    weights may fill the device). Under FSDP2 its weights are gathered on rank 0's CPU first: a collective, so every
    rank calls this; rank 0 alone writes."""
    state = distributed.gathered_state_dict(model) if distributed.is_sharded(model) else None
    if not distributed.is_main():
        return
    config = getattr(model, "config", None)
    trained_with = getattr(config, "use_cache", None)
    set_use_cache(model, True)  # what it is served with; training ran without the KV cache
    try:
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    finally:
        if trained_with is not None:
            set_use_cache(model, trained_with)


def export(cfg: Config, model: torch.nn.Module, tokenizer: Any, out: Path) -> tuple[Optional[int], Optional[int]]:
    """Write what cfg.export asks for under `out` (adapter/, merged/); returns the adapter's bytes and the bytes of
    the checkpoint a user keeps (the adapter's, or under full fine-tuning every weight), None where there is none."""
    adaptation = adaptations.of(cfg.method)
    if adaptation.trains_all:
        if cfg.export.merged:  # a full fine-tune is its own merged model
            export_trained(model, tokenizer, out / "merged")
        # What a full fine-tune leaves behind is every weight: its size is the checkpoint a user keeps (FSDP2's
        # sharded parameters count their global shape).
        return None, sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    size = None
    sharded = distributed.is_sharded(model)  # FSDP2: every rank takes part in gathering what rank 0 writes
    if not distributed.is_main() and not sharded:  # the other ranks of a multi-process run write nothing
        return size, size
    if cfg.export.adapter:
        with distributed.whole_trainable(model):  # sharded: the method's parameters whole on rank 0
            if distributed.is_main():
                with atomic_dir(out / "adapter") as tmp:
                    adaptation.save(model, tmp, base_model_name=cfg.model.name)
                size = dir_bytes(out / "adapter")
    if cfg.export.merged and adaptation.unwrap_fn is not None:
        if sharded:
            plain = plain_copy(cfg, model)
            if plain is not None:
                save_merged(plain, tokenizer, out / "merged", adaptation.unwrap_fn)
        else:
            export_merged(model, tokenizer, out / "merged", adaptation.unwrap_fn)
    return size, size


@dataclass
class Ending:
    """What the end of a completed run measured: the merge check (mergeable methods), the inference latency and the
    exported sizes. All None for a run that did not complete."""

    merge: Optional[MergeCheck] = None
    latency_s: Optional[float] = None
    adapter_bytes: Optional[int] = None
    checkpoint_bytes: Optional[int] = None
    frozen_bytes_per_param: Optional[float] = None  # a quantized base's linears, measured (lora_lab.quant)


def conclude(
    cfg: Config, model: torch.nn.Module, tokenizer: Any, evaluator: Evaluator, trained: Trained, out: Path
) -> Ending:
    """A completed run's end: the merge check where the method merges (its latency is the merged model's), else the
    latency as trained; then the export."""
    if trained.status != "completed":
        return Ending()
    adaptation = adaptations.of(cfg.method)
    check = check_merge(model, adaptation, evaluator, trained) if adaptation.merges else None
    # prompt/prefix/adapters, full fine-tuning: as trained, nothing to fold in
    latency = check.latency_s if check is not None else evaluator.latency(model)
    adapter_bytes, checkpoint_bytes = export(cfg, model, tokenizer, out)
    per_param = None
    if bases.quantized_modules(model):
        from lora_lab.quant import frozen_bytes

        nbytes, n = frozen_bytes(model)
        per_param = nbytes / n
    return Ending(check, latency, adapter_bytes, checkpoint_bytes, per_param)


# ----------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class RunRole:
    """Who a run is (records.Identity's kind, name, study and trial) and the overrides that made it (the settings a
    person chose, records.Settings). build() gives it to the Session, so the run knows who it is from the start; the
    default is a plain run."""

    kind: str = "run"  # run, trial or compare
    name: Optional[str] = None  # None: tracking.run_name, else <method>-<model>-<data>
    study: str = ""
    trial: Optional[int] = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))


def identity_of(cfg: Config, role: RunRole, device: torch.device, output_dir: Path) -> Identity:
    """The run's identity record (records.Identity)."""
    name = role.name or cfg.tracking.run_name or f"{cfg.method}-{Path(cfg.model.name).name}-{cfg.data.name}"
    return Identity(
        kind=role.kind,
        name=name,
        study=role.study,
        trial=role.trial,
        model=cfg.model.name,
        data=cfg.data.name,
        device=str(device),
        output_dir=str(output_dir),
    )


# Overrides that say where or how to run, not what: never a run's settings.
NOT_SETTINGS = (
    "output_dir",
    "trainer.resume",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.checkpoint_every",
    "trainer.parallel",  # DDP or FSDP2: the same steps, spread differently
    "trainer.collective_timeout_s",
)


def settings_of(cfg: Config, overrides: list[str]) -> Settings:
    """The settings a person chose (records.Settings): the ones every run has, the method's own fields (its config
    group's, from lora_lab.adaptations; none for full fine-tuning and IA3) and every other override given, with the
    value it resolved to."""
    from dataclasses import is_dataclass

    from lora_lab.records import DEVICES_PARAM, SETTINGS_PARAMS

    own_group = adaptations.of(cfg.method).group
    own = {f"{own_group}.{k}": v for k, v in asdict(getattr(cfg, own_group)).items()} if own_group else {}
    others = adaptations.groups() - {own_group}
    common = set(SETTINGS_PARAMS.values()) | {DEVICES_PARAM}
    chosen: dict[str, Any] = {}
    for o in overrides:
        key, _, text = o.partition("=")
        key = key.lstrip("+~")
        if key in NOT_SETTINGS or key.startswith("tracking") or key in common or key in own:
            continue
        if key.split(".", 1)[0] in others:
            continue  # a run has no settings of other methods (full FT no LoRA's), whatever a study's overrides say
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        chosen[key] = text if is_dataclass(node) or node is None else node  # a config group: its option's name
    t = cfg.trainer
    # 6 significant digits: lr_mult x ref_lr carries float noise (10 x 3e-4 = 0.0030000000000000005), and runs at
    # "3e-3" must group as one LR wherever it came from; no LR grid is that fine.
    lr = float(f"{cfg.optim.peak_lr:.6g}")
    return Settings(
        method=cfg.method,
        model=cfg.model.name,
        data=cfg.data.name,
        seed=cfg.seed,
        lr=lr,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        max_steps=t.max_steps,
        max_length=cfg.data.max_length,
        precision=t.precision,
        device=t.device,
        devices=t.devices,
        method_fields=own,
        overrides=chosen,
    )


def assemble_record(
    trained: Trained,
    ending: Ending,
    *,
    counts: lora.ParamCount,
    clock: Clock,
    setup_time_s: float,
    identity: Identity,
    settings: Settings,
) -> RunRecord:
    """The run's record from how the loop ended, how the run finished, and who and what it is."""
    status, evals = trained.status, trained.evals
    # A diverged run has no final loss: the last finite evaluation would read as a result.
    last = evals[-1] if evals and status == "completed" else {"val_loss": float("nan")}
    base = evals[0] if evals and evals[0]["step"] == 0 else {}
    check = ending.merge
    requant = None if check is None else check.requantized
    # The first step pays for allocations, kernel warm-up and compilation; the median keeps a later recompile
    # (a new batch shape under trainer.compile) out of the typical step.
    steady = trained.step_times[1:] or trained.step_times
    return RunRecord(
        status=status,
        reason=trained.reason,
        steps=len(trained.history),
        val_loss=last["val_loss"],
        accuracy=last.get("accuracy"),
        base_val_loss=base.get("val_loss"),
        base_accuracy=base.get("accuracy"),
        merged_val_loss=None if check is None else check.val_loss,
        merged_accuracy=None if check is None else check.accuracy,
        max_abs_logit_diff=None if check is None else check.max_abs_logit_diff,
        merge_ok=None if check is None else check.ok,
        merge_tol=None if check is None else check.tol,
        requant_merged_val_loss=None if requant is None else requant.val_loss,
        requant_merged_accuracy=None if requant is None else requant.accuracy,
        requant_max_abs_logit_diff=None if requant is None else requant.max_abs_logit_diff,
        frozen_bytes_per_param=ending.frozen_bytes_per_param,
        trainable_params=counts.trainable,
        total_params=counts.total,
        adapter_bytes=ending.adapter_bytes,
        checkpoint_bytes=ending.checkpoint_bytes,
        peak_mem_bytes=trained.peak_mem_bytes,
        time_per_step_s=statistics.median(steady) if steady else 0.0,
        tokens_per_s=trained.tokens / max(clock.train_s, 1e-9),
        train_time_s=clock.train_s,
        eval_time_s=clock.eval_s,
        setup_time_s=setup_time_s,
        inference_latency_s=ending.latency_s,
        identity=identity,
        settings=settings,
        history=[build_record(TrainPoint, p, "history") for p in trained.history],
        evals=[build_record(EvalPoint, e, "evals") for e in evals],
    )


def write_metrics(record: RunRecord, out: Path) -> None:
    """The record as out/metrics.json (written atomically). On a full disk: a WriteError saying what the run
    kept (the old metrics.json stays whole where there was one)."""
    try:
        atomic_write_text(out / "metrics.json", json.dumps(record.to_json(), indent=2, default=float))
    except WriteError as exc:
        says = ["the previous metrics.json is unchanged"] if (out / "metrics.json").exists() else []
        kept = [name for name in ("config.yaml", "adapter", "merged", "checkpoints") if (out / name).exists()]
        if kept:
            says.append(f"kept in {out}: {', '.join(kept)}")
        raise WriteError(out / "metrics.json", exc.cause, "; ".join(says)) from None
