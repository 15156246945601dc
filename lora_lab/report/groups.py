"""Grouping runs for comparison: LR points and U-curves, replicated configurations (seeds), the best LR of each."""

from __future__ import annotations

import json
import statistics
from typing import Any, Iterable, Optional

from lora_lab import adaptations
from lora_lab.report.runs import Run, ok_runs


def lr_points(runs: list[Run]) -> dict[float, list[float]]:
    """LR -> final val losses (seeds replicate a point)."""
    pts: dict[float, list[float]] = {}
    for r in runs:
        if r.lr is not None:
            pts.setdefault(r.lr, []).append(r.val_loss)
    return pts


def best_lr(runs: list[Run]) -> tuple[Optional[float], Optional[float]]:
    """(LR, mean val loss) of the LR with the lowest mean final val loss over COMPLETE runs."""
    pts = lr_points(ok_runs(runs))
    if not pts:
        return None, None
    lr = min(pts, key=lambda k: (statistics.fmean(pts[k]), k))
    return lr, statistics.fmean(pts[lr])


def curve_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """LR U-curves: runs that differ only in LR and seed, labelled by what tells them apart
    ('full FT', 'LoRA r=8', 'LoRA r=8 attention', '... bs=16'). Groups with one LR are dropped."""

    def key(r: Run) -> tuple:
        return (r.adaptation, r.targets, r.r, r.variant, r.batch, r.steps, r.p("data.name"), r.p("model.name"))

    groups: dict[tuple, list[Run]] = {}
    for r in ok_runs(runs):
        groups.setdefault(key(r), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.lr for r in v}) >= 2}
    keys = list(groups)
    varies = [len({k[i] for k in keys}) > 1 for i in range(8)]
    lora = adaptations.LORA
    varies[1] = len({k[1] for k in keys if k[0] is lora}) > 1  # targets: among the LoRA curves only
    out = {}
    for k in sorted(keys, key=lambda k: (k[0] is not lora, str(k[1]), k[2] or 0, k[4] or 0, k[5] or 0)):
        if k[0] is lora:  # ranks and target sets are LoRA's
            label = k[3] + f" r={k[2]}" + (f" {k[1]}" if varies[1] else "")
        else:  # full FT and the comparison methods: their paper label (BitFit, IA3, AdapterH, PreEmbed, ...)
            label = k[3]
        if varies[4]:
            label += f" bs={k[4]}"
        if varies[5]:
            label += f" {k[5]} steps"
        if varies[6] or varies[7]:
            label += f" ({k[7]}, {k[6]})"
        out[label] = groups[k]
    return out


SEED_FREE = ("seed", "optim.lr", "optim.lr_mult", "optim.ref_lr")  # not part of a configuration: seed, LR spellings


def config_key(r: Run) -> tuple:
    """Everything a run was given except its seed (the LR as used, however it was spelled): runs with one key
    replicate one configuration."""
    s = r.rec.settings
    rest = {k: v for k, v in s.overrides.items() if k not in SEED_FREE}
    return (
        s.method,
        s.model,
        s.data,
        f"{s.lr:.6g}",
        s.batch_size,
        s.grad_accum,
        s.max_steps,
        s.max_length,
        s.precision,
        json.dumps(s.method_fields, sort_keys=True, default=str),
        json.dumps(rest, sort_keys=True, default=str),
    )


def replicates(runs: Iterable[Run]) -> list[list[Run]]:
    """COMPLETE runs grouped by configuration (`config_key`), one run per seed, in seed order. A seed run twice (the
    same configuration in two studies) counts once, by its lower val loss: reruns differ only by nondeterminism."""
    groups: dict[tuple, dict[int, Run]] = {}
    for r in ok_runs(runs):
        seeds = groups.setdefault(config_key(r), {})
        if r.seed not in seeds or r.val_loss < seeds[r.seed].val_loss:
            seeds[r.seed] = r
    return [[g[s] for s in sorted(g)] for g in groups.values()]


def best_replicated(groups: list[list[Run]]) -> list[Run]:
    """The group (one configuration, its seeds) with the lowest mean final val loss among the groups with the most
    seeds; ties go to the lower LR. Seeds are added where one seed's search found the best LR: a single-seed point of
    that search must not beat their mean, as the search's lucky seed otherwise would (winner's curse)."""
    most = max(len(g) for g in groups)
    return min((g for g in groups if len(g) == most), key=lambda g: (statistics.fmean(r.val_loss for r in g), g[0].lr))


def comparison_study(runs: Iterable[Run]) -> bool:
    """Whether the runs hold one of the methods LoRA is compared with (lora_lab.methods' comparison methods, the
    table rows with a `kind`): Hu et al.'s layout then."""
    return any(r.adaptation.kind is not None for r in ok_runs(runs))


def lr_analysis(runs: list[Run]) -> dict[str, Any]:
    """Best LR per U-curve, the LoRA / full-FT ratio and the spread of the best LoRA LR across ranks."""
    curves = curve_groups(runs)
    best = {label: best_lr(rs) for label, rs in curves.items()}
    full = [lbl for lbl, rs in curves.items() if rs[0].adaptation is adaptations.FULL]
    full_lr = best[full[0]][0] if full else None
    # The rank comparison: the target set (and batch, steps) with the most LoRA curves of different ranks.
    by_set: dict[tuple, list[str]] = {}
    for lbl, rs in curves.items():
        if rs[0].adaptation is adaptations.LORA:  # ranks are LoRA's; the comparison methods have U-curves, not ranks
            by_set.setdefault((rs[0].targets, rs[0].batch, rs[0].steps), []).append(lbl)
    rank_set = max(by_set.values(), key=len, default=[])
    lora_best = [best[lbl][0] for lbl in rank_set if best[lbl][0]]
    return {
        "curves": curves,
        "best": best,
        "full_label": full[0] if full else None,
        "full_lr": full_lr,
        "rank_curves": rank_set + full[:1],
        "spread": (max(lora_best) / min(lora_best)) if len(lora_best) >= 2 else None,
    }
