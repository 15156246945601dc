"""Sweep trials over several devices (`sweep.devices_per_trial`): each trial, and the full-FT comparison, trains as one
process group on the CPU (gloo, the tiny model), the sweep's worker as rank 0 owning the Optuna trial and MLflow run.
Exactly the budget, one Optuna trial and one MLflow run per trial, pruning told to every rank at the same step; a rank
that dies or hangs fails its trial naming it, the trial is retried from its checkpoint, and no process is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from optuna.trial import TrialState
from sweeprun import load, runs, tail
from tiny import TINY_RUN

from lora_lab.config import ConfigError, load_sweep
from lora_lab.sweep import cli, workers
from lora_lab.sweep.study import Invocation, Study
from lora_lab.sweep.trials import Failure, FailureKind
from lora_lab.train import distributed

TINY = [*TINY_RUN, "trainer.num_threads=1", "trainer.device=cpu", "tracking.system_metrics=false"]
GROUP = ["sweep.devices_per_trial=2", "sweep.workers=2"]


def study_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# python -m lora_lab.sweep sweep={path}\nname: {name}\n" + body)
    return str(path)


def train_ranks(parent: int) -> list[psutil.Process]:
    """The `python -m lora_lab.train` processes under `parent`: the ranks a hosted group started."""
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if "lora_lab.train" in p.cmdline():
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------------------------- settings


def test_devices_per_trial_settings_are_checked() -> None:
    assert load_sweep("default", ["devices_per_trial=2", "workers=4"]).devices_per_trial == 2
    with pytest.raises(ConfigError, match=r"sweep.workers: expected a multiple of sweep.devices_per_trial=2"):
        load_sweep("default", ["devices_per_trial=2", "workers=3"])
    with pytest.raises(ConfigError, match=r"sweep.trials_per_device: expected 1 with sweep.devices_per_trial=2"):
        load_sweep("default", ["devices_per_trial=2", "workers=2", "trials_per_device=2"])
    with pytest.raises(ConfigError, match=r"sweep.devices_per_trial: expected an integer >= 1"):
        load_sweep("default", ["devices_per_trial=0"])
    with pytest.raises(ConfigError, match=r"trainer.collective_timeout_s: expected a number of seconds > 0"):
        from lora_lab.config import compose

        compose(["trainer.collective_timeout_s=0"])


def test_a_study_gives_its_trials_their_devices(outputs: Path) -> None:
    spec = load_sweep("default", ["devices_per_trial=2", "workers=2"])
    st = Study(spec, Invocation(train_overrides=list(TINY)))
    assert st.base_cfg.trainer.devices == 2 and st.base_overrides[-1] == "trainer.devices=2"
    assert st.warm is None  # the ranks load their model per trial
    assert st.processes() == 1  # one process (rank 0) talks to the storage
    one = Study(load_sweep("default", []), Invocation(train_overrides=list(TINY)))
    assert one.fingerprint != st.fingerprint  # a study over 2 devices per trial is another study
    # A sweep's trials get their devices from the sweep, not from trainer.devices.
    with pytest.raises(ConfigError, match=r"trainer.devices=2: a sweep's trials get their devices from sweep"):
        Study(load_sweep("default", []), Invocation(train_overrides=[*TINY, "trainer.devices=2"]))


def test_worker_envs_give_each_trial_its_own_gpus() -> None:
    envs = workers.worker_envs(devices=4, per_device=1, gpus=4, cores=16, per_trial=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert all(workers.MEMORY_FRACTION_ENV not in e for e in envs)  # no GPU shared
    assert all(e[workers.THREADS_ENV] == "4" for e in envs)  # 16 cores over 2 workers x 2 ranks
    under = workers.worker_envs(devices=4, per_device=1, gpus=4, cores=16, visible="4,5,6,7", per_trial=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in under] == ["4,5", "6,7"]
    cpu = workers.worker_envs(devices=2, per_device=1, gpus=0, cores=2, per_trial=2)
    assert len(cpu) == 1 and "CUDA_VISIBLE_DEVICES" not in cpu[0] and cpu[0][workers.THREADS_ENV] == "1"


def test_a_lost_rank_is_its_own_failure_kind_and_retried() -> None:
    failure = Failure.of(distributed.RankFailed("rank 1 (pid 7) was killed by SIGKILL: the group broke"))
    assert failure.kind == FailureKind.RANK and failure.kind.retried and not failure.kind.stops_study
    assert failure.reason == "rank 1 (pid 7) was killed by SIGKILL: the group broke"
    assert not FailureKind.ERROR.retried and not FailureKind.OOM.retried


def test_without_a_group_rank_0_decides_alone() -> None:
    seen = []
    distributed.decided_by_main(lambda: seen.append(1))
    assert seen == [1]
    with pytest.raises(KeyError):  # one process: the callback's own exception, as it was
        distributed.decided_by_main(lambda: {}["x"])


# ----------------------------------------------------------------------------------------------- studies


@pytest.mark.slow
def test_four_trials_over_two_devices_each_prune_on_every_rank_and_compare_with_fsdp(
    outputs: Path, tmp_path: Path
) -> None:
    # Grid over the LR: 3e-3 learns, 1e-9 learns nothing and is pruned at its first evaluation once one trial has
    # finished. Each trial and each comparison run is a group of 2 processes: this one (rank 0) and a started rank 1.
    path = study_file(
        tmp_path,
        "group",
        """
overrides: [trainer.max_steps=8, trainer.eval_every=2, trainer.batch_size=4, trainer.eval_at_start=false]
space:
  optim.lr: {type: categorical, choices: [3.0e-3, 1.0e-9]}
sampler: grid
pruner: median
pruner_startup_trials: 1
n_trials: 4
compare_full: true
full_lr_grid: [1.0e-3]
""",
    )
    assert cli.main([f"sweep={path}", *GROUP, *TINY]) == 0
    trials = load(f"sqlite:///{outputs / 'optuna.db'}", "group").get_trials()
    assert len(trials) == 4  # exactly the budget: one Optuna trial per trial, whatever the ranks
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.PRUNED, 2: TrialState.COMPLETE, 3: TrialState.PRUNED}
    folders = outputs / "studies" / "group" / "trials"
    for t in trials:
        rank1 = (folders / f"{t.number:04d}" / "rank-1.log").read_text()
        assert "rank 1 of 2 joined (gloo)" in rank1
        if t.state == TrialState.PRUNED:
            # rank 1 stopped where rank 0's pruner did, at the same step, told by rank 0
            assert t.user_attrs["prune_reason"].startswith("pruned at step 2 ")
            assert "rank 0 stopped the run: Pruned: pruned at step 2 " in rank1
            assert not (folders / f"{t.number:04d}" / "metrics.json").exists()
        else:
            assert "stopped the run" not in rank1
    # The same parameters and seed over a new group each time: the same numbers. And best.yaml's command, 2 ranks
    # through the train CLI's own launcher (trainer.devices=2 is among its overrides), gives them too.
    assert trials[0].values == trials[2].values
    best = yaml.safe_load((outputs / "studies" / "group" / "best.yaml").read_text())
    assert "trainer.devices=2" in best["overrides"]
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs))
    repro = outputs / "repro"
    cmd = [sys.executable, "-m", "lora_lab.train", *best["overrides"], "tracking=off", f"output_dir={repro}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((repro / "metrics.json").read_text())["val_loss"] == pytest.approx(trials[0].values[0], abs=1e-6)
    # One MLflow run per trial (rank 0's), each saying it ran on 2 devices; the comparison's two runs likewise.
    found = runs(f"sqlite:///{outputs / 'mlflow.db'}", "lora_lab")
    kinds: dict[str, list] = {}
    for r in found:
        kinds.setdefault(r.data.tags.get("lora_lab.kind", "?"), []).append(r)
    assert sorted(int(r.data.tags["lora_lab.trial"]) for r in kinds["trial"]) == [0, 1, 2, 3]
    assert all(r.data.params["trainer.devices"] == "2" for r in kinds["trial"] + kinds["compare"])
    assert len(kinds["compare"]) == 2
    # Full fine-tuning in the comparison ran sharded with FSDP2 over the 2 ranks (trainer.parallel=auto).
    (full,) = [p for p in (outputs / "studies" / "group" / "compare").iterdir() if p.name.startswith("full-ft")]
    assert "FSDP2: 2 repeated blocks and the root sharded over 2 ranks" in (full / "rank-1.log").read_text()
    assert train_ranks(os.getpid()) == []  # every rank ended with its run


LONG = """
overrides: [trainer.max_steps=200, trainer.eval_every=50, trainer.checkpoint_every=20, trainer.batch_size=4,
            trainer.eval_at_start=false]
space:
  optim.lr: {type: categorical, choices: [3.0e-3]}
sampler: grid
pruner: none
n_trials: 1
compare_full: false
"""


def start_sweep(path: str, outputs: Path, log: Path, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs), PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "lora_lab.sweep", f"sweep={path}", *GROUP, *TINY, *extra],
            env=env,
            stdout=f,
            stderr=f,
        )


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["rank-killed", "rank-hung", "sweep-terminated"])
def test_a_lost_rank_fails_its_trial_naming_it_and_the_retry_resumes(outputs: Path, tmp_path: Path, fault: str) -> None:
    path = study_file(tmp_path, "lost", LONG)
    # A hung rank is found by the collective that waits for it: 20 s here (600 by default), long enough for rank 0's
    # own pauses on a loaded machine (its MLflow calls, checkpoint writes) that the other rank waits out.
    timeout = ["trainer.collective_timeout_s=20"] if fault == "rank-hung" else []
    log = tmp_path / "sweep.log"
    sweep = start_sweep(path, outputs, log, timeout)
    trial_dir = outputs / "studies" / "lost" / "trials" / "0000"
    try:
        deadline = time.time() + 240
        while not (trial_dir / "checkpoints" / "LATEST").is_file():  # mid-run: a checkpoint, not yet the end
            assert sweep.poll() is None, tail(log)
            assert time.time() < deadline, f"no checkpoint in time: {tail(log)}"
            time.sleep(0.05)
        (rank1,) = train_ranks(sweep.pid)
        # The group's store and connections listen on loopback only (a TCPStore given just a port binds them all).
        group = (psutil.Process(sweep.pid), rank1)
        listening = [c.laddr for p in group for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        if fault == "sweep-terminated":  # the worker (rank 0) is stopped: it ends its rank, and the rerun resumes
            sweep.send_signal(signal.SIGTERM)
            assert sweep.wait(timeout=120) == 128 + signal.SIGTERM, tail(log)
            assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE
            sweep = start_sweep(path, outputs, log, timeout)
        else:
            rank1.send_signal(signal.SIGKILL if fault == "rank-killed" else signal.SIGSTOP)
        assert sweep.wait(timeout=240) == 0, tail(log)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE  # the stopped rank was ended
    study = load(f"sqlite:///{outputs / 'optuna.db'}", "lost")
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    reason = failed.user_attrs["fail_reason"]
    text = log.read_text()
    if fault == "rank-killed":
        assert reason.startswith(f"rank 1 (pid {rank1.pid}) was killed by SIGKILL: the trial's process group broke")
    elif fault == "rank-hung":
        assert reason == (
            "rank(s) 1 did not answer a collective within trainer.collective_timeout_s=20 s (hung): the trial's "
            "process group was ended"
        )
    else:
        assert reason.startswith("interrupted by SIGTERM")
    if fault != "sweep-terminated":
        assert f"trial 0 lost a process ({reason})" in text
    assert retry.system_attrs["failed_trial"] == failed.number
    assert retry.user_attrs["retried_because"] == f"trial 0: {reason}"
    # The retry resumed from the failed trial's checkpoint, in its folder, and trained to the end.
    assert "resumed from" in text and retry.user_attrs["output_dir"] == str(trial_dir)
    # The failed trial's MLflow run ended FAIL with the reason; the retry's run completed.
    found = runs(f"sqlite:///{outputs / 'mlflow.db'}", "lora_lab")
    states = {
        r.data.tags["lora_lab.trial"]: r.data.tags["lora_lab.state"] for r in found if "lora_lab.trial" in r.data.tags
    }
    assert states == {"0": "FAIL", "1": "COMPLETE"}
    assert train_ranks(os.getpid()) == []


@pytest.mark.slow
def test_a_sigkilled_worker_takes_its_starting_rank_with_it(outputs: Path, tmp_path: Path) -> None:
    """The worker hosting a trial's group (rank 0) is SIGKILLed while rank 1 starts: rank 1 ends with it (the
    parent-death signal, distributed.follow_host). Before, it waited at the dead host's store for
    trainer.collective_timeout_s (600 s); once training, a rank's broken connections end it at its next collective."""
    log = tmp_path / "sweep.log"
    sweep = start_sweep(study_file(tmp_path, "lost", LONG), outputs, log, [])
    started: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while not train_ranks(sweep.pid):
            assert sweep.poll() is None and time.time() < deadline, tail(log)
            time.sleep(0.05)
        started.extend(train_ranks(sweep.pid))
        (rank1,) = started
        sweep.kill()
        sweep.wait(timeout=30)
        psutil.wait_procs([rank1], timeout=20)
        assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE, "rank 1 outlived its host"
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        for p in started:  # no orphan, even when the test failed
            if p.is_running():
                p.kill()
