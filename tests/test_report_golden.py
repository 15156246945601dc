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
from report_fixture import log_runs

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


def test_report_tables_equal_the_captured_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_lab.report.__main__ import main

    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path / "outputs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_runs(tmp_path, uri)
    out = tmp_path / "report"
    assert main(["--experiment", "golden", "--tracking-uri", uri, "--out", str(out), "--no-attach"]) == 0
    for golden in sorted(GOLDEN.glob("*.csv")):
        assert normalise((out / golden.name).read_text()) == golden.read_text(), golden.name
