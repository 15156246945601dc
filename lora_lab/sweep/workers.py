"""Who runs the trials: one worker's loop, and the local worker processes (launch, device pinning, threads).

A local worker process is `python -m lora_lab.sweep` again, marked by WORKER_ENV, pinned to its GPU with
CUDA_VISIBLE_DEVICES, capped to its share of that GPU's memory when processes share it, given its share of the cores.
"""

from __future__ import annotations

import datetime
import gc
import logging
import math
import os
import socket
import subprocess
import sys
import time
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from lora_lab import processes
from lora_lab.sweep import optuna_internals as internals
from lora_lab.sweep.objective import (
    Outcome,
    TrialLost,
    claim_trial_dir,
    fail_and_retry,
    interrupted,
    owner_state,
    run_one,
    still_mine,
)
from lora_lab.sweep.storage import StorageError
from lora_lab.sweep.study import Invocation, LostTrialCallback, Study, best_trial, trial_seed
from lora_lab.sweep.trials import Failure, FailureKind, TrialAttrs
from lora_lab.train import Interrupted, free_memory

log = logging.getLogger("lora_lab")

WORKER_ENV = "LORA_LAB_SWEEP_WORKER"  # set in worker processes started by `sweep.workers=N`
PARENT_ENV = "LORA_LAB_SWEEP_PARENT"  # the launcher's pid, in its workers' environment (watch_parent)
# A worker's share of its GPU's memory (torch.cuda.set_per_process_memory_fraction), when processes share one GPU.
MEMORY_FRACTION_ENV = "LORA_LAB_CUDA_MEMORY_FRACTION"
THREADS_ENV = "LORA_LAB_NUM_THREADS"  # a worker's torch CPU threads: the host's cores split between its processes
MEMORY_SHARE = 0.95  # of a GPU's memory, split between the processes on it (the rest: their CUDA contexts)
AUTO_FILL = 0.9  # trials_per_device=auto fills this share of a device's free memory with measured trial peaks
AUTO_MAX_PER_DEVICE = 8
FIRST_FAILURES_TO_STOP = 3  # the first trials all failing the same way means the study itself is broken
UNBEATEN = "worker lost: no heartbeat ever (killed right after it took the trial)"


# ----------------------------------------------------------------------------------------------- the worker loop


def worker_loop(st: Study, max_trials: Optional[int] = None) -> None:
    """Pop WAITING trials until none is left and no trial is running anywhere (a running one might die and come
    back as a retry), or until the timeout, or until this worker ran `max_trials`."""
    study, spec = st.study, st.spec
    heartbeats = internals.heartbeats_enabled(study)
    started = time.time()
    # The failure signature of each of this worker's first FIRST_FAILURES_TO_STOP trials (None: it did not fail).
    first: list[Optional[tuple[Any, str]]] = []
    first_numbers: list[int] = []
    bar = study_bar(st)
    ran = 0
    try:
        while max_trials is None or ran < max_trials:
            optuna.storages.fail_stale_trials(study)
            recover_orphans(st, heartbeats)
            if spec.timeout_s is not None and time.time() - started > spec.timeout_s:
                log.info("sweep.timeout_s=%s reached: no new trials from this worker", spec.timeout_s)
                break
            trial_id = internals.pop_waiting_trial_id(study)  # atomic across workers: one pops each WAITING trial
            if trial_id is None:
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                # Someone else's trial runs; it may still die and be retried. Without heartbeats (a journal) only a
                # worker on this host can be told dead (recover_orphans): trials of other hosts are not waited on.
                if not running or (not heartbeats and all(owner_state(st, t)[0] == "unknown" for t in running)):
                    break
                time.sleep(min(2.0, spec.heartbeat_s))
                refresh_bar(bar, st)
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
            # Who ran it: the study's settings when it ran, and the process (hosts, the kill tests).
            TrialAttrs.write(trial, fingerprint=st.fingerprint, worker=f"{socket.gethostname()}:{os.getpid()}")
            t0 = time.time()
            try:
                with internals.heartbeat(study, trial_id):
                    _, lock = claim_trial_dir(st, trial)
                    try:
                        outcome = run_one(st, trial)
                        if outcome.state is not None:
                            still_mine(trial)
                    finally:
                        lock.close()
            except Interrupted as exc:
                interrupted(st, trial, exc)
                raise
            except TrialLost as exc:
                outcome = Outcome(None, note=str(exc))
            state, values, reason = outcome.state, outcome.values, outcome.reason
            if state is None:  # taken away while this worker was paused: the retry owns it now
                log.warning("%s", reason)
                continue
            if outcome.failure is not None and outcome.failure.kind.stops_study:
                log_trial(trial.number, TrialState.FAIL, None, reason, trial.params, time.time() - t0)
                stop = stopped_by(trial.number, outcome.failure, st)
                try:
                    fail_and_retry(st, trial, reason)
                except StorageError as exc:  # the same full disk under the study's storage
                    stop.args = (f"{stop}. Its state could not be recorded either ({exc}): the next run retries it",)
                raise stop
            if outcome.failure is not None:
                TrialAttrs.write(trial, fail_reason=reason)
            elif reason:
                TrialAttrs.write(trial, prune_reason=reason)
            attrs = TrialAttrs.read(internals.storage(study).get_trial_user_attrs(trial_id))
            if state in (TrialState.COMPLETE, TrialState.PRUNED) and attrs.train_time_s is not None:
                # What the trial spent outside training steps and evaluations: compose, model and data from cache,
                # MLflow logging. The sweep reports its share of the wall time (target: under 5%).
                wall = time.time() - t0
                train_s, eval_s = attrs.require("train_time_s", "eval_time_s")
                TrialAttrs.write(trial, overhead_s=wall - train_s - eval_s, wall_s=wall)
            study.tell(trial, values=values, state=state)
            if outcome.failure is not None and outcome.failure.kind.retried:  # a rank lost: same parameters again
                LostTrialCallback(st, max_retry=st.spec.max_retry)(study, internals.frozen(trial), reason=reason)
            if state != TrialState.COMPLETE:
                # Session.close() already collected; but a trial that ended in an exception kept its frames (and the
                # model they hold) alive in the traceback until run_one returned.
                free_memory()
            log_trial(trial.number, state, values, reason, trial.params, time.time() - t0)
            refresh_bar(bar, st)
            if len(first) < FIRST_FAILURES_TO_STOP:
                first.append(outcome.failure.signature if outcome.failure is not None else None)
                first_numbers.append(trial.number)
                if (
                    len(first) == FIRST_FAILURES_TO_STOP
                    and None not in first  # a trial that did not fail breaks the run of identical failures
                    and len(set(first)) == 1
                    and not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
                ):
                    # The configuration is broken, not these trials: once it is fixed they must not fill the budget.
                    st.stop_counting(first_numbers)
                    kind = outcome.failure.kind.value + (f": {outcome.failure.error}" if outcome.failure.error else "")
                    raise StudyStopped(
                        f"the first {FIRST_FAILURES_TO_STOP} trials all failed the same way "
                        f"({reason}); stopping the study: fix the cause and run the command again",
                        reason=f"stopped: the first {FIRST_FAILURES_TO_STOP} trials all failed the same way ({kind})",
                    )
    finally:
        bar.close()
        gc.unfreeze()  # what was frozen between trials goes back to the collector: an in-process caller runs on


class StudyStopped(RuntimeError):
    """The study stops before its budget is met, for a cause every later trial would share (its first trials all
    failed alike, the tracking server is gone, the disk is full). The message says what to do; `reason` is the short
    line the study's MLflow parent closes with; `tracking_ok` is False when the tracking server is the cause (nothing
    more is sent to it: the parent is closed when the study resumes)."""

    def __init__(self, message: str, reason: str, tracking_ok: bool = True) -> None:
        super().__init__(message)
        self.reason, self.tracking_ok = reason, tracking_ok


def stopped_by(number: int, failure: Failure, st: Study) -> StudyStopped:
    """The stop for trial `number`'s failure of a kind that stops the study (FailureKind.stops_study)."""
    if failure.kind == FailureKind.TRACKING:
        return StudyStopped(
            f"trial {number}: {failure.reason}. The study stops (every later trial would lose its tracking server "
            "too): start the server again, or point tracking.uri at one that answers, and run the same command to "
            f"resume; trial {number} runs again first, from its last checkpoint",
            reason="stopped: tracking server unreachable",
            tracking_ok=False,
        )
    full = failure.reason.startswith("disk full")
    return StudyStopped(
        f"trial {number}: {failure.reason}. The study stops (every later trial would write there too): "
        + (f"free space under {st.dir}" if full else "make the folder writable")
        + f" and run the same command to resume; trial {number} runs again first, from its last checkpoint",
        reason="stopped: disk full" if full else "stopped: a write the disk refused",
    )


def recover_orphans(st: Study, heartbeats: bool) -> list[int]:
    """FAIL each RUNNING trial whose worker died where Optuna's stale-heartbeat check does not see it, with the
    reason, and retry it with the same parameters, as stale heartbeats do (LostTrialCallback). Returns the numbers
    failed here.

    Without heartbeats (a journal file) every such trial stays RUNNING for good: it is lost once its owner is gone
    (objective.owner_state: its process exited and its folder's lock is free). With heartbeats, a trial whose worker
    was killed between popping it and its first beat: lost once it has run sweep.grace_s with no beat (a live worker
    beats within milliseconds of popping)."""
    study = st.study
    storage = internals.storage(study)
    if heartbeats:
        # Through the storage's guard where it has one (a database that went away is waited for, then named).
        guarded = getattr(storage, "guarded", lambda fn, *a: fn(*a))
        now = datetime.datetime.now()  # Optuna stamps datetime_start with the popping host's local time
        lost = [
            (t, UNBEATEN)
            for t in guarded(internals.unbeaten_running, study)
            if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > st.spec.grace_s
        ]
    else:
        owners = ((t, owner_state(st, t)) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        lost = [(t, why) for t, (state, why) in owners if state == "gone"]
    failed = []
    for t, why in lost:
        tid = internals.trial_id(t)
        try:
            TrialAttrs.write(optuna.Trial(study, tid), fail_reason=why)
            if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another process got there first
            continue
        failed.append(t.number)
        LostTrialCallback(st, max_retry=st.spec.max_retry)(study, storage.get_trial(tid), reason=why)
    return failed


def study_bar(st: Study) -> Any:
    """The study's progress (trials finished of n_trials, the best so far) on stderr: a bar on a terminal, plain
    lines in a log (train.progress)."""
    from lora_lab.train.progress import progress_bar

    bar = progress_bar(st.spec.n_trials, desc=f"study {st.spec.name}", unit="trial", position=0, dynamic_ncols=True)
    refresh_bar(bar, st)
    return bar


def refresh_bar(bar: Any, st: Study) -> None:
    """The bar's count of finished trials (every worker's) and the best so far."""
    done = sum(1 for t in st.study.get_trials(deepcopy=False) if t.state.is_finished())
    bar.n = min(done, bar.total)
    best = best_trial(st.study)
    if best is not None:
        bar.set_postfix(best=f"#{best.number} {best.values[0]:.4f}")
    bar.refresh()


def log_trial(
    number: int, state: TrialState, values: Optional[list[float]], reason: str, params: dict, seconds: float
) -> None:
    """One log line per finished trial: its state, values (or reason), parameters and time."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    value = ",".join(f"{v:.4f}" for v in values) if values else reason
    log.info("trial %d %s %s | %s (%.0f s)", number, state.name, value, shown, seconds)


# ----------------------------------------------------------------------------------------------- worker processes


def preload(st: Study) -> None:
    """A warm worker process (`sweep.workers` or `trials_per_device` > 1) loads the base model, tokenizer and data
    into its warm holder at start, and imports what a trial's logging uses: its first trial pays for neither."""
    from lora_lab.plots import loss_curve  # noqa: F401 - matplotlib: every trial's run plots its loss curve

    st.warm.load(st.base_cfg)


def worker_envs(
    devices: int, per_device: int, gpus: int, cores: int, visible: str | None = None, per_trial: int = 1
) -> list[dict[str, str]]:
    """The environment variables of each local worker process: devices / per_trial x per_device of them. On a GPU
    host worker i is pinned with CUDA_VISIBLE_DEVICES to GPU (i // per_device) % gpus, or with per_trial = K > 1
    (sweep.devices_per_trial: its trials' ranks take one GPU each) to GPUs i*K .. i*K+K-1; every GPU shared by k > 1
    processes gives each MEMORY_SHARE / k of its memory. The host's `cores` are split between all the processes a
    trial runs in (at least one thread each). `visible` is the launcher's own CUDA_VISIBLE_DEVICES, if set: GPU k is
    then its k-th entry (a worker given "1" under a launcher limited to "2,3" would land on someone else's GPU 1)."""
    total = devices // per_trial * per_device
    # worker i: the per_trial GPUs from (i // per_device) * per_trial on (per_device is 1 when per_trial > 1)
    gpus_of = [
        [(i // per_device * per_trial + j) % gpus for j in range(per_trial)] if gpus else [] for i in range(total)
    ]
    ids = [v.strip() for v in visible.split(",")] if visible else None
    threads = str(max(1, cores // (total * per_trial)))
    envs = []
    for mine in gpus_of:
        env = {WORKER_ENV: "1", THREADS_ENV: threads, "OMP_NUM_THREADS": threads}
        if mine:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] if ids else str(g) for g in mine)
            sharing = sum(other.count(mine[0]) for other in gpus_of)
            if sharing > 1:
                env[MEMORY_FRACTION_ENV] = f"{MEMORY_SHARE / sharing:.4f}"
        envs.append(env)
    return envs


def watch_parent() -> None:
    """In a worker process: stop (SIGTERM: its trial ends interrupted, with a retry queued and its checkpoints kept)
    when the process that launched it dies, even by SIGKILL, instead of running on unseen."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        processes.die_with(int(parent))


def is_worker() -> bool:
    """Whether this process is a worker started by launch_workers (it runs trials only: no preflight, no summary)."""
    return os.environ.get(WORKER_ENV) == "1"


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


def host_cores() -> int:
    """The cores this process may run on (its affinity), which its workers and their ranks share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cores_with_ranks(per_trial: int) -> None:
    """Runs over `per_trial` processes hosted by this process (its trials when it starts no workers, the comparison
    runs): give it, and so each rank it starts (distributed.hosted passes its thread count on), its share of the
    host's cores. A worker process has its share already (THREADS_ENV)."""
    import torch

    if per_trial > 1 and THREADS_ENV not in os.environ:
        torch.set_num_threads(max(1, host_cores() // per_trial))


def auto_per_device(peak_bytes: int, free_bytes: int) -> int:
    """trials_per_device=auto on a GPU: as many trials of peak `peak_bytes` as fill AUTO_FILL of `free_bytes`,
    between 1 and AUTO_MAX_PER_DEVICE."""
    if peak_bytes <= 0:
        return 1
    return max(1, min(AUTO_MAX_PER_DEVICE, math.floor(AUTO_FILL * free_bytes / peak_bytes)))


def resolve_per_device(st: Study) -> int:
    """sweep.trials_per_device as a number. 'auto' on CUDA sizes N from the largest memory plan of the study's
    configs (lora_lab.train.memory: nothing runs) and the device's free memory; where no plan can be made it runs the
    study's first trial here (it counts in the budget) and sizes N from its measured peak. On the CPU it is 1."""
    import torch

    from lora_lab.sweep.preflight import largest_plan
    from lora_lab.train import pick_device

    n = st.spec.trials_per_device
    if n != "auto":
        return int(n)
    device = pick_device(st.base_cfg.trainer.device)
    if device.type != "cuda":
        log.info("sweep.trials_per_device=auto: 1 on the CPU (more processes would only split the same cores)")
        return 1
    plan = largest_plan(st)
    if plan is not None:
        if st.warm is not None:
            st.warm.drop()  # this process only waits from now on: its kept model must not take the workers' memory
        free_memory()
        free, total = torch.cuda.mem_get_info(device)
        n = auto_per_device(plan.total, free)
        st.study.set_user_attr("trials_per_device", n)  # what auto chose, for the bench and for a later look
        log.info(
            "sweep.trials_per_device=auto: %d per device (the memory plan's largest trial peaks at %.0f MiB; "
            "%.0f of %.0f MiB free)",
            n,
            plan.total / 2**20,
            free / 2**20,
            total / 2**20,
        )
        return n
    return measured_per_device(st, device)


def measured_per_device(st: Study, device: Any) -> int:
    """trials_per_device=auto without a plan: run the study's first trial here (it counts in the budget) and size N
    from its peak memory and the device's free memory after it."""
    import torch

    before = {t.number for t in st.study.get_trials(deepcopy=False)}
    worker_loop(st, max_trials=1)
    measured = [
        t
        for t in st.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number not in before and TrialAttrs.read(t).peak_mem_bytes
    ]
    if st.warm is not None:
        st.warm.drop()  # this process only waits from now on: its kept model must not take the workers' memory
    free_memory()
    if not measured:
        log.warning("sweep.trials_per_device=auto: the measuring trial did not complete; using 1 per device")
        return 1
    (peak,) = TrialAttrs.read(measured[0]).require("peak_mem_bytes")
    peak = int(peak)
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
    cores = host_cores()
    k = st.spec.devices_per_trial
    envs = worker_envs(
        devices, per_device, torch.cuda.device_count(), cores, os.environ.get("CUDA_VISIBLE_DEVICES"), per_trial=k
    )
    if k > 1:
        log.info("starting %d worker processes (%d devices, %d per trial)", len(envs), devices, k)
    else:
        log.info("starting %d worker processes (%d devices x %d per device)", len(envs), devices, per_device)
    for extra in envs:
        env = dict(os.environ, **extra, **{PARENT_ENV: str(os.getpid())})
        args = [
            sys.executable,
            "-m",
            "lora_lab.sweep",
            f"sweep={inv.sweep}",
            *[f"sweep.{o}" for o in inv.sweep_overrides],
            *([] if st.spec.storage else [f"sweep.storage={st.storage_url()}"]),  # the embedded one chosen here
            f"sweep.workers={k}",  # the devices of one trial: this worker's own
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
