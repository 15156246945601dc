"""`python -m lora_lab.sweep [sweep=NAME] [sweep.KEY=VALUE ...] [training overrides ...]`: an Optuna study over LoRA.

A trial is exactly a training run (`lora_lab.train`) with some overrides: this module owns the study's lifecycle
(storage, budget, workers, heartbeats, the comparison with full fine-tuning, best.yaml and trials.csv); search.py turns
the space into overrides, train.py trains, tracking.py talks to MLflow.

The budget is exact across workers and hosts: when a study is created (or its n_trials raised) the missing trials are
enqueued as WAITING under a lock, and workers only ever pop WAITING trials, never create new ones. A worker that dies
stops sending heartbeats; the next worker to look fails its trial and re-enqueues it with the same parameters
(Optuna's RetryHeartbeatStaleTrialCallback), and the retry resumes from the dead trial's last checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lora_lab import adaptations, search, tracking
from lora_lab import optuna_internals as internals
from lora_lab.config import SWEEPS_DIR, ConfigError, SweepConfig, compose, load_sweep, outputs_root
from lora_lab.files import atomic_write_text, file_lock
from lora_lab.records import RecordError, Results, RunRecord, StudyThroughput
from lora_lab.train import Interrupted, RunRole, build, fit_tracked, free_memory, interruptible
from lora_lab.train.warm import Warm

log = logging.getLogger("lora_lab")

WORKER_ENV = "LORA_LAB_SWEEP_WORKER"  # set in worker processes started by `sweep.workers=N`
# A worker's share of its GPU's memory (torch.cuda.set_per_process_memory_fraction), when processes share one GPU.
MEMORY_FRACTION_ENV = "LORA_LAB_CUDA_MEMORY_FRACTION"
THREADS_ENV = "LORA_LAB_NUM_THREADS"  # a worker's torch CPU threads: the host's cores split between its processes
MEMORY_SHARE = 0.95  # of a GPU's memory, split between the processes on it (the rest: their CUDA contexts)
AUTO_FILL = 0.9  # trials_per_device=auto fills this share of a device's free memory with measured trial peaks
AUTO_MAX_PER_DEVICE = 8
FIRST_FAILURES_TO_STOP = 3  # the first trials all failing the same way means the study itself is broken


class TrialLost(Exception):
    """This worker's trial is no longer its own (it was paused past the grace period, failed as stale and retried
    elsewhere): drop it without writing anything more to the trial."""

    run_state, run_status = "FAIL", "KILLED"


class TrialFailed(Exception):
    """A trial ended without a usable objective (diverged, oom, an error); `reason` goes on the trial and its run."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------- arguments


@dataclass
class Invocation:
    """The command line, split: which study, its own settings, and the training overrides every trial gets."""

    sweep: str = "default"
    sweep_overrides: list[str] = field(default_factory=list)  # sweep.KEY=VALUE, without the prefix
    train_overrides: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Invocation:
    inv = Invocation()
    for arg in argv:
        if arg.startswith("sweep="):
            inv.sweep = arg.split("=", 1)[1]
        elif arg.startswith("sweep."):
            inv.sweep_overrides.append(arg[len("sweep.") :])
        elif arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif "=" not in arg:
            raise ConfigError(
                f"argument {arg!r}: expected sweep=NAME, sweep.KEY=VALUE or a training override KEY=VALUE"
            )
        else:
            inv.train_overrides.append(arg)
    return inv


# ----------------------------------------------------------------------------------------------- the study


class Study:
    """One study's settings, storage, folders and MLflow parent, shared by the worker loop and the final summary."""

    def __init__(self, spec: SweepConfig, inv: Invocation) -> None:
        self.spec = spec
        self.file = study_file(inv.sweep)
        self.base_overrides = list(spec.overrides) + list(inv.train_overrides)
        self.fingerprint = fingerprint(spec, self.base_overrides)
        _, self.base_cfg = compose(self.base_overrides)
        self.tracking = self.base_cfg.tracking
        self.dir = outputs_root() / "studies" / spec.name
        self.parent_run_id: Optional[str] = None
        self.study: Optional[optuna.Study] = None
        self.folders: dict[int, Path] = {}  # trial number -> the folder this worker claimed for it
        # The model, tokenizer and data kept between this worker's trials (sweep.warm=false: none, load per trial).
        self.warm: Optional[Warm] = Warm() if spec.warm else None
        # This invocation's trial phase (all its workers), for trials per hour and the devices' busy share.
        self.phase: Optional[tuple[float, float]] = None

    # -- storage ---------------------------------------------------------------------------------------------

    def storage_url(self) -> str:
        if self.spec.storage:
            return _pg_driver(self.spec.storage)
        return f"sqlite:///{outputs_root() / 'optuna.db'}"

    def open_storage(self) -> optuna.storages.BaseStorage:
        """RDB storage with heartbeats (SQLite by default, PostgreSQL for many hosts), or a journal file."""
        url = self.storage_url()
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            raw = url[len("journal:") :]
            path = Path(raw[2:] if raw.startswith("//") else raw)  # journal:///abs/path or journal:relative/path
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            # SQLite serialises writers; wait for the lock instead of failing with "database is locked".
            engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
        try:
            # Two processes creating one new SQLite file at once race in the table creation: serialise it.
            with self.lock() if url.startswith("sqlite:///") else contextlib.nullcontext():
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=self.spec.heartbeat_s,
                    grace_period=self.spec.grace_s,
                    heartbeat_stale_trial_callback=LostTrialCallback(self, max_retry=self.spec.max_retry),
                )
        except Exception as exc:
            raise ConfigError(
                f"sweep.storage={url!r}: cannot open it ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None

    def sampler(self, seed: Optional[int] = None) -> optuna.samplers.BaseSampler:
        """The study's sampler, seeded with `seed` (a trial's own seed) or the study's seed."""
        s, seed = self.spec.sampler, self.spec.seed if seed is None else seed
        if s == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(4, self.spec.n_trials))
        if s == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s == "grid":
            return optuna.samplers.GridSampler(search.grid(self.spec.space), seed=seed)
        if s == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if s == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, self.spec.n_trials // 2)))

    def pruner(self) -> optuna.pruners.BasePruner:
        if self.spec.pruner == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.spec.pruner_startup_trials, n_warmup_steps=0, n_min_trials=1, interval_steps=1
            )
        if self.spec.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=self.base_cfg.trainer.max_steps)
        return optuna.pruners.NopPruner()

    def open(self, storage: optuna.storages.BaseStorage) -> optuna.Study:
        """Create the study, or load it when the same command runs again (resume)."""
        if self.tracking.enabled and self.spec.name not in optuna.get_all_study_names(storage):
            # A new study under a name that MLflow already has runs for: the storage the study ran in was emptied,
            # replaced or is another one (a 0-byte optuna.db reads as empty). Starting over would run every finished
            # trial again and add duplicate children under the old parent run.
            n = tracking.existing_study_runs(self.tracking, self.spec.name)
            if n:
                raise ConfigError(
                    f"sweep.storage: {self.storage_url()} has no study {self.spec.name!r}, but "
                    f"{self.tracking.resolved_uri()} holds {n} MLflow runs of it: the study's storage is empty, "
                    "replaced or another one. Restore the storage the study ran in (or point sweep.storage at it), "
                    f"or start a new study with another sweep.name (or delete study {self.spec.name!r}'s MLflow runs)"
                )
        self.study = optuna.create_study(
            study_name=self.spec.name,
            storage=storage,
            sampler=self.sampler(),
            pruner=self.pruner(),
            directions=self.spec.directions,
            load_if_exists=True,
        )
        if list(self.study.directions) != [optuna.study.StudyDirection[d.upper()] for d in self.spec.directions]:
            raise ConfigError(
                f"sweep.objectives: study {self.spec.name!r} already exists with other directions; "
                f"use another sweep.name"
            )
        self.check_fingerprint()
        return self.study

    def check_fingerprint(self) -> None:
        """One name, one study: a study records the fingerprint of its space and base overrides (and the file it came
        from); another file or changed settings under the same name is refused, unless no trial of the study ever
        finished well (then the study is being fixed: the new settings replace the old, and the old configuration's
        failed trials do not count towards the budget)."""
        attrs = self.study.user_attrs
        old, old_file = attrs.get("fingerprint"), attrs.get("study_file")
        if old is not None and old != self.fingerprint:
            good = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if good:
                which = (
                    f"{old_file} has changed since"
                    if old_file == str(self.file)
                    else f"{self.file} is another study file with the same name as {old_file}"
                )
                raise ConfigError(
                    f"sweep.name={self.spec.name!r}: study {self.spec.name!r} was created from {old_file} with other "
                    f"settings (space or overrides, fingerprint {old} vs {self.fingerprint}); {which}. Give this one "
                    f"its own name (sweep.name=...), or restore the settings the study ran with"
                )
        if old != self.fingerprint or old_file != str(self.file):
            self.study.set_user_attr("fingerprint", self.fingerprint)
            self.study.set_user_attr("study_file", str(self.file))

    # -- budget ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise budget top-ups: a file lock on one machine, an advisory lock on PostgreSQL."""
        url = self.storage_url()
        if url.startswith("postgresql"):
            import sqlalchemy

            engine = sqlalchemy.create_engine(url)
            key = int.from_bytes(self.spec.name.encode()[:8].ljust(8, b"\0"), "big") % (2**63)
            try:
                with engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            finally:
                engine.dispose()
            return
        with file_lock(outputs_root() / f".{self.spec.name}.budget.lock"):
            yield

    def budget_used(self) -> int:
        """Trials that count towards n_trials: all of them except failed ones that were retried."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.system_attrs.get("failed_trial") for t in trials} | {
            n for t in trials for n in t.system_attrs.get("retry_history", [])
        }
        # Trials of a configuration that stopped the study (its first trials all failed the same way) or of settings
        # the study has since been fixed to move away from do not count: the corrected study gets its full budget.
        uncounted = set(self.study.user_attrs.get("uncounted_failures", []))
        return sum(
            1
            for t in trials
            if not (
                t.state == TrialState.FAIL
                and (
                    t.number in retried
                    or t.number in uncounted
                    or t.user_attrs.get("fingerprint", self.fingerprint) != self.fingerprint
                )
            )
        )

    def top_up(self) -> int:
        """Enqueue WAITING trials until the budget n_trials is reached; return how many were added."""
        with self.lock():
            missing = self.spec.n_trials - self.budget_used()
            points = self.grid_points(missing) if self.spec.sampler == "grid" else [{}] * max(0, missing)
            for params in points:
                # Optuna's GridSampler refuses enqueued trials that do not fix every parameter: give it the point.
                self.study.enqueue_trial(params, skip_if_exists=False)
        return max(0, missing)

    def grid_points(self, n: int) -> list[dict[str, Any]]:
        """The next n grid points: those used least so far first, in grid order (n_trials beyond the grid size
        repeats points, e.g. seed replicates)."""
        import itertools

        space = search.grid(self.spec.space)
        keys = list(space)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*space.values())]
        used: dict[tuple, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            params = t.system_attrs.get("fixed_params") or t.params
            key = tuple(params.get(k) for k in keys)
            used[key] = used.get(key, 0) + 1
        out = []
        for _ in range(max(0, n)):
            point = min(grid, key=lambda p: used.get(tuple(p.values()), 0))  # min() keeps grid order among ties
            used[tuple(point.values())] = used.get(tuple(point.values()), 0) + 1
            out.append(point)
        return out

    def counts(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        return states


def _pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (3); use psycopg2 (our dependency) when psycopg is
    absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


class LostTrialCallback(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Heartbeat went stale (the worker died): retry the trial with the same parameters, and end its MLflow run as
    KILLED instead of leaving it RUNNING forever."""

    def __init__(self, study: Study, max_retry: int) -> None:
        super().__init__(max_retry=max_retry)
        self._study = study

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = "worker lost: no heartbeat (killed or preempted)"
        # Optuna has already made the lost trial FAIL, so its attributes are frozen: the reason travels with the
        # retry (built from this copy), and on the lost trial's MLflow run.
        trial.user_attrs["retried_because"] = f"trial {trial.number}: {reason}"
        if self._study.tracking.enabled:
            with contextlib.suppress(Exception):
                tracking.mark_trial_lost(self._study.tracking, self._study.spec.name, trial.number, reason)
        log.warning("trial %d lost its worker; retrying it with the same parameters", trial.number)
        super().__call__(study, trial)


# ----------------------------------------------------------------------------------------------- checks


def check_study(spec: SweepConfig) -> None:
    """The study file's own checks, before any storage, tracking store or folder exists: the space is sampled once
    (and every tied/map entry resolves for every value), and a grid sampler gets a finite grid."""
    search.check_space(spec.space)
    if spec.sampler == "grid":
        search.grid(spec.space)


def study_file(name_or_path: str) -> Path:
    """The file `sweep=NAME` reads (as load_sweep resolves it)."""
    path = Path(name_or_path)
    return (path if path.suffix in (".yaml", ".yml") else SWEEPS_DIR / f"{name_or_path}.yaml").resolve()


def fingerprint(spec: SweepConfig, base_overrides: list[str]) -> str:
    """What makes two runs of a command the same study: its space and the overrides every trial gets."""
    import hashlib
    import json
    from dataclasses import asdict

    space = {k: (asdict(v) if not isinstance(v, dict) else v) for k, v in spec.space.items()}
    text = json.dumps({"space": space, "overrides": list(base_overrides)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preflight(st: Study) -> None:
    """Everything that can be wrong with a study, checked before anything is written: each space entry's extreme
    values compose and validate, the model and data load, and every target choice matches modules."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    configs = [st.base_cfg]
    for extra in search.preview(st.spec.space):
        try:
            configs.append(compose(st.base_overrides + extra)[1])
        except ConfigError as exc:
            raise ConfigError(f"sweep.space: {' '.join(extra)}: {exc}") from None
    base = st.base_cfg
    model, tokenizer = load_model(base.model)
    data = load_data(base.data, tokenizer)
    for cfg in configs:
        if "accuracy" in st.spec.objectives and cfg.data.format not in ("prompted", "classification"):
            raise ConfigError(f"sweep.objectives: accuracy needs labelled data, but data.format={cfg.data.format}")
        if "merged_val_loss" in st.spec.objectives and cfg.method != "lora":
            raise ConfigError(
                f"sweep.objectives: merged_val_loss needs method=lora, but a trial can run method={cfg.method}"
            )
        adaptations.of(cfg.method).check(model, cfg)
    from lora_lab.plots import loss_curve  # noqa: F401 - matplotlib, imported here rather than in the first trial

    if st.warm is not None and st.spec.workers == 1 and st.spec.trials_per_device in (1, "auto"):
        st.warm.keep(base, model, tokenizer, data)  # this process runs (the first) trials: it starts warm
    del model


def preload(st: Study) -> None:
    """A warm worker process (`sweep.workers` or `trials_per_device` > 1) loads the base model, tokenizer and data
    into its warm holder at start, and imports what a trial's logging uses: its first trial pays for neither."""
    from lora_lab.plots import loss_curve  # noqa: F401 - matplotlib: every trial's run plots its loss curve

    st.warm.load(st.base_cfg)


# ----------------------------------------------------------------------------------------------- trials


def trial_dir(st: Study, trial: optuna.Trial) -> Path:
    """A trial's folder; a retry uses the folder of the trial it retries, so it resumes from its checkpoint."""
    if trial.number in st.folders:
        return st.folders[trial.number]
    original = internals.frozen(trial).system_attrs.get("failed_trial")
    return st.dir / "trials" / f"{original if original is not None else trial.number:04d}"


def claim_trial_dir(st: Study, trial: optuna.Trial) -> tuple[Path, Any]:
    """Lock the trial's folder for this worker (an flock held until the trial ends, released if the process dies).
    A retry whose original folder is still locked (its first worker is paused, not dead) takes its own folder and
    starts from step 0: two workers never write one folder. Returns the folder and the open lock file."""
    import fcntl

    original = internals.frozen(trial).system_attrs.get("failed_trial")
    for number in [n for n in (original, trial.number) if n is not None]:
        folder = st.dir / "trials" / f"{number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".owner.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            log.warning("trial %d: folder %s is held by a live (paused?) worker; starting afresh", trial.number, folder)
            continue
        st.folders[trial.number] = folder
        return folder, handle
    raise TrialLost(f"trial {trial.number}: its folder is held by another worker")


def still_mine(trial: optuna.Trial) -> None:
    """Raise TrialLost when the trial is no longer RUNNING (failed as stale while this worker was paused)."""
    state = internals.frozen(trial).state
    if state != TrialState.RUNNING:
        raise TrialLost(
            f"trial {trial.number} is {state.name} in the study (this worker stopped past the grace period and it "
            "was retried elsewhere); dropped here"
        )


def trial_seed(study_seed: int, number: int) -> int:
    """The sampler seed of trial `number`: a hash of (study seed, trial number), in numpy's seed range. Reproducible
    (the same study proposes the same trials), and different for every trial whichever process runs it."""
    import hashlib

    digest = hashlib.sha256(f"lora_lab:{study_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def verdict(spec: SweepConfig, result: RunRecord) -> tuple[str, str]:
    """A finished run's trial state and reason: COMPLETE only with a finite value for every objective (Optuna takes
    +-inf as COMPLETE; here it is a failed trial)."""
    if result.status != "completed":
        return "FAIL", f"{result.status}: {result.reason}"
    for name in spec.objectives:
        value = result.value(name)
        if value is None or not math.isfinite(float(value)):
            return "FAIL", f"diverged: objective {name} is {value}"
    return "COMPLETE", ""


class Pruned(optuna.TrialPruned):
    """Optuna's pruning signal, carrying the MLflow state the run ends in (tracking reads `run_state`)."""

    run_state = "PRUNED"


def run_trial(st: Study, trial: optuna.Trial, batch_shrink: int = 1) -> list[float]:
    """Compose the trial's config, train it with MLflow logging, report each evaluation to the pruner."""
    from omegaconf import OmegaConf

    overrides = search.suggest(trial, st.spec.space)
    folder = trial_dir(st, trial)
    extra = [path_override("output_dir", folder), "trainer.resume=true"]
    resolved, cfg = compose(st.base_overrides + overrides + extra)
    if batch_shrink > 1:  # after an out-of-memory error: same effective batch, smaller micro-batches
        bs = cfg.trainer.batch_size // batch_shrink
        shrink = [f"trainer.batch_size={bs}", f"trainer.grad_accum={cfg.trainer.grad_accum * batch_shrink}"]
        resolved, cfg = compose(st.base_overrides + overrides + extra + shrink)
        overrides += shrink
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("output_dir", str(folder))
    name = st.spec.name
    role = RunRole(
        kind="trial",
        name=f"{name}/trial-{trial.number}",
        study=name,
        trial=trial.number,
        overrides=tuple(st.base_overrides + overrides),
    )
    session = build(cfg, warm=st.warm, role=role)
    # Which device ran it (its busy share) and whether the model came warm (kept from this worker's last trial).
    trial.set_user_attr("device", device_label(session.device))
    trial.set_user_attr("warm", bool(st.warm and st.warm.last_hit))
    single = len(st.spec.objectives) == 1
    warmup = st.spec.pruner_warmup_evals * cfg.trainer.eval_every

    def on_eval(event: Any) -> None:
        still_mine(trial)
        if single and event.step > 0:  # step 0 is the untouched base model, the same for every trial
            trial.report(event.metrics["val_loss"], event.step)
            if event.step >= warmup and trial.should_prune():
                raise Pruned(f"pruned at step {event.step} (val_loss {event.metrics['val_loss']:.4f})")

    try:
        result = fit_tracked(
            session,
            OmegaConf.to_container(resolved, resolve=True),
            searched=dict(trial.params),
            parent_run_id=st.parent_run_id,
            on_eval=on_eval,
            verdict=lambda r: verdict(st.spec, r),
        )
    finally:  # pruned trials too: the overhead share counts every trial that ran
        if st.warm is not None:
            st.warm.give_back()  # the kept model is the loaded one again (or dropped) before anything else runs
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # a lost trial is read-only
            trial.set_user_attr("train_time_s", session.train_time_s)
            trial.set_user_attr("eval_time_s", session.eval_time_s)
    state, reason = verdict(st.spec, result)
    if state != "COMPLETE":
        raise TrialFailed(reason)
    for key in (
        "trainable_params",
        "total_params",
        "val_loss",
        "merged_val_loss",
        "accuracy",
        "time_per_step_s",
        "peak_mem_bytes",
        "max_abs_logit_diff",
        "checkpoint_bytes",
    ):
        trial.set_user_attr(key, result.value(key))
    return [float(result.value(name)) for name in st.spec.objectives]


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_one(st: Study, trial: optuna.Trial) -> tuple[TrialState, Optional[list[float]], str]:
    """Run a popped trial to its end state; every failure becomes FAIL with a reason, and the sweep goes on.

    Checkpoints exist to resume a trial whose worker died; a trial that ends here in any state drops them.
    """
    checkpoints = trial_dir(st, trial) / "checkpoints"
    keep = False
    try:
        for attempt in (1, 2):
            oom = None
            try:
                return TrialState.COMPLETE, run_trial(st, trial, batch_shrink=2 if attempt == 2 else 1), ""
            except Interrupted:
                keep = True  # SIGINT/SIGTERM: the rerun resumes from these
                raise
            except (TrialLost, optuna.exceptions.UpdateFinishedTrialError) as exc:
                return None, None, str(exc)
            except optuna.TrialPruned as exc:
                return TrialState.PRUNED, None, str(exc)
            except TrialFailed as exc:
                return TrialState.FAIL, None, exc.reason
            except Exception as exc:  # noqa: BLE001 - one trial's error must not end the study
                reason = f"oom: {exc}" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
                oom = is_oom(exc)
                if not oom:
                    log.error("trial %d failed: %s", trial.number, reason)
                    return TrialState.FAIL, None, reason.splitlines()[0][:1000]
            # Out of memory: free it outside the except block (the traceback pins the failed attempt's tensors),
            # then retry once with half the micro-batch and twice the accumulation, from step 0.
            free_memory()
            _, cfg = compose(st.base_overrides + search.trial_overrides(_frozen(trial)))
            if attempt == 2 or cfg.trainer.batch_size % 2:
                return TrialState.FAIL, None, reason.splitlines()[0][:1000]
            log.warning("trial %d ran out of memory; retrying once with half the micro-batch", trial.number)
            shutil.rmtree(checkpoints, ignore_errors=True)  # written with the other micro-batch size
        raise AssertionError("unreachable")
    finally:
        if not keep:
            shutil.rmtree(checkpoints, ignore_errors=True)


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return internals.frozen(trial)


def worker_loop(st: Study, max_trials: Optional[int] = None) -> None:
    """Pop WAITING trials until none is left and no trial is running anywhere (a running one might die and come
    back as a retry), or until the timeout, or until this worker ran `max_trials`."""
    study, spec = st.study, st.spec
    heartbeats = internals.heartbeats_enabled(study)
    started = time.time()
    first_failures: list[str] = []
    failed_numbers: list[int] = []
    bar = _study_bar(st)
    ran = 0
    try:
        while max_trials is None or ran < max_trials:
            optuna.storages.fail_stale_trials(study)
            if spec.timeout_s is not None and time.time() - started > spec.timeout_s:
                log.info("sweep.timeout_s=%s reached: no new trials from this worker", spec.timeout_s)
                break
            trial_id = internals.pop_waiting_trial_id(study)  # atomic across workers: one pops each WAITING trial
            if trial_id is None:
                # Without heartbeats (journal storage) a dead worker's trial stays RUNNING forever: don't wait on it.
                if not heartbeats or not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
                time.sleep(min(2.0, spec.heartbeat_s))  # someone else's trial runs; it may still die and be retried
                _refresh_bar(bar, st)
                continue
            # Each trial samples with its own seed, derived from the study's seed and its number: every worker and
            # every resumed process would otherwise replay the same random stream (trial 0's parameters again).
            study.sampler = st.sampler(trial_seed(spec.seed, internals.trial_number(study, trial_id)))
            trial = optuna.Trial(study, trial_id)
            ran += 1
            # What is alive between trials (imported modules, the kept model) stays: exempt it from the cyclic
            # collector, so the collections after the trial (Session.close) scan only what the trial made. Warm.drop
            # unfreezes before it collects, so a dropped model is still freed.
            gc.freeze()
            trial.set_user_attr("fingerprint", st.fingerprint)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (hosts, kill tests)
            t0 = time.time()
            try:
                with internals.heartbeat(study, trial_id):
                    _, lock = claim_trial_dir(st, trial)
                    try:
                        state, values, reason = run_one(st, trial)
                        if state is not None:
                            still_mine(trial)
                    finally:
                        lock.close()
            except Interrupted as exc:
                interrupted(st, trial, str(exc))
                raise
            except TrialLost as exc:
                state, values, reason = None, None, str(exc)
            if state is None:  # taken away while this worker was paused: the retry owns it now
                log.warning("%s", reason)
                continue
            if reason:
                trial.set_user_attr("fail_reason" if state == TrialState.FAIL else "prune_reason", reason)
            attrs = internals.storage(study).get_trial_user_attrs(trial_id)
            if state in (TrialState.COMPLETE, TrialState.PRUNED) and "train_time_s" in attrs:
                # What the trial spent outside training steps and evaluations: compose, model and data from cache,
                # MLflow logging. The sweep reports its share of the wall time (target: under 5%).
                wall = time.time() - t0
                trial.set_user_attr("overhead_s", wall - attrs["train_time_s"] - attrs["eval_time_s"])
                trial.set_user_attr("wall_s", wall)
            study.tell(trial, values=values, state=state)
            if state != TrialState.COMPLETE:
                # Session.close() already collected; but a trial that ended in an exception kept its frames (and the
                # model they hold) alive in the traceback until run_one returned.
                free_memory()
            _log_trial(trial.number, state, values, reason, trial.params, time.time() - t0)
            _refresh_bar(bar, st)
            if state == TrialState.FAIL:
                first_failures.append(reason.split(":")[0])
                failed_numbers.append(trial.number)
                if (
                    len(first_failures) == FIRST_FAILURES_TO_STOP
                    and len(set(first_failures)) == 1
                    and not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
                ):
                    # The configuration is broken, not these trials: once it is fixed they must not fill the budget.
                    uncounted = set(study.user_attrs.get("uncounted_failures", [])) | set(failed_numbers)
                    study.set_user_attr("uncounted_failures", sorted(uncounted))
                    raise ConfigError(
                        f"the first {FIRST_FAILURES_TO_STOP} trials all failed the same way "
                        f"({reason}); stopping the study: fix the cause and run the command again"
                    )
            elif len(first_failures) < FIRST_FAILURES_TO_STOP:
                first_failures, failed_numbers = (
                    [f"ok-{trial.number}"],
                    [],
                )  # a success breaks the run of identical failures
    finally:
        bar.close()
        gc.unfreeze()  # what was frozen between trials goes back to the collector: an in-process caller runs on


def interrupted(st: Study, trial: optuna.Trial, reason: str) -> None:
    """A signal stopped this trial: FAIL it with the reason and queue a retry with the same parameters at once (not
    counted against max_retry: the trial did nothing wrong); the retry resumes from the kept checkpoints."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr("fail_reason", reason)
        st.study.tell(trial, state=TrialState.FAIL)
        frozen = internals.frozen(trial)
        system_attrs = {"failed_trial": frozen.number, "retry_history": [], **frozen.system_attrs}
        system_attrs["retry_history"] = [*system_attrs["retry_history"], frozen.number]
        st.study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs={**frozen.user_attrs, "retried_because": f"trial {frozen.number}: {reason}"},
                system_attrs=system_attrs,
            )
        )
    log.warning("trial %d %s", trial.number, reason)


def _study_bar(st: Study) -> Any:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=st.spec.n_trials,
        desc=f"study {st.spec.name}",
        unit="trial",
        position=0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    _refresh_bar(bar, st)
    return bar


def _refresh_bar(bar: Any, st: Study) -> None:
    done = sum(1 for t in st.study.get_trials(deepcopy=False) if t.state.is_finished())
    bar.n = min(done, bar.total)
    best = best_trial(st.study)
    if best is not None:
        bar.set_postfix(best=f"#{best.number} {best.values[0]:.4f}")
    bar.refresh()


def _log_trial(
    number: int, state: TrialState, values: Optional[list[float]], reason: str, params: dict, seconds: float
) -> None:
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    value = ",".join(f"{v:.4f}" for v in values) if values else reason
    log.info("trial %d %s %s | %s (%.0f s)", number, state.name, value, shown, seconds)


def best_trial(study: optuna.Study) -> Optional[optuna.trial.FrozenTrial]:
    """The best COMPLETE trial: Optuna's best for one objective, the lowest first objective on the Pareto front."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return min(study.best_trials, key=lambda t: sign * t.values[0])


# ----------------------------------------------------------------------------------------------- the end


def compare_with_full(st: Study, best: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """The best LoRA configuration against full fine-tuning on the same data and steps.

    The LoRA side is the best trial retrained from scratch (its own run, tagged 'compare'); the full-FT side is a run
    per LR in full_lr_grid (or full_lr), keeping the best. Runs already in the study folder are reused on a re-run.
    """
    spec = st.spec
    lora_over = search.trial_overrides(best)
    lora_res = _compare_run(st, "lora-best", lora_over)
    full_res = []
    for lr in [spec.full_lr] if spec.full_lr else spec.full_lr_grid:
        res = _compare_run(
            st, f"full-lr{lr:g}", ["method=full", f"optim.lr={lr!r}", "optim.lr_mult=null", *spec.full_overrides]
        )
        if res is not None:
            full_res.append((lr, res))
    rows = []
    if lora_res is not None and lora_res.status == "completed":
        rows.append(_row("LoRA (unmerged)", lora_res, lora_res.val_loss, lora_res.accuracy, lora_over))
        rows.append(_row("LoRA (merged)", lora_res, lora_res.merged_val_loss, lora_res.merged_accuracy, lora_over))
    completed = [(lr, r) for lr, r in full_res if r.status == "completed" and math.isfinite(r.val_loss)]
    if completed:
        lr, r = min(completed, key=lambda x: x[1].val_loss)
        rows.append(_row("Full fine-tune", r, r.val_loss, r.accuracy, [f"optim.lr={lr:g}"]))
    return rows


def _row(
    name: str, r: RunRecord, val_loss: Optional[float], acc: Optional[float], overrides: list[str]
) -> dict[str, Any]:
    return {
        "method": name,
        "val_loss": val_loss,
        "accuracy": acc,
        "trainable_params": r.trainable_params,
        "peak_mem_mib": r.peak_mem_bytes / 2**20,
        "time_per_step_s": r.time_per_step_s,
        "checkpoint_mib": (r.checkpoint_bytes or 0) / 2**20,
        "settings": " ".join(overrides),
    }


def _compare_run(st: Study, name: str, overrides: list[str]) -> Optional[RunRecord]:
    """One comparison run, reused on a re-run only if it ran with exactly these settings (its folder is named by a
    hash of them, so a new best trial or new base overrides get a fresh run)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    full = st.base_overrides + overrides + ["trainer.checkpoint_every=0"]
    folder = st.dir / "compare" / f"{name}-{hashlib.sha1(' '.join(full).encode()).hexdigest()[:8]}"
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            return RunRecord.from_json(json.loads(metrics.read_text()), where=str(metrics))
        except (RecordError, json.JSONDecodeError) as exc:  # another lora_lab version's file: run it again
            log.warning("comparison run %s: not reusing %s (%s)", name, metrics, exc)
    resolved, cfg = compose(full + [path_override("output_dir", folder)])
    log.info("comparison run %s: %s", name, " ".join(overrides))
    try:
        role = RunRole(kind="compare", name=f"{st.spec.name}/compare-{name}", study=st.spec.name, overrides=tuple(full))
        return fit_tracked(
            build(cfg, warm=st.warm, role=role),
            OmegaConf.to_container(resolved, resolve=True),
            parent_run_id=st.parent_run_id,
        )  # closes (frees) the session
    finally:
        if st.warm is not None:
            st.warm.give_back()


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


COMPARE_COLUMNS = [
    ("method", "method", ""),
    ("val_loss", "val loss", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("peak_mem_mib", "peak memory (MiB)", "{:.0f}"),
    ("time_per_step_s", "time/step (s)", "{:.3f}"),
    ("checkpoint_mib", "checkpoint (MiB)", "{:.2f}"),
]


def write_outputs(st: Study, compare_rows: list[dict[str, Any]]) -> list[Path]:
    """best.yaml, trials.csv, comparison.md/csv and plots into the study folder; returns the files written."""
    from lora_lab import plots

    study, out = st.study, st.dir
    files: list[Path] = []
    best = best_trial(study)
    if best is not None:
        overrides = list(st.base_overrides) + search.trial_overrides(best)
        doc = {
            "study": st.spec.name,
            "trial": best.number,
            "objectives": dict(zip(st.spec.objectives, best.values)),
            "overrides": overrides,
            "command": "python -m lora_lab.train " + " ".join(_quote(o) for o in overrides),
        }
        atomic_write_text(out / "best.yaml", f"# {doc['command']}\n" + OmegaConf.to_yaml(OmegaConf.create(doc)))
        files.append(out / "best.yaml")
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    attrs = [
        "trainable_params",
        "val_loss",
        "merged_val_loss",
        "accuracy",
        "time_per_step_s",
        "overhead_s",
        "fail_reason",
        "retried_because",
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["number", "state", *[f"value_{o}" for o in st.spec.objectives], *keys, *attrs, "retry_of", "duration_s"]
    )
    for t in trials:
        values = t.values or [None] * len(st.spec.objectives)
        dur = t.duration.total_seconds() if t.duration else None
        w.writerow(
            [
                t.number,
                t.state.name,
                *values,
                *[t.params.get(k) for k in keys],
                *[t.user_attrs.get(a) for a in attrs],
                t.system_attrs.get("failed_trial"),
                dur,
            ]
        )
    atomic_write_text(out / "trials.csv", buf.getvalue())
    files.append(out / "trials.csv")
    if compare_rows:
        md = format_table(compare_rows, COMPARE_COLUMNS + [("settings", "settings", "")])
        atomic_write_text(
            out / "comparison.md", f"Best LoRA trial vs full fine-tuning, study `{st.spec.name}`\n\n{md}\n"
        )
        files.append(out / "comparison.md")
    files += study_plots(st, trials, plots)
    return files


def study_plots(st: Study, trials: list, plots: Any) -> list[Path]:
    """Optimization history, param importances, val loss vs LR per rank, Pareto front (multi-objective)."""
    import matplotlib.pyplot as plt

    out = st.dir / "plots"
    files = []
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return files
    first = st.spec.objectives[0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([t.number for t in done], [t.values[0] for t in done], label="complete")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [list(t.intermediate_values.values())[-1] for t in pruned],
            marker="x",
            color="gray",
            label="pruned (last report)",
        )
    running, best_so_far = math.inf, []
    sign = 1 if st.spec.directions[0] == "minimize" else -1
    for t in sorted(done, key=lambda t: t.number):
        running = min(running, sign * t.values[0])
        best_so_far.append((t.number, sign * running))
    ax.plot([b[0] for b in best_so_far], [b[1] for b in best_so_far], color="C3", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(first)
    ax.set_title(f"optimization history: {st.spec.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files.append(plots.save(fig, out / "optimization_history.png"))
    if len(done) >= 3 and len(st.spec.directions) == 1 and len({k for t in done for k in t.params}) >= 1:
        with contextlib.suppress(Exception):  # needs enough variety among the completed trials
            imp = optuna.importance.get_param_importances(st.study)
            fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(imp)))
            ax.barh(list(imp)[::-1], list(imp.values())[::-1])
            ax.set_xlabel("importance (fANOVA, share of variance)")
            ax.set_title(f"parameter importances: {st.spec.name}")
            files.append(plots.save(fig, out / "param_importances.png"))
    if any("optim.lr" in t.params for t in done):
        series: dict[str, list] = {}
        for t in done:
            if "optim.lr" in t.params:
                label = f"r={t.params.get('lora.r', 'fixed')}"
                series.setdefault(label, []).append((t.params["optim.lr"], t.values[0]))
        files.append(
            plots.lr_curves(
                series, out / "val_loss_vs_lr.png", title=f"{first} vs learning rate, per rank", ylabel=first
            )
        )
    if len(st.spec.objectives) > 1:
        pts = [(t.values[1], t.values[0]) for t in done]
        front = [(t.values[1], t.values[0]) for t in st.study.best_trials]
        files.append(
            plots.scatter(
                {"trials": pts},
                out / "pareto_front.png",
                xlabel=st.spec.objectives[1],
                ylabel=first,
                title=f"Pareto front: {st.spec.name}",
                logx=True,
                front=front,
            )
        )
    return files


def path_override(key: str, path: Path) -> str:
    """`key='<path>'`: quoted for Hydra's override parser, so spaces, non-ASCII letters, '=' or brackets in the outputs
    folder stay part of the path."""
    import re

    # Hydra's quoted strings: backslashes are literal except before a quote (and at the end, before the closing one).
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(path))
    return f"{key}='{text}'"


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " []{}*?$") else arg


# ----------------------------------------------------------------------------------------------- entry point


def worker_envs(
    devices: int, per_device: int, gpus: int, cores: int, visible: str | None = None
) -> list[dict[str, str]]:
    """The environment variables of each local worker process: `devices` x `per_device` of them. On a GPU host
    worker index i // per_device is pinned to GPU (i // per_device) % gpus with CUDA_VISIBLE_DEVICES, and every GPU
    shared by k > 1 processes gives each MEMORY_SHARE / k of its memory; the host's `cores` are split between all
    processes (at least one thread each). `visible` is the launcher's own CUDA_VISIBLE_DEVICES, if set: GPU k is
    then its k-th entry (a worker given "1" under a launcher limited to "2,3" would land on someone else's GPU 1)."""
    total = devices * per_device
    gpu_of = [(i // per_device) % gpus for i in range(total)] if gpus else [None] * total
    ids = [v.strip() for v in visible.split(",")] if visible else None
    threads = str(max(1, cores // total))
    envs = []
    for gpu in gpu_of:
        env = {WORKER_ENV: "1", THREADS_ENV: threads, "OMP_NUM_THREADS": threads}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = ids[gpu] if ids else str(gpu)
            sharing = gpu_of.count(gpu)
            if sharing > 1:
                env[MEMORY_FRACTION_ENV] = f"{MEMORY_SHARE / sharing:.4f}"
        envs.append(env)
    return envs


def apply_worker_env() -> None:
    """In a worker process, before any tensor exists: its CPU threads and its cap on the GPU's memory (an
    allocation past the cap raises OutOfMemoryError in this process only: its trial is retried with half the
    micro-batch, its neighbours never notice)."""
    import torch

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    fraction = os.environ.get(MEMORY_FRACTION_ENV)
    if fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(fraction), 0)


def auto_per_device(peak_bytes: int, free_bytes: int) -> int:
    """trials_per_device=auto on a GPU: as many trials of peak `peak_bytes` as fill AUTO_FILL of `free_bytes`,
    between 1 and AUTO_MAX_PER_DEVICE."""
    if peak_bytes <= 0:
        return 1
    return max(1, min(AUTO_MAX_PER_DEVICE, math.floor(AUTO_FILL * free_bytes / peak_bytes)))


def resolve_per_device(st: Study) -> int:
    """sweep.trials_per_device as a number. 'auto' on CUDA runs the study's first trial here (it counts in the
    budget) and sizes N from its peak memory and the device's free memory after it; on the CPU it is 1."""
    import torch

    from lora_lab.train import pick_device

    n = st.spec.trials_per_device
    if n != "auto":
        return int(n)
    device = pick_device(st.base_cfg.trainer.device)
    if device.type != "cuda":
        log.info("sweep.trials_per_device=auto: 1 on the CPU (more processes would only split the same cores)")
        return 1
    before = {t.number for t in st.study.get_trials(deepcopy=False)}
    worker_loop(st, max_trials=1)
    measured = [
        t
        for t in st.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number not in before and t.user_attrs.get("peak_mem_bytes")
    ]
    if st.warm is not None:
        st.warm.drop()  # this process only waits from now on: its kept model must not take the workers' memory
    free_memory()
    if not measured:
        log.warning("sweep.trials_per_device=auto: the measuring trial did not complete; using 1 per device")
        return 1
    peak = int(measured[0].user_attrs["peak_mem_bytes"])
    free, total = torch.cuda.mem_get_info(device)
    n = auto_per_device(peak, free)
    st.study.set_user_attr("trials_per_device", n)  # what auto chose, for the bench and for a later look
    log.info(
        "sweep.trials_per_device=auto: %d per device (trial %d peaked at %.0f MiB; %.0f of %.0f MiB free)",
        n,
        measured[0].number,
        peak / 2**20,
        free / 2**20,
        total / 2**20,
    )
    return n


def launch_workers(st: Study, inv: Invocation, devices: int, per_device: int) -> int:
    """Start devices x per_device local worker processes on the same study (see worker_envs); wait for all."""
    import torch

    procs = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    envs = worker_envs(devices, per_device, torch.cuda.device_count(), cores, os.environ.get("CUDA_VISIBLE_DEVICES"))
    log.info("starting %d worker processes (%d devices x %d per device)", len(envs), devices, per_device)
    for extra in envs:
        env = dict(os.environ, **extra)
        args = [
            sys.executable,
            "-m",
            "lora_lab.sweep",
            f"sweep={inv.sweep}",
            *[f"sweep.{o}" for o in inv.sweep_overrides],
            "sweep.workers=1",
            "sweep.trials_per_device=1",
            "sweep.compare_full=false",
            *inv.train_overrides,
        ]
        procs.append(subprocess.Popen(args, env=env))
    try:
        codes = [p.wait() for p in procs]
    except Interrupted as exc:  # pass the signal on (a terminal's Ctrl-C reaches them already; a SIGTERM does not)
        for p in procs:
            if p.poll() is None:
                p.send_signal(exc.signum)
        for p in procs:
            p.wait()
        raise
    # A worker killed by a signal exits with a negative code: max() would hide it behind a 0.
    return next((c for c in codes if c != 0), 0)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input (nothing created), 1 the study stopped on an error."""
    import warnings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and retries are marked experimental by Optuna; they are the documented way to survive dead workers.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    is_worker = os.environ.get(WORKER_ENV) == "1"
    if is_worker:
        apply_worker_env()
    try:
        inv = parse_args(argv)
        spec = load_sweep(inv.sweep, inv.sweep_overrides)
        check_study(spec)
        many = spec.trials_per_device == "auto" or spec.trials_per_device > 1
        if (spec.workers > 1 or many) and spec.storage is None:
            key = "trials_per_device" if many else "workers"
            raise ConfigError(
                f"sweep.{key}={getattr(spec, key)}: the embedded SQLite storage is for one process; give "
                "sweep.storage=postgresql://USER@HOST/DB (many workers, many hosts) or "
                "sweep.storage=journal:///path/to/study.journal (many workers, one host, no heartbeats)"
            )
        st = Study(spec, inv)
        if not is_worker:
            preflight(st)
        elif st.warm is not None:
            preload(st)  # a started worker loads the base model before its first trial, as the preflight does
        storage = st.open_storage()  # an unreachable database stops here, before any study exists
        if st.tracking.enabled:
            tracking.connect(st.tracking)  # and an unusable tracking store too
        st.open(storage)
    except (ValueError, TypeError) as exc:  # ConfigError, ModelError, DataError, bad targets, unreachable storage
        print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
        return 2
    if st.tracking.enabled:
        if not is_worker:
            live = {t.number for t in st.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            closed = tracking.close_unfinished(
                st.tracking, spec.name, live, "not finished when the study resumed: its process was killed or stopped"
            )
            if closed:
                log.info("closed %d runs left RUNNING as KILLED: %s", len(closed), ", ".join(closed))
        st.parent_run_id = tracking.study_parent_run(
            st.tracking,
            spec.name,
            params={f"sweep.{k}": v for k, v in _spec_params(spec).items()},
            tags={
                "storage": st.storage_url().split("@")[-1],
                "sampler": spec.sampler,
                "objectives": ",".join(spec.objectives),
            },
            note=f"**Study `{spec.name}`**: {study_note(st)}\n\n**State: RUNNING** ({spec.n_trials} trials in budget)",
        )
    added = st.top_up()
    log.info(
        "study %s: %d trials in budget, %d added now, storage %s",
        spec.name,
        spec.n_trials,
        added,
        st.storage_url().split("@")[-1],
    )
    try:
        code = 0
        started = time.time()
        with interruptible():
            try:
                per_device = 1 if is_worker else resolve_per_device(st)
                if spec.workers * per_device > 1:
                    code = launch_workers(st, inv, spec.workers, per_device)
                    if code != 0:
                        log.error("a worker exited with code %d", code)
                else:
                    worker_loop(st)
            finally:
                st.phase = (started, time.time())
    except ConfigError as exc:
        print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"lora_lab.sweep: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if is_worker:
        return 0
    return max(finish(st), 1 if code else 0)


def finish(st: Study) -> int:
    """Comparison with full FT, best.yaml, trials.csv, plots; print them; end the parent run if all is done."""
    study, spec = st.study, st.spec
    best = best_trial(study)
    counts = st.counts()
    rows: list[dict[str, Any]] = []
    if best is not None and spec.compare_full:
        rows = compare_with_full(st, best)
    files = write_outputs(st, rows)
    all_done = not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    rate = throughput(study, st.phase) if st.phase else None
    if st.parent_run_id:
        # The best trial's objectives under the trials' own metric names: one `loss/val` column for parent and trials.
        metrics = {objective_metric(o): v for o, v in zip(spec.objectives, best.values)} if best else {}
        metrics.update({f"trials/{k.lower()}": v for k, v in counts.items()})
        if overhead_share(study) is not None:
            metrics["perf/overhead_share"] = overhead_share(study)
        if rate is not None:
            metrics.update(throughput_metrics(rate))
        state = "COMPLETE" if best is not None else ("FAIL" if all_done else "RUNNING")
        summary = tracking.StudySummary(
            state=state,
            metrics=metrics,
            best_trial=best.number if best else None,
            best_values=dict(zip(spec.objectives, best.values)) if best else {},
            best_overrides=" ".join(search.trial_overrides(best)) if best else "",
            counts=counts,
            description=study_note(st),
            table=format_table(rows, COMPARE_COLUMNS) if rows else "",
        )
        tracking.finish_parent(st.tracking, st.parent_run_id, spec.name, summary, files, end=all_done)
    print()
    print(f"study {spec.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if best is None:
        print("no trial completed; see the reasons in trials.csv and the MLflow runs")
    else:
        vals = ", ".join(f"{o}={v:.4f}" for o, v in zip(spec.objectives, best.values))
        print(f"best trial #{best.number}: {vals}\n  {' '.join(search.trial_overrides(best))}")
    share = overhead_share(study)
    if share is not None:
        print(
            f"time outside training steps and evaluations (compose, model/data from cache, logging): "
            f"{100 * share:.1f}% of trial wall time"
        )
    if rate is not None:
        print(throughput_line(rate))
    if rows:
        print("\n" + format_table(rows, COMPARE_COLUMNS))
    print(f"\nfiles: {st.dir}")
    if st.tracking.enabled:
        print(f"See it in MLflow:  {tracking.ui_command(st.tracking)}")
    return 0 if best is not None else 1


def overhead_share(study: optuna.Study) -> Optional[float]:
    """Share of the wall time of completed and pruned trials spent outside training steps and evaluations."""
    done = [t for t in study.get_trials(deepcopy=False) if "overhead_s" in t.user_attrs]
    wall = sum(t.user_attrs["wall_s"] for t in done)
    return sum(t.user_attrs["overhead_s"] for t in done) / wall if wall > 0 else None


def device_label(device: Any) -> str:
    """A device as the study counts it: host and device, a GPU by its physical index (CUDA_VISIBLE_DEVICES maps a
    worker's cuda:0 to the GPU it was given)."""
    host = socket.gethostname()
    if device.type != "cuda":
        return f"{host}:{device.type}"
    index = device.index or 0
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"{host}:cuda:{visible[index].strip() if index < len(visible) else index}"


def throughput(study: optuna.Study, phase: tuple[float, float]) -> Optional[StudyThroughput]:
    """Trials per hour and each device's busy share (time inside training steps and evaluations / wall time) over
    this invocation's trial phase `phase` (start, end; epoch seconds): the trials that started in it and finished.
    With several processes on one device (sweep.trials_per_device) a device's share sums theirs: it can pass 1.
    None when no trial ran."""
    start, end = phase
    wall = end - start
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ran = [
        t
        for t in study.get_trials(deepcopy=False, states=finished)
        if t.datetime_start is not None and t.datetime_start.timestamp() >= start - 1.0  # Optuna's clock: local time
    ]
    if not ran or wall <= 0:
        return None
    busy: dict[str, float] = {}
    for t in ran:
        device = t.user_attrs.get("device", "unknown")
        busy[device] = (
            busy.get(device, 0.0) + t.user_attrs.get("train_time_s", 0.0) + t.user_attrs.get("eval_time_s", 0.0)
        )
    per_device = {d: b / wall for d, b in sorted(busy.items())}
    return StudyThroughput(
        trials=len(ran),
        wall_s=wall,
        trials_per_hour=3600.0 * len(ran) / wall,
        busy_share=sum(per_device.values()) / len(per_device),
        overhead_share=overhead_share(study),
        per_device=per_device,
    )


def throughput_metrics(rate: StudyThroughput) -> dict[str, float]:
    """The parent run's metrics of `rate`, by the names records.StudyThroughput gives them (one per device too, when
    there are several)."""
    import re
    from dataclasses import fields

    out = {}
    for f in fields(StudyThroughput):
        key, value = f.metadata.get("key"), getattr(rate, f.name)
        if key and value is not None:
            out[key] = float(value)
    if len(rate.per_device) > 1:
        key = StudyThroughput.__dataclass_fields__["busy_share"].metadata["key"]
        for device, share in rate.per_device.items():
            out[f"{key}/{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}"] = share
    return out


def throughput_line(rate: StudyThroughput) -> str:
    """The printed throughput: trials per hour and the devices' busy share."""
    devices = ", ".join(f"{d} {100 * s:.1f}%" for d, s in rate.per_device.items())
    return (
        f"throughput: {rate.trials_per_hour:.1f} trials/hour ({rate.trials} trials in {rate.wall_s:.0f} s); "
        f"device busy (inside training steps and evaluations): {100 * rate.busy_share:.1f}% of wall time"
        + (f" ({devices})" if len(rate.per_device) > 1 else f" ({next(iter(rate.per_device))})")
    )


def objective_metric(name: str) -> str:
    """The MLflow metric an objective is logged as in its trials (val_loss -> loss/val)."""
    f = Results.field_of(name)
    return f.metadata.get("key") or f.metadata["curve"]


def study_note(st: Study) -> str:
    """One line on the study: its own description, and the model and data it actually ran."""
    c = st.base_cfg
    ran = f"{c.method} of `{c.model.name}` on `{c.data.name}`, {c.trainer.max_steps} steps per trial"
    return f"{st.spec.description.strip()} (as run: {ran})" if st.spec.description.strip() else f"{ran}."


def _spec_params(spec: SweepConfig) -> dict[str, str]:
    """The study's settings as a person chose them: its name, budget, sampler and objectives, every other field that
    differs from its default, and each space entry with the keys it sets (no defaults logged as if set)."""
    from dataclasses import asdict, fields

    from lora_lab.config import ParamSpec
    from lora_lab.records import param_text

    default, blank = SweepConfig(), asdict(ParamSpec())
    always = ("name", "n_trials", "sampler", "pruner", "objectives")
    out: dict[str, Any] = {}
    for f in fields(SweepConfig):
        v = getattr(spec, f.name)
        if f.name == "space":
            for path, entry in v.items():
                e = asdict(entry) if not isinstance(entry, dict) else entry
                out[f"space.{path}"] = {k: x for k, x in e.items() if k == "type" or x != blank.get(k)}
        elif f.name in always or v != getattr(default, f.name):
            out[f.name] = v
    return {k: param_text(v) for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
