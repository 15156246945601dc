"""The report's tables for a fixed set of runs (tests/report_fixture.py) equal the tables captured before issue 12's
run records replaced the `final.*` metrics (tests/data/report_golden/, the `run` id column left out): the same runs
give the same numbers, whatever the MLflow layout. (The fixture's results use RunResult's old field names, which the
record kept; its `method` and `device` moved to the record's settings and identity.) One table was re-captured on
purpose since: methods.csv (session 4), when the methods table began to average seeds and to prefer the configurations
run with the most seeds: its LoRA row is now the fixture's two-seed attention configuration, with a spread column."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from report_fixture import RUNS

GOLDEN = Path(__file__).parent / "data" / "report_golden"


def normalise(text: str) -> str:
    """A table CSV without its `run` column (MLflow run ids differ per store)."""
    lines = text.splitlines()
    rows = list(csv.reader(lines[1:]))
    keep = [i for i, h in enumerate(rows[0]) if h != "run"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow([r[i] for i in keep])
    return lines[0] + "\n" + buf.getvalue()


def log_runs(root: Path, uri: str) -> None:
    """Every fixture run into the store, through tracking, as train and the sweep log them (records in, MLflow out)."""
    from lora_lab import tracking
    from lora_lab.config import compose
    from lora_lab.train import EvalEvent

    track = [f"tracking.uri={uri}", "tracking.experiment=golden", "tracking.system_metrics=false"]
    parents: dict[str, str] = {}
    for i, fr in enumerate(RUNS):
        _, cfg = compose(fr.overrides + track)
        if fr.study and fr.study not in parents:
            parents[fr.study] = tracking.study_parent_run(cfg.tracking, fr.study, {}, {})
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


def test_report_tables_equal_the_captured_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_lab.report.__main__ import main

    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path / "outputs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_runs(tmp_path, uri)
    out = tmp_path / "report"
    assert main(["--experiment", "golden", "--tracking-uri", uri, "--out", str(out), "--no-attach"]) == 0
    for golden in sorted(GOLDEN.glob("*.csv")):
        assert normalise((out / golden.name).read_text()) == golden.read_text(), golden.name
