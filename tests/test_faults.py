"""Faults a long sweep meets: a non-finite loss, out of memory, a full disk while checkpointing (injected in-process),
and a worker SIGKILLed mid-trial next to another process on the same embedded (SQLite) default study."""

from __future__ import annotations

import contextlib
import errno
import json
import math
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from sweeprun import (
    FAST_HEARTBEAT,
    TRAIN,
    kill_mid_trial,
    load,
    retry_of,
    runs,
    start_worker,
    study_summary,
    sweep_here,
    tail,
    wait_all,
    wait_for,
)


def _no_partial_files(root: Path) -> None:
    """Nothing truncated or half-written anywhere: no temp files/folders, every safetensors and JSON file loads."""
    from safetensors.torch import load_file

    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name and p.name.startswith(".")]
    assert not leftovers, f"temp files left behind: {leftovers[:5]}"
    for p in root.rglob("*.safetensors"):
        load_file(str(p))
    for p in root.rglob("*.json"):
        json.loads(p.read_text())


@pytest.mark.not_serial
def test_nan_and_oom_fail_with_reason_and_a_full_disk_stops_the_study_until_rerun(tmp_path, monkeypatch, capsys):
    """Trial 0's loss turns NaN (injected by a forward hook), trial 1 runs out of memory on both attempts (injected):
    each FAILs with its reason and the sweep goes on. Trial 2 hits ENOSPC while writing its checkpoint (injected
    after a partial write): every later trial would too, so the study stops with one line naming the disk and exit
    1, the trial FAILs with that reason (its MLflow run closed) and is queued again. The rerun runs that retry first,
    then the rest of the budget."""
    import safetensors.torch

    from lora_lab import train
    from lora_lab.sweep import cli, objective

    out = tmp_path / "out"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(out))
    current: dict[str, int] = {}
    real_run_trial, real_fit = objective.run_trial, train.Session.fit
    real_save_file = safetensors.torch.save_file

    def run_trial(st, trial, batch_shrink=1):
        current["n"] = trial.number
        return real_run_trial(st, trial, batch_shrink)

    def nan_loss(module, args, kwargs, output):
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss * float("nan")
        return output

    def fit(self, on_eval=None):
        if current.get("n") == 0:
            # Trial 0's alone: a warm worker keeps the model for the next trials, and the hook with it if left on.
            handle = self.model.register_forward_hook(nan_loss, with_kwargs=True)
            try:
                return real_fit(self, on_eval)
            finally:
                handle.remove()
        if current.get("n") == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_fit(self, on_eval)

    def save_file(tensors, filename, metadata=None):
        if current.get("n") == 2:
            with open(filename, "wb") as f:  # the disk fills up part-way through the file
                f.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save_file(tensors, filename, metadata)

    monkeypatch.setattr(objective, "run_trial", run_trial)
    monkeypatch.setattr(train.Session, "fit", fit)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    args = [
        "sweep=default",
        "sweep.name=faults",
        "sweep.n_trials=4",
        "sweep.sampler=random",
        "sweep.compare_full=false",
        "sweep.pruner=none",
        *TRAIN,
    ]
    assert cli.main(args) == 1  # returned, not raised: no traceback
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("lora_lab.sweep:")]
    ckpts = out / "studies" / "faults" / "trials" / "0002" / "checkpoints"
    assert f"trial 2: disk full: cannot write {ckpts}/step-0000002: no space left on device" in line, line
    assert "The study stops" in line and "run the same command to resume; trial 2 runs again first" in line

    study = load(f"sqlite:///{out / 'optuna.db'}", "faults")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 2
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials]
    assert reasons[0].startswith("diverged") and "non-finite" in reasons[0], reasons[0]
    assert reasons[1].startswith("oom:") and "out of memory" in reasons[1], reasons[1]
    assert "trainer.batch_size=2" in trials[1].user_attrs["overrides"]  # retried once with half the micro-batch
    assert reasons[2].startswith("disk full: cannot write") and "no space left on device" in reasons[2], reasons[2]
    assert trials[4].system_attrs["failed_trial"] == 2 and trials[4].params == trials[2].params

    # The failed checkpoint left nothing: no step folder, no LATEST, no temp folder, no truncated file anywhere.
    assert not ckpts.exists() or not any(ckpts.iterdir()), list(ckpts.iterdir())
    _no_partial_files(out / "studies")

    uri = f"sqlite:///{out / 'mlflow.db'}"
    by_trial = {
        r.data.tags.get("lora_lab.trial"): r
        for r in runs(uri, "lora_lab")
        if r.data.tags.get("lora_lab.kind") == "trial"
    }
    assert {k: r.info.status for k, r in by_trial.items()} == {"0": "FAILED", "1": "FAILED", "2": "FAILED"}
    assert "non-finite training loss" in by_trial["0"].data.tags["lora_lab.reason"]
    assert "no space left on device" in by_trial["2"].data.tags["lora_lab.reason"]
    (parent,) = [r for r in runs(uri, "lora_lab") if r.data.tags.get("lora_lab.kind") == "study"]
    assert parent.info.status == "FAILED" and parent.info.run_name == "FAIL faults"  # the reason: its tag
    assert parent.data.tags["lora_lab.reason"] == "stopped: disk full"

    # The disk has room again: the rerun runs trial 2's retry first, then the rest of the budget.
    current["n"] = -1
    monkeypatch.setattr(objective, "run_trial", real_run_trial)
    assert cli.main(args) == 0
    trials = sorted(load(f"sqlite:///{out / 'optuna.db'}", "faults").get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials[3:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[4].datetime_start < trials[3].datetime_start  # the retry first
    assert math.isfinite(trials[4].values[0])
    every = runs(uri, "lora_lab")
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    (parent,) = [r for r in every if r.data.tags.get("lora_lab.kind") == "study"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "faults"
    assert "lora_lab.reason" not in parent.data.tags


@pytest.mark.not_serial
def test_a_runtime_error_that_says_out_of_memory_is_an_error_not_an_oom(tmp_path, monkeypatch):
    """Out of memory is known by its type (torch.OutOfMemoryError; sweep.trials.is_oom): a RuntimeError whose message
    says "out of memory" fails its trial as that error, at once, without the retry at half the micro-batch."""
    from lora_lab import train
    from lora_lab.sweep import cli

    out = tmp_path / "out"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(out))
    calls = []

    def fit(self, on_eval=None):
        calls.append(self.cfg.trainer.batch_size)
        raise RuntimeError("CUDA error: out of memory (a message, not the type)")

    monkeypatch.setattr(train.Session, "fit", fit)
    args = ["sweep=default", "sweep.name=says_oom", "sweep.n_trials=1", "sweep.sampler=random", "sweep.pruner=none"]
    assert cli.main([*args, "sweep.compare_full=false", *TRAIN, "tracking=off"]) == 1  # no trial completed
    (trial,) = load(f"sqlite:///{out / 'optuna.db'}", "says_oom").get_trials(deepcopy=False)
    assert trial.state == TrialState.FAIL and calls == [4]  # one attempt, at the configured micro-batch
    assert trial.user_attrs["fail_reason"] == "RuntimeError: CUDA error: out of memory (a message, not the type)"
    assert not any("trainer.batch_size" in o for o in trial.user_attrs["overrides"])


@pytest.mark.slow
def test_two_processes_on_the_default_study_survive_a_sigkill_and_resume_exactly(tmp_path):
    """Two `python -m lora_lab.sweep` processes on the embedded default study (SQLite, one outputs folder); one is
    SIGKILLed after its trial wrote a checkpoint. The heartbeat fails that trial, the survivor retries it with the same
    parameters, resumes from the checkpoint and ends with the very losses of an uninterrupted run; the killed MLflow
    run is KILLED; the study holds exactly the budget."""
    from lora_lab import train
    from lora_lab.config import compose, load_sweep

    out = tmp_path / "out"
    args = ["sweep=default", "sweep.n_trials=3", "sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_worker(out, args, log) for log in logs]
    storage = f"sqlite:///{out / 'optuna.db'}"
    try:
        killed = kill_mid_trial(storage, "default", out / "studies" / "default" / "trials", {p.pid: p for p in procs})
        survivors = [p for p in procs if p.returncode is None]
        assert len(survivors) == 1
        codes = wait_all(survivors, timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    survivor_log = logs[procs.index(survivors[0])]
    assert codes == [0], tail(survivor_log)

    study = load(storage, "default")
    assert study_summary(study) == {"COMPLETE": 3, "FAIL": 1}, tail(survivor_log)
    lost = study.trials[killed.number]
    assert lost.state == TrialState.FAIL  # by the heartbeat (Optuna finishes it before the callback: reason in MLflow)
    retry = retry_of(study, killed.number)
    assert retry is not None and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params
    folder = out / "studies" / "default" / "trials" / f"{killed.number:04d}"
    assert f"resumed from {folder / 'checkpoints'}" in survivor_log.read_text()

    # The same trial without the kill: same overrides, same seed, in-process.
    spec = load_sweep("default", ["n_trials=3"])
    _, cfg = compose(
        list(spec.overrides)
        + TRAIN
        + retry.user_attrs["overrides"]
        + [f"output_dir={tmp_path / 'clean'}", "tracking.enabled=false"]
    )
    clean = train.build_and_fit(cfg)
    resumed = json.loads((folder / "metrics.json").read_text())
    assert resumed["steps"] == clean.steps == 8
    assert [p["train_loss"] for p in resumed["history"]] == pytest.approx(
        [p.train_loss for p in clean.history], abs=1e-6
    )
    assert resumed["val_loss"] == pytest.approx(clean.val_loss, abs=1e-6)
    _no_partial_files(out / "studies")

    all_runs = runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
    parents = [r for r in all_runs if r.data.tags.get("lora_lab.kind") == "study"]
    children = [r for r in all_runs if r.data.tags.get("lora_lab.kind") == "trial"]
    assert len(parents) == 1
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    status = {r.data.tags["lora_lab.trial"]: r.info.status for r in children}
    assert status.pop(str(killed.number)) in ("KILLED", "FAILED")
    lost_run = [r for r in children if r.data.tags["lora_lab.trial"] == str(killed.number)][0]
    assert "no heartbeat" in lost_run.data.tags.get("lora_lab.reason", "")
    assert sorted(status.values()) == ["FINISHED"] * 3 and len(children) == 4


@pytest.mark.not_serial
def test_sigterm_keeps_checkpoints_and_resumes_and_a_sigkilled_comparison_run_is_closed_on_resume(tmp_path):
    """SIGTERM mid-trial: exit 143, the trial FAILs as interrupted with a queued retry, its checkpoints stay, its MLflow
    run is KILLED with the reason; the rerun resumes it from the checkpoint. A SIGKILL during the full-fine-tuning
    comparison leaves that MLflow run RUNNING; the next run of the command closes it as KILLED with the reason."""
    import signal

    out = tmp_path / "out"
    folder = out / "studies" / "default" / "trials" / "0000"
    args = ["sweep=default", "sweep.n_trials=1", "sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    p = start_worker(out, args, tmp_path / "a.log")
    wait_for(lambda: (folder / "checkpoints" / "LATEST").is_file(), p, tmp_path / "a.log", 120, "a checkpoint")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143, tail(tmp_path / "a.log")
    assert (folder / "checkpoints" / "LATEST").is_file()  # kept for the retry
    study = load(f"sqlite:///{out / 'optuna.db'}", "default")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted by SIGTERM" in study.trials[0].user_attrs["fail_reason"]
    (run,) = [r for r in runs(uri, "lora_lab") if r.data.tags.get("lora_lab.kind") == "trial"]
    assert run.info.status == "KILLED" and "interrupted by SIGTERM" in run.data.tags["lora_lab.reason"]

    # the rerun resumes the trial; SIGKILL it while a comparison run is RUNNING in MLflow
    compare = ["sweep.compare_full=true", "sweep.full_lr_grid=[1e-4]"]
    p = start_worker(out, [*args, *compare], tmp_path / "b.log")

    def comparing() -> bool:
        with contextlib.suppress(Exception):
            return any(
                r.data.tags.get("lora_lab.kind") == "compare" and r.info.status == "RUNNING"
                for r in runs(uri, "lora_lab")
            )
        return False

    wait_for(comparing, p, tmp_path / "b.log", 120, "the comparison run")
    p.kill()
    p.wait(timeout=30)
    assert f"resumed from {folder / 'checkpoints'}" in (tmp_path / "b.log").read_text()
    code, said = sweep_here(out, [*args, *compare])  # the next run of the command: here, nobody signals it
    assert code == 0, said[-3000:]
    every = runs(uri, "lora_lab")
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    killed = [r for r in every if r.data.tags.get("lora_lab.kind") == "compare" and r.info.status == "KILLED"]
    assert len(killed) == 1 and "study resumed" in killed[0].data.tags["lora_lab.reason"]
    study = load(f"sqlite:///{out / 'optuna.db'}", "default")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_sigint_inside_interruptible_raises_interrupted_once() -> None:
    import os
    import signal

    from lora_lab.train import Interrupted, interruptible

    # What was there before: Python's default_int_handler, or SIG_IGN under a shell's background job (nohup ... &).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as err, interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            sum(range(100))  # the handler runs between bytecodes
    assert err.value.signum == signal.SIGINT and "SIGINT" in str(err.value)
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.not_serial
def test_a_paused_worker_whose_trial_was_retried_elsewhere_drops_it_and_exits_0(tmp_path):
    """SIGSTOP a worker mid-trial past the grace period: another worker (this process: the test only waits for it)
    fails the trial as stale and retries it in its own folder (the first one is still held). SIGCONT: the woken
    worker sees the trial is no longer its own, drops it without touching the study or flipping MLflow states, and
    exits 0."""
    import signal

    out = tmp_path / "out"
    trials = out / "studies" / "default" / "trials"
    args = ["sweep=default", "sweep.n_trials=1", "sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN]
    a = start_worker(out, args, tmp_path / "a.log")
    try:
        wait_for(
            lambda: (trials / "0000" / "checkpoints" / "LATEST").is_file(),
            a,
            tmp_path / "a.log",
            120,
            "trial 0's checkpoint",
        )
        a.send_signal(signal.SIGSTOP)
        code, said = sweep_here(out, args)
        assert code == 0, said[-3000:]
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=60) == 0, tail(tmp_path / "a.log")
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
    assert "no longer" in (tmp_path / "a.log").read_text() or "dropped here" in (tmp_path / "a.log").read_text()
    study = load(f"sqlite:///{out / 'optuna.db'}", "default")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["output_dir"] == str(trials / "0001")  # never the held folder
    by_trial = {
        r.data.tags["lora_lab.trial"]: r.info.status
        for r in runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
        if r.data.tags.get("lora_lab.kind") == "trial"
    }
    assert by_trial == {"0": "KILLED", "1": "FINISHED"}
