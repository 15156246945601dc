"""`python -m lora_lab.report [--study NAME ...] [--experiment NAME] [--tracking-uri URI] [--out DIR] [tables...]`

Paper-style tables (Markdown, LaTeX, CSV) and plots (PNG) from the MLflow runs of one or more studies, written into a
folder and attached to each study's MLflow parent run (under `report/`). Tables: methods, targets, ranks, lr,
capacity, batch, params, compute, merge (default: all). Each table is a small function of the runs that returns rows
and a caption naming the runs it came from; published numbers from ../shared/ANCHORS.md stand beside ours, labelled
with their source.

`python -m lora_lab.report best-lr --study NAME [--where KEY=VALUE]` prints the best peak LR of a study (argmin of the
final val loss over COMPLETE runs), for scripts such as scripts/reproduce.sh.

Exit codes: 0 written, 2 bad input (no tracking store, a named study or experiment without runs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from lora_lab import tracking
from lora_lab.files import atomic_write_text
from lora_lab.records import EvalPoint, RunRecord, TrainPoint, finite

TABLES = ("methods", "targets", "ranks", "lr", "capacity", "batch", "params", "compute", "merge")
OK_STATE = "COMPLETE"  # a run whose results the tables use

# Published numbers (../shared/ANCHORS.md), with their sources.
HU = "Hu et al. 2021 (arXiv 2106.09685)"
WR = "LoRA Without Regret (Schulman & Thinking Machines, 2025)"
PEFT = "PEFT method comparison, Llama-3.2-3B MetaMathQA->GSM8K, one seed"
PUBLISHED_PARAMS = {("mlp", 256): 0.49e9, ("attn", 256): 0.25e9, ("all-linear", 256): 0.70e9, ("mlp", 128): 0.24e9}
PUBLISHED_PARAMS_NO_HEAD = {
    ("mlp", 256): 0.453e9,
    ("attn", 256): 0.218e9,
    ("all-linear", 256): 0.671e9,
    ("mlp", 128): 0.226e9,
}
PUBLISHED_METHODS = {  # our method label -> what the papers report for it
    "LoRA": f"RoBERTa-base 0.3M params, GLUE avg 87.2; GPT-3 4.7M, WikiSQL 73.4 [{HU} Tables 2, 4]; "
    f"Llama-3.2-3B q,v r=32 9.2M, GSM8K 0.482, 22.3 GB, 1796 s [{PEFT}]",
    "rsLoRA": f"Llama-3.2-3B q,v r=64 18.4M, GSM8K 0.530 (0.489 without rsLoRA), 22.5 GB, 1871 s [{PEFT}]",
    "LoRA+": "B's LR ~16x A's [LoRA+ paper]; no same-quantity number in ANCHORS.md",
    "full FT": f"RoBERTa-base 125.0M, GLUE avg 86.4; GPT-3 175,255.8M, WikiSQL 73.8 [{HU} Tables 2, 4]; "
    f"Llama-3.2-3B 3.21B, GSM8K 0.500, 37.2 GB, 3111 s [{PEFT}]",
}
PUBLISHED_METHODS.update(  # Hu et al. Tables 2-4 (ANCHORS.md "Baselines beside LoRA"): the comparison methods
    {
        "BitFit": f"RoBERTa-base 0.1M, GLUE avg 85.2; GPT-3 14.2M, WikiSQL 71.3 / MNLI-m 91.0 [{HU} Tables 2, 4]",
        "IA3": "not in Hu et al.; no same-quantity number in ANCHORS.md",
        "AdapterH": f"RoBERTa-large 0.8M, GLUE avg 86.4; GPT-2 M 11.09M, E2E BLEU 67.3; GPT-3 7.1M, WikiSQL 71.9 "
        f"[{HU} Tables 2-4]",
        "AdapterL": f"GPT-2 M 0.37M, E2E BLEU 66.3; 11.09M, BLEU 68.9 [{HU} Table 3]",
        "PreEmbed": f"GPT-3 3.2M, WikiSQL 63.1 / MNLI-m 88.6 [{HU} Table 4]",
        "PreLayer": f"GPT-2 M 0.35M, E2E BLEU 69.7; GPT-3 20.2M, WikiSQL 70.1 / MNLI-m 89.5 [{HU} Tables 3, 4]",
    }
)
BASELINES = ("BitFit", "IA3", "AdapterH", "AdapterL", "PreEmbed", "PreLayer")  # methods.py's methods, by paper name
PUBLISHED_TARGETS = {  # Hu et al. Table 5, GPT-3 175B at 18M params: WikiSQL / MultiNLI accuracy (%)
    "Wq": "70.4 / 91.0 (r=8)",
    "Wk": "70.0 / 90.8 (r=8)",
    "Wv": "73.0 / 91.0 (r=8)",
    "Wo": "73.2 / 91.3 (r=8)",
    "Wq+Wk": "71.4 / 91.3 (r=4)",
    "Wq+Wv": "73.7 / 91.3 (r=4)",
    "attention": "73.7 / 91.7 (r=2)",
}
PUBLISHED_TARGETS_WR = {
    "attention": "underperforms MLP-only even at matched params (attn r=256 vs MLP r=128)",
    "MLP": "about as good as all layers",
    "all linear": "best or tied with MLP-only",
}
PUBLISHED_RANKS = {  # Hu et al. Table 6, WikiSQL accuracy (%) at r = 1, 2, 4, 8, 64
    "Wq": {1: 68.8, 2: 69.6, 4: 70.5, 8: 70.4, 64: 70.0},
    "Wq+Wv": {1: 73.4, 2: 73.3, 4: 73.7, 8: 73.8, 64: 73.5},
    "attention": {1: 74.1, 2: 73.7, 4: 74.0, 8: 74.0, 64: 73.9},
}
SHORT = {
    "q_proj": "Wq",
    "k_proj": "Wk",
    "v_proj": "Wv",
    "o_proj": "Wo",
    "attn": "attention",
    "mlp": "MLP",
    "all-linear": "all linear",
    "gate_proj": "Wgate",
    "up_proj": "Wup",
    "down_proj": "Wdown",
}


class ReportError(ValueError):
    """Bad input: no store, or a named study / experiment without runs."""


# ----------------------------------------------------------------------------------------------- runs


def _num(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


@dataclass
class Run:
    """One MLflow training run (a trial, a comparison or a plain run): its record, read back by tracking."""

    run_id: str
    parent: str
    state: str
    rec: RunRecord
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss) of every evaluation

    @classmethod
    def from_tracked(cls, t: tracking.TrackedRun) -> "Run":
        return cls(
            run_id=t.run_id,
            parent=t.parent_id,
            state=t.state,
            rec=t.record,
            val_history=[(e.step, e.val_loss) for e in t.record.evals],
        )

    @property
    def name(self) -> str:
        return self.rec.identity.name

    @property
    def study(self) -> str:
        return self.rec.identity.study

    @property
    def kind(self) -> str:
        return self.rec.identity.kind

    def p(self, path: str) -> Any:
        """A setting by config path (`lora.alpha`, `data.max_length`), typed; None when not set."""
        return self.rec.settings.get(path)

    @property
    def method(self) -> str:
        return self.rec.settings.method

    @property
    def r(self) -> Optional[int]:
        return int(self.p("lora.r")) if self.method == "lora" and self.p("lora.r") is not None else None

    @property
    def lr(self) -> float:
        """The peak LR the run used (records.Settings.lr)."""
        return self.rec.settings.lr

    @property
    def targets(self) -> Optional[str]:
        """'all linear', 'attention', 'MLP', 'Wq+Wv', ... (None for full fine-tuning)."""
        if self.method != "lora":
            return None
        names = list(self.p("lora.targets") or [])
        if self.p("lora.target_regex"):
            names.append(f"/{self.p('lora.target_regex')}/")
        return "+".join(SHORT.get(n, n) for n in names) or "?"

    @property
    def variant(self) -> str:
        """Method label for the method table: LoRA, rsLoRA, LoRA+, DoRA, PiSSA, OLoRA (combined: 'DoRA+rsLoRA') or
        full FT."""
        if self.method == "full":
            return "full FT"
        if self.method == "adapter":
            return "AdapterL" if self.p("adapter.placement") == "pfeiffer" else "AdapterH"
        if self.method != "lora":
            return {"bitfit": "BitFit", "ia3": "IA3", "prompt": "PreEmbed", "prefix": "PreLayer"}.get(
                self.method, self.method
            )
        parts = [
            {"dora": "DoRA"}.get(self.p("lora.variant") or "", ""),
            {"pissa": "PiSSA", "olora": "OLoRA"}.get(self.p("lora.init") or "", ""),
            "rsLoRA" if self.p("lora.rslora") is True else "",
            "LoRA+" if (self.p("lora.lr_ratio") or 1.0) != 1.0 else "",
        ]
        return "+".join(x for x in parts if x) or "LoRA"

    @property
    def batch(self) -> int:
        return self.rec.settings.batch

    @property
    def steps(self) -> int:
        return self.rec.settings.max_steps

    @property
    def seed(self) -> int:
        return self.rec.settings.seed

    @property
    def val_loss(self) -> Optional[float]:
        return self.rec.val_loss

    @property
    def ok(self) -> bool:
        return self.state == OK_STATE and finite(self.val_loss)

    @property
    def trainable(self) -> int:
        return self.rec.trainable_params


def load_runs(uri: str, experiment: Optional[str], studies: Optional[list[str]]) -> tuple[list[Run], list[str]]:
    """Training runs and study parent run ids of the selection; ReportError when a named selection has none."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ReportError(f"no MLflow store at {uri}; give --tracking-uri or set LORA_LAB_OUTPUTS")
    tracked, parents = tracking.read_runs(uri, experiment, studies or None)
    runs = [Run.from_tracked(t) for t in tracked]
    where = f" in experiment {experiment!r}" if experiment else ""
    if experiment and not runs and not parents:
        raise ReportError(f"experiment {experiment!r} has no runs at {uri}")
    for s in studies or []:
        if not any(r.study == s for r in runs):
            raise ReportError(f"study {s!r} has no runs{where} at {uri}")
    if not runs:
        raise ReportError(f"no runs at {uri}")
    return runs, parents


def ok_runs(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if r.ok]


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    name: str
    title: str
    caption: str
    columns: list[tuple[str, str, str]]  # (key, header, format)
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


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


def _fmt_lr(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0e}".replace("e-0", "e-")


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
        return (r.method, r.targets, r.r, r.variant, r.batch, r.steps, r.p("data.name"), r.p("model.name"))

    groups: dict[tuple, list[Run]] = {}
    for r in ok_runs(runs):
        groups.setdefault(key(r), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.lr for r in v}) >= 2}
    keys = list(groups)
    varies = [len({k[i] for k in keys}) > 1 for i in range(8)]
    varies[1] = len({k[1] for k in keys if k[0] == "lora"}) > 1  # targets: among the LoRA curves only
    out = {}
    for k in sorted(keys, key=lambda k: (k[0] != "lora", str(k[1]), k[2] or 0, k[4] or 0, k[5] or 0)):
        if k[0] == "full":
            label = "full FT"
        elif k[0] != "lora":  # the comparison methods: BitFit, IA3, adapters, PreEmbed, PreLayer
            label = k[3]
        else:
            label = ("LoRA" if k[3] == "LoRA" else k[3]) + f" r={k[2]}" + (f" {k[1]}" if varies[1] else "")
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


def _spread(vals: list[float], sd: Optional[float]) -> str:
    return "1 seed" if sd is None else f"± {sd:.4f} sd, {len(vals)} seeds [{min(vals):.4f}, {max(vals):.4f}]"


def comparison_study(runs: Iterable[Run]) -> bool:
    """Whether the runs hold one of the methods LoRA is compared with (methods.py's): Hu et al.'s layout then."""
    return any(r.variant in BASELINES for r in ok_runs(runs))


def table_methods(runs: list[Run]) -> Table:
    """Hu et al. Tables 2-4: each method at its best configuration (lowest mean final val loss over its seeds)."""
    used, rows = [], []
    known = ("LoRA", "rsLoRA", "LoRA+", "DoRA", "PiSSA", "OLoRA", "full FT", *BASELINES)
    ok = ok_runs(runs)
    others = sorted({r.variant for r in ok} - set(known))  # combinations such as DoRA+rsLoRA
    # Beside the comparison methods, LoRA gets a row per target set and rank, as Hu et al. list it at several budgets.
    paper = comparison_study(ok)
    for variant in (*known, *others):
        cands = [r for r in ok if r.variant == variant]
        if not cands:
            continue
        used += cands
        budgets: dict[tuple, list[Run]] = {}
        for r in cands:
            budgets.setdefault((r.targets, r.r) if paper and r.method == "lora" else (), []).append(r)
        for budget, rs in sorted(budgets.items(), key=lambda kv: min(r.trainable for r in kv[1])):
            group = best_replicated(replicates(rs))
            b, vals = group[0], [r.val_loss for r in group]
            sd = statistics.stdev(vals) if len(vals) > 1 else None
            f = b.rec
            size = f.checkpoint_bytes if b.method == "full" else f.adapter_bytes
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
    bits = [f"lr={_fmt_lr(r.lr)}"]
    if r.method == "lora":
        bits = [f"{r.targets}", f"r={r.r}", f"alpha={r.p('lora.alpha')}"] + bits
    elif r.method == "adapter":
        bits = [f"bottleneck={r.p('adapter.bottleneck')}"] + bits
    elif r.method in ("prompt", "prefix"):
        bits = [f"n_tokens={r.p(r.method + '.n_tokens')}"] + bits
    if r.batch:
        bits.append(f"bs={r.batch}")
    return " ".join(bits)


def _varying_studies(
    runs: list[Run], attr: Callable[[Run], Any], fixed: Optional[Callable[[Run], Any]] = None, fallback_all: bool = True
) -> list[Run]:
    """LoRA runs of the studies in which `attr` takes two or more values (and `fixed`, if given, only one); falls
    back to dropping the `fixed` condition, then to all LoRA runs."""
    lora = [r for r in ok_runs(runs) if r.method == "lora"]
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
    t = Table("ranks", "Rank ablation", cap, cols, rows)
    t.columns_csv = (
        cols
        + [(f"r{k}_lr", f"r={k} best LR", "") for k in ranks]
        + [(f"r{k}_params", f"r={k} params", "") for k in ranks]
    )
    return t


def lr_analysis(runs: list[Run]) -> dict[str, Any]:
    """Best LR per U-curve, the LoRA / full-FT ratio and the spread of the best LoRA LR across ranks."""
    curves = curve_groups(runs)
    best = {label: best_lr(rs) for label, rs in curves.items()}
    full = [lbl for lbl in curves if lbl.startswith("full FT")]
    full_lr = best[full[0]][0] if full else None
    # The rank comparison: the target set (and batch, steps) with the most LoRA curves of different ranks.
    by_set: dict[tuple, list[str]] = {}
    for lbl, rs in curves.items():
        if rs[0].method == "lora":  # ranks are LoRA's; the comparison methods have U-curves, not ranks
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
        ratio = lr / a["full_lr"] if a["full_lr"] and not label.startswith("full FT") else None
        rows.append(
            {
                "curve": label,
                "lrs": " ".join(_fmt_lr(x) for x in grid),
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
                "lrs": "over: " + ", ".join(lbl for lbl in a["rank_curves"] if not lbl.startswith("full FT")),
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
        row: dict[str, Any] = {"curve": f"{label} (lr {_fmt_lr(lr)})", "runs": len(at)}
        for step in steps:
            vals = [v for r in at for s, v in r.val_history if s == step]
            if vals:
                row[f"s{step}"] = statistics.fmean(vals)
        if label.startswith("full FT") and not full_curve:
            full_curve = {st: row[f"s{st}"] for st in steps if f"s{st}" in row}
        rows.append(row)
    for row in rows:
        if full_curve and not row["curve"].startswith("full FT"):
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
            label = "full FT" if r.method == "full" else f"{r.variant} r={r.r}"
            cells.setdefault(r.batch, {}).setdefault(label, []).append(r.val_loss)
    labels = sorted({lbl for c in cells.values() for lbl in c}, key=lambda s: (s == "full FT", s))
    rows = []
    for b in sorted(cells):
        row: dict[str, Any] = {"batch": b, "steps": next((r.steps for r in used if r.batch == b), None)}
        for lbl in labels:
            if lbl in cells[b]:
                row[lbl] = statistics.fmean(cells[b][lbl])
        lora = [row[lbl] for lbl in labels if lbl != "full FT" and lbl in row]
        if lora and "full FT" in row:
            row["gap"] = min(lora) - row["full FT"]
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
    from lora_lab.bench import shape_config

    return shape_config("llama-8b")


def model_config(name: str, setting: Optional[Callable[[str], Any]] = None) -> Any:
    """A transformers config for a model we ran (its shape only); `setting` gives a run's setting by path."""
    from transformers import LlamaConfig

    from lora_lab import bench

    if name == "tiny":
        get = setting or (lambda path: None)
        g = lambda k, d: int(get(f"model.tiny.{k}") or d)  # noqa: E731
        from lora_lab.models import tiny_tokenizer

        return LlamaConfig(
            vocab_size=len(tiny_tokenizer()),
            hidden_size=g("hidden_size", 64),
            num_hidden_layers=g("num_layers", 2),
            num_attention_heads=g("num_heads", 4),
            num_key_value_heads=g("num_kv_heads", 2),
            intermediate_size=g("intermediate_size", 128),
            tie_word_embeddings=True,
            max_position_embeddings=128,
        )
    if "smollm2" in name.lower():
        return bench.smollm2_135m_config()
    if "llama-3.1-8b" in name.lower():
        return llama31_8b_config()
    raise ReportError(f"no config known for model {name!r}")


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
        if r.method == "lora" and r.r and r.trainable is not None:
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
    """Measured LoRA / full-FT time per step beside the FLOPs ratio theory gives (lora_lab.bench.step_flops)."""
    from lora_lab import bench

    ok = ok_runs(runs)
    rows, used = [], []
    fulls: dict[tuple, list[Run]] = {}
    for r in ok:
        if r.method == "full" and r.rec.time_per_step_s:
            fulls.setdefault((r.p("model.name"), r.batch, r.p("data.max_length")), []).append(r)
    loras: dict[tuple, list[Run]] = {}
    for r in ok:
        if r.method == "lora" and r.rec.time_per_step_s:
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
            with _suppress():
                cfg = model_config(model or "", rs[0].p)
                theory = bench.step_flops(cfg, batch, int(seq), rank) / bench.step_flops(cfg, batch, int(seq), None)
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
    cap = (
        "Compute: measured LoRA / full-FT time per optimizer step (medians over runs of the same model, batch and "
        "sequence length) beside the matmul-FLOPs ratio of lora_lab.bench.step_flops for the same model and rank "
        "(all-linear LoRA only) and the published (2N^2 + 6NR) / 3N^2 at N=4096. On shared CPUs the measured times "
        f"carry the load of other processes. {_source(used)}"
    )
    return Table("compute", "Compute per step", cap, cols, rows)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ReportError, ValueError, KeyError))


def table_merge(runs: list[Run]) -> Table:
    """Merged vs unmerged LoRA: max |logit difference| and val-loss difference, per precision."""
    lora = [r for r in ok_runs(runs) if r.method == "lora" and r.rec.max_abs_logit_diff is not None]
    by: dict[str, list[Run]] = {}
    for r in lora:
        # trainer.device as set is often 'auto': the device the run resolved to decides what precision=auto meant.
        prec = r.p("trainer.precision") or "auto"
        label = "bf16" if prec == "bf16" or (prec == "auto" and r.rec.identity.device.startswith("cuda")) else "fp32"
        by.setdefault(label, []).append(r)
    rows = []
    for label, rs in sorted(by.items()):
        diffs = [r.rec.max_abs_logit_diff for r in rs]
        dl = [abs(r.rec.merged_val_loss - r.val_loss) for r in rs if r.rec.merged_val_loss is not None]
        rows.append(
            {
                "precision": label,
                "runs": len(rs),
                "max_logit_diff": max(diffs),
                "median_logit_diff": statistics.median(diffs),
                "max_dloss": max(dl) if dl else None,
                "published": "-"
                if label != "bf16"
                else "loss 2.1178 -> 2.1214 after a bf16 merge (one user report, ANCHORS.md)",
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
        "the adapter into the weights (merge in fp32 math) and re-evaluates the merged model. " + _source(lora)
    )
    return Table("merge", "Merged vs unmerged", cap, cols, rows)


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
}


# ----------------------------------------------------------------------------------------------- writers


def _cell(v: Any, fmt: str) -> str:
    if v is None or v == "":
        return "-"
    if fmt and isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt.format(v)
    return str(v)


def to_markdown(t: Table) -> str:
    head = "| " + " | ".join(h.replace("|", "\\|") for _, h, _ in t.columns) + " |"
    sep = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k), f).replace("|", "\\|") for k, _, f in t.columns) + " |" for r in t.rows]
    return "\n".join([f"### {t.title}", "", f"*{t.caption}*", "", head, sep, *body, *t.notes]) + "\n"


def _tex(s: str) -> str:
    table = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "±": r"$\pm$",
    }
    return "".join(table.get(c, c) for c in s)


def to_latex(t: Table) -> str:
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{" + "l" * len(t.columns) + "}",
        r"\toprule",
        " & ".join(_tex(h) for _, h, _ in t.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(_cell(r.get(k), f)) for k, _, f in t.columns) + r" \\" for r in t.rows]
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{" + _tex(t.caption) + "}",
        r"\label{tab:" + t.name + "}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Raw values (full precision) under the headers; the caption as the first, commented line."""
    cols = getattr(t, "columns_csv", t.columns)
    buf = io.StringIO()
    buf.write(f"# {t.caption}\n")
    w = csv.writer(buf)
    w.writerow([h for _, h, _ in cols])
    for r in t.rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _, _ in cols])
    return buf.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    """A table CSV written by to_csv, as dicts keyed by header."""
    lines = [ln for ln in Path(path).read_text().splitlines() if not ln.startswith("# ")]
    return list(csv.DictReader(lines))


# ----------------------------------------------------------------------------------------------- plots


def _history(uri: str, r: Run) -> tuple[list[TrainPoint], list[EvalPoint]]:
    lrs = dict(tracking.metric_history(uri, r.run_id, "optim/lr"))
    train = [
        TrainPoint(step=s, train_loss=v, lr=lrs.get(s, math.nan))
        for s, v in tracking.metric_history(uri, r.run_id, "loss/train")
        if s > 0
    ]
    return train, [e for e in r.rec.evals if e.step > 0]


def make_plots(uri: str, runs: list[Run], out: Path) -> list[Path]:
    from lora_lab import plots

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
            curves[f"{lbl} (lr {_fmt_lr(lr)})"] = _history(uri, best_run)
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
            pts.setdefault(r.variant + (f" {r.targets}" if r.method == "lora" else ""), []).append(
                (r.trainable, r.val_loss)
            )
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


# ----------------------------------------------------------------------------------------------- entry point


def build_tables(runs: list[Run], names: Iterable[str]) -> list[Table]:
    return [TABLE_FUNCS[n](runs) for n in names]


def write_report(tables: list[Table], plot_files: list[Path], out: Path, header: str) -> list[Path]:
    files = []
    for t in tables:
        for ext, text in (("md", to_markdown(t)), ("tex", to_latex(t)), ("csv", to_csv(t))):
            atomic_write_text(out / f"{t.name}.{ext}", text)
            files.append(out / f"{t.name}.{ext}")
    body = [header, ""]
    if plot_files:
        body += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_files] + [""]
    body += ["## Tables", ""] + [to_markdown(t) for t in tables]
    atomic_write_text(out / "report.md", "\n".join(body))
    return [out / "report.md", *files, *plot_files]


def main(argv: Optional[list[str]] = None) -> int:
    from lora_lab.config import TrackingConfig

    ap = argparse.ArgumentParser(
        prog="python -m lora_lab.report",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("tables", nargs="*", help=f"tables to write: {', '.join(TABLES)} (default all), or best-lr")
    ap.add_argument("--study", action="append", default=[], help="a study name (repeatable)")
    ap.add_argument("--experiment", default=None, help="an MLflow experiment name")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<outputs>/mlflow.db)")
    ap.add_argument("--out", default=None, help="output folder (default <outputs>/reports/<name>)")
    ap.add_argument("--where", action="append", default=[], help="best-lr: only runs whose param KEY equals VALUE")
    ap.add_argument("--no-attach", action="store_true", help="do not attach the files to the studies' parent runs")
    args = ap.parse_args(argv)
    uri = args.tracking_uri or TrackingConfig().resolved_uri()
    try:
        if args.tables == ["best-lr"]:
            runs, _ = load_runs(uri, args.experiment, args.study)
            for cond in args.where:
                k, _, v = cond.partition("=")
                same = (lambda a, b: _num(a) == _num(b)) if _num(v) is not None else (lambda a, b: a == b)
                runs = [r for r in runs if r.p(k) is not None and same(tracking.records.param_text(r.p(k)), v)]
            lr, _ = best_lr(runs)
            if lr is None:
                raise ReportError(f"no COMPLETE run with an LR among studies {args.study} {args.where}")
            print(f"{lr:g}")
            return 0
        unknown = [t for t in args.tables if t not in TABLES]
        if unknown:
            raise ReportError(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
        runs, parents = load_runs(uri, args.experiment, args.study)
    except ReportError as exc:
        print(f"lora_lab.report: error: {exc}", file=sys.stderr)
        return 2
    from lora_lab.config import outputs_root

    name = "+".join(args.study) or args.experiment or "all"
    out = Path(args.out) if args.out else outputs_root() / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, args.tables or TABLES)
    plot_files = make_plots(uri, runs, out) if not args.tables else []
    studies = sorted({r.study for r in runs if r.study})
    header = (
        f"# lora_lab report: {name}\n\nGenerated by `python -m lora_lab.report "
        + " ".join(
            [
                *(f"--study {s}" for s in args.study),
                *([f"--experiment {args.experiment}"] if args.experiment else []),
                *args.tables,
            ]
        )
        + f"` from {len(runs)} MLflow runs of studies {', '.join(studies) or '-'}."
    )
    files = write_report(tables, plot_files, out, header)
    if not args.no_attach:
        ids = {r.parent for r in runs if r.parent and (not args.study or r.study in args.study)}
        ids &= set(parents) or ids
        for pid in sorted(ids):
            tracking.attach_files(uri, pid, files, artifact_path="report")
    print(f"report: {out / 'report.md'} ({len(tables)} tables, {len(plot_files)} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
