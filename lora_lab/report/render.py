"""Writing tables: Markdown (through lora_lab.markdown), LaTeX and CSV, and the report folder with its report.md."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lora_lab import markdown
from lora_lab.files import atomic_write_text
from lora_lab.report.tables import Table


def to_markdown(t: Table) -> str:
    """A table as a Markdown section: title, caption in italics, the table (lora_lab.markdown.table), notes."""
    return "\n".join([f"### {t.title}", "", f"*{t.caption}*", "", markdown.table(t.rows, t.columns), *t.notes]) + "\n"


# LaTeX's special characters in text mode, and the one non-ASCII sign the captions use.
_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
}


def _tex(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in s)


def to_latex(t: Table) -> str:
    """A table as a LaTeX table float (booktabs rules), caption and label `tab:<name>`."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{" + "l" * len(t.columns) + "}",
        r"\toprule",
        " & ".join(_tex(h) for _, h, _ in t.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(markdown.text(r.get(k), f)) for k, _, f in t.columns) + r" \\" for r in t.rows]
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{" + _tex(t.caption) + "}",
        r"\label{tab:" + t.name + "}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Raw values (full precision) under the headers; the caption as the first, commented line."""
    cols = t.csv_columns or t.columns
    buf = io.StringIO()
    buf.write(f"# {t.caption}\n")
    w = csv.writer(buf)
    w.writerow([h for _, h, _ in cols])
    for r in t.rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _, _ in cols])
    return buf.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    """A table CSV written by to_csv, as dicts keyed by header."""
    lines = [ln for ln in Path(path).read_text().splitlines() if not ln.startswith("# ")]
    return list(csv.DictReader(lines))


def write_report(tables: list[Table], plot_files: list[Path], out: Path, header: str) -> list[Path]:
    """Each table as .md, .tex and .csv in `out`, and report.md (header, plots, tables); the files written."""
    files = []
    for t in tables:
        for ext, text in (("md", to_markdown(t)), ("tex", to_latex(t)), ("csv", to_csv(t))):
            atomic_write_text(out / f"{t.name}.{ext}", text)
            files.append(out / f"{t.name}.{ext}")
    body = [header, ""]
    if plot_files:
        body += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_files] + [""]
    body += ["## Tables", ""] + [to_markdown(t) for t in tables]
    atomic_write_text(out / "report.md", "\n".join(body))
    return [out / "report.md", *files, *plot_files]
