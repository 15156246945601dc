"""lora_lab.data on paths and caches that are not what they should be: symlink loops, devices, folders whose files
change, damaged cache entries (issue 24): each named in a DataError or repaired, never a traceback or stale rows."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lora_lab.config import DataConfig
from lora_lab.data import DataError, data_fingerprint, load_data
from lora_lab.files import cache_dir
from lora_lab.models import tiny_tokenizer


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(n: int, word: str) -> str:
    return "".join(json.dumps({"text": f"{word} number {i} was fine", "label": i % 2}) + "\n" for i in range(n))


def test_a_symlink_loop_and_a_device_are_named(tmp_path: Path, tok) -> None:
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match="symbolic link loop"):
        load_data(DataConfig(name=str(loop)), tok)
    with pytest.raises(DataError, match="not a regular file or folder"):
        load_data(DataConfig(name="/dev/null"), tok)
    other = tmp_path / "rows.bin"
    other.write_text("x")
    with pytest.raises(DataError, match="unknown kind.*\\.jsonl"):
        load_data(DataConfig(name=str(other)), tok)


def test_a_data_folder_is_read_and_a_changed_file_is_a_new_source(tmp_path: Path, tok) -> None:
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(_rows(30, "apple"))
    cfg = DataConfig(name=str(folder), format="classification", max_length=16)
    first = load_data(cfg, tok)
    assert first.source.startswith("folder ")
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    (folder / "part-0.jsonl").write_text(_rows(30, "pear"))
    assert data_fingerprint(cfg, tok) != first.fingerprint
    second = load_data(cfg, tok)
    pear = tok("pear", add_special_tokens=False)["input_ids"]
    assert any(pear[0] in ids for ids in second.train["input_ids"])  # the new rows, not the cached ones


def test_a_damaged_cache_entry_is_set_aside_and_built_again(tmp_path: Path, tok, caplog) -> None:
    cfg = DataConfig(name="synthetic_sentiment", max_length=32, max_train_examples=32, max_val_examples=8)
    good = load_data(cfg, tok)
    entry = cache_dir() / "data" / good.fingerprint
    (entry / "meta.json").write_text("{not json")
    again = load_data(cfg, tok)
    assert again.train["input_ids"] == good.train["input_ids"]
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(entry.name + ".damaged-")]
    assert "is damaged" in caplog.text


def test_a_huge_row_is_cut_before_tokenizing_and_keeps_what_truncation_keeps(tmp_path: Path, tok) -> None:
    import resource

    from lora_lab import data as data_mod

    words = " ".join(f"w{i % 97}" for i in range(2_000_000))  # ~8 MB in one row
    path = tmp_path / "huge.jsonl"
    path.write_text(
        json.dumps({"text": words, "label": 1})
        + "\n"
        + "".join(json.dumps({"text": f"ok {i}", "label": i % 2}) + "\n" for i in range(20))
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    task = load_data(DataConfig(name=str(path), format="classification", max_length=16, val_fraction=0.2), tok)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    rows = list(task.train["input_ids"]) + list(task.val["input_ids"])
    longest = max(rows, key=len)
    assert len(longest) == 16 and longest == tok(words[:2000], truncation=True, max_length=16)["input_ids"]
    assert grown_mib < 500, grown_mib  # the whole row through the tokenizer took gigabytes
    # Text-format pieces join back into the document, each cut after a space.
    doc = "ab " * 1000
    pieces = data_mod._pieces(doc, size=64)
    assert "".join(pieces) == doc and all(p.endswith(" ") for p in pieces[:-1])
