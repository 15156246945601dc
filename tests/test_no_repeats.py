"""Every process seeds its trials from the study seed and the trial number: three workers, then a resume by two more
processes, propose no configuration twice (before, each process replayed the same sampler stream)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from sweeprun import REPO

from lora_lab.sweep.study import trial_seed

TRAIN = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "trainer.max_steps=1",
    "trainer.eval_every=1",
    "trainer.eval_at_start=false",
    "tracking=off",
]


def _sweep(out: Path, journal: Path, processes: int, n_trials: int) -> None:
    """`processes` sweep processes at once on one journal-file study (as worker processes: no preflight, no plots)."""
    args = ["sweep=default", "sweep.name=norepeat", "sweep.sampler=random", "sweep.compare_full=false"]
    args += ["sweep.pruner=none", f"sweep.storage=journal://{journal}", f"sweep.n_trials={n_trials}"]
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), OMP_NUM_THREADS="1", LORA_LAB_SWEEP_WORKER="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lora_lab.sweep", *args, *TRAIN],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(processes)
    ]
    for p in procs:
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, text[-3000:]


def test_three_workers_and_a_two_process_resume_repeat_no_configuration(tmp_path: Path) -> None:
    out, journal = tmp_path / "out", tmp_path / "study.journal"
    _sweep(out, journal, processes=3, n_trials=4)
    _sweep(out, journal, processes=2, n_trials=7)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="norepeat", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert len(trials) == 7 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    configs = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(configs)) == len(configs), configs
    assert len({t.user_attrs["worker"] for t in trials}) >= 3  # the trials really were spread over processes


def test_trial_seeds_are_reproducible_distinct_and_in_range() -> None:
    seeds = [trial_seed(0, n) for n in range(1000)]
    assert seeds == [trial_seed(0, n) for n in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**32 for s in seeds)
    assert trial_seed(1, 0) != trial_seed(0, 0)
