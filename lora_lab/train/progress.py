"""Progress where it is read: a live tqdm bar on a terminal, plain periodic lines in a log file.

A bar redraws itself with carriage returns and cursor codes: on a terminal that is one live line, in a log file
(`python -m lora_lab.train > log 2>&1`, a batch job) it is hundreds of `\\r`-joined fragments. So `progress_bar`
gives a tqdm bar only where its stream is a terminal (or a notebook), and elsewhere `ProgressLines`: one plain line
at most every `every_s` seconds, and at least that often while the bar is open (a heartbeat thread writes one when
no step came, e.g. during a long evaluation), plus a last line at the end. Both take the same calls (update,
set_postfix, refresh, close; n and total), so the loop and the sweep's study bar do not care which they got.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

LINE_EVERY_S = 10.0  # a log line this often: well inside "one every 30 s", far from flooding a log

# How the loop's postfix keys read in a line (tqdm's bar keeps the short keys).
LABELS = {"loss": "train loss", "val": "val loss", "tok_s": "tokens/s"}


def live(stream: TextIO) -> bool:
    """Whether a live bar suits `stream`: a terminal, or stderr/stdout inside a notebook kernel (tqdm.auto draws a
    widget there)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules and stream in (sys.stdout, sys.stderr)


def progress_bar(
    total: Optional[int],
    initial: int = 0,
    *,
    enabled: bool = True,
    desc: str = "",
    unit: str = "step",
    stream: Optional[TextIO] = None,
    every_s: float = LINE_EVERY_S,
    **tqdm_options: Any,
) -> Any:
    """A progress display on `stream` (default stderr): tqdm on a terminal, `ProgressLines` elsewhere, a disabled
    tqdm when `enabled` is false. `tqdm_options` (leave, position, ...) go to tqdm only."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if enabled and not live(stream):
        return ProgressLines(total, initial, desc=desc, unit=unit, stream=stream, every_s=every_s)
    options = {"dynamic_ncols": True, "leave": False, **tqdm_options}
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, file=stream, **options)


def clock_text(seconds: float) -> str:
    """Seconds as h:mm:ss (m:ss under an hour)."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines:
    """Progress as plain lines for a log: `<desc>: step n/total (p%), train loss .., val loss .., tokens/s ..,
    elapsed m:ss, ETA m:ss`. No carriage return, no cursor code.

    A line is written when `every_s` seconds passed since the last one, checked at every update and refresh and by
    a heartbeat thread (`heartbeat=False` leaves it out: tests drive `tick()` with a fake `clock`); `close()` writes
    the last line when steps were made since the previous one. Postfix values are merged, so a value stays shown
    until it is replaced (the val loss between evaluations)."""

    def __init__(
        self,
        total: Optional[int],
        initial: int = 0,
        *,
        desc: str = "",
        unit: str = "step",
        stream: Optional[TextIO] = None,
        every_s: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        self.total, self.n, self.initial = total, initial, initial
        self.desc, self.unit, self.stream, self.every_s, self.clock = desc, unit, stream or sys.stderr, every_s, clock
        self.postfix: dict[str, str] = {}
        self.started = self.last = clock()
        self.last_n: Optional[int] = None  # the step the last line showed (None: no line yet)
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="progress-lines", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s / 4):
            self.tick()

    def update(self, n: int = 1) -> None:
        """`n` more steps done."""
        self.n += n
        self.tick()

    def set_postfix(self, ordered_dict: Optional[dict[str, Any]] = None, refresh: bool = True, **values: Any) -> None:
        """Values shown after the count (tqdm's call): merged into those already shown."""
        with self._lock:
            self.postfix.update({k: str(v) for k, v in {**(ordered_dict or {}), **values}.items()})
        if refresh:
            self.tick()

    def refresh(self) -> None:
        """Write a line if one is due."""
        self.tick()

    def tick(self) -> None:
        """Write a line when `every_s` seconds passed since the last one."""
        with self._lock:
            if not self.closed and self.clock() - self.last >= self.every_s:
                self._write()

    def close(self) -> None:
        """Stop the heartbeat; write the last line when steps were made since the previous line."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if not self.closed and self.n != (self.last_n if self.last_n is not None else self.initial):
                self._write()
            self.closed = True

    def line(self) -> str:
        """The line for the current state."""
        now = self.clock()
        elapsed = now - self.started
        count = f"{self.unit} {self.n}" + (f"/{self.total}" if self.total else "")
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        parts += [f"{LABELS.get(k, k)} {v}" for k, v in self.postfix.items()]
        parts.append(f"elapsed {clock_text(elapsed)}")
        done = self.n - self.initial
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {clock_text((self.total - self.n) * elapsed / done)}")
        return ", ".join(parts)

    def _write(self) -> None:
        text = self.line()
        self.last, self.last_n = self.clock(), self.n
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full log must not end the run
            pass

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
