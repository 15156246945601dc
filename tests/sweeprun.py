"""Helpers shared by the fault and scale-out tests: sweep worker processes, waiting for a trial to checkpoint, and
reading back the Optuna study and the MLflow runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent

# Small and quiet: the tiny model, 8 steps, a checkpoint every 2, one CPU thread per worker, no system metrics.
TRAIN = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "trainer.max_steps=8",
    "trainer.eval_every=4",
    "trainer.batch_size=4",
    "trainer.checkpoint_every=2",
    "trainer.eval_at_start=false",
    "tracking.system_metrics=false",
]
FAST_HEARTBEAT = ["sweep.heartbeat_s=1", "sweep.grace_s=3", "sweep.compare_full=false", "sweep.pruner=none"]


def start_worker(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), PYTHONUNBUFFERED="1")
    env.pop("LORA_LAB_SWEEP_WORKER", None)
    f = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "lora_lab.sweep", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
    )


def load(storage_url: str, name: str) -> optuna.Study:
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(storage_url, engine_kwargs=kwargs))


def kill_mid_trial(
    storage_url: str, name: str, trials_dir: Path, procs: dict[int, subprocess.Popen], timeout: float = 300
) -> optuna.trial.FrozenTrial:
    """SIGKILL the worker of the first RUNNING trial that has written a checkpoint and not finished; return that
    trial as it was just before the kill."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs.values():
            assert p.poll() is None, f"a worker exited early with {p.returncode}"
        try:
            trials = load(storage_url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # the study may not exist yet
            trials = []
        for t in trials:
            pid = int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])
            folder = trials_dir / f"{t.number:04d}"
            if (
                pid in procs
                and (folder / "checkpoints" / "LATEST").is_file()
                and not (folder / "metrics.json").exists()
            ):
                os.kill(pid, signal.SIGKILL)
                procs[pid].wait(timeout=30)
                return t
        time.sleep(0.1)
    raise AssertionError("no trial reached a checkpoint in time")


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise AssertionError("workers did not finish in time") from None
    return codes


def runs(tracking_uri: str, experiment: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text()[-n:]
    except OSError:
        return ""


def study_summary(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def retry_of(study: optuna.Study, number: int) -> Optional[optuna.trial.FrozenTrial]:
    found = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == number]
    return found[0] if found else None


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 180, what: str = "") -> None:
    """Poll `predicate` until it holds; fail naming `what` (and the log's tail) on a timeout or if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"exited early with {proc.returncode}: {tail(log)}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {tail(log)}")
