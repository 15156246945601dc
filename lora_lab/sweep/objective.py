"""The objective: one popped trial run to its end state (compose, train with MLflow logging, prune, retry an OOM).

A trial is exactly a training run (`lora_lab.train`) with some overrides: search.py turns the space into overrides,
train trains, tracking talks to MLflow. A retry (of a dead worker's trial) resumes from that trial's last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from lora_lab.config import Config, compose
from lora_lab.records import RunRecord
from lora_lab.sweep import optuna_internals as internals
from lora_lab.sweep import search
from lora_lab.sweep.storage import StorageError
from lora_lab.sweep.study import Study
from lora_lab.sweep.trials import RESULTS, Failure, FailureKind, TrialAttrs, TrialFailed, Verdict, verdict
from lora_lab.train import Interrupted, RunRole, build, distributed, fit_tracked, free_memory

log = logging.getLogger("lora_lab")


class TrialLost(Exception):
    """This worker's trial is no longer its own (it was paused past the grace period, failed as stale and retried
    elsewhere): drop it without writing anything more to the trial."""

    run_state, run_status = "FAIL", "KILLED"


class Pruned(optuna.TrialPruned):
    """Optuna's pruning signal, carrying the MLflow state the run ends in (tracking reads `run_state`)."""

    run_state = "PRUNED"


@dataclass(frozen=True)
class Outcome:
    """How a popped trial ended here: its state (None: taken away from this worker, which drops it), its objective
    values when COMPLETE, its failure when FAIL, and `note`: why it was pruned or dropped."""

    state: Optional[TrialState]
    values: Optional[list[float]] = None
    failure: Optional[Failure] = None
    note: str = ""

    @property
    def reason(self) -> str:
        return self.failure.reason if self.failure is not None else self.note


def trial_dir(st: Study, trial: optuna.Trial) -> Path:
    """A trial's folder; a retry uses the folder of the trial it retries, so it resumes from its checkpoint."""
    if trial.number in st.folders:
        return st.folders[trial.number]
    original = retried_trial(trial)
    return st.trial_folder(original if original is not None else trial.number)


def retried_trial(trial: optuna.Trial) -> Optional[int]:
    """The number of the trial this one retries (Optuna's system attribute `failed_trial`), or None."""
    return internals.frozen(trial).system_attrs.get("failed_trial")


def claim_trial_dir(st: Study, trial: optuna.Trial) -> tuple[Path, Any]:
    """Lock the trial's folder for this worker (an flock held until the trial ends, released if the process dies).
    A retry whose original folder is still locked (its first worker is paused, not dead) takes its own folder and
    starts from step 0: two workers never write one folder. Returns the folder and the open lock file."""
    import fcntl

    for number in [n for n in (retried_trial(trial), trial.number) if n is not None]:
        folder = st.trial_folder(number)
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


def device_label(device: Any) -> str:
    """A device as the study counts it: host and device, a GPU by its physical index (CUDA_VISIBLE_DEVICES maps a
    worker's cuda:0 to the GPU it was given)."""
    host = socket.gethostname()
    if device.type != "cuda":
        return f"{host}:{device.type}"
    index = device.index or 0
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"{host}:cuda:{visible[index].strip() if index < len(visible) else index}"


def path_override(key: str, path: Path) -> str:
    """`key='<path>'`: quoted for Hydra's override parser, so spaces, non-ASCII letters, '=' or brackets in the outputs
    folder stay part of the path."""
    import re

    # Hydra's quoted strings: backslashes are literal except before a quote (and at the end, before the closing one).
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(path))
    return f"{key}='{text}'"


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
    TrialAttrs.write(trial, overrides=overrides, output_dir=str(folder))
    retry = retried_trial(trial) is not None
    reused = finished_run(folder, OmegaConf.to_container(resolved, resolve=True)) if retry else None
    if reused is not None:  # trained to its end before (its trial's state was never recorded): not trained again
        log.info(
            "trial %d: reusing the finished run in %s (same configuration; not trained again)", trial.number, folder
        )
        return judged_values(st, trial, reused)
    name = st.spec.name
    role = RunRole(
        kind="trial",
        name=f"{name}/trial-{trial.number}",
        study=name,
        trial=trial.number,
        overrides=tuple(st.base_overrides + overrides),
    )
    # trainer.devices=K > 1 (sweep.devices_per_trial): this worker is rank 0, the other ranks are started for the trial
    with distributed.group_for(cfg, st.base_overrides + overrides + extra, folder):
        return trained_values(st, trial, cfg, resolved, role)


def trained_values(st: Study, trial: optuna.Trial, cfg: Config, resolved: Any, role: RunRole) -> list[float]:
    """Build and train the trial's run with MLflow logging, reporting each evaluation to the pruner; its values."""
    from omegaconf import OmegaConf

    session = build(cfg, warm=st.warm, role=role)
    # Which device ran it (its busy share) and whether the model came warm (kept from this worker's last trial).
    TrialAttrs.write(trial, device=device_label(session.device), warm=bool(st.warm and st.warm.last_hit))
    single = len(st.spec.objectives) == 1
    warmup = st.spec.pruner_warmup_evals * cfg.trainer.eval_every

    def on_eval(event: Any) -> None:
        still_mine(trial)
        if single and event.step > 0:  # step 0 is the untouched base model, the same for every trial
            trial.report(event.metrics["val_loss"], event.step)
            if event.step >= warmup and trial.should_prune():
                raise Pruned(f"pruned at step {event.step} (val_loss {event.metrics['val_loss']:.4f})")

    judged: list[Verdict] = []

    def judge(result: RunRecord) -> tuple[str, str]:
        judged.append(verdict(st.spec, result))  # judged once: the run's MLflow outcome and the trial's state agree
        return judged[-1].outcome()

    try:
        result = fit_tracked(
            session,
            OmegaConf.to_container(resolved, resolve=True),
            searched=dict(trial.params),
            parent_run_id=st.parent_run_id,
            on_eval=on_eval,
            verdict=judge,
        )
    finally:  # pruned trials too: the overhead share counts every trial that ran
        if st.warm is not None:
            st.warm.give_back()  # the kept model is the loaded one again (or dropped) before anything else runs
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # a lost trial is read-only
            TrialAttrs.write(trial, train_time_s=session.train_time_s, eval_time_s=session.eval_time_s)
    (judgement,) = judged
    return judged_values(st, trial, result, judgement)


def judged_values(
    st: Study, trial: optuna.Trial, result: RunRecord, judgement: Optional[Verdict] = None
) -> list[float]:
    """A finished run's objective values, its results stored on the trial; TrialFailed when the verdict is FAIL."""
    judgement = judgement or verdict(st.spec, result)
    if judgement.failure is not None:
        raise TrialFailed(judgement.failure)
    TrialAttrs.write(trial, **{key: result.value(key) for key in RESULTS})
    return [float(result.value(name)) for name in st.spec.objectives]


def finished_run(folder: Path, resolved: dict[str, Any]) -> Optional[RunRecord]:
    """The record of a run that finished in `folder` with exactly this configuration (its metrics.json, written last,
    and its config.yaml), or None. A trial whose run finished but whose state never reached the study (the storage
    went away, the disk filled up, the process was killed just then) is retried in the same folder, and the retry
    takes this instead of training again."""
    import json

    import yaml

    from lora_lab.records import RecordError

    metrics, config = folder / "metrics.json", folder / "config.yaml"
    # config.yaml is written when a run starts, metrics.json when it ends: an older metrics.json is another run's.
    if not (metrics.is_file() and config.is_file()) or metrics.stat().st_mtime < config.stat().st_mtime:
        return None
    try:
        if yaml.safe_load(config.read_text()) != {**resolved, "output_dir": str(folder)}:
            return None
        return RunRecord.from_json(json.loads(metrics.read_text()), where=str(metrics))
    except (OSError, ValueError, RecordError, yaml.YAMLError) as exc:
        log.warning("not reusing %s (%s): training the trial again", metrics, exc)
        return None


def run_one(st: Study, trial: optuna.Trial) -> Outcome:
    """Run a popped trial to its end state; every failure becomes FAIL with its kind and reason, and the sweep goes
    on.

    Checkpoints exist to resume a trial whose worker died; a trial that ends here in any state drops them.
    """
    checkpoints = trial_dir(st, trial) / "checkpoints"
    keep = False
    try:
        for attempt in (1, 2):
            try:
                return Outcome(TrialState.COMPLETE, run_trial(st, trial, batch_shrink=2 if attempt == 2 else 1))
            except (Interrupted, StorageError):
                keep = True  # SIGINT/SIGTERM, or the study's storage gone: the rerun resumes from these
                raise
            except (TrialLost, optuna.exceptions.UpdateFinishedTrialError) as exc:
                return Outcome(None, note=str(exc))
            except optuna.TrialPruned as exc:
                return Outcome(TrialState.PRUNED, note=str(exc))
            except TrialFailed as exc:
                return Outcome(TrialState.FAIL, failure=exc.failure)
            except Exception as exc:  # noqa: BLE001 - one trial's error must not end the study
                failure = Failure.of(exc, folder=trial_dir(st, trial))
                if failure.kind.stops_study or failure.kind.retried:
                    keep = True  # a lost server, a full disk, a lost rank: the retry resumes from these
                if failure.kind != FailureKind.OOM:
                    log.error("trial %d failed: %s", trial.number, failure.reason)
                    return Outcome(TrialState.FAIL, failure=failure)
            # Out of memory: free it outside the except block (the traceback pins the failed attempt's tensors),
            # then retry once with half the micro-batch and twice the accumulation, from step 0.
            free_memory()
            _, cfg = compose(st.base_overrides + search.trial_overrides(internals.frozen(trial)))
            if attempt == 2 or cfg.trainer.batch_size % 2:
                return Outcome(TrialState.FAIL, failure=failure)
            log.warning("trial %d ran out of memory; retrying once with half the micro-batch", trial.number)
            shutil.rmtree(checkpoints, ignore_errors=True)  # written with the other micro-batch size
        raise AssertionError("unreachable")
    finally:
        if not keep:
            shutil.rmtree(checkpoints, ignore_errors=True)


def fail_and_retry(st: Study, trial: optuna.Trial, reason: str) -> None:
    """FAIL this trial with `reason` and queue a retry with the same parameters at once (not counted against
    max_retry: the trial did nothing wrong; a signal, a lost server or a full disk stopped it); the retry runs first
    when the study resumes (optuna_internals.pop_waiting_trial_id), from the kept checkpoints."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        TrialAttrs.write(trial, fail_reason=reason)
        st.study.tell(trial, state=TrialState.FAIL)
        frozen = internals.frozen(trial)
        system_attrs = {"failed_trial": frozen.number, "retry_history": [], **frozen.system_attrs}
        system_attrs["retry_history"] = [*system_attrs["retry_history"], frozen.number]
        attrs = replace(TrialAttrs.read(frozen), **TrialAttrs.for_retry(f"trial {frozen.number}: {reason}"))
        st.study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=attrs.stored(),
                system_attrs=system_attrs,
            )
        )


def interrupted(st: Study, trial: optuna.Trial, exc: Interrupted) -> None:
    """A signal stopped this trial: FAIL it with the reason and queue its retry (fail_and_retry)."""
    reason = Failure.interrupted(exc).reason
    fail_and_retry(st, trial, reason)
    log.warning("trial %d %s", trial.number, reason)


# ----------------------------------------------------------------------------------------------- dead owners


def owner_state(st: Study, trial: optuna.trial.FrozenTrial) -> tuple[str, str]:
    """Whether a RUNNING trial's worker still lives: ('alive', ''), ('gone', why) or ('unknown', '') (another host,
    or not recorded yet).

    For storages without heartbeats (a journal file). Gone = its process (`worker`: host:pid, on this host) has
    exited, or its pid now belongs to a process that started after the trial did, AND the trial's folder lock
    (claim_trial_dir) is free. Both, because each alone misleads: a live worker holds no lock between popping a
    trial and claiming its folder, nor between releasing it and telling the study the trial's state; and a pid can
    be reused. A trial popped by a worker that died before it recorded itself is gone once its folders are free and
    it started more than sweep.grace_s ago."""
    import fcntl

    worker = TrialAttrs.read(trial).worker
    started = trial.datetime_start.timestamp() if trial.datetime_start is not None else None
    host, _, pid = (worker or "").rpartition(":")
    if worker is not None and (host != socket.gethostname() or not pid.isdigit()):
        return "unknown", ""
    # This process asks between its own trials: a RUNNING trial under its own pid is a leftover, judged by its lock.
    if worker is not None and int(pid) != os.getpid() and process_alive(int(pid), since=started):
        return "alive", ""
    if worker is None and (started is None or time.time() - started < st.spec.grace_s):
        return "unknown", ""
    original = trial.system_attrs.get("failed_trial")
    for number in {n for n in (original, trial.number) if n is not None}:
        lock = st.trial_folder(number) / ".owner.lock"
        if not lock.is_file():
            continue
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the handle closes
            except BlockingIOError:
                return "alive", ""  # someone holds its folder: a live worker (paused, perhaps)
    who = f"process {pid}" if worker is not None else "its worker (unrecorded)"
    return "gone", f"worker lost: {who} is gone and its trial folder is unlocked (killed or crashed)"


def process_alive(pid: int, since: Optional[float] = None) -> bool:
    """Whether process `pid` exists and is not a zombie, and (where /proc tells, Linux) started before `since`
    (epoch seconds): a process that started later only reuses a dead worker's pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return True
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) ": state is field 3, starttime field 22
    if fields[0] == "Z":
        return False  # exited, not yet reaped by its parent
    start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return since is None or start <= since + 1.0
