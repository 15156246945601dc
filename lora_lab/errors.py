"""How an exception reads in a one-line message for people: its first line (a leaf: stdlib only)."""

from __future__ import annotations


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first non-empty line of `exc`'s message (its type's name when it has none); `with_type` puts the type
    first: 'OSError: [Errno 28] No space left on device'."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__
