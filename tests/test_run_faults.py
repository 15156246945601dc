"""A run the machine fails (issue 24, items 1 and 16): a full disk at a checkpoint or at metrics.json, a lost
tracking server, memory run out. `python -m lora_lab.train` prints one line, `lora_lab.train: error: <message>`,
exits 1, never a traceback; the last good checkpoint stays good and loads; no temp file is left behind.

The full disk is a small tmpfs filled up at the chosen write (where this machine lets root mount one), else an
injected ENOSPC at the same write."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from disks import fill_disk, tmpfs

from lora_lab import files
from lora_lab.config import compose
from lora_lab.train import cli, session
from lora_lab.train.build import build
from lora_lab.train.checkpoint import Checkpointer
from lora_lab.train.cli import main

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking=off"]


@dataclass
class Disk:
    root: Path  # where the run's folder goes
    fill: Callable[[], None]  # from now on, writes there fail with ENOSPC
    free: Callable[[], None]  # and from now on they succeed again


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    with tmpfs(tmp_path / "small", "8m") as mnt:
        if mnt is None:  # no mount here: the same writes fail with an injected ENOSPC
            import safetensors.torch

            def inject() -> None:
                monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
                monkeypatch.setattr(files.os, "fsync", _enospc)

            yield Disk(tmp_path, inject, monkeypatch.undo)
            return
        filler = mnt / "filler"
        yield Disk(mnt, lambda: fill_disk(filler), lambda: filler.unlink(missing_ok=True))


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name or ".old-" in p.name]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(
    disk: Disk, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = disk.root / "run"
    save = Checkpointer.save

    def save_on_a_full_disk(self: Checkpointer, step: int, history: list, evals: list) -> Path:
        if step == 4:
            disk.fill()
        return save(self, step, history, evals)

    monkeypatch.setattr(Checkpointer, "save", save_on_a_full_disk)
    argv = [*TINY, "trainer.max_steps=8", "trainer.checkpoint_every=2", f"output_dir={run}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"lora_lab.train: error: cannot write {run}/checkpoints/step-0000004: no space left on device" in err
    assert f"the last good checkpoint {run}/checkpoints/step-0000002 is kept: trainer.resume=true" in err
    assert "Traceback" not in err
    assert _temp_files(run) == [] and (run / "checkpoints" / "LATEST").read_text() == "step-0000002"
    disk.free()
    monkeypatch.setattr(Checkpointer, "save", save)
    fresh = build(compose([*argv, "trainer.resume=true"])[1])
    optimizer, scheduler = fresh.make_optimizer()
    ckpt = Checkpointer(run / "checkpoints", fresh.model, optimizer, scheduler, full=False, cfg=fresh.cfg)
    state = ckpt.load_latest()
    assert state is not None and state["step"] == 2 and not (run / "checkpoints" / "bad").exists()
    assert main([*argv, "trainer.resume=true"]) == 0  # and the same command resumes it to the end


def test_a_full_disk_at_metrics_json_is_one_line_naming_it(
    disk: Disk, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = disk.root / "run"
    write = session.write_metrics

    def write_on_a_full_disk(record, out: Path) -> None:  # noqa: ANN001
        disk.fill()
        write(record, out)

    monkeypatch.setattr(session, "write_metrics", write_on_a_full_disk)
    assert main([*TINY, f"output_dir={run}"]) == 1
    err = capsys.readouterr().err
    line = f"lora_lab.train: error: cannot write {run}/metrics.json: no space left on device; kept in {run}: "
    assert line + "config.yaml, adapter" in err and "Traceback" not in err
    assert not (run / "metrics.json").exists() and _temp_files(run) == []


@pytest.mark.parametrize(
    "error,words",
    [
        (MemoryError(), ["out of memory: the process ran out of host memory (RAM)", "trainer.batch_size"]),
        (
            "torch.OutOfMemoryError",
            ["out of memory: the GPU ran out of device memory (CUDA out of memory. Tried", "trainer.grad_accum"],
        ),
        ("TrackingUnreachable", ["tracking server http://127.0.0.1:9 unreachable since"]),
        (OSError(errno.EIO, "Input/output error", "/data/x"), ["/data/x: Input/output error"]),
    ],
)
def test_machine_failures_exit_1_with_one_line(
    error: object, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch

    from lora_lab.tracking import TrackingUnreachable

    if error == "torch.OutOfMemoryError":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    elif error == "TrackingUnreachable":
        error = TrackingUnreachable("tracking server http://127.0.0.1:9 unreachable since 12:00:00")

    def fail(session, resolved):  # noqa: ANN001
        session.close()
        raise error

    monkeypatch.setattr(cli, "fit_tracked", fail)
    assert main([*TINY, f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora_lab.train: error: ") or "\nlora_lab.train: error: " in err
    for word in words:
        assert word in err, err
    assert "Traceback" not in err


def test_any_other_error_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(session, resolved):  # noqa: ANN001
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "fit_tracked", fail)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback: it is for us to read
        main([*TINY, f"output_dir={tmp_path / 'run'}"])
