"""One study's lifecycle in its storage: storage, sampler, pruner, fingerprint and the exact budget.

The budget is exact across workers and hosts: when a study is created (or its n_trials raised) the missing trials are
enqueued as WAITING under a lock, and workers only ever pop WAITING trials (retries first), never create new ones. A
worker that dies stops sending heartbeats; the next worker to look fails its trial and re-enqueues it with the same
parameters (Optuna's RetryHeartbeatStaleTrialCallback, here LostTrialCallback). A journal has no heartbeats: there the
next worker finds the dead worker's process gone and its trial folder unlocked (workers.recover_orphans). Which
storage and how it is guarded: storage.py.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from optuna.trial import TrialState

from lora_lab import tracking
from lora_lab.config import SWEEPS_DIR, ConfigError, SweepConfig, compose, outputs_root
from lora_lab.files import file_lock
from lora_lab.sweep import search
from lora_lab.sweep.storage import advisory_lock, embedded_url, open_storage
from lora_lab.sweep.trials import TrialAttrs
from lora_lab.train.warm import Warm

log = logging.getLogger("lora_lab")


@dataclass
class Invocation:
    """The command line, split: which study, its own settings, and the training overrides every trial gets."""

    sweep: str = "default"
    sweep_overrides: list[str] = field(default_factory=list)  # sweep.KEY=VALUE, without the prefix
    train_overrides: list[str] = field(default_factory=list)


class Study:
    """One study's settings, storage, folders and MLflow parent, shared by the worker loop and the final summary."""

    def __init__(self, spec: SweepConfig, inv: Invocation) -> None:
        self.spec = spec
        self.file = study_file(inv.sweep)
        self.base_overrides = list(spec.overrides) + list(inv.train_overrides)
        _, self.base_cfg = compose(self.base_overrides)
        if self.base_cfg.trainer.devices != 1:
            raise ConfigError(
                f"trainer.devices={self.base_cfg.trainer.devices}: a sweep's trials get their devices from "
                f"sweep.devices_per_trial={self.base_cfg.trainer.devices} (the sweep starts their ranks)"
            )
        if spec.devices_per_trial > 1:  # every trial and comparison run trains over that many processes
            self.base_overrides.append(f"trainer.devices={spec.devices_per_trial}")
            _, self.base_cfg = compose(self.base_overrides)
        self.fingerprint = fingerprint(spec, self.base_overrides)
        self.tracking = self.base_cfg.tracking
        self.dir = outputs_root() / "studies" / spec.name
        self.parent_run_id: Optional[str] = None
        self._url: Optional[str] = None  # the storage's URL, chosen once (storage_url)
        self.storage_note = ""  # what the log says about an embedded storage chosen for the study, if anything
        self.study: Optional[optuna.Study] = None
        self.folders: dict[int, Path] = {}  # trial number -> the folder this worker claimed for it
        # The model, tokenizer and data kept between this worker's trials (sweep.warm=false: none, load per trial;
        # none over several devices either: FSDP2 shards a model in place, and the other ranks load theirs per trial).
        self.warm: Optional[Warm] = Warm() if spec.warm and spec.devices_per_trial == 1 else None
        # This invocation's trial phase (all its workers), for trials per hour and the devices' busy share.
        self.phase: Optional[tuple[float, float]] = None

    def trial_folder(self, number: int) -> Path:
        """The folder of trial `number` (its config, checkpoints, metrics.json, adapter)."""
        return self.dir / "trials" / f"{number:04d}"

    # -- storage ---------------------------------------------------------------------------------------------

    def storage_url(self) -> str:
        """sweep.storage (PostgreSQL through an installed driver), else the embedded default on one machine: the
        SQLite file in the outputs, or the study's journal file for several processes (storage.embedded_url)."""
        if self.spec.storage:
            return pg_driver(self.spec.storage)
        if self._url is None:
            self._url, self.storage_note = embedded_url(self.spec.name, outputs_root(), self.dir, self.processes())
        return self._url

    def processes(self) -> int:
        """How many local processes run this study's trials and talk to its storage: workers / devices_per_trial x
        trials_per_device ('auto' may mean several). A trial's other ranks never touch the storage."""
        tpd = self.spec.trials_per_device
        return self.spec.workers // self.spec.devices_per_trial * (2 if tpd == "auto" else int(tpd))

    def open_storage(self) -> optuna.storages.BaseStorage:
        """The study's storage (storage.open_storage): RDB with heartbeats (SQLite, PostgreSQL) or a journal file,
        behind bounded retries and errors that name it."""
        url = self.storage_url()
        # Two processes creating one new SQLite file at once race in the table creation: serialise it.
        with self.lock() if url.startswith("sqlite:///") else contextlib.nullcontext():
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            return open_storage(
                url,
                deadline_s=self.spec.storage_deadline_s,
                heartbeat_s=self.spec.heartbeat_s,
                grace_s=self.spec.grace_s,
                lost=LostTrialCallback(self, max_retry=self.spec.max_retry),
            )

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
        """The study's pruner: median (after pruner_startup_trials), hyperband over the steps, or none."""
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
    def lock(self, what: str = "budget") -> Iterator[None]:
        """Serialise `what` between the study's processes: budget top-ups, or the comparison with full fine-tuning
        (one process runs it, the others then reuse its runs). A file lock on one machine, an advisory lock on
        PostgreSQL."""
        url = self.storage_url()
        if url.startswith("postgresql"):
            with advisory_lock(url, lock_key(self.spec.name, what), self.spec.storage_deadline_s):
                yield
            return
        with file_lock(outputs_root() / f".{self.spec.name}.{what}.lock"):
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

        def counts(t: optuna.trial.FrozenTrial) -> bool:
            if t.state != TrialState.FAIL:
                return True
            ran_with = TrialAttrs.read(t).fingerprint
            return not (
                t.number in retried or t.number in uncounted or (ran_with is not None and ran_with != self.fingerprint)
            )

        return sum(1 for t in trials if counts(t))

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

    def stop_counting(self, numbers: list[int]) -> None:
        """Trials `numbers` (a configuration that stopped the study) no longer count towards the budget."""
        uncounted = set(self.study.user_attrs.get("uncounted_failures", [])) | set(numbers)
        self.study.set_user_attr("uncounted_failures", sorted(uncounted))

    def counts(self) -> dict[str, int]:
        """How many of the study's trials are in each state (COMPLETE, FAIL, ...)."""
        states: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        return states


def lock_key(name: str, what: str) -> int:
    """The PostgreSQL advisory lock key of study `name`'s lock `what`: the budget's is the one it has always been
    (the name's first 8 bytes), the others a hash of both."""
    import hashlib

    raw = name.encode()[:8].ljust(8, b"\0") if what == "budget" else hashlib.sha256(f"{name}:{what}".encode()).digest()
    return int.from_bytes(raw[:8], "big") % (2**63)


def pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (3); use psycopg2 (our dependency) when psycopg is
    absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


class LostTrialCallback(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """A trial's worker died (its heartbeat went stale; with a journal, its process is gone and its folder's lock
    free), or a rank of its process group did (FailureKind.RANK): retry the trial with the same parameters (at most
    max_retry times), and end its MLflow run as KILLED instead of leaving it RUNNING forever."""

    HEARTBEAT = "worker lost: no heartbeat (killed or preempted)"

    def __init__(self, study: Study, max_retry: int) -> None:
        super().__init__(max_retry=max_retry)
        self._study = study

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str = HEARTBEAT) -> None:
        # Optuna has already made the lost trial FAIL, so its attributes are frozen: the reason travels with the
        # retry (built from this copy, without its dead worker), and on the lost trial's MLflow run.
        TrialAttrs.write(trial, **TrialAttrs.for_retry(f"trial {trial.number}: {reason}"))
        if self._study.tracking.enabled:
            with contextlib.suppress(Exception):
                tracking.mark_trial_lost(self._study.tracking, self._study.spec.name, trial.number, reason)
        log.warning("trial %d lost a process (%s); retrying it with the same parameters", trial.number, reason)
        super().__call__(study, trial)


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


def trial_seed(study_seed: int, number: int) -> int:
    """The sampler seed of trial `number`: a hash of (study seed, trial number), in numpy's seed range. Reproducible
    (the same study proposes the same trials), and different for every trial whichever process runs it."""
    import hashlib

    digest = hashlib.sha256(f"lora_lab:{study_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def best_trial(study: optuna.Study) -> Optional[optuna.trial.FrozenTrial]:
    """The best COMPLETE trial: Optuna's best for one objective, the lowest first objective on the Pareto front."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return min(study.best_trials, key=lambda t: sign * t.values[0])


def study_note(st: Study) -> str:
    """One line on the study: its own description, and the model and data it actually ran."""
    c = st.base_cfg
    ran = f"{c.method} of `{c.model.name}` on `{c.data.name}`, {c.trainer.max_steps} steps per trial"
    return f"{st.spec.description.strip()} (as run: {ran})" if st.spec.description.strip() else f"{ran}."


def spec_params(spec: SweepConfig) -> dict[str, str]:
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
