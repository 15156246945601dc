"""The report's figures: which plots its runs give (LR U-curves, loss curves, the Pareto front, methods at budgets)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lora_lab import adaptations
from lora_lab.report.groups import comparison_study, lr_analysis, lr_points
from lora_lab.report.runs import Run, history, ok_runs
from lora_lab.report.tables import fmt_lr, table_methods


def make_plots(uri: str, runs: list[Run], out: Path) -> list[Path]:
    """The report's PNGs in `out`: LR U-curves, loss curves at the best LRs (read from MLflow at `uri`), val loss vs
    trainable parameters with its Pareto front, and the methods at their budgets (comparison studies)."""
    from lora_lab import plots  # matplotlib: only when a report draws (best-lr and table-only reports do not)

    files = []
    a = lr_analysis(runs)
    if a["curves"]:
        series = {
            lbl: [(lr, statistics.fmean(v)) for lr, v in lr_points(rs).items()] for lbl, rs in a["curves"].items()
        }
        files.append(
            plots.lr_curves(
                series,
                out / "lr_curves.png",
                best={k: v[0] for k, v in a["best"].items()},
                title="Final validation loss vs learning rate (circles: best LR per curve)",
            )
        )
        curves = {}
        for lbl in a["rank_curves"]:
            rs, lr = a["curves"][lbl], a["best"][lbl][0]
            best_run = min((r for r in rs if r.lr == lr), key=lambda r: r.val_loss)
            curves[f"{lbl} (lr {fmt_lr(lr)})"] = history(uri, best_run)
        if curves:
            files.append(
                plots.loss_curve(
                    curves,
                    out / "loss_curves.png",
                    log_steps=True,
                    title="Loss curves at each curve's best LR (train: thin, validation: markers)",
                )
            )
    ok = [r for r in ok_runs(runs) if r.trainable]
    if ok:
        pts: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            lora = r.adaptation is adaptations.LORA  # LoRA's points by target set too
            pts.setdefault(r.variant + (f" {r.targets}" if lora else ""), []).append((r.trainable, r.val_loss))
        front, best = [], math.inf
        for x, y in sorted(p for v in pts.values() for p in v):
            if y < best:
                front.append((x, y))
                best = y
        files.append(
            plots.scatter(
                pts,
                out / "pareto.png",
                xlabel="trainable parameters",
                logx=True,
                ylabel="final validation loss (nats per token)",
                front=front,
                title="Validation loss vs trainable parameters, every completed run",
            )
        )
    rows = table_methods(runs).rows if comparison_study(ok) else []
    if len(rows) >= 2:  # the comparison methods' study: each method at its budget, mean and spread over seeds
        points = {}
        for row in rows:
            points[row["method"]] = (row["trainable_params"], row["val_loss"], row["val_sd"])
        files.append(
            plots.budget_points(
                points,
                out / "methods.png",
                xlabel="trainable parameters",
                ylabel="final validation loss (nats per token)",
                title="Methods at their budgets (best configuration each; bars: 1 sd over seeds)",
            )
        )
    return files
