"""A study file is checked whole before anything exists (space sampled once, grid, name), a broken configuration does
not eat the budget of the fixed one, paths with odd characters are quoted, and one name means one study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_lab.config import ConfigError, load_sweep
from lora_lab.sweep import cli, objective

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.eval_at_start=false",
    "tracking.system_metrics=false",
]
QUICK = ["sweep.compare_full=false", "sweep.pruner=none"]


def _file(tmp_path: Path, name: str, body: str, file: str | None = None) -> Path:
    path = tmp_path / f"{file or name}.yaml"
    path.write_text(f"# python -m lora_lab.sweep sweep={path}\nname: {name}\n" + body)
    return path


def _nothing_created(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if out.exists() else []
    assert not files, f"created: {files[:5]}"


@pytest.mark.parametrize(
    "space,sampler,expect",
    [
        # class 4: found only by the grid sampler, after optuna.db and mlflow.db existed
        ("optim.lr: {type: float, low: 1.0e-4, high: 1.0e-3}", "grid", ["sweep.space.optim.lr", "step"]),
        # class 5: each of these failed every trial (or exited 0) instead of failing at load
        ("optim.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true, step: 1.0e-4}", "tpe", ["log-scaled", "step"]),
        (
            "lora.targets: {type: categorical, choices: [q_proj, v_proj]}\n  lora.alpha: {type: tied, of: lora.targets,"
            " ratio: 2}",
            "random",
            ["sweep.space.lora.alpha.of", "numbers", "q_proj"],
        ),
        (
            "lora.r: {type: categorical, choices: [4, 8, 16]}\n  lora.alpha: {type: map, of: lora.r, map: {'4': 8}}",
            "random",
            ["sweep.space.lora.alpha.map", "lora.r=8, 16"],
        ),
        (
            "lora.r: {type: int, low: 4, high: 8}\n  lora.dropout: {type: map, of: optim.lr, map: {'4': 0.1}}\n"
            "  optim.lr: {type: float, low: 1.0e-4, high: 1.0e-3}",
            "random",
            ["sweep.space.lora.dropout.of", "finite set"],
        ),
    ],
)
def test_space_errors_are_found_at_load_and_nothing_is_created(
    space: str, sampler: str, expect: list[str], tmp_path: Path, outputs: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _file(tmp_path, "bad", f"sampler: {sampler}\nn_trials: 2\nspace:\n  {space}\n")
    assert cli.main([f"sweep={path}", *TINY, *QUICK]) == 2
    err = capsys.readouterr().err
    for word in expect:
        assert word in err, f"{word!r} not in {err}"
    _nothing_created(outputs)


@pytest.mark.parametrize("name", ['it"s', "it's", "../../x", "a/b", "ré", "..", "-x", ""])
def test_study_name_is_validated(name: str) -> None:
    with pytest.raises(ConfigError, match="sweep.name"):
        load_sweep("default", [f"name='{name}'" if "'" not in name else f'name="{name}"'])


def test_a_broken_configuration_does_not_eat_the_budget_of_the_fixed_one(
    tmp_path: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(
        tmp_path, "fixme", "n_trials: 3\nsampler: random\nspace:\n  lora.r: {type: categorical, choices: [2, 4]}\n"
    )

    def broken(cfg):  # the cause the user then fixes (say, a data file): every trial fails the same way
        raise RuntimeError("broken data file")

    monkeypatch.setattr(objective, "build", broken)
    assert cli.main([f"sweep={path}", *TINY, "tracking=off", *QUICK]) == 1
    monkeypatch.undo()
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(outputs))
    assert cli.main([f"sweep={path}", *TINY, "tracking=off", *QUICK]) == 0
    study = optuna.load_study(study_name="fixme", storage=f"sqlite:///{outputs / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 3 and states.count(TrialState.COMPLETE) == 3, states


def test_odd_outputs_path_is_quoted_and_one_name_is_one_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    out = tmp_path / "résultats d'été [1]"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(out))
    first = _file(tmp_path, "same", "n_trials: 1\nspace:\n  lora.r: {type: categorical, choices: [2, 4]}\n", "first")
    assert cli.main([f"sweep={first}", *TINY, *QUICK]) == 0
    study = optuna.load_study(study_name="same", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    assert (out / "studies" / "same" / "trials" / "0000" / "metrics.json").is_file()
    capsys.readouterr()

    second = _file(tmp_path, "same", "n_trials: 2\nspace:\n  lora.r: {type: categorical, choices: [8]}\n", "second")
    assert cli.main([f"sweep={second}", *TINY, *QUICK]) == 2
    err = capsys.readouterr().err
    assert str(first) in err and str(second) in err and "sweep.name" in err, err
    # the same file with other trial overrides is another study too; the unchanged command still resumes
    assert cli.main([f"sweep={first}", *TINY, "lora.dropout=0.1", *QUICK]) == 2
    assert "has changed" in capsys.readouterr().err
    assert cli.main([f"sweep={first}", *TINY, *QUICK, "sweep.n_trials=1"]) == 0
    assert len(study.get_trials()) == 1
