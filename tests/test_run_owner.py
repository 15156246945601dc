"""One owner per run folder (issue 24, item 6), with real processes: a second `python -m lora_lab.train` aimed at
the output_dir of a live run is refused at start (exit 2, naming the owner's PID) before it opens an MLflow run; the
folder of a killed run is taken over by the next one (run in the test's process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweeprun import run_here

from lora_lab.files import OWNER_FILE, FolderBusy
from lora_lab.files import claim_folder as claim
from lora_lab.train.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "tracking.system_metrics=false",
]


def _train(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lora_lab.train", *TINY, *args]


def _runs(out: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_a_live_runs_folder_is_refused_and_a_dead_ones_taken_over(tmp_path: Path) -> None:
    out, folder = tmp_path / "outputs", tmp_path / "run"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out))
    first = subprocess.Popen(
        _train(out, "trainer.max_steps=100000", "trainer.eval_every=100000", f"output_dir={folder}"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        lock = folder / OWNER_FILE
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid) and _runs(out)):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "the first run never started"
            time.sleep(0.5)
        second = subprocess.run(
            _train(out, "trainer.max_steps=2", f"output_dir={folder}"),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"lora_lab.train: error: output_dir={folder} is in use by a live run (PID {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert len(_runs(out)) == 1  # the refused run opened no MLflow run
        assert first.poll() is None  # and the first one runs on
    finally:
        first.send_signal(signal.SIGKILL)  # killed: its lock goes with it, its PID stays in the file
        first.wait(timeout=60)
    assert (folder / OWNER_FILE).read_text().strip() == str(first.pid)
    # The next run, in this process (nothing signals it; a process of its own cost ~12 s more CPU than the run).
    code, said = run_here(out, main, [*TINY, "trainer.max_steps=2", "tracking=off", f"output_dir={folder}"])
    assert code == 0, said[-3000:]
    assert f"taking over from PID {first.pid}" in said
    assert (folder / "metrics.json").is_file()


def test_claim_in_one_process(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with claim(folder):
        assert (folder / OWNER_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(FolderBusy, match=f"PID {os.getpid()}"):  # another claim, even from this process
            claim(folder)
    claim(folder).release()  # released: claimed again
