"""A sweep whose servers go away mid-study (issue 24, items 2, 3 and 12): a real `mlflow server` killed during a trial
(the study stops within tracking.deadline_s with one line naming the server, and resumes once it is back), and a real
PostgreSQL stopped mid-trial (a restart within sweep.storage_deadline_s costs nothing; past it the study stops with one
line naming the database, never its password, and resumes once it is back)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from servers import MlflowServer, postgres_server
from sweeprun import FAST_HEARTBEAT, TRAIN, load, runs, start_worker, study_summary, sweep_here, tail, wait_for

pytestmark = pytest.mark.slow


def _one_line(log: Path) -> str:
    text = log.read_text()
    assert "Traceback" not in text, tail(log, 6000)
    (line,) = [x for x in text.splitlines() if x.startswith("lora_lab.sweep:")]
    return line


def test_a_tracking_server_killed_mid_trial_stops_the_study_in_bounded_time_and_it_resumes(tmp_path: Path) -> None:
    import os
    import signal

    import mlflow

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = MlflowServer(db, tmp_path / "artifacts", workers=1).start()
    out = tmp_path / "out"
    args = [
        "sweep=default",
        "sweep.n_trials=2",
        "sweep.sampler=random",
        *FAST_HEARTBEAT,
        *TRAIN,
        # Long enough that trial 0 still trains and evaluates past the deadline after the kill (its evaluations
        # are where a run finds its server gone).
        "trainer.max_steps=800",
        "trainer.eval_every=50",
        "trainer.checkpoint_every=100",
        f"tracking.uri={server.url}",
        "tracking.deadline_s=4",
    ]
    log = tmp_path / "a.log"
    try:
        p = start_worker(out, args, log)
        client = mlflow.MlflowClient(tracking_uri=server.url)

        def trial_logged() -> bool:
            exp = client.get_experiment_by_name("lora_lab")
            trials = client.search_runs([exp.experiment_id], "tags.`lora_lab.kind` = 'trial'") if exp else []
            return bool(trials) and "loss/val" in trials[0].data.metrics

        # Two requests to the server per poll: twice a second (trial 0 trains for 800 steps after it).
        wait_for(trial_logged, p, log, what="trial 0's first evaluation in MLflow", every=0.5)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
        lost = time.time()
        code = p.wait(timeout=120)
        took = time.time() - lost
    finally:
        if p.poll() is None:
            p.kill()
        server.stop()
    assert code == 1, tail(log)
    line = _one_line(log)
    assert f"tracking server {server.url} unreachable since" in line and "The study stops" in line, line
    assert took < 4 + 60  # the deadline, plus the bounded requests still under way (tracking.HTTP_LIMITS)
    study = load(f"sqlite:///{out / 'optuna.db'}", "default")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"].startswith(f"tracking server {server.url} unreachable since")
    assert trials[2].system_attrs["failed_trial"] == 0

    # The server is back (same address, same store): the same command resumes, trial 0's retry first.
    again = MlflowServer(db, tmp_path / "artifacts", workers=1)
    again.port, again.url = server.port, server.url
    again.start()
    try:
        code, said = sweep_here(out, args)  # in this process: nothing signals this run
        assert code == 0, said[-3000:]
        every = runs(again.url, "lora_lab")
    finally:
        again.stop()
    trials = sorted(load(f"sqlite:///{out / 'optuna.db'}", "default").trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].datetime_start < trials[1].datetime_start  # the retry ran first
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    (parent,) = [r for r in every if r.data.tags.get("lora_lab.kind") == "study"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "default"


PG_ARGS = [
    "sweep=default",
    "sweep.name=pg",
    "sweep.n_trials=3",
    "sweep.sampler=random",
    *FAST_HEARTBEAT,
    *TRAIN,
    "trainer.max_steps=200",
    "trainer.eval_every=10",
    "trainer.checkpoint_every=10",  # TRAIN's 2 is for short trials: 100 checkpoints a trial cost seconds here
]


def _running_with_a_checkpoint(out: Path, number: int):
    return lambda: (out / "studies" / "pg" / "trials" / f"{number:04d}" / "checkpoints" / "LATEST").is_file()


@pytest.mark.postgres
def test_a_postgres_restart_within_the_deadline_costs_nothing(tmp_path: Path) -> None:
    with postgres_server() as pg:
        url = pg.create_db("optuna")
        out = tmp_path / "out"
        log = tmp_path / "a.log"
        p = start_worker(out, [*PG_ARGS, f"sweep.storage={url}", "sweep.storage_deadline_s=60"], log)
        try:
            wait_for(_running_with_a_checkpoint(out, 1), p, log, what="trial 1's first checkpoint")
            pg.halt()
            time.sleep(5)
            pg.resume()
            code = p.wait(timeout=600)
        finally:
            if p.poll() is None:
                p.kill()
        assert code == 0, tail(log)
        text = log.read_text()
        assert "Traceback" not in text, tail(log, 6000)
        assert f"PostgreSQL database 'optuna' on 127.0.0.1:{pg.port} (user postgres) not answering" in text
        assert "answers again" in text
        assert study_summary(load(url, "pg")) == {"COMPLETE": 3}, tail(log)


@pytest.mark.postgres
def test_postgres_gone_past_the_deadline_stops_the_study_naming_the_database_and_it_resumes(tmp_path: Path) -> None:
    with postgres_server() as pg:
        pg.create_db("optuna")
        url = f"postgresql+psycopg2://postgres:s3cret@127.0.0.1:{pg.port}/optuna"  # trust auth: any password
        out = tmp_path / "out"
        log = tmp_path / "a.log"
        args = [*PG_ARGS, f"sweep.storage={url}", "sweep.storage_deadline_s=5"]
        p = start_worker(out, args, log)
        try:
            wait_for(_running_with_a_checkpoint(out, 1), p, log, what="trial 1's first checkpoint")
            pg.halt()
            gone = time.time()
            code = p.wait(timeout=120)
            took = time.time() - gone
        finally:
            if p.poll() is None:
                p.kill()
        assert code == 1, tail(log)
        line = _one_line(log)
        assert f"PostgreSQL database 'optuna' on 127.0.0.1:{pg.port} (user postgres) has not answered since" in line
        assert "sweep.storage_deadline_s=5" in line and "run the same command to resume" in line, line
        assert "s3cret" not in log.read_text()
        assert took < 5 + 30
        every = runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
        (parent,) = [r for r in every if r.data.tags.get("lora_lab.kind") == "study"]
        assert parent.info.status == "FAILED" and "storage" in parent.data.tags["lora_lab.reason"]

        pg.resume()
        time.sleep(3.5)  # past sweep.grace_s: the stopped trial's heartbeat is stale
        code, said = sweep_here(out, args)  # in this process: nothing signals this run
        assert code == 0, said[-3000:]
        study = load(f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/optuna", "pg")
        assert study_summary(study) == {"COMPLETE": 3, "FAIL": 1}, said[-3000:]
        every = runs(f"sqlite:///{out / 'mlflow.db'}", "lora_lab")
        assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
