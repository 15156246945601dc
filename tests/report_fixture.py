"""A fixed set of runs with made-up, deterministic numbers, for the report's golden tables.

The numbers are not trained: each run is a list of overrides (composed through the real config) and the results it
"measured". `log_runs` logs them through tracking into a fresh MLflow store as train and the sweep do;
tests/test_report_golden.py builds every report table and compares the CSVs with tests/data/report_golden/, captured
from the report before the run records (issue 12) replaced the `final.*` metrics: the same runs must give the same
tables. tests/test_report_faults.py logs its own few (a trial that diverged at its first step among them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.max_steps=4", "trainer.eval_every=2"]
# Tiny Llama (hidden 64, 4 heads, 2 KV heads -> k/v out 32, MLP 128, 2 layers): sum of d_in + d_out per layer.
ATTN_DIMS = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)
MLP_DIMS = 3 * (64 + 128)
TOTAL = 120_000  # the tiny model's parameters (made up; full FT trains them all)


@dataclass
class FakeRun:
    study: str
    kind: str  # trial, compare, run
    trial: int
    overrides: list[str]
    val_loss: float  # final; the curve is 0.9 (base), then halfway, then this
    state: str = "COMPLETE"  # COMPLETE / PRUNED / FAIL (trials), completed / diverged (runs)
    reason: str = ""
    time_per_step_s: float = 0.05
    peak_mem_bytes: int = 300 * 2**20
    logit_diff: float = 2e-6
    extra: dict = field(default_factory=dict)
    early: bool = False  # diverged at its first step: no evaluation after the base model's, so no throughput point

    @property
    def method(self) -> str:
        return "full" if "method=full" in self.overrides else "lora"

    def trainable(self) -> int:
        if self.method == "full":
            return TOTAL
        r = int(next(o.split("=")[1] for o in self.overrides if o.startswith("lora.r=")))
        targets = next((o.split("=")[1] for o in self.overrides if o.startswith("lora.targets=")), "[all-linear]")
        dims = {"[attn]": ATTN_DIMS, "[mlp]": MLP_DIMS}.get(targets, ATTN_DIMS + MLP_DIMS)
        return r * dims * 2

    def results(self) -> dict:
        """What train measured, by RunResult field name (before issue 12)."""
        done = self.state in ("COMPLETE", "completed")
        lora = self.method == "lora"
        steps = 4 if done else (1 if self.early else 2)
        evals = [{"step": 0, "val_loss": 0.9, "accuracy": 0.5}]
        if not self.early:
            evals.append(
                {"step": 2, "val_loss": round((0.9 + self.val_loss) / 2, 6), "accuracy": 0.6, "tokens_per_s": 900.0}
            )
        if done:
            evals.append({"step": 4, "val_loss": self.val_loss, "accuracy": 0.7, "tokens_per_s": 1000.0})
        history = [{"step": s, "train_loss": round(1.0 - 0.05 * s, 6), "lr": 1e-3} for s in range(1, steps + 1)]
        return dict(
            status="completed" if done else "diverged",
            method=self.method,
            steps=steps,
            val_loss=self.val_loss if done else float("nan"),
            accuracy=0.7 if done else None,
            base_val_loss=0.9,
            base_accuracy=0.5,
            merged_val_loss=self.val_loss + 1e-7 if done and lora else None,
            merged_accuracy=0.7 if done and lora else None,
            max_abs_logit_diff=self.logit_diff if done and lora else None,
            trainable_params=self.trainable(),
            total_params=TOTAL,
            adapter_bytes=self.trainable() * 4 + 1000 if done and lora else None,
            checkpoint_bytes=(self.trainable() * 4 + 1000 if lora else TOTAL * 4) if done else None,
            peak_mem_bytes=self.peak_mem_bytes,
            time_per_step_s=self.time_per_step_s,
            tokens_per_s=1000.0,
            train_time_s=self.time_per_step_s * steps,
            eval_time_s=0.1,
            setup_time_s=0.2,
            device="cpu",
            reason=self.reason if not done else "",
            history=history,
            evals=evals,
        )

    def record(self, output_dir: str = "", device: str = "cpu") -> tuple[Any, Any]:
        """(config, RunRecord) of this run, as train would produce them on `device`."""
        from lora_lab.config import compose
        from lora_lab.records import EvalPoint, Identity, RunRecord, TrainPoint
        from lora_lab.train import settings_of

        _, cfg = compose(self.overrides)
        res = self.results()
        identity = Identity(
            kind=self.kind,
            name=f"{self.study}/trial-{self.trial}" if self.study else "run",
            study=self.study,
            trial=self.trial if self.study else None,
            model=cfg.model.name,
            data=cfg.data.name,
            device=device,
            output_dir=output_dir,
        )
        history, evals = res.pop("history"), res.pop("evals")
        record = RunRecord(
            **{k: v for k, v in res.items() if k not in ("method", "device")},
            identity=identity,
            settings=settings_of(cfg, self.overrides),
            history=[TrainPoint(**h) for h in history],
            evals=[EvalPoint(**e) for e in evals],
        )
        return cfg, record


def _lora(study: str, trial: int, r: int, lr: str, loss: float, *more: str, **kw) -> FakeRun:
    return FakeRun(study, "trial", trial, [*TINY, f"lora.r={r}", f"optim.lr={lr}", "lora.alpha=8", *more], loss, **kw)


def _full(study: str, trial: int, lr: str, loss: float, *more: str, **kw) -> FakeRun:
    return FakeRun(study, "trial", trial, [*TINY, "method=full", f"optim.lr={lr}", *more], loss, **kw)


RUNS = [
    # r x LR (U-curves, ranks, capacity, compute, merge)
    _lora("g_lora", 0, 2, "3e-3", 0.61, "lora.targets=[all-linear]", time_per_step_s=0.031),
    _lora("g_lora", 1, 2, "3e-2", 0.58, "lora.targets=[all-linear]", time_per_step_s=0.033),
    _lora("g_lora", 2, 8, "3e-3", 0.55, "lora.targets=[all-linear]", time_per_step_s=0.036, logit_diff=5e-6),
    _lora("g_lora", 3, 8, "3e-2", 0.57, "lora.targets=[all-linear]", time_per_step_s=0.038),
    _lora("g_lora", 4, 8, "1e-1", 9.0, "lora.targets=[all-linear]", state="FAIL", reason="diverged: nan"),
    _lora("g_lora", 5, 2, "1e-5", 0.88, "lora.targets=[all-linear]", state="PRUNED", reason="pruned at step 2"),
    _full("g_full", 0, "3e-4", 0.50, time_per_step_s=0.061),
    _full("g_full", 1, "3e-3", 0.53, time_per_step_s=0.059),
    # target sets at a matched budget, two seeds on attention
    _lora("g_targets", 0, 4, "1e-2", 0.64, "lora.targets=[attn]"),
    _lora("g_targets", 1, 3, "1e-2", 0.60, "lora.targets=[mlp]"),
    _lora("g_targets", 2, 4, "1e-2", 0.66, "lora.targets=[attn]", "seed=1"),
    # batch size, LoRA and full FT
    _lora("g_batch", 0, 8, "3e-3", 0.56, "trainer.batch_size=4"),
    _lora("g_batch", 1, 8, "3e-3", 0.59, "trainer.batch_size=16"),
    _full("g_batch", 2, "3e-4", 0.52, "trainer.batch_size=4"),
    _full("g_batch", 3, "3e-4", 0.53, "trainer.batch_size=16"),
    # method variants: rsLoRA, LoRA+, and an LR given as a multiple of the reference LR
    FakeRun("g_methods", "trial", 0, [*TINY, "lora.r=8", "lora.rslora=true", "optim.lr=3e-3"], 0.545),
    FakeRun("g_methods", "trial", 1, [*TINY, "lora.r=8", "lora.lr_ratio=16", "optim.lr=1e-3"], 0.551),
    FakeRun("g_methods", "trial", 2, [*TINY, "lora.r=8", "optim.lr_mult=10", "optim.ref_lr=3e-4"], 0.552),
    FakeRun(
        "", "run", 0, [*TINY, "lora.r=4", "lora.targets=[q_proj,v_proj]", "optim.lr=2e-3"], 0.62, state="completed"
    ),
]
STUDIES = sorted({r.study for r in RUNS if r.study})


def log_runs(
    root: Path,
    uri: str,
    runs: Sequence[FakeRun] = RUNS,
    experiment: str = "golden",
    descriptions: Optional[dict[str, str]] = None,
) -> None:
    """Every run into the store, through tracking, as train and the sweep log them (records in, MLflow out): a study's
    parent first (with its spec's description as the sweep logs it), the evaluations as they happen, then the results
    (`finish`, for all but a pruned trial) and the state. `descriptions`: study -> its description."""
    from lora_lab import tracking
    from lora_lab.config import compose
    from lora_lab.train import EvalEvent

    track = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.system_metrics=false"]
    parents: dict[str, str] = {}
    for i, fr in enumerate(runs):
        _, cfg = compose(fr.overrides + track)
        if fr.study and fr.study not in parents:
            about = (descriptions or {}).get(fr.study)
            params = {"sweep.description": about} if about else {}
            parents[fr.study] = tracking.study_parent_run(cfg.tracking, fr.study, params, {})
        out = root / "runs" / f"{i:02d}"
        out.mkdir(parents=True, exist_ok=True)
        _, record = fr.record(str(out))
        res = fr.results()
        history, evals = res["history"], res["evals"]
        counts = {"params/trainable": record.trainable_params, "params/total": record.total_params}
        with tracking.TrainingRun(
            cfg.tracking, record.identity, record.settings, parent_run_id=parents.get(fr.study), start_metrics=counts
        ) as run:
            for e in evals:
                pts = [h for h in history if e["step"] - 2 < h["step"] <= e["step"]]
                run.on_eval(EvalEvent(e["step"], 4, {k: v for k, v in e.items() if k != "step"}, pts))
            if fr.state != "PRUNED":
                run.finish(record)
            run.set_outcome({"completed": "COMPLETE", "diverged": "FAIL"}.get(fr.state, fr.state), fr.reason)


# A small study with a trial that diverged at its first step (no throughput point: the report used to crash on it) and
# a pruned one, and a description a page must escape (tests/test_report_faults.py, tests/test_report_html.py).
FAULT_STUDY = "f_lora"
FAULT_DESCRIPTION = "LoRA r=2 at three LRs <first try> & one that diverges"
FAULT_RUNS = [
    FakeRun(FAULT_STUDY, "trial", 0, [*TINY, "lora.r=2", "optim.lr=3e-3", "lora.alpha=8"], 0.61),
    FakeRun(FAULT_STUDY, "trial", 1, [*TINY, "lora.r=2", "optim.lr=3e-2", "lora.alpha=8"], 0.58),
    FakeRun(
        FAULT_STUDY,
        "trial",
        2,
        [*TINY, "lora.r=2", "optim.lr=1e-1", "lora.alpha=8"],
        float("nan"),
        state="FAIL",
        reason="diverged: non-finite training loss at step 1",
        early=True,
    ),
    FakeRun(
        FAULT_STUDY,
        "trial",
        3,
        [*TINY, "lora.r=2", "optim.lr=1e-5", "lora.alpha=8"],
        0.88,
        state="PRUNED",
        reason="pruned at step 2",
    ),
]


def fault_store(root: Path) -> str:
    """FAULT_RUNS logged into a fresh store under `root` (experiment `faults`); its URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    log_runs(root, uri, FAULT_RUNS, experiment="faults", descriptions={FAULT_STUDY: FAULT_DESCRIPTION})
    return uri
