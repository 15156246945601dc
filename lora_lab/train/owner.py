"""One owner per run folder: an exclusive flock on `<folder>/.owner.lock`, held for the run, the owner's PID inside.

Two processes writing one output_dir would leave one run's metrics.json and adapter under two MLflow runs. So
`python -m lora_lab.train` claims its folder before it opens an MLflow run: a folder a live process holds is refused
(`FolderBusy`, exit 2, naming that process's PID). The lock is the kernel's (fcntl.flock): it goes with the process
that held it, however that process ended, so a stale lock file left by a dead run is simply taken over; the PID
written into it only serves the message. It is the same file sweep trial folders are locked with, so a plain run
and a sweep trial never share a folder either. flock may not exclude across hosts on some network filesystems.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any, Optional

from lora_lab.files import write_error

log = logging.getLogger("lora_lab")

OWNER_FILE = ".owner.lock"  # the file sweep trial folders lock too


class FolderBusy(RuntimeError):
    """The run folder is held by another live process (its PID, when it wrote one). The command exits 2."""

    def __init__(self, folder: Path, pid: str) -> None:
        who = f"PID {pid}" if pid else "another process"
        super().__init__(
            f"output_dir={folder} is in use by a live run ({who}); wait for it to end, or give another output_dir"
        )
        self.folder, self.pid = folder, pid


class FolderClaim:
    """A held claim on a run folder; `release()` (or leaving the `with`) lets it go. The kernel lets it go too
    when the process ends."""

    def __init__(self, folder: Path, handle: Optional[IO[str]]) -> None:
        self.folder, self.handle = folder, handle

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        if self.handle is not None:
            self.handle.close()  # closing the only descriptor drops the flock
            self.handle = None

    def __enter__(self) -> "FolderClaim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim(folder: Path) -> FolderClaim:
    """Claim `folder` (created if missing) for this process. Raises FolderBusy when a live process holds it, a
    files.WriteError when it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / OWNER_FILE, "a+")
    except OSError as exc:
        raise write_error(folder, exc) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        handle.close()
        raise FolderBusy(folder, pid) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        log.info("output_dir %s: taking over from PID %s, which has ended", folder, previous)
    try:  # the PID is for other processes' messages only: a full disk must not stop the run here
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        pass
    return FolderClaim(folder, handle)
