"""trainer.devices=N (lora_lab/train/distributed.py): real 2-process runs through the CLI on the CPU (gloo, the tiny
model, fp32, fixed seed). Two processes equal one at the same global batch (LoRA under DDP and under FSDP2, full
fine-tuning under FSDP2, every frozen-base method under FSDP2, LoRA in bf16 and compiled under DDP), and two
launchers as two hosts equal one launcher of two; rank 0 alone writes metrics.json, the adapter and the merged model
(gathered from the shards under FSDP2) and the one MLflow run; a killed rank ends the whole group; a resume with
another devices count is refused, one with the same count resumes (DDP, and FSDP2 on a frozen base and on full
fine-tuning)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterator, NamedTuple

import psutil
import pytest
import torch
from tiny import TINY_RUN

pytestmark = pytest.mark.slow

# trainer.device=cpu: gloo and fp32 on any machine (a host with one GPU could not give two processes one each).
TINY = [*TINY_RUN, "trainer.num_threads=1", "trainer.device=cpu"]
ATOL = 1e-5


def cli(args: list[str], outputs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs))
    return subprocess.run(
        [sys.executable, "-m", "lora_lab.train", *TINY, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_losses(one: dict, two: dict) -> float:
    """Per-step train losses and every evaluation's val loss within ATOL; returns the largest difference."""
    assert [p["step"] for p in one["history"]] == [p["step"] for p in two["history"]] == list(range(1, 9))
    diffs = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(one["history"], two["history"])]
    diffs += [abs(a["val_loss"] - b["val_loss"]) for a, b in zip(one["evals"], two["evals"])]
    assert len(one["evals"]) == len(two["evals"]) == 3
    assert max(diffs) <= ATOL, diffs
    assert abs(one["val_loss"] - two["val_loss"]) <= ATOL
    return max(diffs)


def mlflow_runs(db: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def peft_logits(adapter: Path) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    from lora_lab.config import compose
    from lora_lab.models import load_model

    _, cfg = compose(TINY)
    base, _ = load_model(cfg.model)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(folder: Path) -> torch.Tensor:
    """The logits of an exported merged model (a plain transformers folder, every weight in it)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=torch.arange(3, 35).reshape(2, 16)).logits


@pytest.mark.parametrize("parallel", ["auto", "fsdp"])
def test_lora_two_processes_equal_one_and_rank0_alone_writes(parallel: str, tmp_path: Path) -> None:
    """LoRA over 2 processes x grad_accum 1 against 1 process x grad_accum 2 (global batch 8 both): under DDP
    (trainer.parallel=auto keeps it: FSDP2 refuses the chunked loss this run uses) and under FSDP2 (the frozen base
    sharded beside its adapters, in the same units)."""
    outputs = tmp_path / "outputs"
    one_dir, two_dir, db = tmp_path / "one", tmp_path / "two", tmp_path / "mlflow.db"
    common = ["lora.r=4", "export.merged=true"]
    one = cli([*common, "trainer.grad_accum=2", "tracking.enabled=false", f"output_dir={one_dir}"], outputs)
    assert one.returncode == 0, one.stderr[-3000:]
    # The 2-process run checkpoints its blocks' activations, and under DDP computes its loss in chunks
    # (trainer.loss_chunk, through DDP's forward; FSDP2 refuses it): still the same losses.
    two_args = [*common, "trainer.devices=2", f"trainer.parallel={parallel}", "trainer.gradient_checkpointing=true"]
    two_args += ["trainer.loss_chunk=5"] if parallel == "auto" else []
    two = cli([*two_args, f"tracking.uri=sqlite:///{db}", f"output_dir={two_dir}"], outputs)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2 joined (gloo)" in two.stderr
    assert "[rank 1] INFO lora_lab: activation checkpointing of 2 repeated blocks" in two.stderr
    if parallel == "auto":  # the chunked loss: FSDP2 is refused, so auto keeps DDP whatever the plan
        says = "[rank 0] INFO lora_lab: trainer.parallel=auto: ddp (FSDP2 is refused here: trainer.parallel=fsdp with "
        assert says + "trainer.loss_chunk=5: the chunked loss" in two.stderr
        assert "FSDP2:" not in two.stderr
    else:
        assert "FSDP2: 2 repeated blocks and the root sharded over 2 ranks" in two.stderr

    m1, m2 = metrics(one_dir), metrics(two_dir)
    print(f"LoRA {parallel} max |loss diff| 1 vs 2 processes:", assert_same_losses(m1, m2))
    assert m2["settings"]["devices"] == 2 and m2["settings"]["grad_accum"] == 1
    # The merge check on rank 0 (under FSDP2 merged into the shards) measures what the 1-process run measured.
    assert m2["merge_ok"] is True
    assert abs(m2["merged_val_loss"] - m1["merged_val_loss"]) <= ATOL
    assert abs(m2["max_abs_logit_diff"] - m1["max_abs_logit_diff"]) <= ATOL
    assert m2["adapter_bytes"] == m1["adapter_bytes"]
    # One of each: metrics.json, adapter, merged model, config.yaml (saying devices: 2), one MLflow run; nothing
    # else anywhere.
    assert sorted(p.name for p in two_dir.iterdir() if not p.name.startswith(".")) == [
        "adapter",
        "config.yaml",
        "loss_curve.png",
        "merged",
        "metrics.json",
    ]
    assert "devices: 2" in (two_dir / "config.yaml").read_text()
    found = sorted(tmp_path.rglob("metrics.json"))
    logged = [p for p in found if "mlartifacts" in p.parts]  # the MLflow run's artifact copy
    assert len(logged) == 1
    assert [p for p in found if p not in logged] == [one_dir / "metrics.json", two_dir / "metrics.json"]
    runs = mlflow_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["trainer.devices"] == "2"
    assert abs(runs[0].data.metrics["loss/val"] - m2["val_loss"]) < 1e-9

    # The 2-process adapter, in peft's layout (under FSDP2 gathered whole on rank 0), loads with peft and gives the
    # 1-process adapter's logits; so does the merged model (under FSDP2 every weight gathered, then merged).
    theirs_two, theirs_one = peft_logits(two_dir / "adapter"), peft_logits(one_dir / "adapter")
    print(f"LoRA {parallel} peft logits max |diff|:", (theirs_two - theirs_one).abs().max().item())
    assert (theirs_two - theirs_one).abs().max().item() <= ATOL
    merged_two, merged_one = merged_logits(two_dir / "merged"), merged_logits(one_dir / "merged")
    print(f"LoRA {parallel} merged logits max |diff|:", (merged_two - merged_one).abs().max().item())
    assert (merged_two - merged_one).abs().max().item() <= ATOL
    assert (merged_one - theirs_one).abs().max().item() <= 1e-4  # the merged model is the adapted one


def test_full_fsdp_two_processes_equal_one(tmp_path: Path) -> None:
    """Full fine-tuning under FSDP2 (trainer.parallel=auto would pick DDP for a model this small)."""
    outputs = tmp_path / "outputs"
    common = ["method=full", "tracking.enabled=false", "export.merged=true"]
    one = cli([*common, "trainer.grad_accum=2", f"output_dir={tmp_path / 'one'}"], outputs)
    assert one.returncode == 0, one.stderr[-3000:]
    # Activation checkpointing inside FSDP2's blocks: the same numbers as without it.
    two_args = ["trainer.devices=2", "trainer.parallel=fsdp", "trainer.gradient_checkpointing=true"]
    two = cli([*common, *two_args, f"output_dir={tmp_path / 'two'}"], outputs)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP2: 2 repeated blocks and the root sharded over 2 ranks" in two.stderr
    assert "[rank 1] INFO lora_lab: activation checkpointing of 2 repeated blocks" in two.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    print("FSDP2 max |loss diff| 1 vs 2 processes:", assert_same_losses(m1, m2))
    assert m2["checkpoint_bytes"] == m1["checkpoint_bytes"]  # the sharded parameters count their global shape
    # export.merged writes the trained model, gathered from the shards by rank 0: a plain transformers folder
    # with every weight, the same model as the 1-process run's.
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 35).reshape(2, 16)
    logits = []
    for run in ("one", "two"):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / run / "merged", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert model.config.use_cache is True
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
    from lora_lab.config import compose
    from lora_lab.models import load_model

    base, _ = load_model(compose([*TINY, *common])[1].model)
    with torch.no_grad():
        assert (base.eval()(input_ids=ids).logits - logits[0]).abs().max().item() > 1e-3  # trained, not the base


# Every method on a frozen base under FSDP2, each a short run (4 steps, an evaluation and a checkpoint every 2).
FSDP_METHODS = {
    # Resumed, against the same 2 ranks uninterrupted (each rank draws its own dropout masks: no 1-process twin).
    "lora-dropout": ["lora.r=4", "lora.dropout=0.1"],
    "dora-rslora": ["lora.r=4", "lora.variant=dora", "lora.rslora=true"],
    "ia3": ["method=ia3"],
    "adapter": ["method=adapter"],
    "prompt": ["method=prompt"],
    "prefix": ["method=prefix"],
    "bitfit": ["method=bitfit"],
}
SHORT = ["tracking.enabled=false", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2"]


def _fsdp_ranks(rank: int, port: int, out: Path) -> None:
    """One of two ranks (torch.multiprocessing.spawn): a gloo group of its own (no launcher), then each of
    FSDP_METHODS built and fitted in this process under FSDP2, as `python -m lora_lab.train` runs a rank; LoRA with
    dropout once more with trainer.resume=true (from the checkpoint at step 2)."""
    import logging
    import shutil

    import torch.distributed as dist

    from lora_lab.config import compose
    from lora_lab.train.build import build

    said: list[str] = []  # what lora_lab logs in this rank, kept: rank 0 writes it beside each run's metrics
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lora_lab").addHandler(handler)
    logging.getLogger("lora_lab").setLevel(logging.INFO)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, args in FSDP_METHODS.items():
            for resume in (False, True) if name == "lora-dropout" else (False,):
                if resume and rank == 0:
                    shutil.copy(out / name / "metrics.json", out / name / "uninterrupted.json")
                dist.barrier()
                said.clear()
                two = ["trainer.devices=2", "trainer.parallel=fsdp", f"trainer.resume={str(resume).lower()}"]
                _, cfg = compose([*TINY, *SHORT, *args, *two, f"output_dir={out / name}"])
                build(cfg).fit()
                if rank == 0:
                    (out / name / "log.txt").write_text("\n".join(said))
    finally:
        dist.destroy_process_group()


def test_every_method_under_fsdp_equals_one_process(tmp_path: Path) -> None:
    """LoRA's variants (DoRA, rsLoRA, dropout), IA3, adapters, prompt, prefix and BitFit with their frozen base
    sharded under FSDP2 (two ranks spawned here, each building and fitting every method as a CLI rank does) against
    one process with twice the grad_accum: the same losses, the same merge check, the same adapter files (gathered
    whole on rank 0) and checkpoints (the trainable state only, gathered); LoRA resumed from a checkpoint ends with the
    uninterrupted run's losses."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from lora_lab.config import compose
    from lora_lab.train.build import build

    compared = [name for name in FSDP_METHODS if name != "lora-dropout"]
    for name in compared:  # the 1-process runs, in this process
        one = ["trainer.grad_accum=2", f"output_dir={tmp_path / 'one' / name}"]
        _, cfg = compose([*TINY, *SHORT, *FSDP_METHODS[name], *one])
        build(cfg).fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_ranks, args=(port, tmp_path / "two"), nprocs=2)

    for name in compared:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        m1, m2 = metrics(one), metrics(two)
        diffs = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(m1["history"], m2["history"], strict=True)]
        diffs += [abs(a["val_loss"] - b["val_loss"]) for a, b in zip(m1["evals"], m2["evals"], strict=True)]
        assert len(m2["history"]) == 4 and max(diffs) <= ATOL, (name, diffs)
        assert (m1["merge_ok"], m2["merge_ok"]) in ((True, True), (None, None)), name
        if m1["merge_ok"]:  # IA3, BitFit and DoRA fold into the shards
            assert abs(m1["merged_val_loss"] - m2["merged_val_loss"]) <= ATOL, name
        assert m2["adapter_bytes"] == m1["adapter_bytes"], name
        for file in ("adapter/adapter_model.safetensors", "checkpoints/step-0000002/weights.safetensors"):
            w1, w2 = load_file(str(one / file)), load_file(str(two / file))
            assert sorted(w1) == sorted(w2), (name, file)
            assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= ATOL, (name, file)
        assert "FSDP2: 2 repeated blocks and the root sharded over 2 ranks" in (two / "log.txt").read_text()
        print(f"FSDP2 {name}: max |loss diff| 1 vs 2 processes {max(diffs):.2e}")
    # The resumed LoRA run (steps 3-4 again, from the checkpoint of step 2) equals the uninterrupted one.
    run = tmp_path / "two" / "lora-dropout"
    uninterrupted = json.loads((run / "uninterrupted.json").read_text())
    resumed = metrics(run)
    assert "at step 2" in (run / "log.txt").read_text()  # resumed from the checkpoint, not trained afresh
    assert [p["step"] for p in resumed["history"]] == [1, 2, 3, 4]
    pairs = [*zip(uninterrupted["history"], resumed["history"])]
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in pairs) <= ATOL
    assert abs(uninterrupted["val_loss"] - resumed["val_loss"]) <= ATOL


def test_lora_in_bf16_and_compiled_under_ddp_equals_one_process(tmp_path: Path) -> None:
    """trainer.precision=bf16 with trainer.compile=true under DDP (each block compiled, then DDP around the model):
    2 processes give the losses of 1 process with twice the grad_accum, within bf16's rounding (2e-2 relative)."""
    outputs = tmp_path / "outputs"
    common = ["lora.r=4", "trainer.precision=bf16", "trainer.compile=true", "tracking.enabled=false"]
    common += ["trainer.max_steps=4", "trainer.eval_every=2"]  # bf16 on the CPU is slow: few steps
    one = cli([*common, "trainer.grad_accum=2", f"output_dir={tmp_path / 'one'}"], outputs)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli([*common, "trainer.devices=2", "trainer.parallel=ddp", f"output_dir={tmp_path / 'two'}"], outputs)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1] INFO lora_lab: compiled 2 repeated blocks (regional torch.compile)" in two.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m2["settings"]["precision"] == "bf16" and m2["settings"]["devices"] == 2
    pairs = [(a["train_loss"], b["train_loss"]) for a, b in zip(m1["history"], m2["history"], strict=True)]
    pairs += [(a["val_loss"], b["val_loss"]) for a, b in zip(m1["evals"], m2["evals"], strict=True)]
    assert len(m2["history"]) == 4 and len(m2["evals"]) == 3
    rel = max(abs(a - b) / abs(a) for a, b in pairs)
    print("bf16 + compile under DDP, max relative loss diff 1 vs 2 processes:", rel)
    assert rel <= 2e-2
    assert m2["merge_ok"] is True


def test_lora_on_a_4bit_base_under_ddp_equals_one_process(tmp_path: Path) -> None:
    """model.quantize=nf4 (bitsandbytes' packed weights, replicated on every rank) under DDP: only the adapters'
    gradients are reduced, and 2 processes give the losses and both merges' numbers of 1 process."""
    outputs = tmp_path / "outputs"
    common = ["lora.r=4", "model.quantize=nf4", "tracking.enabled=false"]
    one = cli([*common, "trainer.grad_accum=2", f"output_dir={tmp_path / 'one'}"], outputs)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli([*common, "trainer.devices=2", f"output_dir={tmp_path / 'two'}"], outputs)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2 joined (gloo)" in two.stderr and "FSDP2:" not in two.stderr  # auto: DDP (FSDP2 refused)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    print("NF4 under DDP, max |loss diff| 1 vs 2 processes:", assert_same_losses(m1, m2))
    assert m2["frozen_bytes_per_param"] == m1["frozen_bytes_per_param"] < 0.6
    assert abs(m2["requant_merged_val_loss"] - m1["requant_merged_val_loss"]) <= ATOL
    assert abs(m2["merged_val_loss"] - m1["merged_val_loss"]) <= ATOL


def test_two_launchers_as_two_hosts_equal_two_devices(tmp_path: Path) -> None:
    """Several hosts: one torchrun per host, one process each, joined by torchrun's c10d rendezvous (README's SLURM
    recipe), here two launchers on 127.0.0.1. Their run equals `trainer.devices=2` on one host and, through it, one
    process at the same global batch; the output folder (shared by the "hosts") is written by global rank 0 alone."""
    import socket

    outputs, db = tmp_path / "outputs", tmp_path / "mlflow.db"
    one = cli(
        ["lora.r=4", "trainer.devices=2", "tracking.enabled=false", f"output_dir={tmp_path / 'one_host'}"], outputs
    )
    assert one.returncode == 0, one.stderr[-3000:]
    # trainer.parallel=auto asked the memory plan: the tiny model, replicated, fits each rank's share of the RAM.
    assert "[rank 0] INFO lora_lab: trainer.parallel=auto: ddp (the model replicated on each device plans" in one.stderr

    with socket.socket() as s:  # a free port for the rendezvous store (the first launcher binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "two_hosts"
    launchers = []
    for node in range(2):
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-hosts", "--max-restarts=0"]
        args += ["-m", "lora_lab.train", *TINY, "lora.r=4", f"tracking.uri=sqlite:///{db}", f"output_dir={run}"]
        env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs))
        log = (tmp_path / f"host{node}.log").open("w")
        launchers.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        codes = [p.wait(timeout=300) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"host{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "rank 1 of 2 joined (gloo)" in "".join(logs)
    m1, m2 = metrics(tmp_path / "one_host"), metrics(run)
    print("two launchers vs devices=2, max |loss diff|:", assert_same_losses(m1, m2))
    assert m2["settings"]["devices"] == 2
    runs = mlflow_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run for the group, not one per host


@pytest.mark.parametrize(
    "method",
    [
        # DDP; dropout: each rank draws its own masks, and a resumed rank must go on with its own RNG stream
        ["lora.r=4", "lora.dropout=0.1"],
        # FSDP2: the checkpoint holds the gathered whole; each rank takes its shards back (LoRA under FSDP2 resumes in
        # test_every_method_under_fsdp_equals_one_process)
        ["method=full", "trainer.parallel=fsdp"],
    ],
    ids=["lora-ddp", "full-fsdp"],
)
def test_resume_with_the_same_devices_resumes_and_another_count_is_refused(method: list[str], tmp_path: Path) -> None:
    outputs, run = tmp_path / "outputs", tmp_path / "run"
    args = [*method, "tracking.enabled=false", "trainer.checkpoint_every=4", f"output_dir={run}"]
    first = cli([*args, "trainer.devices=2"], outputs)
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = metrics(run)
    assert (run / "checkpoints" / "step-0000004" / "rng-ranks.pt").is_file()

    # Another count is refused before anything loads: by the launcher (3) or by the one process (1).
    for devices, then, now in (("1", 2, 1), ("3", 2, 3)) if method[0] != "method=full" else (("3", 2, 3),):
        refused = cli([*args, f"trainer.devices={devices}", "trainer.resume=true"], outputs)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"trainer.devices: {then} -> {now}" in refused.stderr
        assert "Traceback" not in refused.stderr

    again = cli([*args, "trainer.devices=2", "trainer.resume=true"], outputs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 4" in again.stderr
    assert_same_losses(uninterrupted, metrics(run))


def _ranks(launcher: psutil.Process, n: int, timeout: float = 120) -> dict[int, psutil.Process]:
    """The launcher's rank processes by RANK, once all n have joined their group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in launcher.children():
            try:
                ranks[int(child.environ()["RANK"])] = child
            except (psutil.Error, KeyError):
                pass
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"{n} ranks did not start within {timeout} s")


class Launched(NamedTuple):
    """A launcher started by `_launched`: its Popen, its process, its ranks by RANK and every process under it."""

    proc: subprocess.Popen
    launcher: psutil.Process
    ranks: dict[int, psutil.Process]
    everyone: list[psutil.Process]


@contextlib.contextmanager
def _launched(cmd: list[str], env: dict[str, str], stderr: IO[str]) -> Iterator[Launched]:
    """Start the launcher `cmd` (stderr to `stderr`) and yield it once its two ranks have joined. On the way out (the
    test's assertions, or its failure) whatever is left of the launcher and of every process it started is killed:
    a failing test must not leave its own orphans behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
    everyone: list[psutil.Process] = []
    try:
        launcher = psutil.Process(proc.pid)
        ranks = _ranks(launcher, 2)
        everyone = [*launcher.children(recursive=True)]
        yield Launched(proc, launcher, ranks, everyone)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in everyone:
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.mark.parametrize("stop", ["kill-rank-1", "sigterm-launcher", "kill-launcher", "kill-launcher-at-start"])
def test_a_killed_rank_or_a_stopped_launcher_ends_every_rank_with_no_orphans(stop: str, tmp_path: Path) -> None:
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(tmp_path / "outputs"))
    args = ["trainer.devices=2", "trainer.max_steps=100000", "trainer.eval_every=100000", "tracking.enabled=false"]
    cmd = [sys.executable, "-m", "lora_lab.train", *TINY, *args, f"output_dir={tmp_path / 'run'}"]
    err_file = tmp_path / "launcher.err"
    with err_file.open("w") as stderr, _launched(cmd, env, stderr) as group:
        proc, ranks = group.proc, group.ranks
        if stop == "kill-launcher-at-start":  # its ranks are starting: they end with it (the parent-death signal);
            group.launcher.send_signal(signal.SIGKILL)  # before, they waited at the dead store for JOIN_S (300 s)
            proc.wait(timeout=30)
            _, alive = psutil.wait_procs(group.everyone, timeout=10)
            assert not alive, f"orphans: {alive}"
            return
        # Training, not still importing: rank 0 has built the run and claimed its folder, and two seconds more.
        deadline = time.monotonic() + 120
        while not (tmp_path / "run").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        # Nothing of the group listens beyond loopback: the rendezvous store, the ranks' connections (the elastic
        # agent's own store, given a port alone, bound every interface).
        group_procs = [group.launcher, *ranks.values()]
        listening = [c.laddr for q in group_procs for c in q.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        if stop == "kill-rank-1":
            ranks[1].send_signal(signal.SIGKILL)
        else:  # SIGKILL: the launcher cannot end its ranks; they see it gone and end themselves
            group.launcher.send_signal(signal.SIGTERM if stop == "sigterm-launcher" else signal.SIGKILL)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(group.everyone, timeout=10)
    err = err_file.read_text()
    assert not alive, f"orphans: {alive}"
    if stop == "kill-rank-1":
        assert proc.returncode == 1
        assert f"rank 1 (pid {ranks[1].pid}) was killed by SIGKILL" in err, err[-3000:]
    elif stop == "sigterm-launcher":
        assert proc.returncode == 128 + signal.SIGTERM
        assert "interrupted by SIGTERM: every rank was ended" in err, err[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL


def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_losses(tmp_path: Path) -> None:
    """SIGKILL of rank 1 while the group trains (between checkpoints: almost surely inside a step), then the same
    command with trainer.resume=true: the run goes on from the last checkpoint and ends with the losses of a run that
    was never interrupted."""
    outputs = tmp_path / "outputs"
    args = ["lora.r=4", "lora.dropout=0.1", "trainer.devices=2", "tracking.enabled=false"]
    args += ["trainer.max_steps=120", "trainer.eval_every=40", "trainer.checkpoint_every=10"]
    whole = cli([*args, f"output_dir={tmp_path / 'whole'}"], outputs)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "run"
    err = tmp_path / "killed.err"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(outputs))
    cmd = [sys.executable, "-m", "lora_lab.train", *TINY, *args, f"output_dir={run}"]
    with err.open("w") as stderr, _launched(cmd, env, stderr) as group:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "LATEST").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        group.ranks[1].send_signal(signal.SIGKILL)
        assert group.proc.wait(timeout=120) == 1, err.read_text()[-3000:]
        _, alive = psutil.wait_procs(group.everyone, timeout=10)
    assert not alive, f"orphans: {alive}"
    assert not (run / "metrics.json").exists()  # it did not finish before the kill

    again = cli([*args, "trainer.resume=true", f"output_dir={run}"], outputs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    one, two = metrics(tmp_path / "whole"), metrics(run)
    assert [p["step"] for p in two["history"]] == list(range(1, 121))
    diffs = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(one["history"], two["history"])]
    diffs += [abs(a["val_loss"] - b["val_loss"]) for a, b in zip(one["evals"], two["evals"])]
    assert len(two["evals"]) == len(one["evals"]) and max(diffs) <= ATOL, max(diffs)


@pytest.mark.parametrize(
    "args, says",
    [
        (["trainer.devices=0"], "trainer.devices: expected an integer >= 1"),
        (["trainer.devices=2", "trainer.parallel=zero3"], "trainer.parallel"),
        (["trainer.devices=2", "model.quantize=nf4", "trainer.parallel=fsdp"], "model.quantize=nf4"),
        (["trainer.devices=2", "trainer.parallel=fsdp", "trainer.loss_chunk=64"], "trainer.loss_chunk=64"),
    ],
)
def test_combinations_that_do_not_work_are_refused_by_name(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lora_lab.train.cli import main

    assert main([*TINY, *args, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
