"""Helpers shared by the fault and scale-out tests: sweep worker processes, waiting for a trial to checkpoint, and
reading back the Optuna study and the MLflow runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

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


def run_here(out: Path, main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str]:
    """What `python -m lora_lab.sweep *args` (main: lora_lab.sweep.cli.main; or the train command's) does with
    $LORA_LAB_OUTPUTS=out, run in this process: its exit code, and what it logged (lora_lab's INFO lines) and printed
    to stderr. For a run the test neither signals nor watches while it runs (a rerun after a kill): a process of its
    own costs ~12 s more CPU than the run (interpreter, imports; measured 18-19.5 against 6.5 s for a 2-trial study),
    taken from the other worker's tests on 2 cores. The environment is restored afterwards (tracking.connect sets
    MLflow's HTTP limits in it for a tracking server)."""
    import contextlib
    import io
    import logging

    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("lora_lab")
    level, environ = logger.level, dict(os.environ)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    os.environ["LORA_LAB_OUTPUTS"] = str(out)
    os.environ.pop("LORA_LAB_SWEEP_WORKER", None)
    try:
        with contextlib.redirect_stderr(lines):
            code = main(list(args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        os.environ.clear()
        os.environ.update(environ)
    return code, lines.getvalue()


def sweep_here(out: Path, args: list[str]) -> tuple[int, str]:
    """run_here for `python -m lora_lab.sweep *args`."""
    from lora_lab.sweep import cli

    return run_here(out, cli.main, args)


def start_worker(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), PYTHONUNBUFFERED="1")
    env.pop("LORA_LAB_SWEEP_WORKER", None)
    f = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "lora_lab.sweep", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
    )


def storage(storage_url: str) -> optuna.storages.RDBStorage:
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(storage_url, engine_kwargs=kwargs)


def load(storage_url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage(storage_url))


def trials_poll(
    storage_url: str, name: str, states: Optional[tuple[TrialState, ...]] = None
) -> Callable[[], list[optuna.trial.FrozenTrial]]:
    """A poll of the study's trials (those in `states`, or all; [] while the study does not exist yet) on one storage
    made at the first poll: a new RDBStorage per poll (an engine, a schema check) cost 44 ms of CPU on SQLite against
    9 ms, taken from the workers being watched, 10 polls a second."""
    held: list[optuna.storages.RDBStorage] = []

    def poll() -> list[optuna.trial.FrozenTrial]:
        try:
            if not held:
                held.append(storage(storage_url))
            study = optuna.load_study(study_name=name, storage=held[0])
            return study.get_trials(deepcopy=False, states=states)
        except Exception:  # the study may not exist yet
            return []

    return poll


def running_trials(storage_url: str, name: str) -> Callable[[], list[optuna.trial.FrozenTrial]]:
    """trials_poll of the study's RUNNING trials."""
    return trials_poll(storage_url, name, (TrialState.RUNNING,))


def kill_mid_trial(
    storage_url: str, name: str, trials_dir: Path, procs: dict[int, subprocess.Popen], timeout: float = 300
) -> optuna.trial.FrozenTrial:
    """SIGKILL the worker of the first RUNNING trial that has written a checkpoint and not finished; return the
    trial that worker held when it died, as it was then (see held_by)."""
    deadline = time.time() + timeout
    running = running_trials(storage_url, name)
    while time.time() < deadline:
        for p in procs.values():
            assert p.poll() is None, f"a worker exited early with {p.returncode}"
        for t in running():
            pid = worker_pid(t)
            folder = trials_dir / f"{t.number:04d}"
            if (
                pid in procs
                and (folder / "checkpoints" / "LATEST").is_file()
                and not (folder / "metrics.json").exists()
            ):
                os.kill(pid, signal.SIGKILL)
                procs[pid].wait(timeout=30)
                return held_by(storage_url, name, pid, t)
        time.sleep(0.1)
    raise AssertionError("no trial reached a checkpoint in time")


def worker_pid(trial: optuna.trial.FrozenTrial) -> int:
    """The PID in the trial's `worker` attribute (host:pid), 0 if it has none."""
    return int(str(trial.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])


def held_by(storage_url: str, name: str, pid: int, seen: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The trial the SIGKILLed worker `pid` held when it died: `seen` (the RUNNING trial the kill was aimed at) unless
    the worker finished it between the poll and the kill and had taken its next trial (an 8-step trial can end in
    that moment on a loaded machine: the test then followed a trial that had COMPLETEd). Read after the death, so
    nothing changes under it but a survivor failing it as stale: RUNNING or FAIL, not COMPLETE."""
    trials = load(storage_url, name).get_trials(deepcopy=False)
    held = [t for t in trials if worker_pid(t) == pid and t.state in (TrialState.RUNNING, TrialState.FAIL)]
    return max(held, key=lambda t: t.number) if held else seen


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


def wait_for(
    predicate, proc: subprocess.Popen, log: Path, timeout: float = 180, what: str = "", every: float = 0.05
) -> None:
    """Poll `predicate` every `every` seconds until it holds; fail naming `what` (and the log's tail) on a timeout or
    if `proc` exits. A predicate that asks a server (not a file) polls less often: each ask costs the server and
    this process CPU that the watched process needs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"exited early with {proc.returncode}: {tail(log)}"
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: {tail(log)}")
