"""Sweeps on the tiny model: trials, MLflow parent/child runs, best.yaml, pruning, divergence, Pareto fronts."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from sweeprun import sweep_here, trials_poll

from lora_lab import train
from lora_lab.sweep import cli
from lora_lab.sweep.outputs import overhead_share

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false"]


def load_study(outputs: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{outputs / 'optuna.db'}")


def runs_by_kind(outputs: Path) -> dict[str, list]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    out: dict[str, list] = {}
    for e in client.search_experiments():
        for r in client.search_runs([e.experiment_id]):
            out.setdefault(r.data.tags.get("lora_lab.kind", "?"), []).append(r)
    return out


def study_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# python -m lora_lab.sweep sweep={path}\nname: {name}\n" + body)
    return str(path)


def test_three_trial_study_runs_logs_and_best_yaml_reproduces(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["sweep=default", *TINY, "sweep.n_trials=3", "sweep.compare_full=false", "sweep.pruner=none"])
    assert code == 0
    study = load_study(outputs, "default")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert set(trials[0].params) == {"lora.r", "lora.dropout", "lora.targets", "optim.lr"}
    for t in trials:  # the time split behind the printed overhead share adds up to the trial's wall time
        a = t.user_attrs
        assert a["train_time_s"] > 0 and a["eval_time_s"] > 0 and a["overhead_s"] >= 0
        assert a["train_time_s"] + a["eval_time_s"] + a["overhead_s"] == pytest.approx(a["wall_s"], rel=1e-6)
    share = overhead_share(study)
    assert share == pytest.approx(
        sum(t.user_attrs["overhead_s"] for t in trials) / sum(t.user_attrs["wall_s"] for t in trials)
    )

    runs = runs_by_kind(outputs)
    assert len(runs["study"]) == 1 and len(runs["trial"]) == 3
    parent = runs["study"][0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["trial"]} == {parent}
    assert sorted(r.data.tags["lora_lab.trial"] for r in runs["trial"]) == ["0", "1", "2"]
    assert all(r.data.tags["lora_lab.state"] == "COMPLETE" and r.info.status == "FINISHED" for r in runs["trial"])
    assert runs["study"][0].info.status == "FINISHED"
    assert runs["study"][0].data.tags["best_trial"] == str(study.best_trial.number)

    folder = outputs / "studies" / "default"
    with open(folder / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number
    assert (folder / "best.yaml").read_text().startswith("# python -m lora_lab.train ")
    out = capsys.readouterr().out
    assert f"best trial #{study.best_trial.number}" in out and "mlflow ui" in out
    assert f"{100 * share:.1f}% of trial wall time" in out
    # best.yaml's overrides reproduce the best value through lora_lab.train (same seed, CPU: deterministic).
    code = train.main([*best["overrides"], "tracking=off", f"output_dir={outputs / 'repro'}"])
    assert code == 0
    import json

    repro = json.loads((outputs / "repro" / "metrics.json").read_text())
    assert repro["val_loss"] == pytest.approx(study.best_value, abs=1e-6)


def test_rerun_resumes_and_runs_no_finished_trial_again(outputs: Path) -> None:
    args = ["sweep=default", *TINY, "sweep.n_trials=2", "sweep.compare_full=false", "trainer.max_steps=4"]
    assert cli.main(args) == 0
    first = {t.number: t.datetime_complete for t in load_study(outputs, "default").get_trials()}
    assert cli.main(args) == 0  # same budget: nothing to do
    assert {t.number: t.datetime_complete for t in load_study(outputs, "default").get_trials()} == first
    assert cli.main([*args[:-2], "sweep.n_trials=3", "sweep.compare_full=false", "trainer.max_steps=4"]) == 0
    trials = load_study(outputs, "default").get_trials()
    assert len(trials) == 3 and {t.number: t.datetime_complete for t in trials if t.number in first} == first


def test_bad_trial_is_pruned_and_diverging_trial_fails_with_reason(outputs: Path, tmp_path: Path) -> None:
    # Grid over (lr, r): lr=1e-9 learns nothing and must be pruned once a good trial has finished;
    # lr=1e20 without clipping diverges and must FAIL with its reason, while the study goes on.
    path = study_file(
        tmp_path,
        "prune",
        """
overrides: [trainer.max_steps=8, trainer.eval_every=2, optim.grad_clip=0]
space:
  optim.lr: {type: categorical, choices: [3.0e-3, 1.0e-9, 1.0e20]}
  lora.r: {type: categorical, choices: [4, 8]}
sampler: grid
pruner: median
pruner_startup_trials: 1
seed: 3
n_trials: 6
compare_full: false
""",
    )
    assert cli.main([f"sweep={path}", *TINY]) == 0
    trials = load_study(outputs, "prune").get_trials()
    assert len(trials) == 6
    by_state = {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}
    failed = by_state[optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["optim.lr"] == 1e20 for t in failed)
    assert all(t.user_attrs["fail_reason"].startswith("diverged") for t in failed)
    complete = by_state[optuna.trial.TrialState.COMPLETE]
    assert any(t.params["optim.lr"] == 3e-3 for t in complete)
    first_done = min(t.datetime_complete for t in complete)
    stuck = [t for t in trials if t.params["optim.lr"] == 1e-9 and t.datetime_start > first_done]
    assert stuck and all(t.state == optuna.trial.TrialState.PRUNED for t in stuck)  # a trial that learns nothing is cut
    pruned = by_state[optuna.trial.TrialState.PRUNED]
    assert all(t.user_attrs["prune_reason"].startswith("pruned at step") for t in pruned)
    # A pruned trial's time counts in the overhead share too: its training steps up to the prune are measured.
    assert all(t.user_attrs["train_time_s"] > 0 and t.user_attrs["overhead_s"] >= 0 for t in pruned)
    assert all("overhead_s" not in t.user_attrs for t in failed)
    runs = runs_by_kind(outputs)["trial"]
    states = {r.data.tags["lora_lab.trial"]: (r.info.status, r.data.tags["lora_lab.state"]) for r in runs}
    for t in failed:
        assert states[str(t.number)] == ("FAILED", "FAIL")
    for t in pruned:
        assert states[str(t.number)] == ("KILLED", "PRUNED")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    for r in runs:  # state in the name too; pruned and failed runs keep their config, curve and a description
        n = int(r.data.tags["lora_lab.trial"])
        state = r.data.tags["lora_lab.state"]
        assert r.info.run_name == ("" if state == "COMPLETE" else f"{state} ") + f"trial-{n} · prune"
        assert {"config.yaml", "loss_curve.png"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        assert f"**State: {state}**" in r.data.tags["mlflow.note.content"]
        # The failed ones diverge at their first steps: the base model's evaluation is theirs only under base/.
        assert "base/loss_val" in r.data.metrics and ("loss/val" in r.data.metrics) == (state != "FAIL")
        assert state == "FAIL" or "loss/train" in r.data.metrics


def test_multi_objective_study_yields_pareto_front(outputs: Path) -> None:
    assert cli.main(["sweep=pareto", *TINY, "sweep.n_trials=4", "trainer.max_steps=4"]) == 0
    study = load_study(outputs, "pareto")
    assert len(study.directions) == 2
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    front = study.best_trials
    assert front
    for t in front:  # nobody on the front is dominated by another complete trial
        assert not any(
            o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in complete
        )
    assert all(t.values[1] == t.user_attrs["trainable_params"] for t in complete)
    assert (outputs / "studies" / "pareto" / "plots" / "pareto_front.png").stat().st_size > 1000


def test_compare_full_writes_comparison_table(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(
        ["sweep=default", *TINY, "sweep.n_trials=1", "sweep.full_lr_grid=[1e-4,1e-3]", "trainer.max_steps=4"]
    )
    assert code == 0
    out = capsys.readouterr().out
    for row in ("(trial 0, retrained)", "full fine-tuning (LR "):  # one row each; the merge check is a line
        assert out.count(row) == 1
    table = (outputs / "studies" / "default" / "comparison.md").read_text()
    assert "full fine-tuning (LR " in table and "optim.lr=" in table and "Merged into the weights" in table
    compare = runs_by_kind(outputs)["compare"]
    assert len(compare) == 3  # the best LoRA retrained + one full FT per LR of the grid
    full = [r for r in compare if r.data.params["method"] == "full"]
    best_full = min(full, key=lambda r: r.data.metrics["loss/val"])
    assert not any(k.startswith("lora.") for r in full for k in r.data.params)  # full FT has no LoRA settings
    assert sorted(r.info.run_name for r in compare) == [
        "full-ft-lr0.0001 · default",
        "full-ft-lr0.001 · default",
        "rerun-trial-0 · default",
    ]
    assert f"optim.lr={float(best_full.data.params['optim.lr']):g}" in table


def test_sigkill_mid_trial_then_restart_loses_no_finished_trial(outputs: Path) -> None:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs), PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        "-m",
        "lora_lab.sweep",
        "sweep=default",
        *TINY,
        "sweep.n_trials=3",
        "sweep.compare_full=false",
        "sweep.pruner=none",
        "sweep.heartbeat_s=1",
        "sweep.grace_s=3",
        # 400 steps, evaluated every 50, checkpointed every 5: ~5 s a trial here, the poll's window (at 60 steps a trial
        # took ~1.5 s and a loaded CI machine's poll missed every window, then waited out its deadline)
        "trainer.max_steps=400",
        "trainer.eval_every=50",
        "trainer.checkpoint_every=5",
    ]
    err = outputs.parent / "sweep.err"  # a file, not a pipe nobody reads: a full pipe would stall the sweep
    with err.open("w") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    storage = f"sqlite:///{outputs / 'optuna.db'}"
    trials_dir = outputs / "studies" / "default" / "trials"
    deadline = time.time() + 240
    trials_now = trials_poll(storage, "default")  # one storage for every poll: a new one per poll costs 5x the CPU
    try:  # wait until trial 0 is COMPLETE and trial 1 has written a checkpoint, then kill the worker
        while time.time() < deadline:
            time.sleep(0.05)  # a finished trial deletes its checkpoints: the window is the trial's run
            if proc.poll() is not None:
                pytest.fail(
                    f"the sweep ended (exit {proc.returncode}) before the poll saw a checkpoint of its "
                    f"second trial:\n{err.read_text()[-3000:]}"
                )
            # The cheap check first; the study read is slow, and the checkpoint seen may be of a trial that has
            # finished since: kill only while the trial with the checkpoint still runs.
            checkpointed = {int(p.parent.parent.name) for p in trials_dir.glob("*/checkpoints/LATEST")}
            if not checkpointed:
                continue
            states = {t.number: t.state for t in trials_now()}  # {} while the study does not exist yet
            running = {n for n in checkpointed if states.get(n) == optuna.trial.TrialState.RUNNING}
            if running and optuna.trial.TrialState.COMPLETE in states.values():
                break
        else:
            pytest.fail(f"the sweep never reached a checkpoint of its second trial:\n{err.read_text()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished_before = {
        t.number: t.values
        for t in optuna.load_study(study_name="default", storage=storage).get_trials()
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    time.sleep(3.5)  # past the grace period: the dead trial's heartbeat is stale
    code, said = sweep_here(outputs, args[3:])  # the same command, in this process: nothing signals the rerun
    assert code == 0, said[-3000:]
    trials = optuna.load_study(study_name="default", storage=storage).get_trials()
    complete = {t.number: t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(complete[n] == v for n, v in finished_before.items())  # nothing finished was lost or re-run
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert (
        len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == optuna.trial.TrialState.COMPLETE
    )
    assert "no heartbeat" in retry[0].user_attrs["retried_because"]
    assert len(complete) == 3  # the budget: 3 trials count, the lost one was replaced by its retry
    killed = [r for r in runs_by_kind(outputs)["trial"] if r.data.tags["lora_lab.trial"] == str(failed[0].number)]
    assert killed and killed[0].info.status == "KILLED" and "no heartbeat" in killed[0].data.tags["lora_lab.reason"]
