"""The tracked run: write the resolved config.yaml, fit a Session inside an MLflow run, close it.

The one sequence behind `python -m lora_lab.train`, every sweep trial and every comparison run. Who the run is
(kind, name, study, trial) and which overrides made it travel with the Session (finish.RunRole, given to build()).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from lora_lab.files import atomic_write_text
from lora_lab.records import RunRecord
from lora_lab.train import distributed
from lora_lab.train.loop import EvalCallback, EvalEvent
from lora_lab.train.session import Session


def completion_verdict(result: RunRecord) -> tuple[str, str]:
    """A plain run's state: COMPLETE when training completed, FAIL with the reason otherwise."""
    return ("COMPLETE", "") if result.completed else ("FAIL", f"{result.status}: {result.reason}")


def fit_tracked(
    session: Session,
    resolved: dict[str, Any],
    *,
    searched: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    on_eval: Optional[EvalCallback] = None,
    verdict: Optional[Callable[[RunRecord], tuple[str, str]]] = None,
) -> RunRecord:
    """Write the resolved config.yaml, fit inside an MLflow run (when tracking is on), close the session.

    `resolved` is the composed config as a plain dict; `searched` what a sweep sampled for the run; `parent_run_id`
    its study's MLflow run. `verdict` names the run's final state (COMPLETE, PRUNED, FAIL) and reason (default:
    completion_verdict), and an exception with a `run_state` attribute (a pruned trial) ends the run in that state.
    """
    import yaml

    from lora_lab import tracking
    from lora_lab.records import Results

    if not distributed.is_main():  # another rank of a multi-process run: it trains, rank 0 writes and tracks
        try:
            return session.fit(on_eval)
        finally:
            session.close()
    try:
        resolved = {**resolved, "output_dir": str(session.output_dir)}
        atomic_write_text(session.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        counts = {
            Results.field_of("trainable_params").metadata["key"]: session.counts.trainable,
            Results.field_of("total_params").metadata["key"]: session.counts.total,
        }
        with tracking.TrainingRun(
            session.cfg.tracking,
            session.identity(),
            session.settings(),
            searched=searched,
            parent_run_id=parent_run_id,
            start_metrics=counts,
        ) as run_log:

            def hook(event: EvalEvent) -> None:
                run_log.on_eval(event)
                if on_eval is not None:
                    on_eval(event)

            result = session.fit(hook)
            run_log.finish(result)
            run_log.set_outcome(*(verdict or completion_verdict)(result))
        return result
    finally:
        session.close()
