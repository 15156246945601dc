"""How a study ends, whatever the path (issue 24, items 7, 8, 13, 16, 17): its MLflow parent closed with a state and a
reason (stopped for identical failures, interrupted, resumed after a kill), interrupted work first on resume, a dead
worker's trial recovered without heartbeats (journal), a torn journal tail repaired, one comparison for two
processes, and worker processes that stop when their launcher is SIGKILLed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sweeprun import FAST_HEARTBEAT, TRAIN, runs, start_worker, study_summary, sweep_here, tail, wait_all, wait_for

from lora_lab.sweep import cli

QUICK = ["sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN]


def _journal(path: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name="default", storage=JournalStorage(JournalFileBackend(str(path))))


def _parent(outputs: Path, name: str = "default"):
    (parent,) = [
        r
        for r in runs(f"sqlite:///{outputs / 'mlflow.db'}", "lora_lab")
        if r.data.tags.get("lora_lab.kind") == "study" and r.data.tags.get("lora_lab.study") == name
    ]
    return parent


@pytest.mark.not_serial
def test_a_study_stopped_by_identical_failures_closes_its_parent_fail_with_the_reason(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study_file = tmp_path / "default.yaml"
    study_file.write_text("name: default\nspace:\n  lora.r: {type: categorical, choices: [4, 8]}\n")
    broken = [f"sweep={study_file}", "sweep.n_trials=5", *QUICK, "optim.lr=1e20", "optim.grad_clip=0"]
    assert cli.main(broken) == 1
    assert "the first 3 trials all failed the same way" in capsys.readouterr().err
    parent = _parent(outputs)
    reason = "stopped: the first 3 trials all failed the same way (diverged)"
    assert parent.info.status == "FAILED"
    assert parent.info.run_name == "FAIL default"  # the state first; the reason in its tag and description
    assert parent.data.tags["lora_lab.state"] == "FAIL" and parent.data.tags["lora_lab.reason"] == reason
    assert f"**State: FAIL** ({reason})" in parent.data.tags["mlflow.note.content"]

    # Fixed, the same study runs its full budget; its parent runs again and ends FINISHED, without the old reason.
    assert cli.main([f"sweep={study_file}", "sweep.n_trials=2", *QUICK]) == 0
    parent = _parent(outputs)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "default"
    assert parent.data.tags["lora_lab.state"] == "COMPLETE" and "lora_lab.reason" not in parent.data.tags


@pytest.mark.slow
@pytest.mark.not_serial
def test_sigterm_closes_the_parent_killed_and_the_rerun_runs_the_interrupted_trial_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["sweep=default", "sweep.n_trials=3", *QUICK, "trainer.max_steps=24"]
    log = tmp_path / "a.log"
    p = start_worker(out, args, log)
    folder = out / "studies" / "default" / "trials" / "0000"
    wait_for(lambda: (folder / "checkpoints" / "LATEST").is_file(), p, log, what="trial 0's checkpoint")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143, tail(log)
    assert "Traceback" not in log.read_text()
    parent = _parent(out)
    reason = "interrupted: resume with the same command"
    assert parent.info.status == "KILLED" and parent.info.run_name == "KILLED default"
    assert parent.data.tags["lora_lab.state"] == "KILLED" and parent.data.tags["lora_lab.reason"] == reason

    code, said = sweep_here(out, args)  # the rerun, in this process: nothing signals it
    assert code == 0, said[-3000:]
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    retry = trials[3]
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.datetime_start < min(trials[1].datetime_start, trials[2].datetime_start)  # interrupted work first
    assert f"resumed from {folder / 'checkpoints'}" in said
    parent = _parent(out)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "default"
    assert "lora_lab.reason" not in parent.data.tags


@pytest.mark.slow
@pytest.mark.not_serial
def test_a_sigkilled_journal_worker_trial_is_recovered_by_the_rerun(tmp_path: Path) -> None:
    """Journal storage has no heartbeats: the trial of a SIGKILLed process stayed RUNNING for good. The rerun sees
    its process gone and its folder's lock free: FAILs it (worker lost) and retries it from its checkpoint; the budget
    completes; nothing stays RUNNING in Optuna or MLflow, and the study's parent ends FINISHED."""
    out = tmp_path / "out"
    journal = tmp_path / "study.journal"
    args = ["sweep=default", "sweep.n_trials=2", *QUICK, "trainer.max_steps=24", f"sweep.storage=journal://{journal}"]
    log = tmp_path / "a.log"
    p = start_worker(out, args, log)
    folder = out / "studies" / "default" / "trials" / "0000"
    wait_for(lambda: (folder / "checkpoints" / "LATEST").is_file(), p, log, what="trial 0's checkpoint")
    p.kill()
    p.wait(timeout=30)
    assert [t.state for t in _journal(journal).trials][:1] == [TrialState.RUNNING]

    code, said = sweep_here(out, args)  # the rerun, in this process: nothing signals it
    assert code == 0, said[-3000:]
    study = _journal(journal)
    assert study_summary(study) == {"COMPLETE": 2, "FAIL": 1}, said[-3000:]
    lost = study.trials[0]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"].startswith("worker lost: process")
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert f"resumed from {folder / 'checkpoints'}" in said
    every = runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    (killed,) = [r for r in every if r.data.tags.get("lora_lab.trial") == "0"]
    assert killed.info.status == "KILLED" and "worker lost" in killed.data.tags["lora_lab.reason"]
    assert _parent(out).info.status == "FINISHED"


def test_a_live_workers_trial_is_not_taken(tmp_path: Path) -> None:
    """owner_state: alive while the process lives or holds the folder; gone only when both are gone."""
    import datetime
    import fcntl
    import socket
    import subprocess
    import sys
    from types import SimpleNamespace

    from lora_lab.sweep.objective import owner_state, process_alive

    trial_folder = tmp_path / "0000"
    trial_folder.mkdir()
    st = SimpleNamespace(trial_folder=lambda n: tmp_path / f"{n:04d}", spec=SimpleNamespace(grace_s=30))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.time()

    def trial(pid: int) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"worker": f"{socket.gethostname()}:{pid}"})
        t.number, t.datetime_start = 0, datetime.datetime.fromtimestamp(started)
        return t

    try:
        assert process_alive(child.pid, since=started) and owner_state(st, trial(child.pid))[0] == "alive"
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)
    holder = open(trial_folder / ".owner.lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)  # someone holds the folder: not gone, whatever its pid says
    assert owner_state(st, trial(child.pid))[0] == "alive"
    holder.close()
    state, why = owner_state(st, trial(child.pid))
    assert state == "gone" and why == (
        f"worker lost: process {child.pid} is gone and its trial folder is unlocked (killed or crashed)"
    )
    other = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"worker": "elsewhere:1"})
    assert owner_state(st, other)[0] == "unknown"  # another host: nothing to tell


def test_a_retry_does_not_name_the_dead_worker_as_its_owner(tmp_path: Path) -> None:
    """A retry copied from a trial with its worker's host:pid, once popped, looked owned by that dead worker until
    its new worker wrote itself: another worker's recover_orphans failed it in that moment (CI: UpdateFinishedTrial
    in the worker that had popped it). Both retry paths start the retry with no worker."""
    import datetime
    import socket
    from types import SimpleNamespace

    from lora_lab.sweep.objective import fail_and_retry, owner_state
    from lora_lab.sweep.study import LostTrialCallback
    from lora_lab.sweep.trials import TrialAttrs

    study = optuna.create_study(
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.journal")))
    )
    st = SimpleNamespace(
        study=study,
        tracking=SimpleNamespace(enabled=False),
        spec=SimpleNamespace(name="s", grace_s=30),
        trial_folder=lambda n: tmp_path / f"{n:04d}",
    )
    dead = f"{socket.gethostname()}:999999"  # above pid_max: no such process
    for _ in range(2):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        TrialAttrs.write(trial, worker=dead, device="h:cpu", overrides=["x=1"])
    fail_and_retry(st, optuna.Trial(study, 0), "interrupted by SIGTERM")
    study.tell(1, state=TrialState.FAIL)
    LostTrialCallback(st, max_retry=3)(study, study.trials[1], reason="worker lost")
    retries = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [r.system_attrs["failed_trial"] for r in retries] == [0, 1]
    for retry in retries:
        attrs = TrialAttrs.read(retry)
        assert attrs.worker is None and attrs.device is None and attrs.fail_reason is None, attrs
        assert attrs.overrides == ["x=1"]  # what it ran (after an OOM: the smaller batch) is kept
        assert attrs.retried_because.startswith(f"trial {retry.system_attrs['failed_trial']}: ")
        popped = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=retry.user_attrs)
        popped.number, popped.datetime_start = retry.number, datetime.datetime.now()
        assert owner_state(st, popped)[0] == "unknown"  # just popped, not yet claimed: left to its new worker


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path: Path) -> None:
    """A worker SIGKILLed between popping a trial and its first heartbeat left the trial RUNNING with no heartbeat
    row: Optuna's fail_stale_trials never judges such a trial, and the resumed sweep waited on it forever (found by
    test_sweep's SIGKILL test, killed in that moment). Past sweep.grace_s it is FAIL and retried; a trial that beats
    is left to Optuna's check, and one just popped to its worker."""
    from types import SimpleNamespace

    from lora_lab.sweep import optuna_internals as internals
    from lora_lab.sweep.study import LostTrialCallback
    from lora_lab.sweep.workers import UNBEATEN, recover_orphans

    st = SimpleNamespace(
        tracking=SimpleNamespace(enabled=False), spec=SimpleNamespace(name="s", grace_s=1, max_retry=3)
    )
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}",
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=LostTrialCallback(st, max_retry=3),
    )
    st.study = study = optuna.create_study(storage=storage, study_name="s")
    for x in (0.25, 0.75):
        study.enqueue_trial({"x": x})
    dead, beating = internals.pop_waiting_trial_id(study), internals.pop_waiting_trial_id(study)
    storage.record_heartbeat(beating)
    assert [t._trial_id for t in internals.unbeaten_running(study)] == [dead]
    assert recover_orphans(st, heartbeats=True) == []  # within sweep.grace_s: perhaps a live worker about to beat
    time.sleep(1.2)
    storage.record_heartbeat(beating)
    assert recover_orphans(st, heartbeats=True) == [study.trials[0].number]
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == UNBEATEN
    retry = trials[2]
    # It never sampled: its retry carries the same enqueued parameters, as Optuna's fixed_params.
    assert retry.system_attrs["failed_trial"] == 0 and retry.system_attrs["fixed_params"] == {"x": 0.25}
    assert retry.user_attrs["retried_because"] == f"trial 0: {UNBEATEN}"
    assert recover_orphans(st, heartbeats=True) == []  # once


@pytest.mark.not_serial
def test_a_torn_journal_tail_is_set_aside_and_the_study_goes_on(outputs: Path, tmp_path: Path, caplog) -> None:
    import logging

    journal = tmp_path / "study.journal"
    args = ["sweep=default", *QUICK, "tracking=off", f"sweep.storage=journal://{journal}"]
    assert cli.main([*args, "sweep.n_trials=1"]) == 0
    good = journal.read_bytes()
    torn = b'{"op_code":6,"worker_id":"w","trial_id":0,"user_attr":{"fail_re'  # a disk-full append, cut short
    journal.write_bytes(good + torn)
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        assert cli.main([*args, "sweep.n_trials=2"]) == 0
    assert f"journal file {journal}: its last record was torn" in caplog.text
    (aside,) = tmp_path.glob("study.journal.torn-*")
    assert aside.read_bytes() == torn and journal.read_bytes().startswith(good)
    assert study_summary(_journal(journal)) == {"COMPLETE": 2}

    # A glued last line (a cut record, then a whole one appended after it) goes aside the same way.
    journal.write_bytes(journal.read_bytes() + torn + b'{"op_code":0,"worker_id":"w"}\n')
    assert cli.main([*args, "sweep.n_trials=2"]) == 0
    assert len(list(tmp_path.glob("study.journal.torn-*"))) == 2


@pytest.mark.not_serial
def test_a_broken_journal_record_with_records_after_it_is_exit_2_naming_the_file(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    journal = tmp_path / "study.journal"
    args = ["sweep=default", *QUICK, "tracking=off", f"sweep.storage=journal://{journal}", "sweep.n_trials=1"]
    assert cli.main(args) == 0
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2]) + b'{"op_code":6,"wor\n' + b"".join(lines[2:]))
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"the journal file {journal} is damaged at line 3 of {len(lines) + 1}" in err
    assert f"head -n 2 {journal}" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_on_one_sqlite_study_run_one_comparison(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["sweep=default", "sweep.n_trials=2", *QUICK, "sweep.compare_full=true", "sweep.full_lr_grid=[1e-4]"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    codes = wait_all([start_worker(out, args, log) for log in logs], timeout=600)
    assert codes == [0, 0], "\n".join(tail(log) for log in logs)
    compare = [
        r for r in runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab") if r.data.tags.get("lora_lab.kind") == "compare"
    ]
    full, rerun = sorted(r.info.run_name for r in compare)  # one comparison: two runs, not four
    assert full == "full-ft-lr0.0001 · default" and rerun in ("rerun-trial-0 · default", "rerun-trial-1 · default")
    assert all("full fine-tuning (LR" in log.read_text() for log in logs)  # both print the comparison


@pytest.mark.slow
def test_sigkill_of_a_two_worker_launcher_stops_its_workers_and_leaves_their_trials_resumable(tmp_path: Path) -> None:
    from lora_lab.sweep.objective import process_alive

    out = tmp_path / "out"
    args = ["sweep=default", "sweep.n_trials=2", "sweep.workers=2", *QUICK, "trainer.checkpoint_every=10"]
    args += ["trainer.max_steps=400", "tracking=off"]
    log = tmp_path / "a.log"
    launcher = start_worker(out, args, log)
    journal = out / "studies" / "default" / "study.journal"
    trials = out / "studies" / "default" / "trials"
    both = lambda: all((trials / f"{n:04d}" / "checkpoints" / "LATEST").is_file() for n in (0, 1))  # noqa: E731
    wait_for(both, launcher, log, what="both workers' first checkpoints")
    pids = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in _journal(journal).trials}
    assert len(pids) == 2 and launcher.pid not in pids
    launcher.kill()
    launcher.wait(timeout=30)
    deadline = time.time() + 60
    while any(process_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(pid) for pid in pids), "a worker kept running after its launcher was killed"
    study = _journal(journal)
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all("interrupted by SIGTERM" in t.user_attrs["fail_reason"] for t in interrupted)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == 2  # their retries

    p = start_worker(out, [*args[:-2], "trainer.max_steps=400", "tracking=off"], tmp_path / "b.log")
    assert p.wait(timeout=600) == 0, tail(tmp_path / "b.log")
    assert study_summary(_journal(journal)) == {"COMPLETE": 2, "FAIL": 2}
    assert os.path.exists(journal)
