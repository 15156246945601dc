"""One Markdown table writer, shared by the sweep's outputs, the MLflow descriptions and the report (a leaf: stdlib)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

Column = tuple[str, str, str]  # (row key, header, format spec such as "{:.4f}"; "" for str())


def text(value: Any, fmt: str = "") -> str:
    """A value as table text, in any format: '-' for a missing value, numbers through `fmt`, anything else str()."""
    if value is None or value == "":
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def cell(value: Any, fmt: str = "") -> str:
    """One Markdown cell: `text(value, fmt)` with '|' escaped so it cannot end the cell."""
    return text(value, fmt).replace("|", "\\|")


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table of `rows` (dicts) with `columns` (key, header, format)."""
    head = "| " + " | ".join(h.replace("|", "\\|") for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
