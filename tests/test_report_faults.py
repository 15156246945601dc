"""`python -m lora_lab.report` on bad input and faults (issue 24, items 1, 5 and 9): a study with a trial that diverged
at its first step is reported (the trial left out of every table and listed with its reason) and its best LR found;
an --out that cannot be a folder, an unknown study or experiment exit 2 with one line and write nothing; a full disk
exits 1 with one line naming the file, the cause and what was kept, and the previous report stays whole."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from disks import tmpfs
from report_fixture import FAULT_STUDY, fault_store

from lora_lab import files, records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LAB_OUTPUTS", str(root / "outputs"))
        yield {"root": root, "uri": fault_store(root)}


def report(store: dict, out: Path, *more: str) -> int:
    from lora_lab.report.__main__ import main

    return main(["--tracking-uri", store["uri"], "--study", FAULT_STUDY, "--out", str(out), "--no-attach", *more])


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("lora_lab.report: error: "), err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_curve_without_a_point_reads_as_nan_for_a_run_that_did_not_complete() -> None:
    # The report crashed here: a trial that diverged at its first step logged no perf/tokens_per_s point.
    latest = {
        "train/steps": 1.0,
        "params/trainable": 10.0,
        "params/total": 100.0,
        "perf/peak_mem_bytes": 1.0,
        "perf/time_per_step_s": 0.1,
        "time/train_s": 0.1,
        "time/eval_s": 0.1,
        "time/setup_s": 0.1,
    }
    res = records.results_from_metrics(latest, "diverged", "non-finite training loss at step 1")
    assert math.isnan(res.tokens_per_s) and math.isnan(res.val_loss) and res.steps == 1
    with pytest.raises(records.RecordError, match="perf/tokens_per_s"):  # a completed run must have its throughput
        records.results_from_metrics(latest, "completed", "")


def test_a_diverged_trial_is_left_out_and_listed(store: dict, tmp_path: Path, capsys) -> None:
    from lora_lab.report.__main__ import main
    from lora_lab.report.render import read_csv

    out = tmp_path / "report"
    assert report(store, out) == 0
    lr = {r["curve"]: r for r in read_csv(out / "lr.csv")}
    assert float(lr["LoRA r=2"]["best LR"]) == pytest.approx(3e-2)  # the COMPLETE trials only
    assert lr["LoRA r=2"]["LRs tried"] == "3e-3 3e-2"
    methods = {r["method"]: r for r in read_csv(out / "methods.csv")}
    assert float(methods["LoRA (best)"]["val loss"]) == pytest.approx(0.58)
    md = (out / "report.md").read_text()
    left = md[md.index("### Runs left out") :]
    assert "| f_lora/trial-2 | FAIL | 1 | diverged: non-finite training loss at step 1 |" in left
    assert "| f_lora/trial-3 | PRUNED | 2 | pruned at step 2 |" in left
    assert "trial-0" not in left and "trial-1" not in left
    capsys.readouterr()
    assert main(["best-lr", "--tracking-uri", store["uri"], "--study", FAULT_STUDY]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(3e-2)
    assert main(["best-lr", "--tracking-uri", store["uri"], "--study", FAULT_STUDY, "--where", "lora.r"]) == 2
    assert "expected KEY=VALUE" in one_error_line(capsys)


def test_out_is_a_file_exits_2_naming_it(store: dict, tmp_path: Path) -> None:
    # Through the real command line: exit code, one line on stderr, no traceback, the file untouched.
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    env = {**os.environ, "LORA_LAB_OUTPUTS": str(store["root"] / "outputs")}
    args = ["--tracking-uri", store["uri"], "--study", FAULT_STUDY, "--out", str(target), "--no-attach"]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.report", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"lora_lab.report: error: --out {target} is a file; expected a folder for the report's files"
    )
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_inside_a_file_exits_2(store: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert report(store, tmp_path / "notes.txt" / "report") == 2
    err = one_error_line(capsys)
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in err and "expected a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_through_a_symlink_loop_or_a_device_exits_2(store: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert report(store, tmp_path / "loop" / "report") == 2
    assert f"{tmp_path / 'loop'} is a symbolic link that leads nowhere (broken or a loop)" in one_error_line(capsys)
    assert report(store, Path(os.devnull)) == 2
    assert f"--out {os.devnull} is a device, socket or pipe; expected a folder" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def test_a_store_that_is_not_a_database_exits_2(tmp_path: Path, capsys) -> None:
    from lora_lab.report.__main__ import main

    (tmp_path / "mlflow.db").write_text("not a database")
    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "report")]) == 2
    assert f"{tmp_path / 'mlflow.db'} is not an SQLite database" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder this user cannot write: a read-only tmpfs for root (who may write anywhere else), else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "64k", read_only=True) as mnt:
        if mnt is None:
            pytest.skip("cannot mount a read-only tmpfs here")
        yield mnt


def test_an_unwritable_out_exits_2(store: dict, read_only: Path, capsys) -> None:
    assert report(store, read_only / "report") == 2
    err = one_error_line(capsys)
    assert f"--out {read_only / 'report'}: {read_only} is " in err
    assert "read-only file system" in err or "not writable" in err
    assert list(read_only.iterdir()) == []


def test_an_unknown_study_or_experiment_writes_nothing(store: dict, tmp_path: Path, capsys) -> None:
    from lora_lab.report.__main__ import main

    out = tmp_path / "new" / "report"
    args = ["--tracking-uri", store["uri"], "--out", str(out), "--no-attach"]
    assert main([*args, "--study", "no_such_study"]) == 2
    assert "study 'no_such_study' has no runs" in one_error_line(capsys)
    assert main([*args, "--experiment", "no_such_experiment"]) == 2
    assert "experiment 'no_such_experiment' has no runs" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_a_full_disk_exits_1_and_keeps_the_previous_report(
    store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "report"
    assert report(store, out) == 0
    before = snapshot(out)
    assert {"report.md", "report.html", "lr.csv", "lr_curves.png"} <= set(before)
    capsys.readouterr()
    with monkeypatch.context() as mp:
        full_disk(mp)
        assert report(store, out) == 1
    err = one_error_line(capsys)
    assert f"cannot write {out}/" in err and "no space left on device" in err
    assert f"the previous report in {out} is unchanged" in err
    assert snapshot(out) == before  # no file replaced, no staging folder left


def test_a_full_disk_on_a_new_folder_leaves_nothing(
    store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "new" / "report"
    full_disk(monkeypatch)
    assert report(store, out) == 1
    err = one_error_line(capsys)
    assert f"cannot write {out}/" in err and "no space left on device; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk(store: dict, small_disk: Path, capsys) -> None:
    # The plots alone are larger than the disk: one of them is the file that did not fit.
    assert report(store, small_disk / "report") == 1
    err = one_error_line(capsys)
    assert f"cannot write {small_disk / 'report'}/" in err and "no space left on device" in err
    assert list(small_disk.iterdir()) == []
