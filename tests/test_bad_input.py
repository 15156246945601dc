"""Bad input: exit code 2, a message that names what is wrong and what was expected, and nothing created (no Optuna
study, no MLflow run, no output folder with files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sweeprun import REPO

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking.system_metrics=false"]


def _nothing_created(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if out.exists() else []
    assert not files, f"created: {files[:5]}"  # no optuna.db, no mlflow.db, no run or study folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def out(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return folder


def _check(entry: str, argv: list[str], expect: list[str], out: Path, capsys) -> None:
    from lora_lab import train
    from lora_lab.sweep import cli

    main = train.main if entry == "train" else cli.main
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for word in expect:
        assert word in err, f"{word!r} not in: {err}"
    _nothing_created(out)


TRAIN_CASES = {
    "unknown key": (["trainer.bogus_key=1"], ["trainer.bogus_key", "unknown key", "expected one of"]),
    "wrong type": (["lora.r=abc"], ["lora.r", "abc"]),
    "r <= 0": (["lora.r=0"], ["lora.r", "expected an integer >= 1"]),
    "alpha <= 0": (["lora.alpha=0"], ["lora.alpha", "expected a number > 0"]),
    "dropout >= 1": (["lora.dropout=1.0"], ["lora.dropout", "[0, 1)"]),
    "dropout < 0": (["lora.dropout=-0.1"], ["lora.dropout", "[0, 1)"]),
    "lr <= 0": (["optim.lr=0"], ["optim.lr", "expected a number > 0"]),
    "target matches nothing": (["lora.targets=[no_such_proj]"], ["no_such_proj"]),
    "unknown model": (["model.name=no_such_model_xyz"], ["model.name", "no_such_model_xyz"]),
    "unknown dataset": (["data.name=no_such_dataset_xyz"], ["data.name", "no_such_dataset_xyz"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_rejects(case, out, capsys):
    argv, expect = TRAIN_CASES[case]
    _check("train", [*TINY, *argv], expect, out, capsys)


def test_dataset_missing_its_text_column_and_empty_dataset(tmp_path, out, capsys):
    rows = _write(
        tmp_path / "rows.jsonl", "\n".join('{"body": "good film %d", "label": %d}' % (i, i % 2) for i in range(40))
    )
    _check("train", [*TINY, f"data.name={rows}"], ["data.text_column", "'text'", "body"], out, capsys)
    empty = _write(tmp_path / "empty.jsonl", "")
    _check("train", [*TINY, f"data.name={empty}"], ["data.name", "empty"], out, capsys)


SPACE = """overrides: [trainer.max_steps=2]
space:
{entry}
n_trials: 2
compare_full: false
"""


@pytest.mark.parametrize(
    "entry,expect",
    [
        ("  optim.lr: {type: float, low: 1.0e-2, high: 1.0e-3}", ["sweep.space.optim.lr", "low <= high"]),
        ("  lora.r: {type: categorical, choices: []}", ["sweep.space.lora.r.choices", "non-empty list"]),
        ("  lora.r: {type: categorical, choices: [0, 4]}", ["lora.r=0", "expected an integer >= 1"]),
    ],
)
def test_sweep_rejects_bad_spaces(entry, expect, tmp_path, out, capsys):
    path = _write(tmp_path / "bad_space.yaml", SPACE.format(entry=entry))
    _check("sweep", [f"sweep={path}", *TINY], expect, out, capsys)


def test_sweep_rejects_unreachable_storage_and_bad_train_override(out, capsys):
    _check(
        "sweep",
        ["sweep.storage=postgresql+psycopg2://nobody@127.0.0.1:1/nodb", *TINY],
        ["sweep.storage", "cannot open it"],
        out,
        capsys,
    )
    _check("sweep", ["sweep.n_trials=0", *TINY], ["sweep.n_trials", "expected an integer >= 1"], out, capsys)
    _check("sweep", ["lora.alpha=-1", *TINY], ["lora.alpha", "expected a number > 0"], out, capsys)


def test_adapter_file_of_wrong_shape_or_truncated(tmp_path, build_tiny):
    """load_adapter names the file and what it expected; the entry points turn its ValueError into exit code 2."""
    from lora_lab import lora, peft_io

    model = build_tiny("llama")
    lora.apply_lora(model, r=4, alpha=8, targets=("q_proj",))
    lora.save_adapter(model, tmp_path / "good")
    other = build_tiny("llama")
    lora.apply_lora(other, r=8, alpha=8, targets=("q_proj",))
    lora.save_adapter(other, tmp_path / "r8")
    weights = (tmp_path / "r8" / peft_io.ADAPTER_WEIGHTS).read_bytes()
    (tmp_path / "good" / peft_io.ADAPTER_WEIGHTS).write_bytes(weights)  # r=8 tensors beside an r=4 config
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors: mis-shaped keys.*file \(8, 32\) vs model \(4, 32\)"
    ):
        lora.load_adapter(build_tiny("llama"), tmp_path / "good")
    (tmp_path / "r8" / peft_io.ADAPTER_WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: corrupt or truncated safetensors file"):
        lora.load_adapter(build_tiny("llama"), tmp_path / "r8")


@pytest.mark.slow
def test_cli_exit_code_2_through_subprocess(tmp_path):
    """The real command lines: an unknown key for train, a sweep file that is not valid YAML."""
    out = tmp_path / "out"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-m", "lora_lab.train", *TINY, "lora.rank=8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "lora.rank" in p.stderr and "expected one of" in p.stderr, p.stderr[-2000:]
    bad = _write(tmp_path / "broken.yaml", "space:\n  lora.r: {type: categorical, choices: [4, 8\n")
    p = subprocess.run(
        [sys.executable, "-m", "lora_lab.sweep", f"sweep={bad}", *TINY],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and str(bad) in p.stderr and "not valid YAML" in p.stderr, p.stderr[-2000:]
    _nothing_created(out)


def _unwritable_cases(tmp_path: Path) -> dict[str, tuple[str, list[str], dict[str, str], list[str]]]:
    """entry, argv, environment, expected words: outputs that cannot be written are exit 2 with the path and why."""
    a_file = _write(tmp_path / "a_file", "not a folder")
    long = "a" * 300
    return {
        "output_dir is a file": ("train", [f"output_dir={a_file}"], {}, ["output_dir", str(a_file), "is a file"]),
        "output_dir under a file": (
            "train",
            [f"output_dir={a_file}/run"],
            {},
            ["output_dir", f"{a_file}/run", "is a file"],
        ),
        "outputs root is a file (train)": ("train", [], {"LORA_LAB_OUTPUTS": str(a_file)}, ["LORA_LAB_OUTPUTS"]),
        "outputs root is a file (sweep)": ("sweep", [], {"LORA_LAB_OUTPUTS": str(a_file)}, ["LORA_LAB_OUTPUTS"]),
        "outputs root read-only (sweep)": (
            "sweep",
            [],
            {"LORA_LAB_OUTPUTS": "/sys/lora_lab_outputs"},
            ["LORA_LAB_OUTPUTS", "/sys/lora_lab_outputs", "Permission denied"],
        ),
        "journal under a file": (
            "sweep",
            [f"sweep.storage=journal://{a_file}/study.journal"],
            {},
            ["sweep.storage", str(a_file)],
        ),
        # A 300-character folder name: in a folder that exists (the file system says so at once), or under one
        # still to be made (the run's own check, before anything is written).
        "output_dir name too long": ("train", [f"output_dir={tmp_path / long}"], {}, ["255", "shorter output_dir"]),
        "output_dir name too long, deeper": (
            "train",
            [f"output_dir={tmp_path / 'new' / long / 'run'}"],
            {},
            ["output_dir", "300 bytes", "255", "shorter output_dir"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "output_dir is a file",
        "output_dir under a file",
        "outputs root is a file (train)",
        "outputs root is a file (sweep)",
        "outputs root read-only (sweep)",
        "journal under a file",
        "output_dir name too long",
        "output_dir name too long, deeper",
    ],
)
def test_unwritable_outputs_are_exit_2_with_path_and_reason(case, tmp_path, out, capsys, monkeypatch):
    entry, argv, env, expect = _unwritable_cases(tmp_path)[case]
    if "read-only" in case and os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("no read-only folder here")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _check(entry, [*TINY, *argv], expect, out, capsys)
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_empty_or_foreign_storage_beside_a_studys_mlflow_runs_is_exit_2(tmp_path, out, capsys):
    from lora_lab.sweep import cli

    quick = ["sweep.n_trials=1", "sweep.compare_full=false", "sweep.pruner=none", "trainer.max_steps=2"]
    quick += ["trainer.eval_every=2", "trainer.eval_at_start=false"]
    assert cli.main([*TINY, *quick]) == 0
    capsys.readouterr()
    db, runs = out / "optuna.db", out / "mlflow.db"
    before = runs.stat().st_size
    foreign = tmp_path / "foreign.db"
    foreign.write_bytes(db.read_bytes())
    import optuna

    optuna.delete_study(study_name="default", storage=f"sqlite:///{foreign}")
    db.write_bytes(b"")  # a 0-byte optuna.db, as left by a full disk or a bad copy
    for argv in ([], [f"sweep.storage=sqlite:///{foreign}"]):
        assert cli.main([*TINY, *quick, *argv]) == 2
        err = capsys.readouterr().err
        assert "sweep.storage" in err and "MLflow runs" in err and "sweep.name" in err, err
    assert runs.stat().st_size == before  # no duplicate children under the old parent
    assert not optuna.get_all_study_names(f"sqlite:///{db}")
