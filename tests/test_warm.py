"""Warm sweep workers (lora_lab/train/warm.py): a trial on the kept model gives a fresh process's numbers, and
anything a trial's overrides change in model.* or data.* is loaded again."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from lora_lab.config import compose
from lora_lab.records import RunRecord
from lora_lab.sweep import cli
from lora_lab.sweep.outputs import throughput, throughput_metrics
from lora_lab.train.build import build
from lora_lab.train.warm import Warm

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.checkpoint_every=0",
    "trainer.eval_at_start=false",
    "tracking=off",
]


def _fit(overrides: list[str], out: Path, warm: Warm | None = None) -> RunRecord:
    _, cfg = compose(TINY + overrides + [f"output_dir={out}"])
    session = build(cfg, warm=warm)
    try:
        return session.fit()
    finally:
        session.close()
        if warm is not None:
            warm.give_back()


def _same(a: RunRecord, b: RunRecord) -> None:
    assert len(a.history) == len(b.history) > 0
    for p, q in zip(a.history, b.history):
        assert p.train_loss == pytest.approx(q.train_loss, abs=1e-6, rel=0)
    assert [e.val_loss for e in a.evals] == pytest.approx([e.val_loss for e in b.evals], abs=1e-6, rel=0)
    assert a.val_loss == pytest.approx(b.val_loss, abs=1e-6, rel=0)


def _kept_state_is_loaded(warm: Warm) -> None:
    e = warm.entry
    for name, p in e.model.named_parameters():
        assert p.dtype == e.params[name].dtype and torch.equal(p.detach().cpu(), e.params[name]), name
        assert p.requires_grad == e.requires_grad[name] and p.grad is None, name


LORA_A = ["method=lora", "lora.r=4", "lora.targets=[all-linear]", "optim.lr=3e-3", "seed=1"]
LORA_B = ["method=lora", "lora.r=8", "lora.targets=[attn]", "lora.dropout=0.05", "optim.lr=1e-3", "seed=2"]
PISSA = ["method=lora", "lora.r=4", "lora.init=pissa", "lora.targets=[mlp]", "optim.lr=1e-3", "seed=3"]
FULL = ["method=full", "optim.lr=1e-4", "seed=4"]


@pytest.mark.parametrize(
    "before, after",
    [
        ([LORA_A, PISSA], LORA_B),  # LoRA after LoRA trials (one changing the base weights: PiSSA's residual)
        ([LORA_A], FULL),  # full fine-tuning after a LoRA trial: starts from the loaded weights, not merged ones
        ([FULL], LORA_B),  # LoRA after a full fine-tuning trial: the trained weights are gone
    ],
    ids=["lora-after-lora", "full-after-lora", "lora-after-full"],
)
def test_warm_trial_equals_fresh_build(tmp_path: Path, before: list[list[str]], after: list[str]) -> None:
    warm = Warm()
    for i, overrides in enumerate(before):
        _fit(overrides, tmp_path / f"before{i}", warm)
        _kept_state_is_loaded(warm)
    warm_result = _fit(after, tmp_path / "warm", warm)
    assert warm.hits == len(before) and warm.misses == 1  # the last trial really ran on the kept model
    _kept_state_is_loaded(warm)
    fresh = _fit(after, tmp_path / "fresh")
    _same(warm_result, fresh)


def test_warm_reloads_when_model_or_data_changes(tmp_path: Path) -> None:
    warm = Warm()
    _, base = compose(TINY + LORA_A)
    _, wider = compose(TINY + LORA_A + ["model.tiny.hidden_size=48"])
    _, fewer = compose(TINY + LORA_A + ["data.max_val_examples=8"])
    model, _, data = warm.take(base)
    warm.give_back()
    assert warm.take(base)[0] is model and (warm.hits, warm.misses) == (1, 1)
    warm.give_back()
    wide_model, _, _ = warm.take(wider)  # model.* changed: another model
    warm.give_back()
    assert warm.misses == 2 and wide_model is not model and wide_model.config.hidden_size == 48
    _, _, few = warm.take(fewer)  # data.* changed: other rows (and the model is loaded again with them)
    warm.give_back()
    assert warm.misses == 3 and len(few.val) == 8 < len(data.val)
    with pytest.raises(RuntimeError, match="give_back first"):
        warm.take(base)
        warm.take(base)


def test_method_without_undo_is_dropped(tmp_path: Path) -> None:
    warm = Warm()
    _fit(["method=bitfit", "optim.lr=1e-3"], tmp_path / "bitfit", warm)
    assert warm.entry is None  # BitFit trains (and may add) biases in place: loaded afresh next time
    _fit(LORA_A, tmp_path / "lora", warm)
    assert warm.misses == 2 and warm.entry is not None


def _study(tmp_path: Path, name: str, space: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"# python -m lora_lab.sweep sweep={path}\nname: {name}\nsampler: random\npruner: none\n"
        f"compare_full: false\nn_trials: 4\nspace:\n{space}"
    )
    return str(path)


def test_sweep_warm_and_cold_give_the_same_trials_and_reload_on_model_change(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = (
        "  lora.r: {type: categorical, choices: [4, 8]}\n"
        "  model.tiny.hidden_size: {type: categorical, choices: [32, 48]}\n"
        "  optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n"
    )
    values = {}
    for mode in ("true", "false"):
        name = f"warm-{mode}"
        code = cli.main([f"sweep={_study(tmp_path, name, space)}", f"sweep.warm={mode}", *TINY])
        assert code == 0
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{outputs / 'optuna.db'}")
        trials = sorted(study.get_trials(), key=lambda t: t.number)
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
        values[mode] = [(t.params, t.values) for t in trials]
        came_warm = [t.user_attrs["warm"] for t in trials]
        if mode == "false":
            assert not any(came_warm)
        else:  # warm exactly when the previous trial ran the same model shape
            sizes = [t.params["model.tiny.hidden_size"] for t in trials]
            assert came_warm == [False] + [a == b for a, b in zip(sizes, sizes[1:])]
            assert True in came_warm and False in came_warm[1:]  # this seed's trials both reuse and reload
        out = capsys.readouterr().out
        assert "trials/hour" in out and "device busy" in out
    # Same sampler seed, same proposals; warm and cold give the same numbers.
    assert [p for p, _ in values["true"]] == [p for p, _ in values["false"]]
    for (_, a), (_, b) in zip(values["true"], values["false"]):
        assert a == pytest.approx(b, abs=1e-6, rel=0)


def test_throughput_counts_this_invocations_trials(tmp_path: Path) -> None:
    import datetime

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="tp")
    t0 = datetime.datetime.now()
    for device, busy in [("h:cpu", 30.0), ("h:cpu", 40.0), ("h:cuda:1", 50.0)]:
        study.add_trial(
            optuna.trial.create_trial(
                value=1.0,
                user_attrs={"device": device, "train_time_s": busy - 10, "eval_time_s": 10.0},
            )
        )
    start = t0.timestamp()
    rate = throughput(study, (start, start + 100.0))
    assert rate.trials == 3 and rate.trials_per_hour == pytest.approx(108.0)
    assert rate.per_device == pytest.approx({"h:cpu": 0.7, "h:cuda:1": 0.5})
    assert rate.busy_share == pytest.approx(0.6)
    metrics = throughput_metrics(rate)
    assert metrics["perf/trials_per_hour"] == pytest.approx(108.0) and metrics["perf/busy_share"] == 0.6
    assert metrics["perf/busy_share/h_cuda_1"] == 0.5
    assert throughput(study, (start + 3600, start + 3700)) is None  # none of them ran in that phase
