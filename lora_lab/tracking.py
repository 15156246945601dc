"""Every MLflow call lora_lab makes: one run per training, a parent run per study, child runs per trial.

The training loop knows nothing of MLflow: `TrainingRun.on_eval` is handed to it as its callback. The link from a trial
to its study is the `mlflow.parentRunId` tag, so it holds across processes and hosts (workers on other machines log
to the same tracking server and find the parent by its id).

What MLflow shows is laid out for a person reading the UI: runs named `<study>/trial-<n>` (a suffix for PRUNED and
FAIL), params = the settings chosen (lora_lab.records.Settings), metrics under grouped names (`loss/train`,
`loss/val`, `eval/accuracy`, `perf/...`; lora_lab.records says each one's unit), a Markdown description on every run
and study, and the experiment marked as model training so the UI does not open in its GenAI mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import os
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from lora_lab import adaptations, records
from lora_lab.config import ConfigError, TrackingConfig, outputs_root
from lora_lab.errors import first_line
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
NOTE_TAG = "mlflow.note.content"  # MLflow's description of a run or an experiment (Markdown)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3.x: this value opens the experiment as model training
EXPERIMENT_KIND = "custom_model_development"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
EXPERIMENT_NOTE = """Runs of lora_lab: LoRA and full fine-tuning on the same data, searched by Optuna. Each study is a
parent run (named after the study) with one child run per trial, `<study>/trial-<n>`, and its comparison runs; single
`python -m lora_lab.train` runs stand alone.

* **State**: the `lora_lab.state` column (COMPLETE, PRUNED, FAIL); pruned and failed runs also carry it in their name
  and their reason in `lora_lab.reason`.
* **Params** are the settings a person chose (the run's overrides and the method's own fields); derived numbers such
  as parameter counts are metrics.
* **Metrics** (units):

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


class TrackingUnreachable(RuntimeError):
    """The tracking server has not answered for tracking.deadline_s: the run ends FAIL rather than waiting."""

    run_state = "FAIL"  # how TrainingRun.__exit__ ends a run this stops


def unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, says the server did not answer (refused, reset, timed out, retries
    used up), rather than that it refused the request."""
    import requests

    away = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
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


def experiment_note() -> str:
    """The experiment's description: how its runs are laid out, and every metric with its unit."""
    rows = ["| metric | unit | what |", "|---|---|---|"]
    seen = set()
    for cls in (records.TrainPoint, records.EvalPoint, records.Results, records.StudyThroughput):
        for _name, unit, doc, key in records.describe(cls):
            if key and key not in seen:
                seen.add(key)
                rows.append(f"| `{key}` | {unit or '-'} | {doc} |")
    return EXPERIMENT_NOTE + "\n".join(rows) + "\n"


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
    """The run's name in MLflow: its identity's name, with the state appended when it is not COMPLETE."""
    return identity.name if state == "COMPLETE" else f"{identity.name} ({state})"


def _fmt(value: Any, spec: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def run_note(
    identity: Identity,
    settings: Settings,
    searched: dict[str, Any],
    state: str,
    reason: str,
    record: Optional[RunRecord],
    last: Optional[EvalPoint],
    parent_link: Optional[str] = None,
) -> str:
    """A run's Markdown description: what it is, its searched values, its result with units, its state and why."""
    what = {
        "trial": f"Trial {identity.trial} of study `{identity.study}`",
        "compare": f"Comparison run of study `{identity.study}`",
        "run": "A single training run",
    }[identity.kind]
    method = adaptations.of(settings.method).describe(settings.get)
    lines = [
        f"**{what}**: {method} of `{settings.model}` on `{settings.data}`, {settings.max_steps} steps, "
        f"peak LR {settings.lr:g}, batch {settings.batch}.",
        "",
    ]
    if parent_link:
        lines += [f"Study: [{identity.study}]({parent_link})", ""]
    if searched:
        lines += ["Searched values: " + ", ".join(f"`{k}={records.param_text(v)}`" for k, v in searched.items()), ""]
    lines += [f"**State: {state}**" + (f": {reason}" if reason else ""), ""]
    rows = []
    if record is not None:
        r = record
        rows += [
            ("val loss", _fmt(r.val_loss), "nats/token", f"base model {_fmt(r.base_val_loss)}"),
            ("accuracy", _fmt(r.accuracy, "{:.3f}"), "fraction", f"base model {_fmt(r.base_accuracy, '{:.3f}')}"),
        ]
        if r.merged_val_loss is not None:
            ok = {True: "passed", False: "FAILED", None: "-"}[r.merge_ok]
            rows += [
                (
                    "merged val loss",
                    _fmt(r.merged_val_loss),
                    "nats/token",
                    f"max logit diff {_fmt(r.max_abs_logit_diff, '{:.1e}')}, check {ok}"
                    + (f" at tolerance {r.merge_tol:.1e}" if r.merge_tol is not None else ""),
                )
            ]
        rows += [
            (
                "trainable params",
                f"{r.trainable_params:,}",
                "parameters",
                f"{100 * r.trainable_params / max(1, r.total_params):.3f}% of {r.total_params:,}",
            ),
            ("time per step", _fmt(r.time_per_step_s, "{:.3f}"), "s", f"{r.steps} steps"),
            ("throughput", _fmt(r.tokens_per_s, "{:.0f}"), "tokens/s", ""),
            ("peak memory", _fmt(r.peak_mem_bytes / 2**20, "{:.0f}"), "MiB", ""),
        ]
    elif last is not None:
        rows += [("val loss at its last evaluation", _fmt(last.val_loss), "nats/token", f"step {last.step}")]
        if last.accuracy is not None:
            rows += [
                ("accuracy at its last evaluation", _fmt(last.accuracy, "{:.3f}"), "fraction", f"step {last.step}")
            ]
    if rows:
        lines += ["| result | value | unit | note |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines += [""]
    lines += [
        "Curves: `loss/train`, `loss/val` (Model metrics); files: `config.yaml`, `metrics.json`, "
        "`loss_curve.png` (Artifacts)."
    ]
    return "\n".join(lines)


# MLflow 3.x's UI opens in its GenAI mode unless told otherwise; this query opens it as model training.
UI_MODE = "workflowType=machine_learning"


def run_url(experiment_id: str, run_id: str) -> str:
    """A link to a run in the MLflow UI, relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}"


def compare_url(experiment_id: str, run_ids: list[str]) -> str:
    """A link that opens MLflow's comparison of these runs."""
    runs = urllib.parse.quote("[" + ",".join(f'"{r}"' for r in run_ids) + "]")
    experiments = urllib.parse.quote(f'["{experiment_id}"]')
    return f"#/compare-runs?runs={runs}&experiments={experiments}&{UI_MODE}"


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
        self.gone = False  # the server stayed away past tracking.deadline_s: nothing more is sent

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
                run_name=i.name,
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
        while self._backlog and not self.gone:
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
            time.sleep(min(2.0, max(0.0, left)))
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
        every = self.tracking.log_every
        metrics = [
            Metric(key, float(getattr(p, name)), now, p.step)
            for p in points
            if p.step % every == 0 or p is points[-1]
            for name, key in _keys(TrainPoint)
        ]
        metrics += [
            Metric(key, float(getattr(point, name)), now, point.step)
            for name, key in _keys(EvalPoint)
            if getattr(point, name) is not None
        ]
        self._log(metrics=metrics)

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
        metrics = {k: v for k, v in records.result_metrics(record).items() if k not in self.start_metrics}
        self._log(metrics=[Metric(k, v, now, record.steps) for k, v in metrics.items()])
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
                ),
            }
            if self.record is not None:
                tags[STATUS_TAG] = self.record.status
            if reason:
                tags[REASON_TAG] = reason[:5000]
            self._client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
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
        client.set_tag(r.info.run_id, STATE_TAG, "FAIL")
        client.set_tag(r.info.run_id, REASON_TAG, reason)
        client.update_run(r.info.run_id, name=f"{r.info.run_name} (FAIL)")
        client.set_terminated(r.info.run_id, status="KILLED")
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
        client.set_tag(r.info.run_id, STATE_TAG, "FAIL")
        client.set_tag(r.info.run_id, REASON_TAG, reason)
        client.update_run(r.info.run_id, name=f"{r.info.run_name} (FAIL)")
        client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


@dataclass
class StudySummary:
    """What a study's parent run shows at the end."""

    state: str  # COMPLETE (a trial completed), FAIL (none did, or stopped), KILLED (interrupted) or RUNNING
    metrics: dict[str, float]  # by MLflow metric name: the best trial's objectives, trial counts
    best_trial: Optional[int]
    best_values: dict[str, float]  # objective -> the best trial's value
    best_overrides: str
    counts: dict[str, int]  # trial state -> number
    description: str  # what the study asks
    table: str  # Markdown: the comparison with full fine-tuning, if any
    reason: str = ""  # why it ended so, when it did not just meet its budget ("stopped: ...", "interrupted: ...")


def finish_parent(
    tracking: TrackingConfig, run_id: str, study: str, summary: StudySummary, artifacts: Iterable[Path], end: bool
) -> None:
    """Attach a study's results to its parent run (metrics, tags, a description with a summary table of its trials,
    a link to the best one and to the comparison of all of them); end it when the whole budget is done."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000
    )
    trials = sorted(
        (c for c in children if c.data.tags.get(KIND_TAG) == "trial"),
        key=lambda c: int(c.data.tags.get(TRIAL_TAG, "0")),
    )
    best = [
        c
        for c in trials
        if c.data.tags.get(TRIAL_TAG) == str(summary.best_trial) and c.data.tags.get(STATE_TAG) == "COMPLETE"
    ]
    note = [
        f"**Study `{study}`**" + (f": {summary.description}" if summary.description else ""),
        "",
        f"**State: {summary.state}**"
        + (f" ({summary.reason})" if summary.reason else "")
        + "; trials: "
        + ", ".join(f"{n} {k}" for k, n in sorted(summary.counts.items())),
        "",
    ]
    if summary.best_trial is not None:
        vals = ", ".join(f"{k} {v:.4f}" for k, v in summary.best_values.items())
        link = (
            f"[trial {summary.best_trial}]({run_url(experiment_id, best[0].info.run_id)})"
            if best
            else f"trial {summary.best_trial}"
        )
        note += [f"Best: {link}, {vals} (losses in nats/token): `{summary.best_overrides}`", ""]
    else:
        note += ["No trial completed: see each trial's reason (`lora_lab.reason`).", ""]
    if trials:
        note += [
            f"[Compare the {len(trials)} trials]({compare_url(experiment_id, [c.info.run_id for c in trials])})",
            "",
            "| trial | state | val loss (nats/token) | accuracy | searched |",
            "|---|---|---|---|---|",
        ]
        for c in trials:
            m, t = c.data.metrics, c.data.tags
            searched = t.get(SEARCHED_TAG, "")
            done = t.get(STATE_TAG) == "COMPLETE"  # others' latest loss/val is an early evaluation, not a result
            note.append(
                f"| [{t.get(TRIAL_TAG)}]({run_url(experiment_id, c.info.run_id)}) | {t.get(STATE_TAG, '?')} "
                f"| {_fmt(m.get('loss/val') if done else None)} "
                f"| {_fmt(m.get('eval/accuracy') if done else None, '{:.3f}')} | {searched} |"
            )
        note.append("")
    if summary.table:
        note += ["Best LoRA trial against full fine-tuning:", "", summary.table, ""]
    tags = {
        STATE_TAG: summary.state,
        NOTE_TAG: "\n".join(note),
        "best_trial": str(summary.best_trial) if summary.best_trial is not None else "none",
    }
    if summary.best_overrides:
        tags["best_overrides"] = summary.best_overrides
    if summary.reason:
        tags[REASON_TAG] = summary.reason
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in summary.metrics.items()],
        tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    ended = summary.state not in ("COMPLETE", "RUNNING")
    suffix = f" ({summary.state}" + (f": {summary.reason}" if summary.reason else "") + ")" if ended else ""
    client.update_run(run_id, name=study + suffix)  # also drops an earlier ending's suffix from a resumed study
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
    first = (
        {k: v for k, v in (("loss/val", evals[0].val_loss), ("eval/accuracy", evals[0].accuracy)) if v is not None}
        if evals and evals[0].step == 0
        else {}
    )
    state = tags.get(STATE_TAG, "FAIL")
    results = None
    if STATUS_TAG in tags:  # the run reached its end and logged its results
        results = records.results_from_metrics(metrics, tags[STATUS_TAG], tags.get(REASON_TAG, ""), first)
    trial = tags.get(TRIAL_TAG)
    identity = Identity(
        kind=tags.get(KIND_TAG, "run"),
        name=r.info.run_name.split(" (")[0],
        study=tags.get(STUDY_TAG, ""),
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
