"""What a person reads of a run or a study: run names, numbers rounded for people, descriptions, the comparison with
full fine-tuning and a study's prepared runs-table view.

Pure text from records (lora_lab.records) and MLflow's names for things: tracking.py writes it to MLflow, the sweep
writes the comparison to comparison.md. Numbers are rounded to 4 significant digits here; MLflow params and metrics
keep full precision. MLflow folds a description to its first ~5 lines of 18 px, the lower 3 fading out: a
description's answer is its first paragraph, three lines joined by hard breaks.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from lora_lab import adaptations, records
from lora_lab.markdown import Column, table
from lora_lab.records import EvalPoint, Identity, RunRecord, Settings, StudyAnswer

SIGNIFICANT = 4  # digits of a number in a description
# A run whose val loss is within this share of the base model's did not learn (IA3 at 3e-4: 5.6133 vs 5.6139).
DID_NOT_LEARN = 0.001
STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
BREAK = "  \n"  # a Markdown hard line break: lines of one paragraph, without a paragraph's margin between them


# ----------------------------------------------------------------------------------------------- numbers


def human(value: Any) -> str:
    """A value for people: numbers to 4 significant digits (integers whole, thousands grouped), '-' when missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if 1e4 <= abs(value) < 1e15:
            return f"{value:,.0f}"
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), f"{value:.4g}")
    return str(value)


def signed(value: Optional[float]) -> str:
    """A difference with its sign: '+0.012', '-0.026'."""
    if value is None or not math.isfinite(value):
        return "-"
    return ("+" if value > 0 else "") + human(float(value))


def count(n: int, word: str) -> str:
    """'1 step', '6 steps'."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def percent(share: Optional[float]) -> str:
    """A fraction as a percentage to 4 significant digits: 0.003107 -> '0.3107%'."""
    return "-" if share is None or not math.isfinite(share) else f"{human(100 * share)}%"


def whole(value: Optional[float]) -> Optional[int]:
    """A count logged as a float metric (params/trainable) back to an int."""
    return None if value is None or not math.isfinite(value) else int(value)


def rounded_setting(override: str) -> str:
    """`key=value` with a float value rounded for people (`optim.lr=0.0003183`); anything else as it is."""
    key, sep, value = override.partition("=")
    if not sep or not re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)", value.strip()):
        return override
    return f"{key}={human(float(value))}"


def rounded_overrides(line: str) -> str:
    """An override line (space-separated) with its floats rounded for people."""
    return " ".join(rounded_setting(o) for o in line.split())


def setting_text(key: str, value: Any) -> str:
    """`key=value` of a setting for a description: floats rounded, other values as MLflow params hold them."""
    return f"{key}={human(value) if isinstance(value, float) else records.param_text(value)}"


def learned(val_loss: Optional[float], base_val_loss: Optional[float]) -> Optional[bool]:
    """Whether a run's val loss moved below the base model's by more than DID_NOT_LEARN of it; None: unknown."""
    if not (records.finite(val_loss) and records.finite(base_val_loss)):
        return None
    return base_val_loss - val_loss > DID_NOT_LEARN * abs(base_val_loss)


def vs_base(val_loss: Optional[float], base_val_loss: Optional[float]) -> str:
    """The change from the base model's val loss, flagged when the run did not learn: '-0.4390', '+0.0001 (did not
    learn)'; '-' when the base model was not evaluated."""
    ok = learned(val_loss, base_val_loss)
    if ok is None:
        return "-"
    return signed(val_loss - base_val_loss) + ("" if ok else " (did not learn)")


def state_counts(counts: dict[str, int]) -> str:
    """'4 trials: 2 COMPLETE, 1 PRUNED, 1 FAIL'."""
    order = sorted(counts, key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER else len(STATE_ORDER), s))
    return f"{count(sum(counts.values()), 'trial')}: " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s])


# ----------------------------------------------------------------------------------------------- names


def display_name(name: str, study: str, state: str = "COMPLETE") -> str:
    """A run's name in MLflow: what tells it apart first (the runs table cuts names at ~20 characters). The state
    leads when it is not COMPLETE, and a study's runs keep their study last: `FAIL trial-1 · demo`, `trial-0 · demo`,
    `full-ft-lr0.001 · demo`; a study's parent is its name (`FAIL broken`)."""
    if study and name.startswith(study + "/"):
        name = f"{name[len(study) + 1 :]} · {study}"
    return name if state == "COMPLETE" else f"{state} {name}"


def identity_name(display: str, study: str) -> str:
    """The inverse of `display_name`: the run's identity name (`demo/trial-1`); also reads the older layout
    (`demo/trial-1 (FAIL)`)."""
    head, _, tail = display.partition(" ")
    if head in (*STATE_ORDER, "KILLED"):
        display = tail
    display = re.sub(r" \((PRUNED|FAIL)\)$", "", display)
    if study and display.endswith(f" · {study}"):
        return f"{study}/{display[: -len(study) - 3]}"
    return display


# ----------------------------------------------------------------------------------------------- links

# MLflow 3.x's UI opens in its GenAI mode unless told otherwise; this query opens it as model training.
UI_MODE = "workflowType=machine_learning"
# MLflow 3.x's UI reads a runs-table view (filter, sort, columns) from the experiment tag VIEW_TAG_PREFIX + key, given
# as ?viewStateShareKey=key (the UI's "share view"; mlflow/server/js: EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX and
# _URL_PARAM_KEY). UI-internal: tests/test_mlflow_ui.py pins it against the installed MLflow.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_PARAM = "viewStateShareKey"


def run_url(experiment_id: str, run_id: str) -> str:
    """A link to a run in the MLflow UI, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}"


def compare_url(experiment_id: str, run_ids: list[str]) -> str:
    """A link that opens MLflow's comparison of these runs."""
    runs = urllib.parse.quote("[" + ",".join(f'"{r}"' for r in run_ids) + "]")
    experiments = urllib.parse.quote(f'["{experiment_id}"]')
    return f"#/compare-runs?runs={runs}&experiments={experiments}&{UI_MODE}"


def view_key(study: str) -> str:
    """The share key of a study's prepared view (study names are [A-Za-z0-9._-]: safe in a tag key and a URL)."""
    return f"lora_lab.{study}"


def view_url(experiment_id: str, study: str) -> str:
    """A link that opens the experiment's runs table on the study's prepared view."""
    return f"#/experiments/{experiment_id}/runs?{VIEW_PARAM}={view_key(study)}&{UI_MODE}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's canonical column key (makeCanonicalSortKey)


def trial_objective(name: str) -> str:
    """The metric a COMPLETE trial's objective value is logged as (`objective/val_loss`): only COMPLETE trials
    have it, so a pruned trial's last intermediate loss never sorts among final values."""
    return f"objective/{name}"


def study_view(study: str, objectives: list[str], maximize: bool, keys: list[str], methods_vary: bool) -> dict:
    """The runs-table view of a study (MLflow's shared view state): its trials only, sorted by the first objective,
    with the columns that answer it (state, objectives, accuracy, trainable params, method and LR, the searched keys,
    why a trial ended)."""
    params = (["method"] if methods_vary else []) + ["optim.lr"] + [k for k in keys if k not in ("optim.lr", "method")]
    columns = (
        [_column("tags", "lora_lab.state")]
        + [_column("metrics", trial_objective(o)) for o in objectives]
        + [_column("metrics", "eval/accuracy"), _column("metrics", "params/trainable")]
        + [_column("params", p) for p in params]
        + [_column("tags", "lora_lab.reason")]
    )
    objective = _column("metrics", trial_objective(objectives[0]))
    return {
        "searchFilter": f"tags.`lora_lab.study` = '{study}' and tags.`lora_lab.kind` = 'trial'",
        "orderByKey": objective,
        "orderByAsc": not maximize,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        # The order as listed (the UI groups columns by kind otherwise: the state would come last, off screen).
        "columnOrder": [*columns, _column("attributes", "Duration")],
        "columnWidths": {columns[0]: 100, objective: 140},
        "runListHidden": False,
        "viewMaximized": False,
    }


def view_json(view: dict) -> str:
    """The view as the experiment tag's value."""
    return json.dumps(view, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------- a run


def _memory_label(device: str) -> tuple[str, str]:
    """(label, note) of peak memory on a device: the CUDA allocator's peak, or on the CPU the process's RSS."""
    if device.startswith("cuda"):
        return "peak CUDA memory", "allocator peak"
    return "peak RSS", "the whole process (not comparable between methods)"


def what_it_is(settings: Settings) -> str:
    """The method and its key settings: 'LoRA (r=8, alpha=16, targets=all-linear)'."""
    return adaptations.of(settings.method).describe(settings.get)


def run_note(
    identity: Identity,
    settings: Settings,
    searched: dict[str, Any],
    state: str,
    reason: str,
    record: Optional[RunRecord],
    last: Optional[EvalPoint],
    parent_link: Optional[str] = None,
    base: Optional[EvalPoint] = None,
) -> str:
    """A run's Markdown description. Its first paragraph (three lines) says what it is and how it ended: its state,
    which run of which study and its method with the key settings; its result (or why it has none, or where it was
    pruned); its LR and length. Then its searched values, a table of results with units, its curves and files.
    `last` is its last evaluation and `base` the base model's (step 0), for a run without a record (pruned)."""
    study = f"[{identity.study}]({parent_link})" if parent_link else f"`{identity.study}`"
    who = {
        "trial": f"Trial {identity.trial} of study {study}",
        "compare": f"Comparison run of study {study}",
        "run": "A single training run",
    }[identity.kind]
    first = f"**State: {state}** · {who}: {what_it_is(settings)}"
    s = settings
    steps = record.steps if record is not None else (last.step if last is not None else 0)
    how = f"peak LR {human(s.lr)}, {count(s.max_steps, 'step')} of batch {s.batch} (`{s.model}` on `{s.data}`)"
    if state == "COMPLETE" and record is not None:
        ok = learned(record.val_loss, record.base_val_loss)
        result = f"val loss **{human(record.val_loss)} nats/token**"
        if ok is not None:
            result += f", base model {human(record.base_val_loss)}" + ("" if ok else ": **did not learn**")
        if record.accuracy is not None:
            result += f"; accuracy {human(record.accuracy)}"
    elif state == "PRUNED":
        at = f" at step {last.step}" if last is not None and last.step > 0 else ""
        there = f": val loss {human(last.val_loss)} there, not a final value" if at else ""
        flat = at and learned(last.val_loss, base.val_loss if base is not None else None) is False
        result = f"**Pruned{at}**{there}" + (f" (base model {human(base.val_loss)}: did not learn)" if flat else "")
    elif state == "RUNNING":
        result = "Running: its curves so far are under Model metrics"
    else:
        result = f"**No result**: {reason or 'ended early'}"
        if record is not None or steps:
            result += f" ({count(steps, 'step')} of {s.max_steps} trained)"
    lines = [BREAK.join([first, result, how]), ""]
    if searched:
        lines += ["Searched values: " + ", ".join(f"`{setting_text(k, v)}`" for k, v in searched.items()), ""]
    rows = _result_rows(record, state, last)
    if rows:
        lines += [
            table(rows, [("what", "result", ""), ("value", "value", ""), ("unit", "unit", ""), ("note", "note", "")])
        ]
        lines += [""]
    lines += [
        "Curves: `loss/train`, `loss/val` (Model metrics); the base model before training, when evaluated: "
        "`base/loss_val`, `base/accuracy`. Files: `config.yaml`, `metrics.json`, `loss_curve.png` (Artifacts)."
    ]
    return "\n".join(lines)


def _result_rows(record: Optional[RunRecord], state: str, last: Optional[EvalPoint]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []

    def add(what: str, value: Any, unit: str, note: str = "") -> None:
        rows.append({"what": what, "value": human(value), "unit": unit, "note": note})

    if record is not None:
        r = record
        if state == "COMPLETE":
            add(
                "val loss",
                r.val_loss,
                "nats/token",
                f"base model {human(r.base_val_loss)}: {vs_base(r.val_loss, r.base_val_loss)}"
                if r.base_val_loss is not None
                else "",
            )
            if r.accuracy is not None:
                add(
                    "accuracy",
                    r.accuracy,
                    "fraction",
                    f"base model {human(r.base_accuracy)}" if r.base_accuracy is not None else "",
                )
            if r.merged_val_loss is not None:
                ok = {True: "passed", False: "FAILED", None: "-"}[r.merge_ok]
                tol = f" at tolerance {human(r.merge_tol)}" if r.merge_tol is not None else ""
                add(
                    "merged val loss",
                    r.merged_val_loss,
                    "nats/token",
                    f"max logit diff {human(r.max_abs_logit_diff)}, check {ok}{tol}",
                )
        elif r.base_val_loss is not None:
            add("base model val loss", r.base_val_loss, "nats/token", "before training: not this run's result")
        add(
            "trainable params",
            r.trainable_params,
            "parameters",
            f"{percent(r.trainable_params / max(1, r.total_params))} of {r.total_params:,}",
        )
        add("steps trained", r.steps, "steps")
        if state == "COMPLETE":
            add("time per step", r.time_per_step_s, "s")
            add("throughput", r.tokens_per_s, "tokens/s")
            label, note = _memory_label(r.identity.device)
            add(label, r.peak_mem_bytes / 2**20, "MiB", note)
            if r.checkpoint_bytes:
                add("checkpoint", r.checkpoint_bytes / 2**20, "MiB", "what a user keeps")
    elif last is not None and last.step > 0:
        add("val loss at its last evaluation", last.val_loss, "nats/token", f"step {last.step}, not a final value")
        if last.accuracy is not None:
            add("accuracy at its last evaluation", last.accuracy, "fraction", f"step {last.step}")
    return rows


# ----------------------------------------------------------------------------------------------- the comparison

# The comparison table's columns (markdown.table: key, header, format; values come formatted), as printed and in
# MLflow; comparison.md adds the settings of each row.
COMPARE_COLUMNS: list[Column] = [
    ("method", "run", ""),
    ("val_loss", "val loss (nats/token)", ""),
    ("vs_full", "vs full FT", ""),
    ("vs_base", "vs base model", ""),
    ("accuracy", "accuracy", ""),
    ("trainable_params", "trainable params", ""),
    ("peak_mem_mib", "peak CUDA memory (MiB)", ""),
    ("time_per_step_s", "time/step (s)", ""),
    ("checkpoint_mib", "checkpoint (MiB)", ""),
]
SETTINGS_COLUMN: Column = ("settings", "settings", "")


@dataclass
class Comparison:
    """The best trial retrained against full fine-tuning at its best LR, on the same data and steps."""

    best: Optional[RunRecord]  # the best trial retrained (None: it did not complete)
    full: Optional[RunRecord]  # full fine-tuning at the best LR of the grid (None: none completed)
    trial: Optional[int] = None  # the best trial's number
    best_overrides: str = ""  # the best trial's searched overrides
    grid: list[float] = field(default_factory=list)  # the full-FT LRs tried (one: sweep.full_lr)

    @property
    def full_lr(self) -> Optional[float]:
        return self.full.settings.lr if self.full is not None else None

    def on_cuda(self) -> bool:
        """Every run on CUDA: peak memory is the allocator's, comparable between methods."""
        runs = [r for r in (self.best, self.full) if r is not None]
        return bool(runs) and all(r.identity.device.startswith("cuda") for r in runs)

    def rows(self) -> list[dict[str, str]]:
        """The table's rows (COMPARE_COLUMNS keys, and `settings`), values formatted for people."""
        rows = []
        if self.best is not None:
            trial = f"trial {self.trial}, retrained" if self.trial is not None else "retrained"
            rows.append(self._row(f"{what_it_is(self.best.settings)} ({trial})", self.best, self.best_overrides))
        if self.full is not None:
            rows.append(
                self._row(f"full fine-tuning (LR {human(self.full_lr)})", self.full, f"optim.lr={human(self.full_lr)}")
            )
        return rows

    def _row(self, name: str, r: RunRecord, settings: str) -> dict[str, str]:
        full = self.full if self.full is not None and r is not self.full else None
        share = f" ({percent(r.trainable_params / full.trainable_params)})" if full and full.trainable_params else ""
        return {
            "method": name,
            "val_loss": human(r.val_loss),
            "vs_full": signed(r.val_loss - full.val_loss) if full else "-",
            "vs_base": vs_base(r.val_loss, r.base_val_loss),
            "accuracy": human(r.accuracy),
            "trainable_params": f"{r.trainable_params:,}{share}",
            "peak_mem_mib": human(r.peak_mem_bytes / 2**20) if self.on_cuda() else "-",
            "time_per_step_s": human(r.time_per_step_s),
            "checkpoint_mib": human((r.checkpoint_bytes or 0) / 2**20),
            "settings": rounded_overrides(settings),
        }

    def verdict(self) -> str:
        """Who wins, by how much: 'LoRA beats full FT by 0.026 nats/token val loss (5.175 vs 5.201)'."""
        if self.best is None or self.full is None:
            return ""
        return beats(adaptations.of(self.best.settings.method).label, self.best.val_loss, self.full.val_loss)

    def edge(self) -> str:
        """'lower' or 'upper' when the chosen full-FT LR is at that edge of a grid of several ('' otherwise): full FT
        may do better beyond it, and the comparison may flatter the other side."""
        grid = sorted(self.grid)
        if self.full is None or len(grid) < 2:
            return ""
        return (
            "lower" if math.isclose(self.full_lr, grid[0]) else "upper" if math.isclose(self.full_lr, grid[-1]) else ""
        )

    def edge_warning(self) -> str:
        """The warning of `edge()` in one line ('' when the LR is inside its grid)."""
        edge = self.edge()
        if not edge:
            return ""
        beyond = "lower" if edge == "lower" else "higher"
        return (
            f"**Full FT's LR {human(self.full_lr)} is at the {edge} edge of `sweep.full_lr_grid`**: a {beyond} LR may "
            "do better; extend the grid"
        )

    def lr_line(self) -> str:
        """The full-FT LR chosen and, when it is at an edge of the grid, a warning that a better one may lie beyond."""
        if self.full is None:
            return ""
        lr, grid = self.full_lr, sorted(self.grid)
        if len(grid) < 2:
            return f"Full fine-tuning ran at LR {human(lr)} (`sweep.full_lr`)."
        text = f"Full fine-tuning's LR: {human(lr)}, the best of `sweep.full_lr_grid` [{', '.join(map(human, grid))}]"
        return text + (f". {self.edge_warning()}." if self.edge() else ".")

    def merge_line(self) -> str:
        """The merged model's check, in one line (not a second row of the same numbers)."""
        r = self.best
        if r is None or r.merged_val_loss is None:
            return ""
        ok = {True: "passed", False: "**FAILED**", None: "not judged"}[r.merge_ok]
        tol = f" (tolerance {human(r.merge_tol)})" if r.merge_tol is not None else ""
        same = "the same as unmerged" if r.merged_val_loss == r.val_loss else f"unmerged {human(r.val_loss)}"
        return (
            f"Merged into the weights: val loss {human(r.merged_val_loss)} ({same}), max logit difference "
            f"{human(r.max_abs_logit_diff)}: check {ok}{tol}."
        )

    def memory_line(self) -> str:
        if self.on_cuda() or (self.best is None and self.full is None):
            return ""
        return (
            "Peak memory is left out: off CUDA it is the process's RSS (model, data, Python and MLflow alike), which "
            "does not compare the methods."
        )

    def lines(self) -> list[str]:
        """The sentences under the table: winner, full FT's LR, the merge check, what peak memory means."""
        return [x for x in (self.verdict(), self.lr_line(), self.merge_line(), self.memory_line()) if x]

    def markdown(self, settings: bool = True) -> str:
        """The table (columns without a value in any row left out) and its sentences."""
        rows = self.rows()
        columns = [
            c for c in COMPARE_COLUMNS + ([SETTINGS_COLUMN] if settings else []) if any(r[c[0]] != "-" for r in rows)
        ]
        parts = [table(rows, columns)] if rows else ["No comparison run completed."]
        return "\n\n".join(parts + self.lines())


def beats(label: str, loss: float, full_loss: float) -> str:
    """'LoRA beats full FT by 0.026 nats/token val loss (5.175 vs 5.201)', or the other way round."""
    d = loss - full_loss
    both = f"({human(loss)} vs {human(full_loss)})"
    if d < 0:
        return f"{label} beats full FT by {human(-d)} nats/token val loss {both}"
    if d > 0:
        return f"full FT beats {label} by {human(d)} nats/token val loss {both}"
    return f"{label} ties with full FT on val loss {both}"


# ----------------------------------------------------------------------------------------------- a study


@dataclass
class TrialLine:
    """One trial as a study's description lists it."""

    number: int
    state: str
    url: str
    values: dict[str, Optional[float]]  # objective -> its value (COMPLETE trials)
    val_loss: Optional[float]  # final (COMPLETE trials)
    accuracy: Optional[float]
    base_val_loss: Optional[float]
    trainable: Optional[int]
    method: str
    searched: str  # overrides, as the trial's tag holds them
    reason: str


def study_answer(best: Optional[RunRecord], full: Optional[RunRecord]) -> StudyAnswer:
    """The study's answer from its best trial's record and the chosen full-FT run's."""
    if best is None:
        return StudyAnswer(best_val_loss=None, best_trainable_params=None, best_params_share=None)
    of = full.trainable_params if full is not None else best.total_params
    return StudyAnswer(
        best_val_loss=best.val_loss,
        best_accuracy=best.accuracy,
        best_trainable_params=best.trainable_params,
        best_params_share=best.trainable_params / of if of else None,
        full_val_loss=full.val_loss if full else None,
        full_accuracy=full.accuracy if full else None,
        full_lr=full.settings.lr if full else None,
        full_trainable_params=full.trainable_params if full else None,
        delta_val_loss=best.val_loss - full.val_loss if full else None,
    )


def answer(
    best: Optional[TrialLine],
    best_record: Optional[RunRecord],
    full: Optional[RunRecord],
    counts: dict[str, int],
    overrides: str,
    links: str,
    reasons: list[str],
    warning: str = "",
) -> str:
    """A study's first paragraph, three lines: the winner and its val loss against full FT (difference and units);
    its trainable parameters, their share of full FT's and the trials by state; its override line and the links.
    A fourth, `warning`, when the comparison needs one (full FT's LR at an edge of its grid)."""
    trials = state_counts(counts)
    if best is None or best_record is None:
        common = max(set(reasons), key=reasons.count) if reasons else ""
        why = f"most common reason: {common}" if common else "see each trial's reason (`lora_lab.reason`)"
        return BREAK.join([f"**No trial completed**: {trials}", why, links])
    r = best_record
    label = adaptations.of(r.settings.method).label
    head = f"**Best: [trial {best.number}]({best.url})**"
    if full is not None:
        first = f"{head}: {beats(label, r.val_loss, full.val_loss)}"
        share = f"{percent(r.trainable_params / full.trainable_params)} of full FT's {full.trainable_params:,}"
    else:
        base = f", base model {human(r.base_val_loss)}" if r.base_val_loss is not None else ""
        first = f"{head}: {label}, val loss {human(r.val_loss)} nats/token{base} (no full-FT run to compare)"
        share = f"{percent(r.trainable_params / max(1, r.total_params))} of the model's {r.total_params:,}"
    if learned(r.val_loss, r.base_val_loss) is False:
        first += ": **did not learn**"
    second = f"{r.trainable_params:,} trainable params, {share} · {trials}"
    third = f"`{rounded_overrides(overrides)}`" + (f" · {links}" if links else "") if overrides else links
    return BREAK.join([first, second, third] + ([warning] if warning else []))


def trials_table(trials: list[TrialLine], objectives: list[str], maximize: bool, limit: Optional[int] = None) -> str:
    """The trials, best first (COMPLETE by the first objective, then the others by number); the first `limit` of
    them, saying how many more there are."""
    sign = -1 if maximize else 1
    first = objectives[0]

    def order(t: TrialLine) -> tuple:
        v = t.values.get(first)
        return (0, sign * v, t.number) if t.state == "COMPLETE" and v is not None else (1, t.number)

    methods_vary = len({t.method for t in trials}) > 1
    rows = []
    ordered = sorted(trials, key=order)
    shown = ordered if limit is None else ordered[:limit]
    for t in shown:
        done = t.state == "COMPLETE"
        row = {
            "trial": f"[{t.number}]({t.url})",
            "state": t.state,
            "method": adaptations.of(t.method).label if t.method in adaptations.METHODS else t.method,
            "accuracy": human(t.accuracy) if done else "-",
            "trainable": human(t.trainable),
            "searched": rounded_overrides(t.searched),
            "ended": t.reason if not done else "",
        }
        for o in objectives:
            row[o] = human(t.values.get(o)) if done else "-"
        row["vs_base"] = vs_base(t.val_loss, t.base_val_loss) if done else "-"
        rows.append(row)
    unit = {"val_loss": " (nats/token)", "merged_val_loss": " (nats/token)"}
    columns: list[Column] = [("trial", "trial", ""), ("state", "state", "")]
    columns += [("method", "method", "")] if methods_vary else []
    columns += [(o, o + unit.get(o, ""), "") for o in objectives]
    columns += [("vs_base", "vs base model", ""), ("accuracy", "accuracy", ""), ("trainable", "trainable params", "")]
    columns += [("searched", "searched", ""), ("ended", "why it ended", "")]
    columns = [c for c in columns if c[0] in ("trial", "state") or any(r[c[0]] not in ("-", "") for r in rows)]
    more = len(ordered) - len(shown)
    return table(rows, columns) + (f"\n\n... and {count(more, 'more trial')}: see the prepared view" if more else "")


def as_run(trials: Iterable[tuple[str, str, str, Any]]) -> str:
    """'LoRA, IA3 of `tiny` on `synthetic_sentiment`, 6 steps per trial' from (method, model, data, steps) of the
    trials: a method study is labelled by its methods."""
    trials = list(trials)
    methods = sorted(
        {m for m, *_ in trials}, key=lambda m: list(adaptations.METHODS).index(m) if m in adaptations.METHODS else 99
    )
    labels = [adaptations.of(m).label if m in adaptations.METHODS else m for m in methods]
    models = sorted({f"`{x}`" for _, x, _, _ in trials})
    data = sorted({f"`{x}`" for _, _, x, _ in trials})
    steps = sorted({s for *_, s in trials if s is not None})
    length = f", {count(int(steps[0]), 'step')} per trial" if len(steps) == 1 else ""
    return f"{', '.join(labels)} of {', '.join(models)} on {', '.join(data)}{length}"
