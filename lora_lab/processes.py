"""A child process's tie to the process that started it: a sweep's workers to their launcher, a hosted group's ranks
to the sweep worker that hosts them. Standard library only."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


def die_with(parent_pid: int) -> None:
    """Stop this process (SIGTERM: a run ends interrupted, its checkpoints kept) when `parent_pid`, the process that
    started it, dies, even by SIGKILL, instead of running on unseen. Linux: the kernel sends the signal (prctl
    PR_SET_PDEATHSIG); elsewhere a thread watches the parent's pid. At once if the parent is gone already."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # it died before the watch began
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lora_lab-parent-watch", daemon=True).start()
