"""Several trials per device (`sweep.trials_per_device`): each worker process's environment (GPU pinning, memory cap,
CPU threads), the 'auto' rule, bad values, an exact budget with two processes on the CPU (on a given journal, and on
the embedded default: the study's own journal file, or the SQLite file a study began in), and a killed process's
trial retried by its neighbour.

A warm worker rebuilding the model when a trial changes `model.*` is tested in tests/test_warm.py:
test_warm_reloads_when_model_or_data_changes and
test_sweep_warm_and_cold_give_the_same_trials_and_reload_on_model_change.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from sweeprun import (
    FAST_HEARTBEAT,
    TRAIN,
    held_by,
    load,
    retry_of,
    running_trials,
    start_worker,
    study_summary,
    tail,
    wait_all,
    worker_pid,
)

from lora_lab.config import ConfigError, load_sweep
from lora_lab.sweep import cli, workers


def test_worker_envs_two_gpus_three_per_device() -> None:
    envs = workers.worker_envs(devices=2, per_device=3, gpus=2, cores=16)
    assert len(envs) == 6
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "0", "1", "1", "1"]
    assert all(e[workers.MEMORY_FRACTION_ENV] == f"{0.95 / 3:.4f}" for e in envs)
    assert all(e[workers.THREADS_ENV] == e["OMP_NUM_THREADS"] == "2" for e in envs)  # 16 cores // 6 processes
    assert all(e[workers.WORKER_ENV] == "1" for e in envs)


def test_worker_envs_cpu_and_oversubscribed_gpu() -> None:
    cpu = workers.worker_envs(devices=1, per_device=2, gpus=0, cores=2)
    assert [e[workers.THREADS_ENV] for e in cpu] == ["1", "1"]
    assert not any("CUDA_VISIBLE_DEVICES" in e or workers.MEMORY_FRACTION_ENV in e for e in cpu)
    assert workers.worker_envs(devices=1, per_device=3, gpus=0, cores=2)[0][workers.THREADS_ENV] == "1"  # at least one
    # One process per GPU: no cap. Three workers on two GPUs: GPU 0 is shared by two, each gets half the share.
    assert workers.MEMORY_FRACTION_ENV not in workers.worker_envs(devices=2, per_device=1, gpus=2, cores=4)[0]
    shared = workers.worker_envs(devices=3, per_device=1, gpus=2, cores=4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["0", "1", "0"]
    assert [e.get(workers.MEMORY_FRACTION_ENV) for e in shared] == ["0.4750", None, "0.4750"]


def test_worker_envs_keep_to_the_launchers_visible_gpus() -> None:
    # A launcher limited to physical GPUs 2 and 3 sees them as 0 and 1; its workers must be given 2 and 3 (UUIDs too).
    envs = workers.worker_envs(devices=2, per_device=2, gpus=2, cores=8, visible="2,3")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "2", "3", "3"]
    uuids = workers.worker_envs(devices=2, per_device=1, gpus=2, cores=8, visible="GPU-aa, GPU-bb")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in uuids] == ["GPU-aa", "GPU-bb"]


def test_auto_per_device() -> None:
    gib = 2**30
    assert workers.auto_per_device(peak_bytes=10 * gib, free_bytes=100 * gib) == 8  # 9 fit, capped at 8
    assert workers.auto_per_device(peak_bytes=30 * gib, free_bytes=100 * gib) == 3  # floor(0.9 * 100 / 30)
    assert workers.auto_per_device(peak_bytes=80 * gib, free_bytes=60 * gib) == 1  # never below one
    assert workers.auto_per_device(peak_bytes=0, free_bytes=60 * gib) == 1


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "true", "many"])
def test_bad_trials_per_device_is_a_config_error(value: str, outputs: Path) -> None:
    with pytest.raises(ConfigError, match="sweep.trials_per_device"):
        load_sweep("default", [f"trials_per_device={value}"])
    assert load_sweep("default", ["trials_per_device=auto"]).trials_per_device == "auto"


def test_cli_refuses_a_bad_value_with_exit_2(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["sweep=default", "sweep.trials_per_device=0", *TRAIN]) == 2
    assert "sweep.trials_per_device" in capsys.readouterr().err
    assert not outputs.exists() or not any(outputs.iterdir())  # nothing created


def test_two_per_device_on_the_embedded_default_use_the_study_journal(tmp_path: Path) -> None:
    """No sweep.storage (issue 23): on one machine several processes just work, on a journal file in the study's
    folder, said once in the log; 4 trials, 4 distinct configurations, from both processes."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = tmp_path / "out"
    args = ["sweep=default", "sweep.n_trials=4", "sweep.sampler=random", "sweep.trials_per_device=2"]
    log = tmp_path / "sweep.log"
    (code,) = wait_all([start_worker(out, [*args, *FAST_HEARTBEAT, *TRAIN, "tracking=off"], log)], timeout=600)
    assert code == 0, tail(log)
    journal = out / "studies" / "default" / "study.journal"
    text = log.read_text()
    assert text.count(f"2 processes on this machine share the journal file {journal}") == 1, tail(log)
    assert not (out / "optuna.db").exists()
    study = optuna.load_study(study_name="default", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials(deepcopy=False)
    assert study_summary(study) == {"COMPLETE": 4}, tail(log)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # 4 distinct trials
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials


def test_a_study_in_the_sqlite_file_keeps_resuming_there(outputs: Path, tmp_path: Path) -> None:
    """A study begun in optuna.db (one process) and resumed with two processes per device stays in optuna.db: no
    journal is started beside it (its trials would be lost from view)."""
    args = ["sweep=default", "sweep.sampler=random", *FAST_HEARTBEAT, *TRAIN, "tracking=off"]
    assert cli.main([*args, "sweep.n_trials=1"]) == 0
    log = tmp_path / "sweep.log"
    (code,) = wait_all([start_worker(outputs, [*args, "sweep.n_trials=3", "sweep.trials_per_device=2"], log)], 600)
    assert code == 0, tail(log)
    assert not (outputs / "studies" / "default" / "study.journal").exists()
    assert study_summary(load(f"sqlite:///{outputs / 'optuna.db'}", "default")) == {"COMPLETE": 3}, tail(log)


def test_two_per_device_finish_exactly_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = tmp_path / "study.journal"
    args = [
        "sweep=default",
        "sweep.n_trials=4",
        "sweep.sampler=random",
        "sweep.trials_per_device=2",
        f"sweep.storage=journal:///{journal}",
        *FAST_HEARTBEAT,
        *TRAIN,
        "tracking=off",
    ]
    log = tmp_path / "sweep.log"
    (code,) = wait_all([start_worker(out, args, log)], timeout=600)
    assert code == 0, tail(log)
    assert "starting 2 worker processes (1 devices x 2 per device)" in log.read_text()
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="default", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials(deepcopy=False)
    assert study_summary(study) == {"COMPLETE": 4}, tail(log)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials


def test_a_killed_process_trial_is_retried_by_its_neighbour(tmp_path: Path) -> None:
    """Two processes on one device (SQLite storage given explicitly: heartbeats); SIGKILL the one whose trial wrote a
    checkpoint. Its neighbour fails that trial on the stale heartbeat and retries it with the same parameters; the
    budget stays exact; the parent reports the lost process with exit code 1."""
    out = tmp_path / "out"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [
        "sweep=default",
        "sweep.n_trials=3",
        "sweep.sampler=random",
        "sweep.trials_per_device=2",
        f"sweep.storage={storage}",
        *FAST_HEARTBEAT,
        *TRAIN,
        "tracking=off",
    ]
    log = tmp_path / "sweep.log"
    parent = start_worker(out, args, log)
    killed = None
    running = running_trials(storage, "default")
    try:
        deadline = time.time() + 300
        while killed is None and time.time() < deadline:
            assert parent.poll() is None, tail(log)
            for t in running():
                pid = worker_pid(t)
                folder = out / "studies" / "default" / "trials" / f"{t.number:04d}"
                if pid and pid != parent.pid and (folder / "checkpoints" / "LATEST").is_file():
                    if not (folder / "metrics.json").exists():
                        os.kill(pid, signal.SIGKILL)
                        killed = held_by(storage, "default", pid, t)
                        break
            time.sleep(0.1)
        assert killed is not None, "no trial reached a checkpoint in time: " + tail(log)
        (code,) = wait_all([parent], timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert code == 1 and "a worker exited with code -9" in log.read_text(), tail(log)
    study = load(storage, "default")
    assert study_summary(study) == {"COMPLETE": 3, "FAIL": 1}, tail(log)
    assert study.trials[killed.number].state == TrialState.FAIL
    retry = retry_of(study, killed.number)
    assert retry is not None and retry.state == TrialState.COMPLETE and retry.params == killed.params


def test_first_trial_takes_the_preflight_model(outputs: Path, tmp_path: Path) -> None:
    """The preflight's loaded base model goes to the warm holder: the first trial does not load it again."""
    import optuna

    study_file = tmp_path / "handoff.yaml"
    study_file.write_text(
        f"# python -m lora_lab.sweep sweep={study_file}\nname: handoff\nsampler: random\npruner: none\n"
        "compare_full: false\nn_trials: 2\nspace:\n  optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n"
    )
    assert cli.main([f"sweep={study_file}", *TRAIN, "trainer.checkpoint_every=0", "tracking=off"]) == 0
    study = optuna.load_study(study_name="handoff", storage=f"sqlite:///{outputs / 'optuna.db'}")
    assert [t.user_attrs["warm"] for t in sorted(study.trials, key=lambda t: t.number)] == [True, True]


def test_auto_on_the_cpu_is_one_process(outputs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = tmp_path / "auto.journal"
    args = ["sweep=default", "sweep.n_trials=1", "sweep.trials_per_device=auto", f"sweep.storage=journal:///{journal}"]
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        assert cli.main([*args, *FAST_HEARTBEAT, *TRAIN, "tracking=off", "trainer.device=cpu"]) == 0
    assert "sweep.trials_per_device=auto: 1 on the CPU" in caplog.text
    assert "starting" not in caplog.text  # no worker processes: the trial ran here
    study = optuna.load_study(study_name="default", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert study.trials[0].user_attrs["warm"]  # the preflight's model, handed on
