"""`python -m lora_lab.sweep [sweep=NAME] [sweep.KEY=VALUE ...] [training overrides ...]`: an Optuna study over LoRA.

A trial is exactly a training run (`lora_lab.train`) with some overrides. This module is the command: it reads the
arguments, runs the study's phases in order (checks, storage, MLflow parent, budget, workers, comparison, outputs),
prints the summary and returns the exit code: 0 done, 2 bad input (nothing created), 1 the study stopped on an error,
128 + N stopped by signal N.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional, Sequence

import optuna
from optuna.trial import TrialState

from lora_lab import tracking
from lora_lab.config import ConfigError, load_sweep
from lora_lab.errors import first_line
from lora_lab.files import WriteError
from lora_lab.markdown import table
from lora_lab.sweep import outputs, search, workers
from lora_lab.sweep.compare import ComparisonRows, compare_with_full
from lora_lab.sweep.preflight import check_study, preflight
from lora_lab.sweep.storage import StorageError, cause_line, safe_url
from lora_lab.sweep.study import Invocation, Study, best_trial, spec_params, study_note
from lora_lab.train import Interrupted, interruptible

log = logging.getLogger("lora_lab")


def parse_args(argv: list[str]) -> Invocation:
    """Split the command line into the study's name, its own settings (sweep.KEY=VALUE) and the trials' overrides."""
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


class OneLine(logging.Filter):
    """A record logged with a traceback (MLflow logs its store's errors so, SQL statement and all) shows as one
    line: its message's first line and the exception's root cause. The user reads what failed; the sweep's own lines
    say what it did about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            text = record.getMessage()
            if not record.name.startswith("lora_lab"):
                text = text.strip().splitlines()[0] if text.strip() else ""
            record.msg, record.args = f"{text} ({cause_line(record.exc_info[1])})", None
            record.exc_info, record.exc_text = None, None
        return True


def one_line_logs() -> None:
    """OneLine on the handlers of the root logger and of MLflow's own logger (which does not propagate)."""
    for logger in (logging.getLogger(), logging.getLogger("mlflow")):
        for handler in logger.handlers:
            if not any(isinstance(f, OneLine) for f in handler.filters):
                handler.addFilter(OneLine())


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input (nothing created), 1 the study stopped on an error, 128 + N stopped by
    signal N. Whatever the ending, the user sees one line, never a traceback."""
    import warnings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    one_line_logs()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and retries are marked experimental by Optuna; they are the documented way to survive dead workers.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    is_worker = workers.is_worker()
    if is_worker:
        workers.watch_parent()  # a worker whose launcher dies (even by SIGKILL) stops, its trial resumable
        workers.apply_worker_env()
    try:
        inv = parse_args(argv)
        spec = load_sweep(inv.sweep, inv.sweep_overrides)
        check_study(spec)
        st = Study(spec, inv)
        if not is_worker:
            preflight(st)
        elif st.warm is not None:
            workers.preload(st)  # a started worker loads the base model before its first trial, as the preflight does
        storage = st.open_storage()  # an unreachable database stops here, before any study exists
        if st.storage_note and not is_worker:
            log.info("%s", st.storage_note)
        if st.tracking.enabled:
            tracking.connect(st.tracking)  # and an unusable tracking store too
            one_line_logs()  # MLflow's own handler is there now
        st.open(storage)
    except (ValueError, TypeError) as exc:  # ConfigError, ModelError, DataError, bad targets, unreachable storage
        print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # the storage opened, then refused the study's first writes (a full disk)
        print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
        return 1
    with interruptible():  # SIGINT/SIGTERM: trial and study end KILLED with the reason; a second signal is ignored
        try:
            return run(st, inv, is_worker)
        except Interrupted as exc:
            close_parent(st, is_worker, "KILLED", "interrupted: resume with the same command")
            print(f"lora_lab.sweep: {exc}", file=sys.stderr)
            return 128 + exc.signum
        except workers.StudyStopped as exc:
            if exc.tracking_ok:
                close_parent(st, is_worker, "FAIL", exc.reason)
            print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
            return 1
        except StorageError as exc:  # the database went away past its deadline, or the disk under it is full
            close_parent(st, is_worker, "FAIL", "stopped: the study's storage failed", storage_ok=False)
            print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
            return 1
        except ConfigError as exc:  # found only once trials ran
            close_parent(st, is_worker, "FAIL", f"stopped: {first_line(exc)}"[:200])
            print(f"lora_lab.sweep: error: {exc}", file=sys.stderr)
            return 1
        except tracking.TrackingUnreachable as exc:  # in a comparison run: the parent cannot be reached either
            print(f"lora_lab.sweep: error: {exc}; run the same command again once the server answers", file=sys.stderr)
            return 1
        except OSError as exc:  # files.WriteError: the study's own files (best.yaml, trials.csv, plots) on a full disk
            close_parent(st, is_worker, "FAIL", "stopped: a write the disk refused")
            print(
                f"lora_lab.sweep: error: {first_line(exc, with_type=not isinstance(exc, WriteError))}", file=sys.stderr
            )
            return 1
        except Exception as exc:
            if not tracking.unreachable(exc):
                raise
            # The tracking server went away between runs (creating the parent, closing it): nothing more to send.
            print(
                f"lora_lab.sweep: error: tracking server {st.tracking.resolved_uri()} unreachable "
                f"({first_line(exc, with_type=True)}); run the same command again once it answers",
                file=sys.stderr,
            )
            return 1


def run(st: Study, inv: Invocation, is_worker: bool) -> int:
    """The study's phases after its storage is open: its MLflow parent, the budget, the trials (here or in worker
    processes), then (not in a worker) the comparison, the outputs and the summary."""
    spec = st.spec
    resumed = bool(st.study.get_trials(deepcopy=False))
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
            params={f"sweep.{k}": v for k, v in spec_params(spec).items()},
            tags={
                "storage": safe_url(st.storage_url()).split("@")[-1],
                "sampler": spec.sampler,
                "objectives": ",".join(spec.objectives),
            },
            note=f"**Study `{spec.name}`**: {study_note(st)}\n\n**State: RUNNING** ({spec.n_trials} trials in budget)",
        )
        if resumed and not is_worker:  # running again: no longer the state and reason of how it stopped last time
            tracking.finish_parent(st.tracking, st.parent_run_id, spec.name, summary_of(st, "RUNNING"), [], end=False)
    added = st.top_up()
    log.info(
        "study %s: %d trials in budget, %d added now, storage %s",
        spec.name,
        spec.n_trials,
        added,
        safe_url(st.storage_url()).split("@")[-1],
    )
    code = 0
    started = time.time()
    workers.share_cores_with_ranks(spec.devices_per_trial)  # trials and comparison runs in this process, if any
    try:
        per_device = 1 if is_worker else workers.resolve_per_device(st)
        if not is_worker and spec.workers // spec.devices_per_trial * per_device > 1:
            code = workers.launch_workers(st, inv, spec.workers, per_device)
            if code != 0:
                log.error("a worker exited with code %d", code)
        else:
            workers.worker_loop(st)
    finally:
        st.phase = (started, time.time())
    if is_worker:
        return 0
    return max(finish(st), 1 if code else 0)


def summary_of(st: Study, state: str, reason: str = "", rows: Sequence[dict[str, Any]] = ()) -> tracking.StudySummary:
    """What the study's MLflow parent shows in `state`: the best trial, the counts and the comparison `rows`.
    Without a storage to read (it is the reason the study stopped), only the state and the reason."""
    spec = st.spec
    try:
        best, counts, share = best_trial(st.study), st.counts(), outputs.overhead_share(st.study)
    except StorageError:
        best, counts, share = None, {}, None
    rate = outputs.throughput(st.study, st.phase) if st.phase and counts else None
    # The best trial's objectives under the trials' own metric names: one `loss/val` column for parent and trials.
    metrics = {outputs.objective_metric(o): v for o, v in zip(spec.objectives, best.values)} if best else {}
    metrics.update({f"trials/{k.lower()}": v for k, v in counts.items()})
    if share is not None:
        metrics["perf/overhead_share"] = share
    if rate is not None:
        metrics.update(outputs.throughput_metrics(rate))
    return tracking.StudySummary(
        state=state,
        metrics=metrics,
        best_trial=best.number if best else None,
        best_values=dict(zip(spec.objectives, best.values)) if best else {},
        best_overrides=" ".join(search.trial_overrides(best)) if best else "",
        counts=counts,
        description=study_note(st),
        table=table(list(rows), outputs.COMPARE_COLUMNS) if rows else "",
        reason=reason,
    )


def close_parent(st: Study, is_worker: bool, state: str, reason: str, storage_ok: bool = True) -> None:
    """The study stopped before its budget was met: its MLflow parent says so (state, reason in its name, tags and
    description), and ends unless trials still run in other processes (the last one to finish ends it). Workers
    leave the parent to their launcher. A parent that cannot be reached is closed when the study resumes."""
    if is_worker or not st.parent_run_id:
        return
    try:
        running = storage_ok and bool(st.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    except StorageError:
        running = False
    try:
        summary = summary_of(st, state, reason)
        tracking.finish_parent(st.tracking, st.parent_run_id, st.spec.name, summary, [], end=not running)
    except Exception as exc:  # noqa: BLE001 - the study is stopping for its own reason: report that one
        log.warning(
            "the study's MLflow parent run could not be closed (%s); the next run of the command closes it",
            cause_line(exc),
        )


def finish(st: Study) -> int:
    """Comparison with full FT, best.yaml, trials.csv, plots; print them; end the parent run if all is done."""
    study, spec = st.study, st.spec
    best = best_trial(study)
    counts = st.counts()
    rows: Optional[ComparisonRows] = None
    if best is not None and spec.compare_full:
        # Two processes of one study finish together: one runs the comparison, the other then reuses its runs.
        with st.lock("compare"):
            rows = compare_with_full(st, best)
    files = outputs.write_outputs(st, rows if rows is not None else [])
    all_done = not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    rate = outputs.throughput(study, st.phase) if st.phase else None
    share = outputs.overhead_share(study)
    if st.parent_run_id:
        state = "COMPLETE" if best is not None else ("FAIL" if all_done else "RUNNING")
        summary = summary_of(st, state, rows=rows if rows is not None else [])
        tracking.finish_parent(st.tracking, st.parent_run_id, spec.name, summary, files, end=all_done)
    print()
    print(f"study {spec.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if best is None:
        print("no trial completed; see the reasons in trials.csv and the MLflow runs")
    else:
        vals = ", ".join(f"{o}={v:.4f}" for o, v in zip(spec.objectives, best.values))
        print(f"best trial #{best.number}: {vals}\n  {' '.join(search.trial_overrides(best))}")
    if share is not None:
        print(
            f"time outside training steps and evaluations (compose, model/data from cache, logging): "
            f"{100 * share:.1f}% of trial wall time"
        )
    if rate is not None:
        print(outputs.throughput_line(rate))
    if rows is not None:  # as comparison.md has it: the table, then who wins, full FT's LR, the merge check
        print("\n" + rows.comparison.markdown(settings=False))
    print(f"\nfiles: {st.dir}")
    if st.tracking.enabled:
        print(f"See it in MLflow:  {tracking.ui_command(st.tracking)}")
    return 0 if best is not None else 1
