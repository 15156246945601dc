"""An MLflow run that breaks while it starts ends FAILED with the reason (issue 24 item 16: MLflow's exit hook ended
it FINISHED, so a crash read as a result)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab import records, tracking
from lora_lab.config import TrackingConfig
from lora_lab.records import Identity, Settings


def test_a_crash_inside_the_runs_start_ends_it_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, system_metrics=False)
    identity = Identity(kind="run", name="broken", model="tiny", data="d", device="cpu", output_dir=str(tmp_path))
    settings = Settings(
        method="lora", model="tiny", data="d", seed=0, lr=1e-3, batch_size=1, grad_accum=1, max_steps=1,
        max_length=8, precision="fp32", device="cpu",
    )  # fmt: skip

    def broken(self: Settings) -> dict[str, str]:
        raise RuntimeError("params could not be built")

    monkeypatch.setattr(records.Settings, "params", broken)
    with pytest.raises(RuntimeError, match="params could not be built"):
        with tracking.TrainingRun(cfg, identity, settings):
            pass  # never reached
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lora_lab").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.STATE_TAG] == "FAIL"
    assert "params could not be built" in run.data.tags[tracking.REASON_TAG]


def _as_mlflow_raises(inner: BaseException) -> BaseException:
    """`inner` wrapped the way mlflow.utils.rest_utils.http_request wraps what requests raised."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise inner
        except Exception as e:
            raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {e}")  # noqa: B904 (as mlflow does)
    except MlflowException as wrapped:
        return wrapped


def test_a_server_cut_off_mid_answer_counts_as_away_not_as_a_refusal() -> None:
    # CI, session 7: a server killed while it answered a log_batch raised ChunkedEncodingError ("Connection broken:
    # IncompleteRead"); read as a refused request, it failed a run the server came back in time for.
    import requests
    from mlflow.exceptions import MlflowException

    cut = requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead(0 bytes read, 2 more expected)")
    assert tracking.unreachable(_as_mlflow_raises(cut))
    assert tracking.unreachable(_as_mlflow_raises(requests.exceptions.ConnectionError("refused")))
    assert tracking.unreachable(_as_mlflow_raises(requests.exceptions.ReadTimeout("slow")))
    # A request the server answered with a refusal is not a lost server: the run must hear of it.
    assert not tracking.unreachable(MlflowException("INVALID_PARAMETER_VALUE: bad metric"))
    assert not tracking.unreachable(_as_mlflow_raises(ValueError("bad body")))
