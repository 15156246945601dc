"""Every MLflow call lora_lab makes: one run per training, a parent run per study, child runs per trial.

The training loop knows nothing of MLflow: `TrainingRun.on_eval` is handed to it as its callback. The link from a trial
to its study is the `mlflow.parentRunId` tag, so it holds across processes and hosts (workers on other machines log
to the same tracking server and find the parent by its id).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from lora_lab.config import Config, ConfigError, TrackingConfig, outputs_root

log = logging.getLogger("lora_lab")

# lora_lab's own tags; MLflow's UI shows them as columns.
STATE_TAG = "lora_lab.state"  # COMPLETE, PRUNED, FAIL (sweep trials) or completed/diverged (runs)
REASON_TAG = "lora_lab.reason"  # why a run failed: diverged, oom, the exception's message
STUDY_TAG = "lora_lab.study"
TRIAL_TAG = "lora_lab.trial"
KIND_TAG = "lora_lab.kind"  # 'study' (parent), 'trial', 'compare' or 'run'
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "completed": "FINISHED",
                 "diverged": "FAILED"}


def _quiet_mlflow() -> None:
    # MLflow's alembic migrations and run-link banners drown our progress bars.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client", "mlflow.utils.autologging_utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; return the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    uri = tracking.resolved_uri()
    try:
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:///"):
            client = _init_sqlite_store(Path(uri[len("sqlite:///"):]))
        else:
            client = mlflow.MlflowClient()
        for attempt in range(5):  # many workers may create the same experiment at once
            exp = client.get_experiment_by_name(tracking.experiment)
            if exp is not None:
                return exp.experiment_id
            try:
                # An embedded store keeps artifacts beside the database; a server decides for itself.
                location = (outputs_root() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
                return client.create_experiment(tracking.experiment, artifact_location=location)
            except MlflowException:
                time.sleep(0.2 * (attempt + 1))
    except Exception as exc:  # unknown scheme, unreachable server, unwritable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tracking.uri={uri!r}: cannot use this MLflow store ({first})") from None
    raise ConfigError(f"tracking.experiment={tracking.experiment!r}: could not create or find it at {uri}")


def _init_sqlite_store(db: Path) -> Any:
    """Create (migrate) an embedded SQLite store under a file lock: two processes that open a new mlflow.db at once
    otherwise race in MLflow's alembic migrations and one of them dies."""
    import mlflow

    from lora_lab.models import file_lock

    with file_lock(db.parent / f".{db.name}.init.lock"):
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)  # the first use of a store creates and migrates it
    return client


def flatten(cfg: dict[str, Any]) -> dict[str, str]:
    """The resolved config (a plain dict) as MLflow params: dotted keys (`lora.r`), values as text."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)[:500]  # MLflow's limit on a param value

    walk(cfg, "")
    return out


def environment_tags() -> dict[str, str]:
    """Git commit and package versions, so a run can be reproduced."""
    tags = {}
    for pkg in ("lora_lab", "torch", "transformers", "optuna", "mlflow", "datasets"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


class TrainingRun:
    """An MLflow run around one training: params at the start, metrics at every evaluation, artifacts at the end.

    Used as a context manager; the run ends FINISHED, FAILED or KILLED according to `set_outcome()` or, when the
    block raises, the exception.
    """

    def __init__(self, cfg: Config, resolved: dict[str, Any], session: Any, parent_run_id: Optional[str] = None,
                 run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None) -> None:
        self.cfg, self.resolved, self.session = cfg, resolved, session
        self.parent_run_id, self.run_name, self.extra_tags = parent_run_id, run_name, tags or {}
        self.run_id: Optional[str] = None
        self.outcome: Optional[tuple[str, str]] = None
        self._client: Any = None

    def __enter__(self) -> "TrainingRun":
        if not self.cfg.tracking.enabled:
            return self
        import mlflow

        experiment_id = connect(self.cfg.tracking)
        c = self.cfg
        tags = {KIND_TAG: "run", "method": c.method, "model": c.model.name, "data": c.data.name,
                "device": str(self.session.device), **environment_tags(), **self.extra_tags}
        name = self.run_name or c.tracking.run_name or f"{c.method}-{Path(c.model.name).name}-{c.data.name}"
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, parent_run_id=self.parent_run_id,
                               log_system_metrics=c.tracking.system_metrics)
        self.run_id = run.info.run_id
        self._client = mlflow.MlflowClient()
        params = flatten(self.resolved)
        params.update({"trainable_params": str(self.session.counts.trainable), "total_params": str(self.session.counts.total),
                       "wrapped_modules": str(len(self.session.wrapped))})
        self._client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        return self

    def on_eval(self, event: Any) -> None:
        """The training loop's callback: per-step training loss and LR, then the evaluation's metrics."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(p[key]), now, int(p["step"])) for p in event.train_points for key in ("train_loss", "lr")
                   if p["step"] % self.cfg.tracking.log_every == 0 or p is event.train_points[-1]]
        metrics += [Metric(k, float(v), now, event.step) for k, v in event.metrics.items() if k not in ("train_loss", "lr")]
        self._client.log_batch(self.run_id, metrics=metrics)

    def set_outcome(self, state: str, reason: str = "") -> None:
        """Record how the run ended (COMPLETE / PRUNED / FAIL, or completed / diverged) and why."""
        self.outcome = (state, reason)

    def finish(self, result: Any) -> None:
        """Final metrics and artifacts (config, metrics.json, adapter, loss curve). The caller sets the outcome after
        this returns, so a failure while logging ends the run FAILED rather than FINISHED."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        from lora_lab.plots import loss_curve

        now = int(time.time() * 1000)
        scalars = {k: v for k, v in result.metrics().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._client.log_batch(self.run_id, metrics=[Metric(f"final.{k}", float(v), now, result.steps) for k, v in scalars.items()])
        out = Path(result.output_dir)
        for name in ("config.yaml", "metrics.json"):
            if (out / name).is_file():
                self._client.log_artifact(self.run_id, str(out / name))
        if (out / "adapter").is_dir():
            self._client.log_artifacts(self.run_id, str(out / "adapter"), artifact_path="adapter")
        if result.history:
            png = loss_curve({self.cfg.method: (result.history, result.evals)}, out / "loss_curve.png",
                             title=f"{self.cfg.method} on {self.cfg.data.name} ({Path(self.cfg.model.name).name})")
            self._client.log_artifact(self.run_id, str(png))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.run_id is None:
            return
        import mlflow

        if exc is not None and getattr(exc, "run_state", None):  # e.g. a pruned trial: the exception says how it ended
            self.outcome = (exc.run_state, str(exc)[:500])
            status = MLFLOW_STATUS.get(exc.run_state, "KILLED")
        elif exc is not None:
            self.outcome = ("FAIL", f"{type(exc).__name__}: {exc}"[:500])
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        else:
            status = MLFLOW_STATUS.get((self.outcome or ("completed", ""))[0], "FINISHED")
        state, reason = self.outcome or ("completed", "")
        with contextlib.suppress(Exception):  # a tag must never hide the exception that ended the run
            self._client.set_tag(self.run_id, STATE_TAG, state)
            if reason:
                self._client.set_tag(self.run_id, REASON_TAG, reason[:5000])
        mlflow.end_run(status=status)


def ui_command(tracking: TrackingConfig) -> str:
    """The command that shows these runs (binds to 127.0.0.1)."""
    uri = tracking.resolved_uri()
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


# ----------------------------------------------------------------------------------------------- studies


def study_parent_run(tracking: TrackingConfig, study: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """The id of the study's parent run, created on first use. Workers on many hosts race to create it: each one
    that created a run keeps the oldest RUNNING parent for the study and deletes its own duplicate, so they all
    agree on one parent without a lock."""
    import mlflow
    from mlflow.entities import Param

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()

    def parents() -> list[Any]:
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = 'study'",
                                  order_by=["attributes.start_time ASC"], max_results=50)
        return sorted((r for r in runs if r.info.lifecycle_stage == "active"), key=lambda r: (r.info.start_time, r.info.run_id))

    existing = parents()
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"study:{study}",
                            tags={KIND_TAG: "study", STUDY_TAG: study, **environment_tags(), **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    time.sleep(0.5)  # let concurrent creators land before choosing
    chosen = parents()[0].info.run_id
    if chosen != run.info.run_id:
        client.delete_run(run.info.run_id)
    return chosen


def mark_trial_lost(tracking: TrackingConfig, study: str, trial_number: int, reason: str) -> int:
    """A worker died mid-trial: end its RUNNING MLflow run as KILLED (with the reason) rather than leave it RUNNING.
    Returns how many runs were marked."""
    import mlflow

    experiment_id = connect(tracking)
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{STUDY_TAG}` = '{study}' and tags.`{TRIAL_TAG}` = '{trial_number}' and attributes.status = 'RUNNING'"))
    for r in runs:
        client.set_tag(r.info.run_id, STATE_TAG, "FAIL")
        client.set_tag(r.info.run_id, REASON_TAG, reason)
        client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


def finish_parent(tracking: TrackingConfig, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                  artifacts: Iterable[Path], end: bool) -> None:
    """Attach a study's results to its parent run; end it when the whole budget is done."""
    import mlflow
    from mlflow.entities import Metric

    connect(tracking)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[mlflow.entities.RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    if end:
        client.set_terminated(run_id, status="FINISHED")


# ----------------------------------------------------------------------------------------------- reports


def _client(uri: str) -> Any:
    import mlflow

    _quiet_mlflow()
    return mlflow.MlflowClient(tracking_uri=uri)


def find_runs(uri: str, experiment: Optional[str] = None, studies: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Active runs of one experiment (every experiment if None), optionally only those tagged with one of `studies`,
    as plain dicts: run_id, run_name, experiment, status, start_time, params, metrics (latest values), tags."""
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
        for r in client.search_runs([e.experiment_id for e in exps], max_results=50000, order_by=["attributes.start_time ASC"], **kwargs):
            if r.info.run_id in seen or r.info.lifecycle_stage != "active":
                continue
            seen.add(r.info.run_id)
            out.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
                        "status": r.info.status, "start_time": r.info.start_time, "params": dict(r.data.params),
                        "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)})
    return out


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged point of one metric of one run, in step order."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def attach_files(uri: str, run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
    """Attach files (report tables, plots) to an existing run, e.g. a study's parent run, on the given store."""
    client = _client(uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)
