"""Every MLflow call lora_lab makes: one run per training, a parent run per study, child runs per trial.

The training loop knows nothing of MLflow: `TrainingRun.on_eval` is handed to it as its callback. The link from a trial
to its study is the `mlflow.parentRunId` tag, so it holds across processes and hosts (workers on other machines log
to the same tracking server and find the parent by its id).

What MLflow shows is laid out for a person reading the UI (the text itself: lora_lab.notes): runs named by what tells
them apart (`FAIL trial-1 · demo`), params = the settings chosen (lora_lab.records.Settings), metrics under grouped
names (`loss/train`, `loss/val`, `eval/accuracy`, `base/...`, `perf/...`; lora_lab.records says each one's unit), a
Markdown description on every run and study whose first lines answer it, a prepared runs-table view per study, and
the experiment marked as model training so the UI does not open in its GenAI mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from lora_lab import adaptations, notes, records
from lora_lab.config import OBJECTIVE_DIRECTIONS, ConfigError, TrackingConfig, outputs_root
from lora_lab.errors import first_line
from lora_lab.markdown import table
from lora_lab.notes import UI_MODE, compare_url, run_note, run_url
from lora_lab.records import EvalPoint, Identity, RunRecord, Settings, TrainPoint

log = logging.getLogger("lora_lab")

# lora_lab's own tags; MLflow's UI shows them as columns.
STATE_TAG = "lora_lab.state"  # COMPLETE, PRUNED or FAIL, for every run (a study: COMPLETE, RUNNING or FAIL)
REASON_TAG = "lora_lab.reason"  # why a run failed or was pruned: diverged, oom, the exception's message
STATUS_TAG = "lora_lab.status"  # what training reached: completed or diverged (records.Results.status)
STUDY_TAG = "lora_lab.study"
TRIAL_TAG = "lora_lab.trial"
KIND_TAG = "lora_lab.kind"  # 'study' (parent), 'trial', 'compare' or 'run'
SEARCHED_TAG = "lora_lab.searched"  # a trial's sampled values, as overrides
OUTPUT_TAG = "lora_lab.output_dir"  # the run's folder (config.yaml, metrics.json, adapter)
BEST_TAG = "lora_lab.best"  # 'trial': a study's best trial; 'rerun': it retrained; 'full-ft': the chosen full-FT run
FULL_GRID_TAG = "lora_lab.full_lr_grid"  # on a study's parent: the full-FT LRs its comparison tried (JSON)
NOTE_TAG = "mlflow.note.content"  # MLflow's description of a run or an experiment (Markdown)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3.x: this value opens the experiment as model training
EXPERIMENT_KIND = "custom_model_development"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
EXPERIMENT_NOTE = """Runs of lora_lab: LoRA and full fine-tuning on the same data, searched by Optuna. Each study is a
parent run named after the study, whose description starts with its answer, with one child run per trial
(`trial-<n> · <study>`) and its comparison runs; single `python -m lora_lab.train` runs stand alone.

* **State**: the `lora_lab.state` column (COMPLETE, PRUNED, FAIL); pruned and failed runs also lead their name with
  it (`FAIL trial-1 · demo`) and carry their reason in `lora_lab.reason`. `lora_lab.best` marks a study's best trial
  (`trial`), its retrained copy (`rerun`) and the full fine-tuning run it is compared with (`full-ft`).
* **Params** are the settings a person chose (the run's overrides and the method's own fields); derived numbers such
  as parameter counts are metrics.
* **Metrics** (units); `base/` is the base model before training, never a run's result:

"""


def _quiet_mlflow() -> None:
    # MLflow's alembic migrations and run-link banners drown our progress bars.
    for name in (
        "alembic",
        "mlflow.store.db.utils",
        "mlflow.tracking._tracking_service.client",
        "mlflow.utils.autologging_utils",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


# How long one HTTP request to a tracking server may retry (MLflow's defaults: 7 retries with backoff 2 and a 120 s
# timeout, ~4 minutes or more per request, so a lost server stalled a sweep for good). A user's own settings win.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


RETRY_EVERY_S = 2.0  # while a tracking server is away: how often a kept write is tried again


class TrackingUnreachable(RuntimeError):
    """The tracking server has not answered for tracking.deadline_s: the run ends FAIL rather than waiting."""

    run_state = "FAIL"  # how TrainingRun.__exit__ ends a run this stops


def unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, says the server did not answer (refused, reset, timed out, retries
    used up, or cut off mid-answer), rather than that it refused the request."""
    import http.client

    import requests
    import urllib3

    away = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
        # A server killed while it answers: the reply ends early ("Connection broken: IncompleteRead").
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.ProtocolError,
        http.client.IncompleteRead,
    )
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (*away, ConnectionError, TimeoutError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _no_retries() -> Any:
    """One attempt per request inside the block (the last calls to a server already given up on)."""
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def connect(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and make sure the experiment exists (described, as model training);
    return the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    uri = tracking.resolved_uri()
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
    try:
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:///"):
            client = _init_sqlite_store(Path(uri[len("sqlite:///") :]))
        else:
            client = mlflow.MlflowClient()
        for attempt in range(5):  # many workers may create the same experiment at once
            exp = client.get_experiment_by_name(tracking.experiment)
            if exp is not None:
                if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older lora_lab or by hand
                    client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return exp.experiment_id
            try:
                # An embedded store keeps artifacts beside the database; a server decides for itself.
                location = (outputs_root() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
                tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: experiment_note()}
                return client.create_experiment(tracking.experiment, artifact_location=location, tags=tags)
            except MlflowException:
                time.sleep(0.2 * (attempt + 1))
    except Exception as exc:  # unknown scheme, unreachable server, unwritable file
        raise ConfigError(f"tracking.uri={uri!r}: cannot use this MLflow store ({first_line(exc)})") from None
    raise ConfigError(f"tracking.experiment={tracking.experiment!r}: could not create or find it at {uri}")


def experiment_note(experiment_id: str = "", studies: Iterable[str] = ()) -> str:
    """The experiment's description: a link to each study's prepared view first (the runs page shows only the first
    line or two), then how its runs are laid out, and every metric with its unit."""
    rows, seen = [], set()
    kinds = (records.TrainPoint, records.EvalPoint, records.Results, records.Stop, records.StudyAnswer)
    for cls in (*kinds, records.StudyThroughput):
        for _name, unit, doc, key in records.describe(cls):
            if key and key not in seen:
                seen.add(key)
                rows.append({"key": f"`{key}`", "unit": unit, "doc": doc})
    rows.append(
        {
            "key": f"`{notes.trial_objective('<objective>')}`",
            "unit": "its result's",
            "doc": "a COMPLETE trial's objective value (what its study sorts by; pruned and failed trials have none)",
        }
    )
    links = [f"[{s}]({notes.view_url(experiment_id, s)})" for s in sorted(studies)]
    head = f"{STUDIES_LINE} {' · '.join(links)}\n\n" if links else ""
    return (
        head + EXPERIMENT_NOTE + table(rows, [("key", "metric", ""), ("unit", "unit", ""), ("doc", "what", "")]) + "\n"
    )


STUDIES_LINE = "**Studies**, each opening on its trials best first:"


def _publish_view(client: Any, experiment_id: str, study: str, view: dict) -> None:
    """The study's prepared runs-table view as an experiment tag, linked from the experiment's description (unless
    a person has rewritten that description). Workers of one study finish at once: two inserting the same new tag
    race (a unique-key error on PostgreSQL), and the one that loses wrote the same view: tried again, then let go."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.set_experiment_tag(
                experiment_id, notes.VIEW_TAG_PREFIX + notes.view_key(study), notes.view_json(view)
            )
            break
        except MlflowException as exc:
            if attempt == 2:
                log.warning("study %s: its prepared view was not saved (%s)", study, first_line(exc))
                return
            time.sleep(0.2 * (attempt + 1))
    exp = client.get_experiment(experiment_id)
    prefix = notes.VIEW_TAG_PREFIX + notes.view_key("")
    studies = [k[len(prefix) :] for k in exp.tags if k.startswith(prefix)]
    current = exp.tags.get(NOTE_TAG, "")
    ours = current.split("\n\n", 1)[1] if current.startswith(STUDIES_LINE) else current
    if ours == experiment_note():
        with contextlib.suppress(MlflowException):  # the same race: another worker wrote the same description
            client.set_experiment_tag(experiment_id, NOTE_TAG, experiment_note(experiment_id, studies))


def _init_sqlite_store(db: Path) -> Any:
    """Create (migrate) an embedded SQLite store under a file lock: two processes that open a new mlflow.db at once
    otherwise race in MLflow's alembic migrations and one of them dies."""
    import mlflow

    from lora_lab.files import file_lock

    with file_lock(db.parent / f".{db.name}.init.lock"):
        client = mlflow.MlflowClient()
        exps = client.search_experiments(max_results=2)  # the first use of a store creates and migrates it
        # MLflow makes an empty "Default" experiment pointing at ./mlruns of wherever the command ran: hide it.
        if [e.experiment_id for e in exps] == ["0"] and not client.search_runs(["0"], max_results=1):
            with contextlib.suppress(Exception):
                client.delete_experiment("0")
    return client


def environment_tags() -> dict[str, str]:
    """Git commit and package versions, so a run can be reproduced."""
    tags = {}
    for pkg in ("lora_lab", "torch", "transformers", "optuna", "mlflow", "datasets"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(identity: Identity, state: str = "COMPLETE") -> str:
    """The run's name in MLflow (notes.display_name): what tells it apart first, the state leading unless COMPLETE."""
    return notes.display_name(identity.name, identity.study, state)


_WRITER: Any = None


def _writer() -> Any:
    """One thread per process that writes runs' metrics and params, in order, off the training loop.

    Not MLflow's own `synchronous=False`: in MLflow 3.17 every end_run shuts its async queue down, and the queue's
    thread notices only at its next 1 s poll (`queue.get(timeout=1)`), so each short run paid up to a second at its
    end (measured: 0.73 s a trial on the default study, tiny model). This thread lives as long as the process."""
    global _WRITER
    if _WRITER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_lab-mlflow")
    return _WRITER


class TrainingRun:
    """An MLflow run around one training: settings as params at the start, curves at every evaluation, results and
    files at the end, the state (tag, name suffix) and a description whatever the ending.

    Used as a context manager; the run ends FINISHED, FAILED or KILLED according to `set_outcome()` or, when the
    block raises, the exception. A run that ends early (pruned, failed) still logs its config and its curve so far.
    """

    def __init__(
        self,
        tracking: TrackingConfig,
        identity: Identity,
        settings: Settings,
        *,
        parent_run_id: Optional[str] = None,
        searched: Optional[dict[str, Any]] = None,
        start_metrics: Optional[dict[str, float]] = None,
        tags: Optional[dict[str, str]] = None,
    ) -> None:
        self.tracking, self.identity, self.settings = tracking, identity, settings
        self.parent_run_id, self.searched = parent_run_id, dict(searched or {})
        self.start_metrics, self.extra_tags = dict(start_metrics or {}), dict(tags or {})
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.outcome: Optional[tuple[str, str]] = None
        self.record: Optional[RunRecord] = None
        self.history: list[TrainPoint] = []
        self.evals: list[EvalPoint] = []
        self._client: Any = None
        # Writes queued on the writer thread (futures, with the time each was queued): the training loop never waits
        # on the tracking store; they are all waited for before the run's state is written and the run ends.
        self._pending: list[tuple[Any, float]] = []
        # Batches a lost server did not take, in order: sent first once it answers again.
        self._backlog: list[dict[str, Any]] = []
        self._down_since: Optional[float] = None  # time.time() of the first write the server did not answer
        self._last_try = 0.0  # time.time() of the last write attempted
        self.gone = False  # the server stayed away past tracking.deadline_s: nothing more is sent
        self._train_logged = 0  # the last training step whose loss/train went to MLflow
        self._base_logged = False  # the base model's evaluation (step 0) went to MLflow as base/*

    def __enter__(self) -> "TrainingRun":
        if not self.tracking.enabled:
            return self
        import mlflow
        from mlflow.entities import Metric, Param

        self.experiment_id = connect(self.tracking)
        i, s = self.identity, self.settings
        tags = {
            KIND_TAG: i.kind,
            "method": s.method,
            "model": i.model,
            "data": i.data,
            "device": i.device,
            OUTPUT_TAG: i.output_dir,
            STATE_TAG: "RUNNING",
            **environment_tags(),
            **self.extra_tags,
        }
        if i.study:
            tags[STUDY_TAG] = i.study
        if i.trial is not None:
            tags[TRIAL_TAG] = str(i.trial)
        if self.searched:
            tags[SEARCHED_TAG] = " ".join(f"{k}={records.param_text(v)}" for k, v in self.searched.items())
        tags[NOTE_TAG] = run_note(i, s, self.searched, "RUNNING", "", None, None, self._parent_link())
        try:
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=run_name(i),
                tags=tags,
                parent_run_id=self.parent_run_id,
                log_system_metrics=self.tracking.system_metrics,
            )
            self.run_id = run.info.run_id
            self._client = mlflow.MlflowClient()
            now = int(time.time() * 1000)
            self._log(
                params=[Param(k, v) for k, v in s.params().items()],
                metrics=[Metric(k, float(v), now, 0) for k, v in self.start_metrics.items()],
            )
        except BaseException as exc:
            # A run that started and then broke ends FAILED with the reason here: left active, MLflow's exit hook
            # would end it FINISHED.
            active = mlflow.active_run()
            if self.run_id is None and active is not None and active.info.run_id != self.parent_run_id:
                self.run_id, self._client = active.info.run_id, mlflow.MlflowClient()
            if self.run_id is not None:
                self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _log(self, **batch: Any) -> None:
        """One log_batch, written by this process's tracking writer thread (`_flush` waits for it). Raises
        TrackingUnreachable once the server has not answered for tracking.deadline_s."""
        self.check_reachable()
        self._pending = [(f, t) for f, t in self._pending if not f.done() or f.exception() is not None]
        self._pending.append((_writer().submit(self._write, batch), time.time()))

    def _write(self, batch: Optional[dict[str, Any]] = None) -> None:
        """On the writer thread: the backlog, then `batch`, in order; a server that does not answer keeps them."""
        if batch is not None:
            self._backlog.append(batch)
        # While the server is away, one attempt per RETRY_EVERY_S, not one per queued write (each attempt is a
        # bounded request of several seconds: queued writes would add up to minutes).
        if self._down_since is not None and time.time() - self._last_try < RETRY_EVERY_S:
            return
        while self._backlog and not self.gone:
            self._last_try = time.time()
            try:
                self._client.log_batch(self.run_id, **self._backlog[0])
            except Exception as exc:
                if not unreachable(exc):
                    self._backlog.pop(0)
                    raise
                self._down_since = self._down_since or time.time()
                log.warning(
                    "MLflow tracking server not answering (%s); keeping %d write(s)",
                    first_line(exc),
                    len(self._backlog),
                )
                return
            self._backlog.pop(0)
            self._down_since = None

    def down_since(self) -> Optional[float]:
        """Since when the server has left a write unanswered (a failed write, or the oldest one still waiting)."""
        waiting = [t for f, t in self._pending if not f.done()]
        times = [t for t in (self._down_since, min(waiting, default=None)) if t is not None]
        return min(times) if times else None

    def check_reachable(self) -> None:
        """Raise TrackingUnreachable when the server has not answered for tracking.deadline_s."""
        since = self.down_since()
        if self.gone or (since is not None and time.time() - since > self.tracking.deadline_s):
            self.gone = True
            when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "?"
            raise TrackingUnreachable(
                f"tracking server {self.tracking.resolved_uri()} unreachable since {when} "
                f"(more than tracking.deadline_s={self.tracking.deadline_s:g} s); "
                f"the run's files are in {self.identity.output_dir}"
            )

    def _flush(self) -> None:
        """Wait for every write of this run queued by `_log` (each request is bounded, see HTTP_LIMITS); raises the
        first error, or TrackingUnreachable when writes are still kept back past the deadline."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f, _ in pending]
        if any(errors):
            raise next(e for e in errors if e is not None)
        # Writes kept back: try again until the deadline; a server back in time loses nothing.
        while self._backlog and not self.gone:
            since = self._down_since or time.time()
            left = since + self.tracking.deadline_s - time.time()
            if left <= 0:
                self.check_reachable()  # raises: past the deadline
            time.sleep(min(RETRY_EVERY_S, max(0.0, left)))
            _writer().submit(self._write).result()
        if self.gone:
            self.check_reachable()

    def _parent_link(self) -> Optional[str]:
        return run_url(self.experiment_id, self.parent_run_id) if self.parent_run_id and self.experiment_id else None

    def on_eval(self, event: Any) -> None:
        """The training loop's callback (a train.EvalEvent): per-step training loss and LR, then the evaluation."""
        points = [records.build(TrainPoint, p, "EvalEvent.train_points") for p in event.train_points]
        point = records.build(EvalPoint, {"step": event.step, **event.metrics}, "EvalEvent.metrics")
        self.history += points
        self.evals.append(point)
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = self._train_metrics(points, now)
        if point.step == 0:  # the base model before training: its own names, never a point of this run's curves
            metrics += [Metric(k, v, now, 0) for k, v in base_metrics(point).items()]
            self._base_logged = True
        else:
            metrics += [
                Metric(key, float(getattr(point, name)), now, point.step)
                for name, key in _keys(EvalPoint)
                if getattr(point, name) is not None
            ]
        self._log(metrics=metrics)

    def _train_metrics(self, points: list[TrainPoint], now: int) -> list[Any]:
        """loss/train and optim/lr of these steps (every tracking.log_every-th, and the last one)."""
        from mlflow.entities import Metric

        every = self.tracking.log_every
        if points:
            self._train_logged = max(self._train_logged, points[-1].step)
        return [
            Metric(key, float(getattr(p, name)), now, p.step)
            for p in points
            if p.step % every == 0 or p is points[-1]
            for name, key in _keys(TrainPoint)
        ]

    def set_outcome(self, state: str, reason: str = "") -> None:
        """Record how the run ended (COMPLETE, PRUNED or FAIL) and why."""
        self.outcome = (state, reason)

    def finish(self, record: RunRecord) -> None:
        """Results and files (metrics.json, adapter). The caller sets the outcome after this returns, so a failure
        while logging ends the run FAILED rather than FINISHED."""
        self.record = record
        self.history, self.evals = list(record.history), list(record.evals)
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        base = {f.metadata["key"] for f in dataclasses.fields(records.Results) if f.name.startswith("base_")}
        metrics = [
            Metric(k, v, now, 0 if k in base else record.steps)
            for k, v in records.result_metrics(record).items()
            if k not in self.start_metrics and not (k in base and self._base_logged)
        ]
        # The training steps no evaluation logged: those of a run that diverged between two evaluations.
        metrics += self._train_metrics([p for p in record.history if p.step > self._train_logged], now)
        stop = nonfinite_step(record)
        if stop is not None:
            metrics.append(Metric(_stop_key("nonfinite_step"), float(stop), now, stop))
        self._log(metrics=metrics)
        self._flush()  # a write that failed (curves, results) fails the run here, inside the block
        out = Path(record.identity.output_dir)
        if (out / "metrics.json").is_file():
            self._client.log_artifact(self.run_id, str(out / "metrics.json"))
        if (out / "adapter").is_dir():
            self._client.log_artifacts(self.run_id, str(out / "adapter"), artifact_path="adapter")

    def _files(self) -> None:
        """config.yaml and the loss curve so far: every run has them, pruned and failed ones too."""
        from lora_lab.plots import loss_curve

        out = Path(self.identity.output_dir)
        if (out / "config.yaml").is_file():
            self._client.log_artifact(self.run_id, str(out / "config.yaml"))
        if self.history or self.evals:
            s = self.settings
            png = loss_curve(
                {s.method: (self.history, self.evals)},
                out / "loss_curve.png",
                title=f"{self.identity.name}: {s.method} on {s.data} ({Path(s.model).name})",
            )
            self._client.log_artifact(self.run_id, str(png))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.run_id is None:
            return
        import mlflow

        if self.gone:  # one attempt to close it; else the study's next start closes it (close_unfinished)
            log.warning(
                "MLflow run %s: the tracking server is gone; its files stay in %s",
                self.run_id,
                self.identity.output_dir,
            )
            with _no_retries(), contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")  # leaves MLflow's active-run stack first, whatever the server says
            return

        if exc is not None and getattr(exc, "run_state", None):  # e.g. a pruned trial: the exception says how it ended
            self.outcome = (exc.run_state, str(exc)[:500])
        elif exc is not None:
            self.outcome = ("FAIL", f"{type(exc).__name__}: {exc}"[:500])
        state, reason = self.outcome or ("COMPLETE", "")
        # Interrupted (a signal) or taken away (a trial retried elsewhere): the run did not fail, it was stopped.
        killed = isinstance(exc, KeyboardInterrupt) or getattr(exc, "run_status", None) == "KILLED"
        status = "KILLED" if killed else MLFLOW_STATUS.get(state, "FAILED")
        try:  # a tag or a file must never hide the exception that ended the run
            self._flush()  # the curves and results land before the state says the run is over
        except Exception as log_exc:  # noqa: BLE001
            log.warning("MLflow run %s: some metrics or params could not be logged: %s", self.run_id, log_exc)
        try:
            tags = {
                STATE_TAG: state,
                NOTE_TAG: run_note(
                    self.identity,
                    self.settings,
                    self.searched,
                    state,
                    reason,
                    self.record,
                    self.evals[-1] if self.evals else None,
                    self._parent_link(),
                    base=self.evals[0] if self.evals and self.evals[0].step == 0 else None,
                ),
            }
            if self.record is not None:
                tags[STATUS_TAG] = self.record.status
            if reason:
                tags[REASON_TAG] = reason[:5000]
            stop = []
            if state == "PRUNED" and self.evals:  # its last loss/val is an intermediate value: say where it stopped
                step = self.evals[-1].step
                stop = [mlflow.entities.Metric(_stop_key("pruned_step"), float(step), int(time.time() * 1000), step)]
            self._client.log_batch(
                self.run_id, metrics=stop, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()]
            )
            if state != "COMPLETE":
                self._client.update_run(self.run_id, name=run_name(self.identity, state))
            self._files()
        except Exception as log_exc:  # noqa: BLE001
            log.warning("MLflow run %s: could not log its state or files: %s", self.run_id, log_exc)
        try:
            mlflow.end_run(status=status)
        except Exception as end_exc:  # noqa: BLE001 - a server lost at the very end must not hide the run's outcome
            log.warning(
                "MLflow run %s: could not be closed (%s); the study's next start closes it",
                self.run_id,
                first_line(end_exc),
            )


def _keys(cls: type) -> list[tuple[str, str]]:
    """(field, MLflow metric) of a point type's logged fields."""
    return [(f.name, f.metadata["key"]) for f in dataclasses.fields(cls) if f.metadata.get("key")]


def _stop_key(name: str) -> str:
    return records.Stop.__dataclass_fields__[name].metadata["key"]


def base_metrics(point: EvalPoint) -> dict[str, float]:
    """The base model's evaluation (step 0) under its own names (base/loss_val, base/accuracy)."""
    values = {"base_val_loss": point.val_loss, "base_accuracy": point.accuracy}
    return {records.Results.metric(k): float(v) for k, v in values.items() if v is not None}


def nonfinite_step(record: RunRecord) -> Optional[int]:
    """The step at which a diverged run's loss was not finite (its reason names it; else the step after its last
    finite one); None for a run that did not diverge."""
    if record.status != "diverged":
        return None
    import re

    said = re.search(r"non-finite .* at step (\d+)", record.reason or "")
    return int(said.group(1)) if said else record.steps + 1


def ui_command(tracking: TrackingConfig) -> str:
    """The command that shows these runs (binds to 127.0.0.1)."""
    uri = tracking.resolved_uri()
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/#/experiments?{UI_MODE} in a browser"
    return (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
        f"  then open http://127.0.0.1:5000/#/experiments?{UI_MODE}"
    )


# ----------------------------------------------------------------------------------------------- studies


def study_parent_run(
    tracking: TrackingConfig, study: str, params: dict[str, str], tags: dict[str, str], note: str = ""
) -> str:
    """The id of the study's parent run, created on first use. Workers on many hosts race to create it: each one
    that created a run keeps the oldest RUNNING parent for the study and deletes its own duplicate, so they all
    agree on one parent without a lock."""
    import mlflow
    from mlflow.entities import Param

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()

    def parents() -> list[Any]:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=50,
        )
        return sorted(
            (r for r in runs if r.info.lifecycle_stage == "active"), key=lambda r: (r.info.start_time, r.info.run_id)
        )

    existing = parents()
    if existing:
        return existing[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=study,
        tags={
            KIND_TAG: "study",
            STUDY_TAG: study,
            STATE_TAG: "RUNNING",
            NOTE_TAG: note or f"Study `{study}`: running.",
            **environment_tags(),
            **tags,
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    time.sleep(0.5)  # let concurrent creators land before choosing
    chosen = parents()[0].info.run_id
    if chosen != run.info.run_id:
        client.delete_run(run.info.run_id)
    return chosen


def existing_study_runs(tracking: TrackingConfig, study: str) -> int:
    """How many active runs (parent, trials, comparisons) the tracking store already holds for `study`."""
    import mlflow

    experiment_id = connect(tracking)
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=1000
    )
    return sum(1 for r in runs if r.info.lifecycle_stage == "active")


def close_unfinished(tracking: TrackingConfig, study: str, live_trials: set[int], reason: str) -> list[str]:
    """End every RUNNING run of `study` (trials, comparison runs; not the study's parent) that nothing runs any
    more, as KILLED with `reason`: a study resuming after a crash leaves none RUNNING forever. Trials numbered in
    `live_trials` are still running in some worker and are left alone. Returns the run names closed."""
    import mlflow

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{study}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    closed = []
    for r in runs:
        tags = r.data.tags
        if tags.get(KIND_TAG) == "study" or r.info.lifecycle_stage != "active":
            continue
        if tags.get(KIND_TAG) == "trial" and tags.get(TRIAL_TAG, "").isdigit() and int(tags[TRIAL_TAG]) in live_trials:
            continue
        _mark_failed(client, r, reason)
        closed.append(r.info.run_name)
    return closed


def mark_trial_lost(tracking: TrackingConfig, study: str, trial_number: int, reason: str) -> int:
    """A worker died mid-trial: end its RUNNING MLflow run as KILLED (with the reason) rather than leave it RUNNING.
    Returns how many runs were marked."""
    import mlflow

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STUDY_TAG}` = '{study}' and tags.`{TRIAL_TAG}` = '{trial_number}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for r in runs:
        _mark_failed(client, r, reason)
    return len(runs)


def _mark_failed(client: Any, r: Any, reason: str) -> None:
    """End a RUNNING run that nothing runs any more as KILLED, in state FAIL with `reason` (its name says so too)."""
    tags = r.data.tags
    client.set_tag(r.info.run_id, STATE_TAG, "FAIL")
    client.set_tag(r.info.run_id, REASON_TAG, reason)
    name = notes.identity_name(r.info.run_name, tags.get(STUDY_TAG, ""))
    client.update_run(r.info.run_id, name=notes.display_name(name, tags.get(STUDY_TAG, ""), "FAIL"))
    client.set_terminated(r.info.run_id, status="KILLED")


@dataclass
class StudySummary:
    """What a study's parent run shows at the end (the rest, its trials and comparison runs, finish_parent reads from
    the parent's child runs)."""

    state: str  # COMPLETE (a trial completed), FAIL (none did, or stopped), KILLED (interrupted) or RUNNING
    metrics: dict[str, float]  # by MLflow metric name: the best trial's objectives, trial counts
    best_trial: Optional[int]
    best_values: dict[str, float]  # objective -> the best trial's value
    best_overrides: str
    counts: dict[str, int]  # trial state -> number
    description: str  # what the study asks (used when the parent has no trials to say what ran)
    table: str  # Markdown: the comparison with full fine-tuning, if any (used when no comparison run is marked)
    reason: str = ""  # why it ended so, when it did not just meet its budget ("stopped: ...", "interrupted: ...")


def mark_comparison(tracking: TrackingConfig, parent_run_id: str, comparison: notes.Comparison) -> None:
    """Mark a study's comparison runs (BEST_TAG: 'rerun' for the best trial retrained, 'full-ft' for full fine-tuning
    at its best LR; the mark taken off runs of an earlier comparison) and record the full-FT LRs tried on the parent,
    so that finish_parent, and one filter in the UI, find them. Runs are matched by their output folder."""
    import mlflow

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    picks = {r.identity.output_dir: role for role, r in (("rerun", comparison.best), ("full-ft", comparison.full)) if r}
    for c in _children(client, experiment_id, parent_run_id):
        if c.data.tags.get(KIND_TAG) != "compare":
            continue
        _set_or_clear(client, c, BEST_TAG, picks.get(c.data.tags.get(OUTPUT_TAG, "")))
    client.set_tag(parent_run_id, FULL_GRID_TAG, json.dumps(list(comparison.grid)))


def _children(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000
    )
    return [r for r in runs if r.info.lifecycle_stage == "active"]


def _set_or_clear(client: Any, run: Any, key: str, value: Optional[str]) -> None:
    """Set tag `key` to `value` on `run`, or delete it when `value` is None (only what differs is written)."""
    has = run.data.tags.get(key)
    if value is not None and has != value:
        client.set_tag(run.info.run_id, key, value)
    elif value is None and has is not None:
        client.delete_tag(run.info.run_id, key)


def _record(client: Any, run: Optional[Any]) -> Optional[RunRecord]:
    """A child run's record, or None (no run, or one logged in a layout this code cannot read: said, not fatal)."""
    if run is None:
        return None
    try:
        return _tracked(client, run).record
    except records.RecordError as exc:
        log.warning("study summary: run %s (%s) left out: %s", run.info.run_id, run.info.run_name, exc)
        return None


def _trial_line(experiment_id: str, c: Any, objectives: list[str]) -> notes.TrialLine:
    m, t = c.data.metrics, c.data.tags
    done = t.get(STATE_TAG) == "COMPLETE"  # others' latest loss/val is an early evaluation, not a result
    return notes.TrialLine(
        number=int(t.get(TRIAL_TAG, "0")),
        state=t.get(STATE_TAG, "?"),
        url=run_url(experiment_id, c.info.run_id),
        values={o: m.get(records.Results.metric(o)) for o in objectives} if done else {},
        val_loss=m.get(records.Results.metric("val_loss")) if done else None,
        accuracy=m.get(records.Results.metric("accuracy")) if done else None,
        base_val_loss=m.get(records.Results.metric("base_val_loss")),
        trainable=notes.whole(m.get(records.Results.metric("trainable_params"))),
        method=t.get("method", ""),
        searched=t.get(SEARCHED_TAG, ""),
        reason=t.get(REASON_TAG, ""),
    )


def finish_parent(
    tracking: TrackingConfig, run_id: str, study: str, summary: StudySummary, artifacts: Iterable[Path], end: bool
) -> None:
    """Attach a study's results to its parent run and end it when the whole budget is done.

    The description answers the study in its first three lines (notes.answer), then says what ran, lists the trials
    best first and compares the best with full fine-tuning. The same answer goes into metrics (records.StudyAnswer:
    best/..., full/..., delta/...), BEST_TAG marks the best trial, each COMPLETE trial gets its objective values as
    `objective/<name>` (the sort key of the prepared view), and the study's prepared runs-table view is published as
    an experiment tag (notes.study_view) and linked from the description."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    parent = client.get_run(run_id)
    children = _children(client, experiment_id, run_id)
    trials = sorted(
        (c for c in children if c.data.tags.get(KIND_TAG) == "trial"),
        key=lambda c: int(c.data.tags.get(TRIAL_TAG, "0")),
    )
    objectives = list(summary.best_values) or list(
        records.param_value(parent.data.params.get("sweep.objectives", '["val_loss"]'))
    )
    maximize = OBJECTIVE_DIRECTIONS.get(objectives[0]) == "maximize"
    best = next(
        (
            c
            for c in trials
            if c.data.tags.get(TRIAL_TAG) == str(summary.best_trial) and c.data.tags.get(STATE_TAG) == "COMPLETE"
        ),
        None,
    )
    picks = {c.data.tags.get(BEST_TAG): c for c in children if c.data.tags.get(KIND_TAG) == "compare"}
    best_record, full_record = _record(client, best), _record(client, picks.get("full-ft"))
    lines = [_trial_line(experiment_id, c, objectives) for c in trials]

    # The prepared view, the marks and the objective values on the trials.
    searched = sorted(
        {o.split("=", 1)[0] for c in trials for o in c.data.tags.get(SEARCHED_TAG, "").split() if "=" in o}
    )
    methods_vary = len({c.data.tags.get("method") for c in trials}) > 1
    view = notes.study_view(study, objectives, maximize, searched, methods_vary)
    _publish_view(client, experiment_id, study, view)
    for c in trials:
        _set_or_clear(client, c, BEST_TAG, "trial" if c is best else None)
        if c.data.tags.get(STATE_TAG) == "COMPLETE":
            values = {notes.trial_objective(o): c.data.metrics.get(records.Results.metric(o)) for o in objectives}
            new = {k: v for k, v in values.items() if v is not None and c.data.metrics.get(k) != v}
            if new:
                client.log_batch(c.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in new.items()])

    # The description.
    links = f"[the {notes.count(len(trials), 'trial')} by {objectives[0]}]({notes.view_url(experiment_id, study)})"
    if trials:
        links += f" · [compare them]({compare_url(experiment_id, [c.info.run_id for c in trials])})"
    best_line = next((t for t in lines if t.number == summary.best_trial and best is not None), None)
    reasons = [t.reason for t in lines if t.reason and t.state == "FAIL"]
    comparison = notes.Comparison(
        best=_record(client, picks.get("rerun")),
        full=full_record,
        trial=summary.best_trial,
        best_overrides=summary.best_overrides,
        grid=json.loads(parent.data.tags.get(FULL_GRID_TAG, "[]")),
    )
    head = notes.answer(
        best_line,
        best_record,
        full_record,
        summary.counts,
        summary.best_overrides,
        links,
        reasons,
        warning=comparison.edge_warning(),
    )
    ran = [
        (
            c.data.tags.get("method", "?"),
            c.data.tags.get("model", "?"),
            c.data.tags.get("data", "?"),
            records.param_value(c.data.params.get("trainer.max_steps", "null")),
        )
        for c in trials
    ]
    asks = records.param_value(parent.data.params.get("sweep.description", "")) or ""
    what = (f"{asks} (as run: {notes.as_run(ran)})" if asks else notes.as_run(ran)) if ran else summary.description
    state = f"**State: {summary.state}**" + (f" ({summary.reason})" if summary.reason else "")
    note = [head, "", f"{state} · study `{study}`" + (f": {what}" if what else ""), ""]
    tail = []
    if comparison.best is not None or comparison.full is not None:
        tail = ["**Against full fine-tuning** (same data and steps):", "", comparison.markdown(settings=False), ""]
    elif summary.table:
        tail = ["**Against full fine-tuning** (same data and steps):", "", summary.table, ""]
    for limit in (len(lines), 40, 20, 10, 5):  # a tag holds 8000 characters: the table gives way first
        shown = notes.trials_table(lines, objectives, maximize, limit=limit)
        text = "\n".join([*note, shown, "", *tail])
        if len(text) <= 8000:
            break
    metrics = {**summary.metrics, **notes.study_answer(best_record, full_record).metrics()}
    tags = {
        STATE_TAG: summary.state,
        NOTE_TAG: text[:8000],
        "best_trial": str(summary.best_trial) if summary.best_trial is not None else "none",
    }
    if summary.best_overrides:
        tags["best_overrides"] = summary.best_overrides
    if summary.reason:
        tags[REASON_TAG] = summary.reason
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()],
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    # State first when it ended otherwise than by its budget (a resumed study drops an earlier ending's state).
    ended = summary.state if summary.state not in ("COMPLETE", "RUNNING") else "COMPLETE"
    client.update_run(run_id, name=notes.display_name(study, "", ended))
    if end:
        client.set_terminated(run_id, status={"FAIL": "FAILED", "KILLED": "KILLED"}.get(summary.state, "FINISHED"))
    elif summary.state == "RUNNING":  # a study resumed after it was stopped runs again, without the old reason
        client.update_run(run_id, status="RUNNING")
        with contextlib.suppress(Exception):  # MLflow refuses to delete a tag that is not there
            client.delete_tag(run_id, REASON_TAG)


# ----------------------------------------------------------------------------------------------- reading back


def _client(uri: str) -> Any:
    import mlflow

    _quiet_mlflow()
    return mlflow.MlflowClient(tracking_uri=uri)


@dataclass
class TrackedRun:
    """A training run read back from MLflow: its record (curves: the evaluations only) and where it sits."""

    run_id: str
    parent_id: str
    state: str  # COMPLETE, PRUNED, FAIL
    record: RunRecord


def _search(uri: str, experiment: Optional[str], studies: Optional[list[str]]) -> list[Any]:
    client = _client(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        exps = [exp] if exp is not None else []
    else:
        exps = client.search_experiments()
    if not exps:
        return []
    filters = [None] if not studies else [f"tags.`{STUDY_TAG}` = '{s}'" for s in studies]
    out, seen = [], set()
    for flt in filters:
        kwargs = {"filter_string": flt} if flt else {}
        for r in client.search_runs(
            [e.experiment_id for e in exps], max_results=50000, order_by=["attributes.start_time ASC"], **kwargs
        ):
            if r.info.run_id in seen or r.info.lifecycle_stage != "active":
                continue
            seen.add(r.info.run_id)
            out.append(r)
    return out


def read_runs(
    uri: str, experiment: Optional[str] = None, studies: Optional[list[str]] = None
) -> tuple[list[TrackedRun], list[str]]:
    """Training runs (as records) and study parent run ids of one experiment (every experiment if None), optionally
    only those of `studies`. A run logged in another layout fails loudly (records.RecordError, naming the run)."""
    client = _client(uri)
    runs, parents = [], []
    for r in _search(uri, experiment, studies):
        tags = r.data.tags
        if tags.get(KIND_TAG) == "study":
            parents.append(r.info.run_id)
            continue
        if tags.get(STATE_TAG) == "RUNNING":
            continue
        try:
            runs.append(_tracked(client, r))
        except records.RecordError as exc:
            raise records.RecordError(f"MLflow run {r.info.run_id} ({r.info.run_name}): {exc}") from None
    return runs, parents


def study_descriptions(uri: str, parent_ids: Iterable[str]) -> dict[str, str]:
    """Study name -> what the study asks (its spec's `description`, logged on its parent run as the param
    `sweep.description`), for the parents `parent_ids` that have one."""
    client = _client(uri)
    out = {}
    for run_id in parent_ids:
        r = client.get_run(run_id)
        text = r.data.params.get("sweep.description", "").strip()
        if text:
            out[r.data.tags.get(STUDY_TAG, r.info.run_name)] = text
    return out


def _tracked(client: Any, r: Any) -> TrackedRun:
    tags, metrics = r.data.tags, r.data.metrics
    params = dict(r.data.params)
    method = params.get(records.SETTINGS_PARAMS["method"])
    try:
        group = adaptations.of(method).group if method is not None else None
    except ValueError as exc:
        raise records.RecordError(str(exc)) from None
    settings = Settings.from_params(params, method_group=group)
    curves: dict[int, dict[str, float]] = {}
    for name, key in _keys(EvalPoint):
        if key in metrics:
            for m in client.get_metric_history(r.info.run_id, key):
                curves.setdefault(m.step, {})[name] = m.value
    evals = [EvalPoint(step=s, **v) for s, v in sorted(curves.items()) if "val_loss" in v]
    base_loss, base_acc = records.Results.metric("base_val_loss"), records.Results.metric("base_accuracy")
    if evals and evals[0].step == 0:  # logged before the base model had names of its own: its curves' first point
        metrics = {base_loss: evals[0].val_loss, **metrics}
        if evals[0].accuracy is not None:
            metrics.setdefault(base_acc, evals[0].accuracy)
    elif base_loss in metrics:  # the record's evaluations start with the base model's, as metrics.json's do
        evals.insert(0, EvalPoint(step=0, val_loss=metrics[base_loss], accuracy=metrics.get(base_acc)))
    state = tags.get(STATE_TAG, "FAIL")
    results = None
    if STATUS_TAG in tags:  # the run reached its end and logged its results
        results = records.results_from_metrics(metrics, tags[STATUS_TAG], tags.get(REASON_TAG, ""))
    trial = tags.get(TRIAL_TAG)
    study = tags.get(STUDY_TAG, "")
    identity = Identity(
        kind=tags.get(KIND_TAG, "run"),
        name=notes.identity_name(r.info.run_name, study),
        study=study,
        trial=int(trial) if trial is not None else None,
        model=settings.model,
        data=settings.data,
        device=tags.get("device", ""),
        output_dir=tags.get(OUTPUT_TAG, ""),
    )
    if results is None:  # pruned or failed mid-run: no results logged, only the curve
        last = evals[-1] if evals else None
        results = records.Results(
            status="diverged",
            reason=tags.get(REASON_TAG, ""),
            steps=last.step if last else 0,
            val_loss=float("nan"),
            base_val_loss=metrics.get(base_loss),
            base_accuracy=metrics.get(base_acc),
            trainable_params=int(metrics.get("params/trainable", 0)),
            total_params=int(metrics.get("params/total", 0)),
            peak_mem_bytes=0,
            time_per_step_s=float("nan"),
            tokens_per_s=float("nan"),
            train_time_s=float("nan"),
            eval_time_s=float("nan"),
            setup_time_s=float("nan"),
        )
    record = RunRecord(**dataclasses.asdict(results), identity=identity, settings=settings, evals=evals)
    return TrackedRun(run_id=r.info.run_id, parent_id=tags.get("mlflow.parentRunId", ""), state=state, record=record)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged point of one metric of one run, in step order."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def attach_files(uri: str, run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
    """Attach files (report tables, plots) to an existing run, e.g. a study's parent run, on the given store."""
    client = _client(uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)
