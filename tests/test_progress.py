"""Progress where it is read (issue 23): a live bar on a terminal, plain periodic lines in a log (no carriage return,
no cursor code), a line at least every LINE_EVERY_S seconds of a long run and never more often."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from lora_lab.train.progress import LINE_EVERY_S, ProgressLines, progress_bar

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_cadence_with_a_fake_clock() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressLines(600, desc="lora tiny", stream=out, every_s=10.0, clock=clock, heartbeat=False)
    written_at = []
    for step in range(600):  # 0.5 s per step: 300 s of training
        clock.now += 0.5
        before = out.getvalue().count("\n")
        bar.update(1)
        if step == 3:
            bar.set_postfix(loss="3.1000", tok_s="1200")
        if step == 39:
            bar.set_postfix(loss="2.9000", val="3.0500")
        if out.getvalue().count("\n") > before:
            written_at.append(clock.now)
    gaps = [b - a for a, b in zip(written_at, written_at[1:])]
    assert len(written_at) == 30 and min(gaps) >= 10.0 and max(gaps) <= 30.0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("lora tiny: step 20/600 (3%), train loss 3.1000, tokens/s 1200, elapsed 0:10, ETA")
    assert "val loss 3.0500" in lines[-1] and "train loss 2.9000" in lines[-1]  # merged: the val loss stays known
    bar.close()  # the last step was already shown: nothing more
    assert out.getvalue().count("\n") == 30


def test_a_long_evaluation_still_gets_a_line_and_close_writes_the_last_one() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressLines(10, stream=out, every_s=10.0, clock=clock, heartbeat=False)
    bar.update(1)
    clock.now += 4
    bar.tick()  # what the heartbeat thread calls: nothing due yet
    assert out.getvalue() == ""
    clock.now += 35  # a long evaluation: no step, but the heartbeat's tick writes the state
    bar.tick()
    assert out.getvalue().splitlines() == ["step 1/10 (10%), elapsed 0:39, ETA 5:51"]
    clock.now += 1
    bar.update(2)
    bar.close()  # steps were made since the last line: the last line says where the run ended
    assert out.getvalue().splitlines()[-1].startswith("step 3/10 (30%)")
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()


def test_the_heartbeat_thread_writes_without_steps() -> None:
    out = io.StringIO()
    bar = ProgressLines(5, desc="x", stream=out, every_s=0.05)
    try:
        import time

        deadline = time.time() + 5
        while "x: step 0/5" not in out.getvalue() and time.time() < deadline:
            time.sleep(0.01)
    finally:
        bar.close()
    assert "x: step 0/5 (0%)" in out.getvalue()


def test_a_terminal_gets_tqdm_and_a_file_gets_lines(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        assert isinstance(progress_bar(10, stream=f), ProgressLines)
        assert not isinstance(progress_bar(10, stream=f, enabled=False), ProgressLines)  # a disabled tqdm
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress_bar(10, stream=tty)
        assert not isinstance(bar, ProgressLines)
        bar.close()
    os.close(master)
    assert LINE_EVERY_S <= 30  # at least one line every 30 s of a long run


def test_the_cli_writes_plain_progress_lines_into_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "log"
    args = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "tracking=off", f"output_dir={tmp_path / 'run'}"]
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_lab.train", *args],
            cwd=REPO,
            env=dict(os.environ, LORA_LAB_OUTPUTS=str(tmp_path / "outputs")),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text
    lines = [line for line in text.splitlines() if line.startswith("lora tiny: step ")]
    assert lines and lines[-1].startswith("lora tiny: step 8/8 (100%), train loss "), text[-3000:]
    assert "val loss" in lines[-1] and "tokens/s" in lines[-1] and "elapsed" in lines[-1]
