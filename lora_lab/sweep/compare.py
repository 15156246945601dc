"""The best LoRA trial against full fine-tuning on the same data and steps: the comparison runs and their rows."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import optuna

from lora_lab.config import compose
from lora_lab.records import RecordError, RunRecord
from lora_lab.sweep import search
from lora_lab.sweep.objective import path_override
from lora_lab.sweep.study import Study
from lora_lab.train import RunRole, build, fit_tracked

log = logging.getLogger("lora_lab")


def compare_with_full(st: Study, best: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """The comparison's rows: LoRA unmerged and merged, and the best full fine-tuning LR.

    The LoRA side is the best trial retrained from scratch (its own run, tagged 'compare'); the full-FT side is a run
    per LR in full_lr_grid (or full_lr), keeping the best. Runs already in the study folder are reused on a re-run.
    """
    spec = st.spec
    lora_over = search.trial_overrides(best)
    lora_res = compare_run(st, "lora-best", lora_over)
    full_res = []
    for lr in [spec.full_lr] if spec.full_lr else spec.full_lr_grid:
        res = compare_run(
            st, f"full-lr{lr:g}", ["method=full", f"optim.lr={lr!r}", "optim.lr_mult=null", *spec.full_overrides]
        )
        if res is not None:
            full_res.append((lr, res))
    rows = []
    if lora_res is not None and lora_res.status == "completed":
        rows.append(row("LoRA (unmerged)", lora_res, lora_res.val_loss, lora_res.accuracy, lora_over))
        rows.append(row("LoRA (merged)", lora_res, lora_res.merged_val_loss, lora_res.merged_accuracy, lora_over))
    completed = [(lr, r) for lr, r in full_res if r.status == "completed" and math.isfinite(r.val_loss)]
    if completed:
        lr, r = min(completed, key=lambda x: x[1].val_loss)
        rows.append(row("Full fine-tune", r, r.val_loss, r.accuracy, [f"optim.lr={lr:g}"]))
    return rows


def row(
    name: str, r: RunRecord, val_loss: Optional[float], acc: Optional[float], overrides: list[str]
) -> dict[str, Any]:
    """One row of the comparison table (outputs.COMPARE_COLUMNS)."""
    return {
        "method": name,
        "val_loss": val_loss,
        "accuracy": acc,
        "trainable_params": r.trainable_params,
        "peak_mem_mib": r.peak_mem_bytes / 2**20,
        "time_per_step_s": r.time_per_step_s,
        "checkpoint_mib": (r.checkpoint_bytes or 0) / 2**20,
        "settings": " ".join(overrides),
    }


def compare_run(st: Study, name: str, overrides: list[str]) -> Optional[RunRecord]:
    """One comparison run, reused on a re-run only if it ran with exactly these settings (its folder is named by a
    hash of them, so a new best trial or new base overrides get a fresh run)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    full = st.base_overrides + overrides + ["trainer.checkpoint_every=0"]
    folder = st.dir / "compare" / f"{name}-{hashlib.sha1(' '.join(full).encode()).hexdigest()[:8]}"
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            return RunRecord.from_json(json.loads(metrics.read_text()), where=str(metrics))
        except (RecordError, json.JSONDecodeError) as exc:  # another lora_lab version's file: run it again
            log.warning("comparison run %s: not reusing %s (%s)", name, metrics, exc)
    resolved, cfg = compose(full + [path_override("output_dir", folder)])
    log.info("comparison run %s: %s", name, " ".join(overrides))
    try:
        role = RunRole(kind="compare", name=f"{st.spec.name}/compare-{name}", study=st.spec.name, overrides=tuple(full))
        return fit_tracked(
            build(cfg, warm=st.warm, role=role),
            OmegaConf.to_container(resolved, resolve=True),
            parent_run_id=st.parent_run_id,
        )  # closes (frees) the session
    finally:
        if st.warm is not None:
            st.warm.give_back()
