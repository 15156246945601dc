"""`python -m lora_lab.sweep ... > log` (issue 23): a log without carriage returns or cursor codes, with the study's
and each trial's progress as plain lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_sweep_into_a_log_file_writes_plain_lines(tmp_path: Path) -> None:
    log = tmp_path / "sweep.log"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    args = ["sweep=default", "model=tiny", "data=tiny_sentiment", "trainer=smoke", "sweep.n_trials=2"]
    args += ["sweep.compare_full=false", "sweep.pruner=none", "tracking.system_metrics=false"]
    with open(log, "w") as f:
        code = subprocess.run(
            [sys.executable, "-m", "lora_lab.sweep", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text
    assert "study default" in text and "step 24/24" in text  # the study's lines and each trial's last line
