"""The report CLI: reads a selection's runs, writes its tables and plots and attaches them; `best-lr` for scripts.

Paper-style tables (Markdown, LaTeX, CSV) and plots (PNG) from the MLflow runs of one or more studies, written into a
folder and attached to each study's MLflow parent run (under `report/`). Tables: methods, targets, ranks, lr,
capacity, batch, params, compute, merge, precision (default: all). Each table is a small function of the runs that
returns rows and a caption naming the runs it came from; published numbers from ../shared/ANCHORS.md stand beside
ours, labelled with their source.

`python -m lora_lab.report best-lr --study NAME [--where KEY=VALUE]` prints the best peak LR of a study (argmin of the
final val loss over COMPLETE runs), for scripts such as scripts/reproduce.sh.

The folder gets report.md and report.html (the same tables and plots on one self-contained page, to open in a
browser or to send), and each table as .md, .tex and .csv; the files are staged and moved in together, so a failed
write leaves the previous report as it was. Pruned and failed runs are left out of every table and listed, with their
reasons, at the end of report.md and report.html.

Exit codes: 0 written, 1 a file could not be written (a full disk: the message names the file and what was kept),
2 bad input (no tracking store, a named study or experiment without runs, --out not a folder the report can write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from lora_lab import tracking
from lora_lab.config import TrackingConfig, outputs_root
from lora_lab.files import WriteError
from lora_lab.records import param_text
from lora_lab.report.figures import make_plots
from lora_lab.report.groups import best_lr
from lora_lab.report.render import Header, check_out, report_folder, write_report
from lora_lab.report.runs import ReportError, load_runs
from lora_lab.report.tables import TABLES, build_tables, table_left_out


def _num(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


def _error(exc: Exception) -> None:
    print(f"lora_lab.report: error: {exc}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """Write the report (exit 0), or print a study's best LR (`best-lr`); 1 when a file cannot be written, 2 on bad
    input."""
    ap = argparse.ArgumentParser(
        prog="python -m lora_lab.report",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("tables", nargs="*", help=f"tables to write: {', '.join(TABLES)} (default all), or best-lr")
    ap.add_argument("--study", action="append", default=[], help="a study name (repeatable)")
    ap.add_argument("--experiment", default=None, help="an MLflow experiment name")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<outputs>/mlflow.db)")
    ap.add_argument("--out", default=None, help="output folder (default <outputs>/reports/<name>)")
    ap.add_argument("--where", action="append", default=[], help="best-lr: only runs whose param KEY equals VALUE")
    ap.add_argument("--no-attach", action="store_true", help="do not attach the files to the studies' parent runs")
    args = ap.parse_args(argv)
    uri = args.tracking_uri or TrackingConfig().resolved_uri()
    name = "+".join(args.study) or args.experiment or "all"
    out = Path(args.out) if args.out else outputs_root() / "reports" / name
    try:
        if args.tables == ["best-lr"]:
            bad = [c for c in args.where if "=" not in c or not c.partition("=")[0]]
            if bad:
                raise ReportError(f"--where {bad[0]!r}: expected KEY=VALUE, e.g. --where lora.r=8")
            runs, _ = load_runs(uri, args.experiment, args.study)
            for cond in args.where:
                k, _, v = cond.partition("=")
                same = (lambda a, b: _num(a) == _num(b)) if _num(v) is not None else (lambda a, b: a == b)
                runs = [r for r in runs if r.p(k) is not None and same(param_text(r.p(k)), v)]
            lr, _ = best_lr(runs)
            if lr is None:
                raise ReportError(f"no COMPLETE run with an LR among studies {args.study} {args.where}")
            print(f"{lr:g}")
            return 0
        unknown = [t for t in args.tables if t not in TABLES]
        if unknown:
            raise ReportError(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
        check_out(out, "--out" if args.out else "the report folder")
        runs, parents = load_runs(uri, args.experiment, args.study)
    except ReportError as exc:
        _error(exc)
        return 2
    tables = build_tables(runs, args.tables or TABLES)
    studies = sorted({r.study for r in runs if r.study})
    command = " ".join(
        [
            "python -m lora_lab.report",
            *(f"--study {s}" for s in args.study),
            *([f"--experiment {args.experiment}"] if args.experiment else []),
            *args.tables,
        ]
    )
    header = Header(name, command, len(runs), studies, tracking.study_descriptions(uri, parents))
    try:
        with report_folder(out) as stage:
            plot_files = make_plots(uri, runs, stage) if not args.tables else []
            written = write_report(tables, plot_files, stage, header, table_left_out(runs))
        files = [out / p.name for p in written]
        if not args.no_attach:
            ids = {r.parent for r in runs if r.parent and (not args.study or r.study in args.study)}
            ids &= set(parents) or ids
            for pid in sorted(ids):
                try:
                    tracking.attach_files(uri, pid, files, artifact_path="report")
                except OSError as exc:  # a local artifact store on a full disk
                    raise WriteError(
                        f"the artifacts of MLflow run {pid}", exc, f"the report in {out} is complete"
                    ) from None
    except WriteError as exc:
        _error(exc)
        return 1
    print(
        f"report: {out / 'report.md'} ({len(tables)} tables, {len(plot_files)} plots); one page: {out / 'report.html'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
