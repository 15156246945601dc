"""A full disk for the fault tests: a small tmpfs where this machine lets the tests mount one, and a way to fill it."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, *, read_only: bool = False) -> Iterator[Optional[Path]]:
    """A tmpfs of `size` ("64k", "8m"; read-only if asked) mounted at `folder` (made if missing) for the block, or
    None where this machine does not let the tests mount one (not root, a container without the right): the callers
    that need a real full disk skip then, the others inject ENOSPC."""
    folder.mkdir(parents=True, exist_ok=True)
    options = ("ro," if read_only else "") + f"size={size}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(path: Path) -> Path:
    """Write `path` until the filesystem holding it has no byte left (unbuffered: nothing left to fail on close)."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return path
