"""Writes on a full disk (issue 24, item 1): a small tmpfs where this machine lets root mount one, an injected
ENOSPC elsewhere. Every writer fails with one WriteError that names the path and the cause, keeps the previous file or
folder whole, and leaves no temp file behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lora_lab import files
from lora_lab.files import WriteError, atomic_dir, atomic_write


def test_atomic_write_on_a_full_disk_names_the_path_and_keeps_the_old_file(small_disk: Path) -> None:
    target = small_disk / "metrics.json"
    atomic_write(target, b"old")
    with pytest.raises(WriteError) as info:
        atomic_write(target, b"x" * (1 << 20))
    msg = str(info.value)
    assert str(target) in msg and "no space left on device" in msg and "previous metrics.json is unchanged" in msg
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in small_disk.iterdir()) == ["metrics.json"]  # no temp file left


def test_atomic_dir_on_a_full_disk_keeps_the_previous_folder(small_disk: Path) -> None:
    import safetensors.torch
    import torch

    folder = small_disk / "adapter"
    with atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(WriteError, match="adapter: no space left on device"):
        with atomic_dir(folder) as tmp:  # safetensors raises its own error type: the full disk is still named
            safetensors.torch.save_file({"w": torch.zeros(64, 1024)}, str(tmp / "w.safetensors"))
    assert (folder / "a.txt").read_text() == "v1" and sorted(p.name for p in small_disk.iterdir()) == ["adapter"]


def test_an_injected_enospc_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(WriteError, match="cannot write .*x.json: no space left on device"):
        atomic_write(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_a_plain_files_mode(tmp_path: Path) -> None:
    """Others read these files (an adapter, a report page): not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
