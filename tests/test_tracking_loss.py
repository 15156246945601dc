"""A real `mlflow server` lost in the middle of a run (issue 24, item 2): the run ends within a bounded time with a
message that names the server, never a hang or a traceback; a server that comes back within tracking.deadline_s
costs nothing (every curve point arrives)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import MlflowServer

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "trainer.eval_every=10",
    "tracking.system_metrics=false",
]

pytestmark = pytest.mark.slow


def _start_run(out: Path, server: MlflowServer, steps: int, deadline: float) -> subprocess.Popen:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), PYTHONUNBUFFERED="1")
    args = [*TINY, f"trainer.max_steps={steps}", f"tracking.uri={server.url}", f"tracking.deadline_s={deadline}"]
    return subprocess.Popen(
        [sys.executable, "-m", "lora_lab.train", *args, f"output_dir={out / 'run'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_a_val_point(server: MlflowServer, proc: subprocess.Popen, timeout: float = 120) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server.url)
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        exp = client.get_experiment_by_name("lora_lab")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and "loss/val" in runs[0].data.metrics:
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("the run logged no evaluation in time")


def _kill(server: MlflowServer) -> None:
    import signal

    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


def test_a_lost_tracking_server_ends_the_run_within_its_deadline(tmp_path: Path) -> None:
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", workers=1).start()
    try:
        proc = _start_run(tmp_path / "out", server, steps=100_000, deadline=4)
        _wait_for_a_val_point(server, proc)
        _kill(server)
        lost = time.time()
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the run hung after its tracking server went away") from None
        took = time.time() - lost
    finally:
        server.stop()
    assert proc.returncode == 1, err[-2000:]
    assert f"tracking server {server.url} unreachable since" in err and "tracking.deadline_s=4" in err
    assert "Traceback" not in err
    assert took < 4 + 60  # the deadline, plus one bounded request (HTTP_LIMITS) still under way


def test_a_tracking_server_back_within_the_deadline_loses_nothing(tmp_path: Path) -> None:
    import mlflow

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = MlflowServer(db, tmp_path / "artifacts", workers=1).start()
    try:
        proc = _start_run(tmp_path / "out", server, steps=300, deadline=120)
        run_id = _wait_for_a_val_point(server, proc)
        _kill(server)
        time.sleep(2)
        again = MlflowServer(db, tmp_path / "artifacts", workers=1)
        again.port, again.url = server.port, server.url  # the same address: the client only retries
        again.start()
        try:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            points = mlflow.MlflowClient(tracking_uri=again.url).get_metric_history(run_id, "loss/train")
        finally:
            again.stop()
    finally:
        server.stop()
    assert sorted(p.step for p in points) == list(range(1, 301))  # every step, also those logged while it was away
