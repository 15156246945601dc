"""Shared fixtures: tiny seeded transformers models built from configs (no download), and a per-test outputs root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

# No hub is reachable from a test (CI has no network): say so before huggingface_hub and datasets read it at import,
# so a name that is not local fails at once, not after the hub client's retries (20 s each).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from disks import tmpfs  # noqa: E402

transformers = pytest.importorskip("transformers")

if torch.cuda.is_available():
    # Resumed runs are compared with uninterrupted ones exactly, and warm trials with cold ones to 1e-6: on a GPU that
    # needs cuBLAS's fixed workspace (set before its first handle; worker processes inherit it) and deterministic
    # kernels where torch has them (a warning, not an error, where it has none).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)

VOCAB = 96


def _tiny_config(kind: str):
    if kind == "llama":  # GQA: 2 kv heads for 4 query heads
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            num_labels=3,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


def build_tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny llama / bert (sequence classification) / gpt2 model, seeded, in eval mode."""
    torch.manual_seed(seed)
    cfg = _tiny_config(kind)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture
def build_tiny() -> Callable[..., torch.nn.Module]:
    """build_tiny(kind, seed=0) -> fresh tiny model; kind in llama, bert, gpt2."""
    return build_tiny_model


@pytest.fixture
def tiny_config() -> Callable[[str], object]:
    """tiny_config(kind) -> the transformers config behind build_tiny (e.g. for meta-device models)."""
    return _tiny_config


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    """A seeded (2, 7) batch of token ids valid for every tiny model."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(1, VOCAB, (2, 7), generator=g)


@pytest.fixture
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/"outputs", set as $LORA_LAB_OUTPUTS for the test (runs, sweeps and mlflow write under it)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(out))
    return out


# Modules whose tests start several processes, servers or browsers and wait on them with deadlines: under
# `pytest -n 2 --dist loadgroup` (the README's test command) they run one after another on one worker, as they were
# written to, while the other worker takes the in-process tests (one thread each: the two share 2 cores) and
# tests/test_distributed.py, test_no_repeats.py and test_run_owner.py (their processes run at once but nothing is
# timed: there they balance the two workers). A test of these modules marked `not_serial` leaves the group too: it
# runs its processes one at a time (a run, then its rerun) or none, and checks no deadline, so it loads the machine
# as an in-process test does (test_sweep_disk_full has only such tests: it is not listed).
PROCESS_HEAVY = {
    "test_faults",
    "test_mlflow_ui",
    "test_scaleout",
    "test_study_endings",
    "test_sweep_devices",
    "test_sweep_group",
    "test_sweep_servers",
    "test_tracking_loss",
}


# tryfirst: before xdist's own hook, which turns the group mark into the nodeid's @group suffix. Without it the marks
# came too late and were ignored: the group's tests were spread over both workers (module fixtures built twice, e.g.
# test_mlflow_ui's studies), as `pytest -n 2 --dist loadgroup -v` shows by the missing "@processes".
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (
            item.module is not None
            and item.module.__name__.rpartition(".")[2] in PROCESS_HEAVY
            and item.get_closest_marker("not_serial") is None
        ):
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process() -> None:
    """Tiny models gain nothing from threads, and on a 2-core CI machine oversubscribed OpenMP threads spin:
    one thread for in-process runs and for the CLI subprocesses the tests start."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_after_each_test() -> Iterator[None]:
    """Back to one torch thread after a test that changed it: the benchmarks run in-process (lora_lab.bench's
    run_core and run_checkpointing) take all cores for themselves, and every later test in that process then ran
    on 2 spinning threads: test_resume_config's resume test took 47.6 s of CPU after test_gradient_checkpointing,
    2.4 s on its own (and the spinning took the other xdist worker's core)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only); skips where mounting is not allowed."""
    with tmpfs(tmp_path / "small", "64k") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here")
        yield mnt
