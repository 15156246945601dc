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
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from lora_lab import tracking
from lora_lab.config import ConfigError, load_sweep
from lora_lab.markdown import table
from lora_lab.sweep import outputs, search, workers
from lora_lab.sweep.compare import compare_with_full
from lora_lab.sweep.preflight import check_study, preflight
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
    is_worker = workers.is_worker()
    if is_worker:
        workers.apply_worker_env()
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
            workers.preload(st)  # a started worker loads the base model before its first trial, as the preflight does
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
            params={f"sweep.{k}": v for k, v in spec_params(spec).items()},
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
                per_device = 1 if is_worker else workers.resolve_per_device(st)
                if spec.workers * per_device > 1:
                    code = workers.launch_workers(st, inv, spec.workers, per_device)
                    if code != 0:
                        log.error("a worker exited with code %d", code)
                else:
                    workers.worker_loop(st)
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
    files = outputs.write_outputs(st, rows)
    all_done = not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    rate = outputs.throughput(study, st.phase) if st.phase else None
    share = outputs.overhead_share(study)
    if st.parent_run_id:
        # The best trial's objectives under the trials' own metric names: one `loss/val` column for parent and trials.
        metrics = {outputs.objective_metric(o): v for o, v in zip(spec.objectives, best.values)} if best else {}
        metrics.update({f"trials/{k.lower()}": v for k, v in counts.items()})
        if share is not None:
            metrics["perf/overhead_share"] = share
        if rate is not None:
            metrics.update(outputs.throughput_metrics(rate))
        state = "COMPLETE" if best is not None else ("FAIL" if all_done else "RUNNING")
        summary = tracking.StudySummary(
            state=state,
            metrics=metrics,
            best_trial=best.number if best else None,
            best_values=dict(zip(spec.objectives, best.values)) if best else {},
            best_overrides=" ".join(search.trial_overrides(best)) if best else "",
            counts=counts,
            description=study_note(st),
            table=table(rows, outputs.COMPARE_COLUMNS) if rows else "",
        )
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
    if rows:
        print("\n" + table(rows, outputs.COMPARE_COLUMNS))
    print(f"\nfiles: {st.dir}")
    if st.tracking.enabled:
        print(f"See it in MLflow:  {tracking.ui_command(st.tracking)}")
    return 0 if best is not None else 1
