"""report.html (issue 23): one self-contained page beside report.md with every table (cells as the Markdown tables
write them: one render path) and every plot (a PNG inlined as a data URI), escaped, with nothing to fetch or run."""

from __future__ import annotations

import base64
import html
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixture import FAULT_DESCRIPTION, FAULT_STUDY, fault_store

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}


class Page(HTMLParser):
    """Reads a page: well-formed (every element closed in order), its headings, images, sections' rows and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.h3: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.rows: dict[str, list[list[str]]] = {}  # section id -> its table's body rows (cell texts)
        self.text: list[str] = []
        self._section = ""
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "section":
            self._section = a.get("id", "")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows.setdefault(self._section, []).append([])
        if tag in ("td", "h3"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "td":
            self.rows[self._section][-1].append("".join(self._cell or []))
        if tag == "h3":
            self.h3.append("".join(self._cell or []))
        if tag in ("td", "h3"):
            self._cell = None
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lora_lab.report.__main__ import main
    from lora_lab.report.runs import load_runs
    from lora_lab.report.tables import TABLES, build_tables, table_left_out

    root = tmp_path_factory.mktemp("html")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LAB_OUTPUTS", str(root / "outputs"))
        uri = fault_store(root)
        out = root / "report"
        assert main(["--tracking-uri", uri, "--study", FAULT_STUDY, "--out", str(out)]) == 0
        runs, parents = load_runs(uri, None, [FAULT_STUDY])
    raw = (out / "report.html").read_text()
    parser = Page()
    parser.feed(raw)
    parser.close()
    tables = build_tables(runs, TABLES) + [table_left_out(runs)]
    return {"uri": uri, "out": out, "raw": raw, "page": parser, "tables": tables, "parents": parents}


def test_the_page_parses_and_holds_every_table_and_plot(page: dict) -> None:
    p, out = page["page"], page["out"]
    assert p.stack == [] and p.tags[0] == "html"  # every element closed
    assert page["raw"].startswith("<!DOCTYPE html>")
    assert [t.title for t in page["tables"]] == p.h3  # every table, in order, the runs left out last
    pngs = sorted(out.glob("*.png"))
    assert {p_.name for p_ in pngs} >= {"lr_curves.png", "loss_curves.png", "pareto.png"}
    srcs = [img["src"] for img in p.imgs]
    for png in pngs:  # each plot as an <img> whose data URI holds the PNG's bytes
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in srcs, png.name
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    # Self-contained: no script, no stylesheet or image to fetch.
    assert "script" not in p.tags and "link" not in p.tags and "http" not in " ".join(srcs)
    assert len(page["raw"]) < 1_000_000


def test_cells_are_the_markdown_tables_cells(page: dict) -> None:
    """One render path: every HTML cell is the Markdown table's cell (markdown.text), unescaped."""
    p, out = page["page"], page["out"]
    for t in page["tables"]:
        if t.name == "left_out":
            md = (out / "report.md").read_text().split("### Runs left out")[1]
        else:
            md = (out / f"{t.name}.md").read_text()
        lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]  # body rows, header left out
        md_rows = [[c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")] for ln in lines]
        assert p.rows.get(t.name, []) == md_rows, t.name
    left = {r[0]: r for r in p.rows["left_out"]}
    assert left["f_lora/trial-2"][1:4] == ["FAIL", "1", "diverged: non-finite training loss at step 1"]


def test_a_description_is_escaped(page: dict) -> None:
    raw, p = page["raw"], page["page"]
    assert "<first" in FAULT_DESCRIPTION and FAULT_DESCRIPTION not in raw
    assert html.escape(FAULT_DESCRIPTION) in raw
    assert "first" not in p.tags  # not read as an element
    assert FAULT_DESCRIPTION in "".join(p.text)  # but shown as written
    assert f"- `{FAULT_STUDY}`: {FAULT_DESCRIPTION}" in (page["out"] / "report.md").read_text()


def test_the_page_is_attached_to_the_study(page: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=page["uri"])
    (parent,) = page["parents"]
    attached = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"report.md", "report.html", "lr_curves.png"} <= attached
