"""Reading runs: a selection's MLflow training runs as typed rows (`Run`), with their labels and metric histories."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from lora_lab import adaptations, tracking
from lora_lab.records import EvalPoint, RecordError, RunRecord, TrainPoint, finite

OK_STATE = "COMPLETE"  # a run whose results the tables use
FULL_FT = adaptations.FULL.paper_label(lambda path: None)  # full fine-tuning's name in the tables: 'full FT'
SHORT = {  # target names as the tables label them
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
    """Bad input: no store, a named study / experiment without runs, a run the report cannot read, a model whose
    shape is not known, an output folder that cannot be one."""


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
    def adaptation(self) -> adaptations.Method:
        """The method's row in lora_lab.adaptations' table (what the report asks instead of comparing names)."""
        return adaptations.of(self.method)

    @property
    def r(self) -> Optional[int]:
        """LoRA's rank (None for the other methods: ranks are LoRA's)."""
        lora_r = self.p("lora.r")
        return int(lora_r) if self.adaptation is adaptations.LORA and lora_r is not None else None

    @property
    def lr(self) -> float:
        """The peak LR the run used (records.Settings.lr)."""
        return self.rec.settings.lr

    @property
    def targets(self) -> Optional[str]:
        """LoRA's target set: 'all linear', 'attention', 'MLP', 'Wq+Wv', ... (None for the other methods)."""
        if self.adaptation is not adaptations.LORA:
            return None
        names = list(self.p("lora.targets") or [])
        if self.p("lora.target_regex"):
            names.append(f"/{self.p('lora.target_regex')}/")
        return "+".join(SHORT.get(n, n) for n in names) or "?"

    @property
    def variant(self) -> str:
        """The method's name in the papers' tables (adaptations' paper_label): LoRA, rsLoRA, LoRA+, DoRA, PiSSA,
        OLoRA (combined: 'DoRA+rsLoRA'), full FT, BitFit, IA3, AdapterH, AdapterL, PreEmbed, PreLayer."""
        return self.adaptation.paper_label(self.p)

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
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise ReportError(f"no MLflow store at {uri}; give --tracking-uri or set LORA_LAB_OUTPUTS")
        with open(db, "rb") as f:
            if db.stat().st_size and f.read(16) != b"SQLite format 3\x00":  # SQLite's own header
                raise ReportError(f"{db} is not an SQLite database (the MLflow store); give --tracking-uri")
    try:
        tracked, parents = tracking.read_runs(uri, experiment, studies or None)
    except RecordError as exc:  # a run logged in another layout (another lora_lab version): named, not traced
        raise ReportError(
            f"{exc}; report on the studies without it (--study) or with the version that logged it"
        ) from None
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
    """The COMPLETE runs with a finite final val loss: the ones the tables use."""
    return [r for r in runs if r.ok]


def history(uri: str, r: Run) -> tuple[list[TrainPoint], list[EvalPoint]]:
    """A run's training points (loss and LR per step, read from MLflow) and its evaluations, step 0 left out."""
    lrs = dict(tracking.metric_history(uri, r.run_id, "optim/lr"))
    train = [
        TrainPoint(step=s, train_loss=v, lr=lrs.get(s, math.nan))
        for s, v in tracking.metric_history(uri, r.run_id, "loss/train")
        if s > 0
    ]
    return train, [e for e in r.rec.evals if e.step > 0]
