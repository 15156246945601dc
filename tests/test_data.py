"""lora_lab.data: row formats, collate, the split, the cache and the error messages (offline, tiny tokenizer)."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter

import datasets
import pytest
import torch

from lora_lab import data as data_mod
from lora_lab.config import DataConfig
from lora_lab.data import DataError, collate, load_data
from lora_lab.models import tiny_tokenizer


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT_ROWS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}, of course."} for i in range(40)]


def test_prompted_rows(tok):
    cfg = DataConfig(name="synthetic_sentiment", max_length=48, max_train_examples=64, max_val_examples=16)
    task = load_data(cfg, tok)
    assert task.format == "prompted" and task.pad_id == tok.pad_token_id
    assert task.label_token_ids == [list(b" negative"), list(b" positive")]
    assert len(task.train) == 64 and len(task.val) == 16
    for row in task.train:
        label_ids = task.label_token_ids[row["class_label"]]
        assert row["prompt_ids"] + label_ids == row["input_ids"]
        assert len(row["input_ids"]) <= 48
        n = len(row["prompt_ids"])
        assert row["labels"][:n] == [-100] * n and row["labels"][n:] == label_ids
        assert tok.decode(row["prompt_ids"]).endswith("\nSentiment:")


def test_prompted_truncates_the_text_but_keeps_the_cue(tmp_path, tok):
    path = _jsonl(tmp_path / "long.jsonl", [{"text": "word " * 100, "label": i % 2} for i in range(10)])
    task = load_data(DataConfig(name=path, max_length=40), tok)
    row = task.train[0]
    assert len(row["input_ids"]) <= 40
    assert tok.decode(row["prompt_ids"]).startswith("Review: word")
    assert tok.decode(row["prompt_ids"]).endswith("\nSentiment:")


def test_chat_rows_label_only_the_response(tmp_path, tok):
    path = _jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    task = load_data(DataConfig(name=path, format="chat", max_length=96, val_fraction=0.25), tok)
    responses = {r["response"] for r in CHAT_ROWS}
    assert len(task.train) == 30 and len(task.val) == 10
    for row in task.train:
        labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        first = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
        assert all(lab == -100 for lab in row["labels"][:first])
        assert tok.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant\n")
        assert tok.decode(labelled, skip_special_tokens=True).strip() in responses
        assert tok.decode(labelled).endswith("<|im_end|>\n")  # it learns to stop


def test_chat_truncates_to_max_length(tmp_path, tok):
    path = _jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "response": "x" * 200}] * 4)
    task = load_data(DataConfig(name=path, format="chat", max_length=32, val_fraction=0.25), tok)
    assert all(len(r["input_ids"]) == 32 and r["labels"][-1] != -100 for r in task.train)


def test_text_rows_are_packed_blocks(tok):
    cfg = DataConfig(name="synthetic_sentiment", format="text", max_length=32, max_val_examples=None)
    task = load_data(cfg, tok)
    assert len(task.train) > 100 and len(task.val) > 5
    for row in list(task.train) + list(task.val):
        assert len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"]
    stream = [t for row in task.train for t in row["input_ids"]]
    assert stream.count(tok.eos_token_id) > 10  # documents are separated by eos


def test_classification_rows(tok):
    task = load_data(DataConfig(name="synthetic_sentiment", format="classification", max_length=16), tok)
    row = task.train[0]
    assert set(row) == {"input_ids", "labels"} and row["labels"] in (0, 1) and len(row["input_ids"]) <= 16
    batch = collate([task.train[i] for i in range(4)], task.pad_id)
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[0] == 4


def test_collate_pads_right_and_masks(tok):
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_ids": [1, 2], "class_label": 0},
        {"input_ids": [4, 5], "labels": [-100, 5], "prompt_ids": [4], "class_label": 1},
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["class_label"].tolist() == [0, 1]
    assert batch["input_ids"].dtype == torch.long

    scored = collate(rows, pad_id=0, candidate=[7, 8])
    assert scored["input_ids"].tolist() == [[1, 2, 7, 8], [4, 7, 8, 0]]
    assert scored["labels"].tolist() == [[-100, -100, 7, 8], [-100, 7, 8, -100]]
    assert scored["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_candidate_mode_matches_training_rows(tok):
    task = load_data(DataConfig(name="synthetic_sentiment", max_length=48, max_val_examples=8), tok)
    rows = [task.val[i] for i in range(8)]
    for cls, candidate in enumerate(task.label_token_ids):
        scored = collate(rows, task.pad_id, candidate=candidate)
        plain = collate(rows, task.pad_id)
        for i, row in enumerate(rows):
            if row["class_label"] == cls:  # scoring the true label word reproduces the training row exactly
                n = len(row["input_ids"])
                assert torch.equal(scored["input_ids"][i, :n], plain["input_ids"][i, :n])
                assert torch.equal(scored["labels"][i, :n], plain["labels"][i, :n])


def test_split_is_deterministic_and_depends_on_split_seed_only(tmp_path, monkeypatch, tok):
    cfg = DataConfig(name="synthetic_sentiment", max_length=48, max_val_examples=None, val_fraction=0.2)
    a = load_data(cfg, tok)
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "other-cache"))  # rebuild, not a cache hit
    b = load_data(cfg, tok)
    assert a.train["input_ids"] == b.train["input_ids"] and a.val["input_ids"] == b.val["input_ids"]
    assert a.fingerprint == b.fingerprint
    assert len(a.val) == 400 and len(a.train) == 1600
    c = load_data(
        DataConfig(name="synthetic_sentiment", max_length=48, max_val_examples=None, val_fraction=0.2, split_seed=1),
        tok,
    )
    assert c.val["input_ids"] != a.val["input_ids"]


def test_caps_apply_after_the_split(tok):
    full = load_data(DataConfig(name="synthetic_sentiment", max_length=48, max_val_examples=None), tok)
    capped = load_data(
        DataConfig(name="synthetic_sentiment", max_length=48, max_train_examples=10, max_val_examples=3), tok
    )
    assert len(capped.train) == 10 and len(capped.val) == 3
    assert capped.val["input_ids"] == full.val["input_ids"][:3]  # the cap does not change which rows are held out
    assert capped.fingerprint != full.fingerprint


def test_cache_hit_is_identical_and_skips_the_loader(monkeypatch, tok):
    calls = Counter()
    real = data_mod.SOURCES["synthetic_sentiment"]

    def counting():
        calls["n"] += 1
        return real()

    monkeypatch.setitem(data_mod.SOURCES, "synthetic_sentiment", counting)
    cfg = DataConfig(name="synthetic_sentiment", max_length=48)
    first = load_data(cfg, tok)
    start = time.time()
    second = load_data(cfg, tok)
    elapsed = time.time() - start
    assert calls["n"] == 1 and elapsed < 1.0
    assert first.fingerprint == second.fingerprint and first.source == second.source
    assert first.train.to_list() == second.train.to_list() and first.val.to_list() == second.val.to_list()
    # Another tokenizer or another field value is another cache entry.
    load_data(DataConfig(name="synthetic_sentiment", max_length=40), tok)
    assert calls["n"] == 2


def test_local_jsonl_and_csv_sources(tmp_path, tok):
    rows = [{"review": f"film {i} was {'great' if i % 2 else 'bad'}", "stars": i % 2} for i in range(20)]
    path = _jsonl(tmp_path / "reviews.jsonl", rows)
    task = load_data(DataConfig(name=path, text_column="review", label_column="stars"), tok)
    assert len(task.train) + len(task.val) == 20 and str(tmp_path) in task.source
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows))
    task = load_data(DataConfig(name=str(csv), text_column="review", label_column="stars"), tok)
    assert len(task.train) == 18 and len(task.val) == 2
    # An edited file is a new cache entry.
    csv.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows[:10]))
    assert len(load_data(DataConfig(name=str(csv), text_column="review", label_column="stars"), tok).train) == 9


def test_local_txt_source_is_one_row_per_line(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line number {i} of a small corpus" for i in range(200)))
    task = load_data(DataConfig(name=str(path), format="text", max_length=16), tok)
    assert all(len(r) == 16 for r in task.train["input_ids"])


def test_unknown_source(tok):
    with pytest.raises(DataError, match=r"data.name='no_such_source'.*not a packaged source.*vader_movies"):
        load_data(DataConfig(name="no_such_source"), tok)


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match=r"data.name=.*missing.jsonl.*no such file"):
        load_data(DataConfig(name=str(tmp_path / "missing.jsonl")), tok)


def test_missing_column_names_the_key_and_the_columns(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": i, "body": "x", "score": 1} for i in range(5)])
    with pytest.raises(DataError, match=r"data.text_column='text' not in the dataset; columns: id, body, score"):
        load_data(DataConfig(name=path), tok)
    with pytest.raises(DataError, match=r"data.label_column='label' not in the dataset"):
        load_data(DataConfig(name=path, text_column="body"), tok)
    with pytest.raises(DataError, match=r"data.prompt_column='prompt'"):
        load_data(DataConfig(name=path, format="chat"), tok)


def test_empty_dataset(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"data.name=.*empty.jsonl.*empty"):
        load_data(DataConfig(name=str(empty)), tok)
    blank = _jsonl(tmp_path / "blank.jsonl", [{"text": "  ", "label": 0}] * 3)
    with pytest.raises(DataError, match=r"empty"):
        load_data(DataConfig(name=blank), tok)


def test_label_out_of_range(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": i % 3} for i in range(9)])
    with pytest.raises(DataError, match=r"data.label_column='label': expected integers in 0..1.*found 2"):
        load_data(DataConfig(name=path), tok)
    path = _jsonl(tmp_path / "s.jsonl", [{"text": "ok", "label": "pos"} for _ in range(9)])
    with pytest.raises(DataError, match=r"data.label_column='label'.*'pos'"):
        load_data(DataConfig(name=path), tok)


def test_text_blocks_longer_than_the_validation_split(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(["tiny"] * 20))
    with pytest.raises(DataError, match=r"val split is empty.*data.max_length"):
        load_data(DataConfig(name=str(path), format="text", max_length=64), tok)


def test_unreachable_hub_dataset_fails_fast(tok):
    start = time.time()
    with pytest.raises(DataError, match=r"data.name='no-org/no-dataset': not a packaged source.*hub could not load it"):
        load_data(DataConfig(name="no-org/no-dataset"), tok)
    assert time.time() - start < 30


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_vader_package_missing_its_file_names_file_and_package(tmp_path, monkeypatch):
    inner = _tar_gz({"hutto_ICWSM_2014/README.txt": b"no snippets here"})
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    sdist.write_bytes(_tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    monkeypatch.setattr(data_mod, "_pip", lambda *a, **k: sdist)
    with pytest.raises(DataError, match=r"vaderSentiment==3\.3\.2.*movieReviewSnippets_GroundTruth\.txt"):
        data_mod._fetch_vader(tmp_path)


@pytest.mark.slow
def test_vader_movies_fetched_through_pip(tok):
    raw = data_mod.SOURCES["vader_movies"]()
    assert isinstance(raw, datasets.Dataset) and len(raw) == 10_072
    positives = sum(raw["label"])
    assert 4_900 < positives < 5_100  # 4,996 positive, 5,076 negative
    task = load_data(DataConfig(name="vader_movies", max_length=64, max_val_examples=128), tok)
    assert len(task.train) == 10_072 - 1_007 and len(task.val) == 128
    assert "vaderSentiment==3.3.2" in task.source
    start = time.time()
    load_data(DataConfig(name="vader_movies", max_length=64, max_val_examples=128), tok)
    assert time.time() - start < 1.0


@pytest.mark.slow
def test_kjv_from_debian(tok):
    import shutil

    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        with pytest.raises(DataError, match=r"data.name='kjv': needs `(apt-get|dpkg-deb)`"):
            data_mod.SOURCES["kjv"]()
        return
    raw = data_mod.SOURCES["kjv"]()
    assert len(raw) == 31_102 and raw[0]["text"].startswith("In the beginning God created")
    task = load_data(DataConfig(name="kjv", format="text", max_length=64, max_val_examples=32), tok)
    assert len(task.val) == 32 and all(len(r) == 64 for r in task.train["input_ids"][:100])


@pytest.mark.slow
def test_austen_from_debian():
    pytest.importorskip("rdata")
    raw = data_mod.SOURCES["austen"]()
    assert set(raw["book"]) == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }
    assert 700_000 < sum(len(t.split()) for t in raw["text"]) < 740_000  # 718k words
