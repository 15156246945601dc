"""Plots shared by runs, sweeps and reports (matplotlib, headless). Each writes a PNG atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from lora_lab.files import atomic_write  # noqa: E402


def save(fig: Any, path: Path) -> Path:
    """Render a figure to PNG bytes, write them atomically (`files.atomic_write`) and close the figure."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def loss_curve(
    curves: dict[str, tuple[Sequence[dict], Sequence[dict]]], path: Path, title: str = "", log_steps: bool = False
) -> Path:
    """Training loss per step (thin) and validation loss per evaluation (markers) for each labelled run: curves map
    a label to (records.TrainPoint list, records.EvalPoint list)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, (history, evals)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if history:
            ax.plot(
                [p.step for p in history],
                [p.train_loss for p in history],
                color=color,
                alpha=0.45,
                linewidth=1,
                label=f"{label} train",
            )
        if evals:
            ax.plot(
                [e.step for e in evals],
                [e.val_loss for e in evals],
                color=color,
                marker="o",
                linewidth=2,
                label=f"{label} val",
            )
    if log_steps:
        ax.set_xscale("log")
    ax.set_xlabel("optimizer step" + (" (log scale)" if log_steps else ""))
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def lr_curves(
    series: dict[str, Iterable[tuple[float, float]]],
    path: Path,
    title: str = "",
    ylabel: str = "final validation loss (nats per token)",
    best: Optional[dict[str, float]] = None,
) -> Path:
    """The LR U-curves: final loss against learning rate (log scale), one line per rank or method."""
    series = {k: list(v) for k, v in series.items()}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, points) in enumerate(series.items()):
        pts = sorted(points)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i % 10}", label=label)
        if best and label in best:
            y = min(p[1] for p in pts)
            ax.scatter([best[label]], [y], s=120, facecolors="none", edgecolors=f"C{i % 10}", linewidths=2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ys = [p[1] for pts in series.values() for p in pts if p[1] > 0]
    if ys and max(ys) / min(ys) > 4:  # a diverged LR (loss 4 vs 0.4) would flatten every other curve: log scale
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def scatter(
    points: dict[str, Sequence[tuple[float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    front: Optional[Sequence[tuple[float, float]]] = None,
) -> Path:
    """Labelled point clouds, e.g. val loss against trainable parameters, with an optional Pareto front."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, pts) in enumerate(points.items()):
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", label=label, alpha=0.8)
    if front:
        f = sorted(front)
        ax.plot([p[0] for p in f], [p[1] for p in f], color="black", linestyle="--", label="Pareto front")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + (" (log scale)" if logx else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def budget_points(
    points: dict[str, tuple[float, float, Optional[float]]], path: Path, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """One labelled point per method at (trainable parameters, mean loss), with its spread over seeds as an error
    bar where there is one: Hu et al.'s methods at their budgets, at a glance."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (label, (x, y, err)) in enumerate(points.items()):
        ax.errorbar([x], [y], yerr=None if err is None else [err], fmt="o", color=f"C{i % 10}", capsize=4, label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel + " (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)
