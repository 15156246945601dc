"""A sweep on a full disk (issue 24, items 1 and 14): the study stops with one line that says the disk is full and
where, exit 1, no traceback; the trial FAILs (or, when the study's own storage cannot be written either, stays for
the next run to retry); its MLflow run is closed; and the rerun, once there is room, trains no finished trial again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from disks import fill_disk, tmpfs
from optuna.trial import TrialState
from sweeprun import FAST_HEARTBEAT, TRAIN, load, runs, start_worker, sweep_here, tail

ARGS = ["sweep=default", "sweep.n_trials=2", "sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN]


def test_a_full_disk_under_the_study_storage_stops_and_the_rerun_reuses_the_finished_run(
    outputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Trial 0 trains to its end (metrics.json written, MLflow run FINISHED), then SQLite cannot commit its state:
    "database or disk is full" (injected as Optuna raises it, a StorageInternalError). One line names optuna.db and
    the full disk, exit 1. The rerun fails the trial as stale, retries it, and the retry takes the finished run's
    metrics.json instead of training again."""
    import sqlite3

    import sqlalchemy.exc

    from lora_lab import train
    from lora_lab.sweep import cli

    real = optuna.storages.RDBStorage.set_trial_state_values
    fired: list[int] = []

    def full_disk(self, trial_id, state, values=None):
        if state == TrialState.COMPLETE and not fired:
            fired.append(trial_id)
            try:
                raise sqlalchemy.exc.OperationalError(
                    "COMMIT", {}, sqlite3.OperationalError("database or disk is full")
                )
            except sqlalchemy.exc.OperationalError as exc:
                raise optuna.exceptions.StorageInternalError(
                    "An exception is raised during the commit. This typically happens due to invalid data in the "
                    "commit, e.g. exceeding max length. "
                ) from exc
        return real(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", full_disk)
    assert cli.main(ARGS) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lora_lab.sweep:")]
    assert f"SQLite file {outputs / 'optuna.db'}: cannot write it: no space left on device" in line, line
    assert "invalid data" not in line and "run the same command again to resume" in line
    storage = f"sqlite:///{outputs / 'optuna.db'}"
    (trial,) = load(storage, "default").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    folder = outputs / "studies" / "default" / "trials" / f"{trial.number:04d}"
    finished = (folder / "metrics.json").read_text()
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    (run,) = [r for r in runs(uri, "lora_lab") if r.data.tags.get("lora_lab.kind") == "trial"]
    assert run.info.status == "FINISHED"  # closed: its run finished before the commit failed
    (parent,) = [r for r in runs(uri, "lora_lab") if r.data.tags.get("lora_lab.kind") == "study"]
    assert parent.info.status == "FAILED" and "storage failed" in parent.data.tags["lora_lab.reason"]

    fits: list[int] = []
    real_fit = train.Session.fit

    def counting_fit(self, on_eval=None):
        fits.append(1)
        return real_fit(self, on_eval)

    monkeypatch.setattr(train.Session, "fit", counting_fit)
    time.sleep(3.5)  # past sweep.grace_s: the killed trial's heartbeat is stale
    assert cli.main(ARGS) == 0
    study = load(storage, "default")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == trial.number)
    assert retry.params == trial.params and retry.values[0] == pytest.approx(trial.user_attrs["val_loss"])
    assert len(fits) == 1  # the other budget trial trained; the retry did not
    assert (folder / "metrics.json").read_text() == finished
    every = runs(uri, "lora_lab")
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    assert sorted(r.data.tags["lora_lab.trial"] for r in every if r.data.tags.get("lora_lab.kind") == "trial") == [
        str(trial.number),
        str(1 - trial.number),
    ]  # one run per trained trial: the reused one was not logged again


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs (root only): room for a sweep's files until the test fills it; skips where mounting is not
    allowed."""
    with tmpfs(tmp_path / "small", "32m") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here")
        yield mnt


def _fill(folder: Path) -> Path:
    """Write a ballast file until the filesystem under `folder` has no byte left."""
    return fill_disk(folder / "ballast")


@pytest.mark.slow
def test_a_real_full_disk_mid_sweep_ends_in_one_line_and_the_rerun_loses_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    out = small_disk / "out"
    args = [*ARGS, "trainer.max_steps=400", "trainer.eval_every=100"]
    storage = f"sqlite:///{out / 'optuna.db'}"
    log = tmp_path / "a.log"
    p = start_worker(out, args, log)
    try:
        trials = out / "studies" / "default" / "trials"
        deadline = time.time() + 300
        while time.time() < deadline:  # (files only: opening optuna.db here would race the sweep creating it)
            assert p.poll() is None, tail(log)
            if (trials / "0000" / "metrics.json").is_file() and (trials / "0001" / "checkpoints" / "LATEST").is_file():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the second trial never wrote a checkpoint: " + tail(log))
        ballast = _fill(small_disk)
        code = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert code == 1, tail(log)
    assert "Traceback" not in text, tail(log, 6000)
    (line,) = [x for x in text.splitlines() if x.startswith("lora_lab.sweep:")]
    assert "no space left on device" in line and str(out) in line, line
    first = load(storage, "default").trials[0]
    assert first.state == TrialState.COMPLETE

    os.unlink(ballast)
    time.sleep(3.5)  # past sweep.grace_s
    code, said = sweep_here(out, args)  # the rerun, in this process: nothing signals it
    assert code == 0, said[-3000:]
    study = load(storage, "default")
    assert study.trials[0].datetime_complete == first.datetime_complete  # not trained again
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 2
    every = runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    trial_runs = [r for r in every if r.data.tags.get("lora_lab.kind") == "trial"]
    assert [r.info.status for r in trial_runs if r.data.tags["lora_lab.trial"] == "0"] == ["FINISHED"]
