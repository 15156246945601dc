"""The best LoRA trial against full fine-tuning on the same data and steps: the comparison runs and their rows."""

from __future__ import annotations

import logging
import math
from typing import Optional

import optuna

from lora_lab import notes, tracking
from lora_lab.config import compose
from lora_lab.records import RecordError, RunRecord
from lora_lab.sweep import search
from lora_lab.sweep.objective import path_override
from lora_lab.sweep.study import Study
from lora_lab.train import RunRole, build, distributed, fit_tracked

log = logging.getLogger("lora_lab")


class ComparisonRows(list):
    """The comparison table's rows (dicts keyed by notes.COMPARE_COLUMNS, values formatted for people), carrying the
    comparison they come from (`.comparison`: its sentences, comparison.md)."""

    def __init__(self, comparison: notes.Comparison) -> None:
        super().__init__(comparison.rows())
        self.comparison = comparison


def compare_with_full(st: Study, best: optuna.trial.FrozenTrial) -> ComparisonRows:
    """The best trial retrained from scratch (its own run, tagged 'compare') against full fine-tuning: a run per LR
    in full_lr_grid (or full_lr), the best of them kept. Runs already in the study folder are reused on a re-run. The
    chosen runs are marked in MLflow (tracking.mark_comparison) for the study's summary."""
    spec = st.spec
    lora_over = search.trial_overrides(best)
    lora_res = compare_run(st, f"rerun-trial-{best.number}", lora_over)
    grid = [spec.full_lr] if spec.full_lr else list(spec.full_lr_grid)
    full_res = []
    if st.base_cfg.model.quantize != "none":
        log.info("comparison: full fine-tuning trains the unquantized base (model.quantize=none)")
    for lr in grid:
        res = compare_run(st, f"full-ft-lr{lr:g}", [*full_settings(st), f"optim.lr={lr!r}", "optim.lr_mult=null"])
        if res is not None:
            full_res.append(res)
    completed = [r for r in full_res if r.status == "completed" and math.isfinite(r.val_loss)]
    comparison = notes.Comparison(
        best=lora_res if lora_res is not None and lora_res.status == "completed" else None,
        full=min(completed, key=lambda r: r.val_loss) if completed else None,
        trial=best.number,
        best_overrides=" ".join(lora_over),
        grid=grid,
    )
    if st.parent_run_id:
        tracking.mark_comparison(st.tracking, st.parent_run_id, comparison)
    return ComparisonRows(comparison)


def full_settings(st: Study) -> list[str]:
    """What makes a comparison run full fine-tuning: method=full; on the same model unquantized where the study's
    trials train a quantized base (full fine-tuning trains the base, which a 4- or 8-bit base cannot be, and QLoRA's
    own yardstick is 16-bit full fine-tuning); then sweep.full_overrides."""
    unquantized = ["model.quantize=none"] if st.base_cfg.model.quantize != "none" else []
    return ["method=full", *unquantized, *st.spec.full_overrides]


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
    argv = full + [path_override("output_dir", folder)]
    resolved, cfg = compose(argv)
    log.info("comparison run %s: %s", name, " ".join(overrides))
    try:
        role = RunRole(kind="compare", name=f"{st.spec.name}/{name}", study=st.spec.name, overrides=tuple(full))
        with distributed.group_for(cfg, argv, folder):  # over sweep.devices_per_trial devices, as the trials
            return fit_tracked(
                build(cfg, warm=st.warm, role=role),
                OmegaConf.to_container(resolved, resolve=True),
                parent_run_id=st.parent_run_id,
            )  # closes (frees) the session
    finally:
        if st.warm is not None:
            st.warm.give_back()
