"""The report's tables: each a function of the runs that returns rows and a caption naming the runs it came from."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from lora_lab import adaptations, shapes
from lora_lab.config import TinyModelConfig
from lora_lab.report.groups import (
    best_lr,
    best_replicated,
    comparison_study,
    lr_analysis,
    lr_points,
    replicates,
)
from lora_lab.report.published import (
    HU,
    PUBLISHED_METHODS,
    PUBLISHED_PARAMS,
    PUBLISHED_PARAMS_NO_HEAD,
    PUBLISHED_PRECISION,
    PUBLISHED_RANKS,
    PUBLISHED_TARGETS,
    PUBLISHED_TARGETS_WR,
    QLORA,
    WR,
)
from lora_lab.report.runs import FULL_FT, OK_STATE, ReportError, Run, ok_runs

# The methods table's rows in order: LoRA's variants, full FT, then the comparison methods by their paper labels.
METHOD_ORDER = (
    *("LoRA", "rsLoRA", "LoRA+", "DoRA", "PiSSA", "OLoRA", FULL_FT),
    *("BitFit", "IA3", "AdapterH", "AdapterL", "PreEmbed", "PreLayer"),
)
TABLES = ("methods", "targets", "ranks", "lr", "capacity", "batch", "params", "compute", "merge", "precision")
QUANTIZE_ORDER = ("none", "int8", "nf4", "fp4")  # the base precision table's rows: 16-bit first, then by bits


@dataclass
class Table:
    """One table: its file name, title, caption, columns (key, header, format) and rows (dicts by key)."""

    name: str
    title: str
    caption: str
    columns: list[tuple[str, str, str]]  # (key, header, format)
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    csv_columns: Optional[list[tuple[str, str, str]]] = None  # the CSV's, where it has more than the columns


def _source(runs: list[Run]) -> str:
    """Which runs a table came from: studies and run counts."""
    by: dict[str, int] = {}
    for r in runs:
        by[r.study or "(no study)"] = by.get(r.study or "(no study)", 0) + 1
    parts = ", ".join(f"`{s}` ({n} run{'s' if n != 1 else ''})" for s, n in sorted(by.items()))
    return f"From {len(runs)} MLflow run{'s' if len(runs) != 1 else ''}: {parts}." if runs else "No runs."


def _mean_sd(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(mean: float, sd: Optional[float], n: int) -> str:
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f} (n={n})"


def fmt_lr(v: Optional[float]) -> str:
    """An LR as the tables and plot labels write it: 3e-4, 1e-2 ("-" for none)."""
    return "-" if v is None else f"{v:.0e}".replace("e-0", "e-")


def _spread(vals: list[float], sd: Optional[float]) -> str:
    return "1 seed" if sd is None else f"± {sd:.4f} sd, {len(vals)} seeds [{min(vals):.4f}, {max(vals):.4f}]"


def table_methods(runs: list[Run]) -> Table:
    """Hu et al. Tables 2-4: each method at its best configuration (lowest mean final val loss over its seeds)."""
    used, rows = [], []
    ok = ok_runs(runs)
    others = sorted({r.variant for r in ok} - set(METHOD_ORDER))  # combinations such as DoRA+rsLoRA
    # Beside the comparison methods, LoRA gets a row per target set and rank, as Hu et al. list it at several budgets.
    paper = comparison_study(ok)
    for variant in (*METHOD_ORDER, *others):
        cands = [r for r in ok if r.variant == variant]
        if not cands:
            continue
        used += cands
        budgets: dict[tuple, list[Run]] = {}
        for r in cands:
            budgets.setdefault((r.targets, r.r) if paper and r.adaptation is adaptations.LORA else (), []).append(r)
        for budget, rs in sorted(budgets.items(), key=lambda kv: min(r.trainable for r in kv[1])):
            group = best_replicated(replicates(rs))
            b, vals = group[0], [r.val_loss for r in group]
            sd = statistics.stdev(vals) if len(vals) > 1 else None
            f = b.rec
            size = f.checkpoint_bytes if b.adaptation.trains_all else f.adapter_bytes  # all weights: no adapter
            accs = [r.rec.accuracy for r in group]
            lat = [r.rec.inference_latency_s for r in group if r.rec.inference_latency_s is not None]
            label = variant + (" (best)" if variant == "LoRA" else "")
            if budget:
                label = f"{variant} {budget[0]} r={budget[1]}"
            rows.append(
                {
                    "method": label,
                    "trainable_params": b.trainable,
                    "val_loss": statistics.fmean(vals),
                    "val_sd": sd,
                    "spread": _spread(vals, sd),
                    "accuracy": None if None in accs else statistics.fmean(accs),
                    "peak_mem_mib": max(r.rec.peak_mem_bytes for r in group) / 2**20,
                    "time_per_step_s": statistics.median(r.rec.time_per_step_s for r in group),
                    "size_mib": None if size is None else size / 2**20,
                    "settings": _settings(b),
                    "run": b.run_id[:8],
                    "published": PUBLISHED_METHODS.get(
                        variant, "not in Hu et al.; no same-quantity number in ANCHORS.md"
                    ),
                    "latency_ms": 1000 * statistics.median(lat) if lat else None,
                }
            )
    cols = [
        ("method", "method", ""),
        ("trainable_params", "# trainable params", "{:,}"),
        ("val_loss", "val loss", "{:.4f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("peak_mem_mib", "peak memory (MiB)", "{:.0f}"),
        ("time_per_step_s", "time/step (s)", "{:.2f}"),
        ("size_mib", "adapter / checkpoint (MiB)", "{:.2f}"),
        ("settings", "settings", ""),
        ("run", "run", ""),
        ("published", "published (other model and task; source)", ""),
    ]
    replicated = any(r["val_sd"] is not None for r in rows)  # seeds replicate configurations: means and spread
    rule = (
        "each method at its best configuration: the lowest mean final val loss over seeds among its configurations "
        "run with the most seeds (single-seed search points do not compete with replicated means: they would win on "
        "a lucky seed); val loss and accuracy are means over those seeds, time/step and latency medians, the run "
        "column is the first seed's"
        if replicated
        else "the best run (lowest final val loss) of each method found"
    )
    cap = (
        f"Method comparison in the style of Hu et al. Tables 2-4: {rule}; size is the adapter for LoRA variants and "
        f"all weights for full FT; peak memory is the process's peak RSS on CPU. Methods with no run are left out. "
        f"{_source(used)}"
    )
    if replicated:
        cols.insert(3, ("spread", "spread over seeds", ""))
    if paper:  # the comparison methods' study: their inference cost too
        cols.insert(
            cols.index(("size_mib", "adapter / checkpoint (MiB)", "{:.2f}")),
            ("latency_ms", "inference latency (ms)", "{:.1f}"),
        )
        cap += (
            " Inference latency: median forward over one evaluation batch after training, merged where the method "
            "merges (LoRA, IA3; BitFit's biases are the model's own), as trained otherwise (adapters, PreEmbed, "
            "PreLayer add computation). LoRA has a row per target set and rank."
        )
    return Table("methods", "Method comparison", cap, cols, rows)


def _settings(r: Run) -> str:
    """The methods table's settings cell: the method's key settings, the LR and the batch size."""
    if r.adaptation is adaptations.LORA:  # the target set in the table's short names, then rank and alpha
        bits = [f"{r.targets}", f"r={r.r}", f"alpha={r.p('lora.alpha')}"]
    else:  # an adapter's placement is its label's already (AdapterH / AdapterL)
        bits = [b for b in r.adaptation.key_settings(r.p) if not b.startswith("placement=")]
    bits.append(f"lr={fmt_lr(r.lr)}")
    if r.batch:
        bits.append(f"bs={r.batch}")
    return " ".join(bits)


def _varying_studies(
    runs: list[Run], attr: Callable[[Run], Any], fixed: Optional[Callable[[Run], Any]] = None, fallback_all: bool = True
) -> list[Run]:
    """LoRA runs of the studies in which `attr` takes two or more values (and `fixed`, if given, only one); falls
    back to dropping the `fixed` condition, then to all LoRA runs."""
    lora = [r for r in ok_runs(runs) if r.adaptation is adaptations.LORA]
    by: dict[str, list[Run]] = {}
    for r in lora:
        by.setdefault(r.study, []).append(r)
    varying = {s: rs for s, rs in by.items() if len({attr(x) for x in rs}) >= 2}
    strict = [r for rs in varying.values() if fixed is None or len({fixed(x) for x in rs}) == 1 for r in rs]
    return strict or [r for rs in varying.values() for r in rs] or (lora if fallback_all else [])


def table_targets(runs: list[Run]) -> Table:
    """Hu et al. Table 5 / Without Regret finding 4: target sets (at matched trainable parameters where the study
    chose ranks for it), each at its best LR; seeds averaged."""
    sel = _varying_studies(runs, lambda r: r.targets, fallback_all=False)  # no study compared target sets: no rows
    groups: dict[tuple, list[Run]] = {}
    for r in sel:
        groups.setdefault((r.targets, r.r), []).append(r)
    rows = []
    for (targets, r), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lr, _ = best_lr(rs)
        at = [x.val_loss for x in rs if x.lr == lr]
        mean, sd = _mean_sd(at)
        pub = PUBLISHED_TARGETS.get(targets)
        rows.append(
            {
                "targets": targets,
                "r": r,
                "trainable_params": rs[0].trainable,
                "best_lr": lr,
                "val_loss": mean,
                "val_loss_sd": sd,
                "n_seeds": len(at),
                "val_loss_text": _pm(mean, sd, len(at)),
                "best_single": min(x.val_loss for x in rs),
                "n_runs": len(rs),
                "published_hu": f"{pub} [{HU} Table 5, GPT-3 WikiSQL/MNLI acc %]" if pub else "-",
                "published_wr": PUBLISHED_TARGETS_WR.get(targets, "-"),
            }
        )
    cols = [
        ("targets", "weights adapted", ""),
        ("r", "r", ""),
        ("trainable_params", "# trainable params", "{:,}"),
        ("best_lr", "best LR", "{:.0e}"),
        ("val_loss_text", "val loss at best LR (mean ± sd over seeds)", ""),
        ("best_single", "best single run", "{:.4f}"),
        ("n_runs", "runs", ""),
        ("published_hu", "published (Hu et al. Table 5)", ""),
        ("published_wr", f"published ({WR}, finding 4)", ""),
    ]
    cap = (
        f"Which weights to adapt (Hu et al. Table 5 style): each target set with the rank its study gave it, at its "
        f"best LR; where seeds were replicated the val loss is their mean ± sd. Published columns are a different "
        f"model, task and metric (accuracy, higher is better; ours is val loss, lower is better). {_source(sel)}"
    )
    return Table("targets", "Which weights at a matched budget", cap, cols, rows)


def table_ranks(runs: list[Run]) -> Table:
    """Hu et al. Table 6: target set x rank, each cell the best final val loss over the LRs tried."""
    sel = _varying_studies(runs, lambda r: r.r, fixed=lambda r: r.targets)
    ranks = sorted({r.r for r in sel if r.r is not None})
    by: dict[str, dict[int, list[Run]]] = {}
    for r in sel:
        by.setdefault(r.targets, {}).setdefault(r.r, []).append(r)
    rows = []
    for targets, cells in sorted(by.items()):
        row: dict[str, Any] = {"targets": targets}
        for k in ranks:
            if k in cells:
                lr, loss = best_lr(cells[k])
                row[f"r{k}"], row[f"r{k}_lr"], row[f"r{k}_params"] = loss, lr, cells[k][0].trainable
        rows.append(row)
    for targets, pub in PUBLISHED_RANKS.items():
        row = {"targets": f"published: {targets} (WikiSQL acc %, GPT-3; {HU} Table 6)"}
        row.update({f"r{k}": f"{pub[k]:.1f}" for k in ranks if k in pub})
        if any(f"r{k}" in row for k in ranks):
            rows.append(row)
    cols = [("targets", "weights adapted", "")]
    for k in ranks:
        cols.append((f"r{k}", f"r={k}", "{:.4f}"))
    cap = (
        f"Rank ablation (Hu et al. Table 6 style): best final val loss over the LRs tried for each target set and "
        f"rank (the CSV also has the best LR and trainable parameters per cell). Published rows are WikiSQL accuracy "
        f"(higher is better) on GPT-3, shown for the ranks we ran. {_source(sel)}"
    )
    csv_cols = (
        cols
        + [(f"r{k}_lr", f"r={k} best LR", "") for k in ranks]
        + [(f"r{k}_params", f"r={k} params", "") for k in ranks]
    )
    return Table("ranks", "Rank ablation", cap, cols, rows, csv_columns=csv_cols)


def table_lr(runs: list[Run]) -> Table:
    """LR sweep: final val loss vs LR per rank and for full FT, the best LR of each, and the LoRA / full-FT ratio."""
    a = lr_analysis(runs)
    rows, used = [], []
    for label, rs in a["curves"].items():
        used += rs
        pts = lr_points(rs)
        lr, loss = a["best"][label]
        grid = sorted(pts)
        edge = lr in (grid[0], grid[-1])
        ratio = lr / a["full_lr"] if a["full_lr"] and rs[0].adaptation is not adaptations.FULL else None
        rows.append(
            {
                "curve": label,
                "lrs": " ".join(fmt_lr(x) for x in grid),
                "losses": " ".join(f"{statistics.fmean(pts[x]):.3f}" for x in grid),
                "best_lr": lr,
                "best_val_loss": loss,
                "edge": "yes (U not bracketed)" if edge else "no",
                "ratio_to_full": ratio,
                "published": ("~10x (fitted 9.8x; ~15x under ~100 steps) [" + WR + ", finding 2]") if ratio else "-",
            }
        )
    if a["spread"] is not None:
        rows.append(
            {
                "curve": "spread of best LoRA LR across ranks (max/min)",
                "ratio_to_full": a["spread"],
                "lrs": "over: " + ", ".join(lbl for lbl in a["rank_curves"] if lbl != a["full_label"]),
                "published": f"< 2x between r=4 and r=512 with alpha/r scaling [{WR}, finding 3]",
            }
        )
    cols = [
        ("curve", "curve", ""),
        ("lrs", "LRs tried", ""),
        ("losses", "final val loss at each LR", ""),
        ("best_lr", "best LR", "{:.0e}"),
        ("best_val_loss", "best val loss", "{:.4f}"),
        ("edge", "best at grid edge", ""),
        ("ratio_to_full", "best LR / best full-FT LR", "{:.1f}x"),
        ("published", "published (source)", ""),
    ]
    cap = (
        f"LR sweeps: final val loss at each LR (mean over seeds) for each LoRA rank and full fine-tuning, the best LR "
        f"(argmin on the grid, so its resolution is the grid step), and the ratio of each best LoRA LR to the best "
        f"full-FT LR beside the published ~10x. {_source(used)}"
    )
    return Table("lr", "Learning-rate U-curves", cap, cols, rows)


def table_capacity(runs: list[Run]) -> Table:
    """Without Regret finding 1: validation loss along training for each rank and full FT, each at its best LR."""
    a = lr_analysis(runs)
    rows, used = [], []
    steps = sorted({s for lbl in a["rank_curves"] for r in a["curves"][lbl] for s, _ in r.val_history})
    full_curve: dict[int, float] = {}
    for label in a["rank_curves"]:
        rs = a["curves"][label]
        lr = a["best"][label][0]
        at = [r for r in rs if r.lr == lr]
        used += at
        row: dict[str, Any] = {"curve": f"{label} (lr {fmt_lr(lr)})", "runs": len(at)}
        for step in steps:
            vals = [v for r in at for s, v in r.val_history if s == step]
            if vals:
                row[f"s{step}"] = statistics.fmean(vals)
        if label == a["full_label"]:  # the one full-FT curve of rank_curves
            full_curve = {st: row[f"s{st}"] for st in steps if f"s{st}" in row}
        rows.append(row)
    for label, row in zip(a["rank_curves"], rows):
        if full_curve and label != a["full_label"]:
            last = max((st for st in steps if f"s{st}" in row and st in full_curve), default=None)
            if last is not None:
                row["gap"] = row[f"s{last}"] - full_curve[last]
    cols = (
        [("curve", "curve (best LR)", "")]
        + [(f"s{st}", f"val loss @ step {st}", "{:.4f}") for st in steps]
        + [
            ("gap", "gap to full FT at the last step", "{:+.4f}"),
            ("runs", "runs", ""),
        ]
    )
    cap = (
        f"Capacity ({WR}, finding 1: high-rank LoRA and full FT follow the same loss curve; low ranks fall off it "
        f"after a number of steps that grows with rank): validation loss at each evaluation of the best-LR run(s) "
        f"of each curve (seeds averaged), and its gap to full FT at the last step. {_source(used)}"
    )
    return Table("capacity", "Capacity: loss along training", cap, cols, rows)


def table_batch(runs: list[Run]) -> Table:
    """Without Regret finding 5: final val loss by batch size for LoRA and full FT (same examples seen)."""
    by: dict[tuple, list[Run]] = {}
    for r in ok_runs(runs):
        by.setdefault((r.study, r.variant, r.targets, r.r), []).append(r)
    sel = [rs for rs in by.values() if len({r.batch for r in rs}) >= 2]
    cells: dict[int, dict[str, list[float]]] = {}
    used = []
    for rs in sel:
        used += rs
        for r in rs:
            label = FULL_FT if r.adaptation is adaptations.FULL else f"{r.variant} r={r.r}"
            cells.setdefault(r.batch, {}).setdefault(label, []).append(r.val_loss)
    labels = sorted({lbl for c in cells.values() for lbl in c}, key=lambda s: (s == FULL_FT, s))
    rows = []
    for b in sorted(cells):
        row: dict[str, Any] = {"batch": b, "steps": next((r.steps for r in used if r.batch == b), None)}
        for lbl in labels:
            if lbl in cells[b]:
                row[lbl] = statistics.fmean(cells[b][lbl])
        lora = [row[lbl] for lbl in labels if lbl != FULL_FT and lbl in row]
        if lora and FULL_FT in row:
            row["gap"] = min(lora) - row[FULL_FT]
        rows.append(row)
    cols = (
        [("batch", "batch size", ""), ("steps", "steps", "")]
        + [(lbl, f"{lbl} val loss", "{:.4f}") for lbl in labels]
        + [("gap", "LoRA - full FT", "{:+.4f}")]
    )
    cap = (
        f"Batch-size sensitivity ({WR}, finding 5: LoRA tolerates large batches worse than full FT, independent of "
        f"rank): final val loss after the same number of training examples at each batch size, each method at one "
        f"LR. {_source(used)}"
    )
    return Table("batch", "Batch size", cap, cols, rows)


def llama31_8b_config() -> Any:
    """Llama-3.1-8B's published shape (config.json), built in code: nothing is downloaded."""
    return shapes.shape_config("llama-8b")


def model_config(name: str, setting: Optional[Callable[[str], Any]] = None) -> Any:
    """A transformers config for a model we ran (its shape only, lora_lab.shapes); `setting` gives a run's setting
    by path (the tiny model's shape is its `model.tiny.*`). ReportError for a model whose shape is not known."""
    get = setting or (lambda path: None)
    default = TinyModelConfig()
    try:
        tiny = TinyModelConfig(**{k: int(get(f"model.tiny.{k}") or getattr(default, k)) for k in shapes.TINY_KEYS})
        return shapes.named_config(name, tiny)
    except ValueError as exc:
        raise ReportError(str(exc)) from exc


def lora_param_count(config: Any, targets: list[str], r: int, include_head: bool = False) -> int:
    """Trainable LoRA parameters for a model config, built on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_lab import lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora.apply_lora(model, r=r, alpha=32, targets=targets, include_head=include_head)
    return lora.count_parameters(model).lora


def table_params(runs: list[Run]) -> Table:
    """Parameter counts from model configs (meta device): Llama-3.1-8B's named configurations beside the published
    figures, and every (model, targets, r) we ran beside the count its runs logged."""
    rows = []
    cfg = llama31_8b_config()
    for (targets, r), pub in PUBLISHED_PARAMS.items():
        label = {"mlp": "MLP", "attn": "attention", "all-linear": "all linear"}[targets]
        without = lora_param_count(cfg, [targets], r)
        with_head = lora_param_count(cfg, [targets], r, include_head=True)
        rows.append(
            {
                "model": "Llama-3.1-8B",
                "config": f"{label} r={r}",
                "count_no_head": without,
                "count_head": with_head,
                "ours_b": f"{without / 1e9:.3f}B / {with_head / 1e9:.2f}B",
                "published_b": f"{PUBLISHED_PARAMS_NO_HEAD[(targets, r)] / 1e9:.3f}B / {pub / 1e9:.2f}B",
                "source": f"{WR} (with lm_head); ANCHORS.md (without)",
            }
        )
    smol = model_config("smollm2-135m-instruct")
    for targets, r in (("attn", 16), ("mlp", 10), ("all-linear", 6)):  # the matched budget of sweeps/wr_targets.yaml
        label = {"mlp": "MLP", "attn": "attention", "all-linear": "all linear"}[targets]
        rows.append(
            {
                "model": "SmolLM2-135M (config)",
                "config": f"{label} r={r}",
                "count_no_head": lora_param_count(smol, [targets], r),
                "source": "matched budget of sweeps/wr_targets.yaml",
            }
        )
    groups: dict[tuple, Run] = {}
    logged: dict[tuple, set] = {}
    for r in runs:
        if r.adaptation is adaptations.LORA and r.r and r.trainable:  # a run that failed before counting logged none
            k = (r.p("model.name"), tuple(r.p("lora.targets") or ()), r.r)
            groups.setdefault(k, r)
            logged.setdefault(k, set()).add(r.trainable)
    used = []
    for (model, targets, rank), r in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2])):
        try:
            mcfg = model_config(model or "", r.p)
        except ReportError:
            continue
        used.append(r)
        n = lora_param_count(mcfg, list(targets), rank)
        runs_n = sorted(logged[(model, targets, rank)])
        rows.append(
            {
                "model": model,
                "config": f"{r.targets} r={rank}",
                "count_no_head": n,
                "logged": ", ".join(f"{x:,}" for x in runs_n),
                "match": "yes" if runs_n == [n] else "NO",
                "source": "our runs (trainable_params)",
            }
        )
    cols = [
        ("model", "model", ""),
        ("config", "LoRA config", ""),
        ("count_no_head", "ours, without lm_head", "{:,}"),
        ("count_head", "ours, with lm_head (same r)", "{:,}"),
        ("ours_b", "ours without / with lm_head", ""),
        ("published_b", "published without / with lm_head", ""),
        ("logged", "logged by the runs", ""),
        ("match", "config count = logged", ""),
        ("source", "source", ""),
    ]
    cap = (
        "Trainable LoRA parameters computed from model configs on the meta device (lora_lab.lora.apply_lora + "
        "count_parameters; r (d_in + d_out) per adapted matrix). Llama-3.1-8B is built from its published dims "
        "(hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, untied lm_head); the published "
        f"figures count the lm_head adapted at the same r. Rows below compare each configuration we ran with the "
        f"count its runs logged. {_source(used) if used else ''}"
    )
    return Table("params", "Parameter counts", cap, cols, rows)


def table_compute(runs: list[Run]) -> Table:
    """Measured LoRA / full-FT time per step beside the FLOPs ratio theory gives (lora_lab.shapes.step_flops)."""
    ok = ok_runs(runs)
    rows, used = [], []
    fulls: dict[tuple, list[Run]] = {}
    for r in ok:
        if r.adaptation is adaptations.FULL and r.rec.time_per_step_s:
            fulls.setdefault((r.p("model.name"), r.batch, r.p("data.max_length")), []).append(r)
    loras: dict[tuple, list[Run]] = {}
    for r in ok:
        if r.adaptation is adaptations.LORA and r.rec.time_per_step_s:
            k = (r.p("model.name"), r.batch, r.p("data.max_length"))
            if k in fulls:
                loras.setdefault(k + (r.targets, r.r), []).append(r)
    for (model, batch, seq, targets, rank), rs in sorted(loras.items(), key=lambda kv: (str(kv[0][3]), kv[0][4] or 0)):
        fr = fulls[(model, batch, seq)]
        used += rs + [f for f in fr if f not in used]
        t_lora = statistics.median(x.rec.time_per_step_s for x in rs)
        t_full = statistics.median(x.rec.time_per_step_s for x in fr)
        theory = pub = None
        if targets == "all linear":
            with contextlib.suppress(ValueError, KeyError):  # ReportError too: a model whose shape is not known
                cfg = model_config(model or "", rs[0].p)
                theory = shapes.step_flops(cfg, batch, int(seq), rank) / shapes.step_flops(cfg, batch, int(seq), None)
            n = 4096
            pub = (2 * n * n + 6 * n * rank) / (3 * n * n)
        rows.append(
            {
                "model": model,
                "config": f"{targets} r={rank}",
                "batch_x_seq": f"{batch}x{seq}",
                "t_lora": t_lora,
                "t_full": t_full,
                "measured": t_lora / t_full,
                "theory": theory,
                "published": pub,
                "n": f"{len(rs)} / {len(fr)}",
            }
        )
    cols = [
        ("model", "model", ""),
        ("config", "LoRA config", ""),
        ("batch_x_seq", "batch x seq", ""),
        ("t_lora", "LoRA s/step (median)", "{:.2f}"),
        ("t_full", "full FT s/step (median)", "{:.2f}"),
        ("measured", "measured ratio", "{:.2f}"),
        ("theory", "FLOPs ratio, this model (theory)", "{:.3f}"),
        ("published", f"published per-matrix ratio at N=4096, same r [{WR}]", "{:.3f}"),
        ("n", "runs (LoRA / full)", ""),
    ]
    # The caption's text is pinned by tests/data/report_golden/compute.csv: lora_lab.bench re-exports step_flops.
    cap = (
        "Compute: measured LoRA / full-FT time per optimizer step (medians over runs of the same model, batch and "
        "sequence length) beside the matmul-FLOPs ratio of lora_lab.bench.step_flops for the same model and rank "
        "(all-linear LoRA only) and the published (2N^2 + 6NR) / 3N^2 at N=4096. On shared CPUs the measured times "
        f"carry the load of other processes. {_source(used)}"
    )
    return Table("compute", "Compute per step", cap, cols, rows)


def compute_precision(r: Run) -> str:
    """'bf16' or 'fp32': what the run computed in. trainer.device as set is often 'auto': the device the run
    resolved to decides what precision=auto meant."""
    prec = r.p("trainer.precision") or "auto"
    return "bf16" if prec == "bf16" or (prec == "auto" and r.rec.identity.device.startswith("cuda")) else "fp32"


def table_merge(runs: list[Run]) -> Table:
    """Merged vs unmerged LoRA: max |logit difference| and val-loss difference, per precision. A quantized base
    (model.quantize) has two rows: the merge into a dense copy of the dequantized base (what is served) and the
    merge into the quantized weights, re-quantized (peft's merge_and_unload on a 4-bit base)."""
    lora = [r for r in ok_runs(runs) if r.adaptation is adaptations.LORA and r.rec.max_abs_logit_diff is not None]
    by: dict[str, list[Run]] = {}
    requant: dict[str, list[Run]] = {}
    for r in lora:
        label = compute_precision(r)
        quantized = r.p("model.quantize") or "none"
        if quantized != "none":
            label = f"{label}, {quantized} base, dense merge"
            if r.rec.requant_max_abs_logit_diff is not None:
                requant.setdefault(label.replace("dense merge", "re-quantized merge"), []).append(r)
        by.setdefault(label, []).append(r)
    rows = []
    for label, rs in sorted({**by, **requant}.items()):
        again = label in requant
        diffs = [r.rec.requant_max_abs_logit_diff if again else r.rec.max_abs_logit_diff for r in rs]
        merged_loss = [r.rec.requant_merged_val_loss if again else r.rec.merged_val_loss for r in rs]
        dl = [abs(m - r.val_loss) for m, r in zip(merged_loss, rs) if m is not None]
        rows.append(
            {
                "precision": label,
                "runs": len(rs),
                "max_logit_diff": max(diffs),
                "median_logit_diff": statistics.median(diffs),
                "max_dloss": max(dl) if dl else None,
                "published": "loss 2.1178 -> 2.1214 after a bf16 merge (one user report, ANCHORS.md)"
                if label == "bf16"
                else "-",
            }
        )
    if "bf16" not in by:
        rows.append(
            {
                "precision": "bf16",
                "runs": 0,
                "published": "loss 2.1178 -> 2.1214 (+0.0036) after a bf16 merge "
                "(one user report, ANCHORS.md); not measured here: no GPU ran these runs",
            }
        )
    cols = [
        ("precision", "precision", ""),
        ("runs", "LoRA runs", ""),
        ("max_logit_diff", "max |logit diff|", "{:.2e}"),
        ("median_logit_diff", "median of per-run max |logit diff|", "{:.2e}"),
        ("max_dloss", "max |merged - unmerged val loss|", "{:.2e}"),
        ("published", "published (source)", ""),
    ]
    cap = (
        "Merged vs unmerged: each LoRA run compares its first validation batch's logits before and after folding "
        "the adapter into the weights (merge in fp32 math) and re-evaluates the merged model. "
        + (
            "A quantized base (model.quantize) is merged twice: into a dense copy of the dequantized base (what is "
            "served) and into the quantized weights, re-quantized (as peft's merge_and_unload on a 4-bit base). "
            if requant
            else ""
        )
        + _source(lora)
    )
    return Table("merge", "Merged vs unmerged", cap, cols, rows)


def table_precision(runs: list[Run]) -> Table:
    """QLoRA's comparison: LoRA on a 16-bit (here: the run's dtype), int8, NF4 and FP4 frozen base (model.quantize),
    each at its best LR (lowest mean final val loss over its seeds), with what the base costs and how its merges
    fare. Only precisions with runs get a row, plus 16-bit's published row."""
    lora = [r for r in ok_runs(runs) if r.adaptation is adaptations.LORA]
    by: dict[str, list[Run]] = {}
    for r in lora:
        by.setdefault(r.p("model.quantize") or "none", []).append(r)
    rows, used = [], []
    best16: Optional[float] = None
    for how in sorted(by, key=lambda h: (QUANTIZE_ORDER.index(h) if h in QUANTIZE_ORDER else len(QUANTIZE_ORDER), h)):
        rs = by[how]
        lr, _ = best_lr(rs)
        at = [r for r in rs if r.lr == lr]
        used += at
        loss, sd = _mean_sd([r.val_loss for r in at])
        if how == "none":
            best16 = loss
        acc = [r.rec.accuracy for r in at if r.rec.accuracy is not None]
        dense = [r.rec.max_abs_logit_diff for r in at if r.rec.max_abs_logit_diff is not None]
        requant = [r.rec.requant_max_abs_logit_diff for r in at if r.rec.requant_max_abs_logit_diff is not None]
        frozen = [
            r.rec.frozen_bytes_per_param
            if r.rec.frozen_bytes_per_param is not None
            else (2.0 if compute_precision(r) == "bf16" or r.p("model.dtype") == "bfloat16" else 4.0)
            for r in at
        ]
        rows.append(
            {
                "base": "16-bit (" + compute_precision(at[0]) + ")" if how == "none" else how,
                "runs": f"{len(at)} of {len(rs)}",
                "lr": fmt_lr(lr),
                "val_loss": _pm(loss, sd, len(at)),
                "vs_16bit": None if best16 is None or how == "none" else loss - best16,
                "accuracy": statistics.fmean(acc) if acc else None,
                "frozen": statistics.fmean(frozen),
                "peak_mib": statistics.median(r.rec.peak_mem_bytes for r in at) / 2**20,
                "step_s": statistics.median(r.rec.time_per_step_s for r in at),
                "merge": (f"{max(dense):.1e}" if dense else "-") + (f" / {max(requant):.1e}" if requant else ""),
                "published": PUBLISHED_PRECISION.get(how, "-"),
            }
        )
    cols = [
        ("base", "frozen base", ""),
        ("runs", "runs at best LR (of all)", ""),
        ("lr", "best LR", ""),
        ("val_loss", "val loss", ""),
        ("vs_16bit", "- 16-bit (nats)", "{:+.4f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("frozen", "frozen B/param", "{:.3f}"),
        ("peak_mib", "peak MiB (median)", "{:.0f}"),
        ("step_s", "s/step (median)", "{:.3f}"),
        ("merge", "merge max |logit diff| (dense / re-quantized)", ""),
        ("published", "published (source)", ""),
    ]
    cap = (
        "Base precision: LoRA on a frozen base stored in 16 bits (the run's dtype), int8 (LLM.int8), NF4 or FP4 "
        "(bitsandbytes, double quantization, blocks of 64), each at its best LR (lowest mean final val loss over its "
        "seeds); '- 16-bit' is its val loss minus 16-bit's. Frozen B/param is measured from the tensors of the "
        "quantized linears (embeddings, norms and the head stay in the run's dtype); peak memory is the CUDA "
        "allocator's peak or, on the CPU, the process's RSS. The merge column: the adapter folded into a dense copy "
        "of the dequantized base (what is served), and into the quantized weights, re-quantized (peft's "
        f"merge_and_unload on a 4-bit base). Published: {QLORA}, on LLaMA (MMLU, perplexity), not this task. "
        + _source(used)
    )
    return Table("precision", "Base precision (QLoRA)", cap, cols, rows)


def table_left_out(runs: list[Run]) -> Table:
    """The runs the tables leave out (pruned, failed, or without a final val loss), each with its state and why."""
    left = sorted(
        (r for r in runs if not r.ok),
        key=lambda r: (r.study, -1 if r.rec.identity.trial is None else r.rec.identity.trial, r.name),
    )
    rows = [
        {
            "run": r.name,
            "state": r.state,
            "steps": r.rec.steps,
            "reason": r.rec.reason or ("no finite final val loss" if r.state == OK_STATE else ""),
            "settings": _settings(r),
            "id": r.run_id[:8],
        }
        for r in left
    ]
    cols = [
        ("run", "run", ""),
        ("state", "state", ""),
        ("steps", "steps done", ""),
        ("reason", "reason", ""),
        ("settings", "settings", ""),
        ("id", "MLflow run", ""),
    ]
    cap = (
        "Runs the tables leave out: pruned and failed runs (and any without a finite final val loss), with the "
        f"reason each ended; no table above uses them. {_source(left)}"
    )
    return Table("left_out", "Runs left out", cap, cols, rows)


TABLE_FUNCS: dict[str, Callable[[list[Run]], Table]] = {
    "methods": table_methods,
    "targets": table_targets,
    "ranks": table_ranks,
    "lr": table_lr,
    "capacity": table_capacity,
    "batch": table_batch,
    "params": table_params,
    "compute": table_compute,
    "merge": table_merge,
    "precision": table_precision,
}


def build_tables(runs: list[Run], names: Iterable[str]) -> list[Table]:
    """The tables `names` (TABLES entries) of the runs."""
    return [TABLE_FUNCS[n](runs) for n in names]
