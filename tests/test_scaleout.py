"""Many workers, one study: a real PostgreSQL server holds the Optuna study and an MLflow tracking server (backed by
the same PostgreSQL) records the runs; 3 `python -m lora_lab.sweep` processes share a global budget of 12 trials,
and one of them is SIGKILLed mid-trial."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from servers import mlflow_server, postgres_server
from sweeprun import FAST_HEARTBEAT, TRAIN, kill_mid_trial, load, retry_of, runs, start_worker, tail, wait_all

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_three_workers_on_postgres_and_an_mlflow_server_share_one_budget(tmp_path):
    with postgres_server() as pg:
        optuna_url = pg.create_db("optuna")
        mlflow_url = pg.create_db("mlflow")
        with mlflow_server(mlflow_url, tmp_path / "mlartifacts") as server:
            out = tmp_path / "out"
            args = [
                "sweep=default",
                "sweep.name=scale",
                "sweep.n_trials=12",
                "sweep.sampler=random",
                f"sweep.storage={optuna_url}",
                *FAST_HEARTBEAT,
                *TRAIN,
                f"tracking.uri={server.url}",
                "tracking.experiment=scaleout",
            ]
            logs = [tmp_path / f"worker{i}.log" for i in range(3)]
            procs = [start_worker(out, args, log) for log in logs]
            try:
                killed = kill_mid_trial(
                    optuna_url, "scale", out / "studies" / "scale" / "trials", {p.pid: p for p in procs}
                )
                survivors = [p for p in procs if p.returncode is None]
                codes = wait_all(survivors, timeout=420)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            assert codes == [0, 0], "\n\n".join(tail(log) for log in logs)

            study = load(optuna_url, "scale")
            trials = study.get_trials(deepcopy=False)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            assert len(complete) == 12  # the exact global budget
            assert [t.state for t in trials if t.state != TrialState.COMPLETE] == [
                TrialState.FAIL
            ]  # only the killed one
            assert len({t.number for t in trials}) == len(trials) == 13
            retry = retry_of(study, killed.number)
            assert retry is not None and retry.state == TrialState.COMPLETE and retry.params == killed.params
            workers = {t.user_attrs["worker"] for t in complete}
            assert len(workers) >= 2  # the budget was shared

            all_runs = runs(server.url, "scaleout")
            parents = [r for r in all_runs if r.data.tags.get("lora_lab.kind") == "study"]
            children = [r for r in all_runs if r.data.tags.get("lora_lab.kind") == "trial"]
            assert len(parents) == 1, [r.info.run_id for r in parents]
            assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
            by_trial: dict[str, list] = {}
            for r in children:
                by_trial.setdefault(r.data.tags["lora_lab.trial"], []).append(r)
            assert all(len(v) == 1 for v in by_trial.values()), "a trial ran twice"  # none run twice
            assert set(by_trial) == {str(t.number) for t in trials}
            lost = by_trial[str(killed.number)][0]
            assert lost.info.status in ("KILLED", "FAILED") and "no heartbeat" in lost.data.tags.get(
                "lora_lab.reason", ""
            )
            assert sorted(r.info.status for k, (r,) in by_trial.items() if k != str(killed.number)) == ["FINISHED"] * 12
            assert parents[0].info.status == "FINISHED"  # the last worker to finish ended the study's run
