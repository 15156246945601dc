"""What a study reports: best.yaml, trials.csv, comparison.md, plots, and its summary numbers.

The numbers: the share of trial wall time outside training steps and evaluations, trials per hour and each device's
busy share (printed, and the parent MLflow run's metrics).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lora_lab import notes
from lora_lab.config import OptimConfig
from lora_lab.files import atomic_write_text
from lora_lab.markdown import Column, table
from lora_lab.records import Results, StudyThroughput
from lora_lab.sweep import search
from lora_lab.sweep.study import Study, best_trial
from lora_lab.sweep.trials import TrialAttrs

# The comparison table's columns (markdown.table: key, header, format), as printed and in MLflow.
COMPARE_COLUMNS: list[Column] = notes.COMPARE_COLUMNS


# trials.csv's attribute columns (TrialAttrs fields), after the trial's number, state, values and params.
CSV_ATTRS = (
    "trainable_params",
    "val_loss",
    "merged_val_loss",
    "accuracy",
    "time_per_step_s",
    "overhead_s",
    "fail_reason",
    "retried_because",
)


def write_outputs(st: Study, compare_rows: list[dict[str, Any]]) -> list[Path]:
    """best.yaml, trials.csv, comparison.md and plots into the study folder; returns the files written."""
    from lora_lab import plots

    study, out = st.study, st.dir
    files: list[Path] = []
    best = best_trial(study)
    if best is not None:
        overrides = list(st.base_overrides) + search.trial_overrides(best)
        doc = {
            "study": st.spec.name,
            "trial": best.number,
            "objectives": dict(zip(st.spec.objectives, best.values)),
            "overrides": overrides,
            "command": "python -m lora_lab.train " + " ".join(quote(o) for o in overrides),
        }
        atomic_write_text(out / "best.yaml", f"# {doc['command']}\n" + OmegaConf.to_yaml(OmegaConf.create(doc)))
        files.append(out / "best.yaml")
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["number", "state", *[f"value_{o}" for o in st.spec.objectives], "method", "lr"]
    w.writerow([*head, *keys, *CSV_ATTRS, "retry_of", "duration_s"])
    for t in trials:
        values = t.values or [None] * len(st.spec.objectives)
        dur = t.duration.total_seconds() if t.duration else None
        a = TrialAttrs.read(t)
        method, lr = ran_with(a)
        w.writerow(
            [
                t.number,
                t.state.name,
                *values,
                method,
                lr,
                *[t.params.get(k) for k in keys],
                *[getattr(a, k) for k in CSV_ATTRS],
                t.system_attrs.get("failed_trial"),
                dur,
            ]
        )
    atomic_write_text(out / "trials.csv", buf.getvalue())
    files.append(out / "trials.csv")
    if compare_rows:
        comparison = getattr(compare_rows, "comparison", None)
        md = comparison.markdown() if comparison is not None else table(compare_rows, COMPARE_COLUMNS)
        title = f"The best trial against full fine-tuning, study `{st.spec.name}` (same data and steps)"
        atomic_write_text(out / "comparison.md", f"{title}\n\n{md}\n")
        files.append(out / "comparison.md")
    files += study_plots(st, trials, plots)
    return files


def ran_with(attrs: TrialAttrs) -> tuple[Optional[str], Optional[float]]:
    """The method and the peak LR (optim.lr, or optim.lr_mult x optim.ref_lr) a trial ran with, from the config.yaml
    of its folder; (None, None) for a trial that stopped before writing one."""
    import yaml

    path = Path(attrs.output_dir) / "config.yaml" if attrs.output_dir else None
    if path is None or not path.is_file():
        return None, None
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        lr = OptimConfig(**cfg.get("optim", {})).peak_lr
    except (OSError, yaml.YAMLError, TypeError, ValueError):  # unreadable, or written by another version
        return None, None
    return cfg.get("method"), lr


def study_plots(st: Study, trials: list, plots: Any) -> list[Path]:
    """Optimization history, param importances, val loss vs LR per rank, Pareto front (multi-objective)."""
    import matplotlib.pyplot as plt

    out = st.dir / "plots"
    files = []
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return files
    first = st.spec.objectives[0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([t.number for t in done], [t.values[0] for t in done], label="complete")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [list(t.intermediate_values.values())[-1] for t in pruned],
            marker="x",
            color="gray",
            label="pruned (last report)",
        )
    running, best_so_far = math.inf, []
    sign = 1 if st.spec.directions[0] == "minimize" else -1
    for t in sorted(done, key=lambda t: t.number):
        running = min(running, sign * t.values[0])
        best_so_far.append((t.number, sign * running))
    ax.plot([b[0] for b in best_so_far], [b[1] for b in best_so_far], color="C3", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(first)
    ax.set_title(f"optimization history: {st.spec.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files.append(plots.save(fig, out / "optimization_history.png"))
    if len(done) >= 3 and len(st.spec.directions) == 1 and len({k for t in done for k in t.params}) >= 1:
        with contextlib.suppress(Exception):  # needs enough variety among the completed trials
            imp = optuna.importance.get_param_importances(st.study)
            fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(imp)))
            ax.barh(list(imp)[::-1], list(imp.values())[::-1])
            ax.set_xlabel("importance (fANOVA, share of variance)")
            ax.set_title(f"parameter importances: {st.spec.name}")
            files.append(plots.save(fig, out / "param_importances.png"))
    if any("optim.lr" in t.params for t in done):
        series: dict[str, list] = {}
        for t in done:
            if "optim.lr" in t.params:
                label = f"r={t.params.get('lora.r', 'fixed')}"
                series.setdefault(label, []).append((t.params["optim.lr"], t.values[0]))
        files.append(
            plots.lr_curves(
                series, out / "val_loss_vs_lr.png", title=f"{first} vs learning rate, per rank", ylabel=first
            )
        )
    if len(st.spec.objectives) > 1:
        pts = [(t.values[1], t.values[0]) for t in done]
        front = [(t.values[1], t.values[0]) for t in st.study.best_trials]
        files.append(
            plots.scatter(
                {"trials": pts},
                out / "pareto_front.png",
                xlabel=st.spec.objectives[1],
                ylabel=first,
                title=f"Pareto front: {st.spec.name}",
                logx=True,
                front=front,
            )
        )
    return files


def quote(arg: str) -> str:
    """A command-line argument as a shell reads it back (quoted when it holds spaces, brackets or globs)."""
    return f"'{arg}'" if any(c in arg for c in " []{}*?$") else arg


def overhead_share(study: optuna.Study) -> Optional[float]:
    """Share of the wall time of completed and pruned trials spent outside training steps and evaluations."""
    timed = [a for a in map(TrialAttrs.read, study.get_trials(deepcopy=False)) if a.overhead_s is not None]
    split = [a.require("overhead_s", "wall_s") for a in timed]
    wall = sum(w for _, w in split)
    return sum(o for o, _ in split) / wall if wall > 0 else None


def throughput(study: optuna.Study, phase: tuple[float, float]) -> Optional[StudyThroughput]:
    """Trials per hour and each device's busy share (time inside training steps and evaluations / wall time) over
    this invocation's trial phase `phase` (start, end; epoch seconds): the trials that started in it and finished.
    With several processes on one device (sweep.trials_per_device) a device's share sums theirs: it can pass 1.
    None when no trial ran."""
    start, end = phase
    wall = end - start
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ran = [
        t
        for t in study.get_trials(deepcopy=False, states=finished)
        if t.datetime_start is not None and t.datetime_start.timestamp() >= start - 1.0  # Optuna's clock: local time
    ]
    if not ran or wall <= 0:
        return None
    busy: dict[str, float] = {}
    for t in ran:
        a = TrialAttrs.read(t)
        device = a.device if a.device is not None else "unknown"
        busy[device] = busy.get(device, 0.0) + (a.train_time_s or 0.0) + (a.eval_time_s or 0.0)
    per_device = {d: b / wall for d, b in sorted(busy.items())}
    return StudyThroughput(
        trials=len(ran),
        wall_s=wall,
        trials_per_hour=3600.0 * len(ran) / wall,
        busy_share=sum(per_device.values()) / len(per_device),
        overhead_share=overhead_share(study),
        per_device=per_device,
    )


def throughput_metrics(rate: StudyThroughput) -> dict[str, float]:
    """The parent run's metrics of `rate`, by the names records.StudyThroughput gives them (one per device too, when
    there are several)."""
    import re
    from dataclasses import fields

    out = {}
    for f in fields(StudyThroughput):
        key, value = f.metadata.get("key"), getattr(rate, f.name)
        if key and value is not None:
            out[key] = float(value)
    if len(rate.per_device) > 1:
        key = StudyThroughput.__dataclass_fields__["busy_share"].metadata["key"]
        for device, share in rate.per_device.items():
            out[f"{key}/{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}"] = share
    return out


def throughput_line(rate: StudyThroughput) -> str:
    """The printed throughput: trials per hour and the devices' busy share."""
    devices = ", ".join(f"{d} {100 * s:.1f}%" for d, s in rate.per_device.items())
    return (
        f"throughput: {rate.trials_per_hour:.1f} trials/hour ({rate.trials} trials in {rate.wall_s:.0f} s); "
        f"device busy (inside training steps and evaluations): {100 * rate.busy_share:.1f}% of wall time"
        + (f" ({devices})" if len(rate.per_device) > 1 else f" ({next(iter(rate.per_device))})")
    )


def objective_metric(name: str) -> str:
    """The MLflow metric an objective is logged as in its trials (val_loss -> loss/val)."""
    return Results.metric(name)
