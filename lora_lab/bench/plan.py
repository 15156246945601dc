"""The memory plan's accuracy: predicted vs measured peak of real training steps, one fresh process per configuration.

``python -m lora_lab.bench plan [--steps N] [--out F]``. Each configuration is a `python -m lora_lab.train` override
list (the trainer's own build, optimizer, batches and autocast), trained for a few steps on a generated text file
(data.format=text packs every row to exactly data.max_length tokens, so the plan's T is the measured T). Measured, on
the CPU: the process's RSS high-water mark over the steps (VmHWM, reset through /proc/self/clear_refs once the session
is built, so the load's transient copies are not counted) minus its RSS before the session was built (imports done):
weights, data, gradients, optimizer state, activations and whatever the allocator keeps. On CUDA:
torch.cuda.max_memory_allocated over the steps. Predicted: lora_lab.memplan's training-step peak for the same config.

Rows whose setting has no effect in this checkout are skipped with a note, not measured: model.quantize when no
frozen weight comes out quantized, trainer.gradient_checkpointing when a forward saves as much as without it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

# The plan's shapes: a Llama-shaped model=tiny (d=384, 6 layers, GQA) and SmolLM2-135M (the packaged model: its
# 49,152-token vocabulary makes the logits a real part), each with LoRA (r=8, all linear layers) and full FT.
SHAPES = {
    "tiny-llama": (
        [
            "model=tiny",
            "model.tiny.hidden_size=384",
            "model.tiny.num_layers=6",
            "model.tiny.num_heads=6",
            "model.tiny.num_kv_heads=2",
            "model.tiny.intermediate_size=1024",
        ],
        8,
        256,
    ),
    "smollm2-135m": (["model=smollm2_135m"], 4, 128),
}
METHODS = {
    "lora": ["method=lora"],
    "full": ["method=full"],
    "nf4": ["model.quantize=nf4"],
    "int8": ["model.quantize=int8"],
    # LoRA with the chunked loss (trainer.loss_chunk): 128 positions of the batch's logits at a time
    "lora-chunked": ["method=lora", "trainer.loss_chunk=128"],
}
CHECKPOINTING = {"off": [], "on": ["trainer.gradient_checkpointing=true"]}
DESCRIPTION = "The memory plan's prediction beside the measured peak of real training steps, per configuration."
TOLERANCE = 0.15  # the target: predicted within 15% of measured


def text_file(folder: Path, words: int = 60000) -> Path:
    """A seeded text of pseudo-words, a line per sentence: enough packed blocks for every configuration."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tos", "va", "quil", "om", "bre", "st", "ur", "nea"]
    lines = []
    for _ in range(words // 12):
        lines.append(" ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(12)) + ".")
    path = folder / "plan_bench.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def configurations(data: Path, shapes: list[str], kinds: list[str]) -> list[dict[str, Any]]:
    """Each bench row: its name and the training overrides that make it."""
    rows = []
    for shape in shapes:
        model, batch, seq = SHAPES[shape]
        for kind in kinds:
            for ck, ck_over in CHECKPOINTING.items():
                overrides = [
                    *model,
                    *METHODS[kind],
                    *ck_over,
                    f"data.name={data}",
                    "data.format=text",
                    f"data.max_length={seq}",
                    "data.max_val_examples=8",
                    f"trainer.batch_size={batch}",
                    f"trainer.eval_batch_size={batch}",
                    "trainer.device=auto",
                    "trainer.memory_check=false",
                    "trainer.progress=false",
                    "tracking.enabled=false",
                ]
                rows.append({"shape": shape, "method": kind, "checkpointing": ck, "overrides": overrides})
    return rows


def measure_child(overrides: list[str], steps: int) -> dict[str, Any]:
    """In a fresh process: build the run as train does, train `steps` steps, return predicted and measured bytes."""
    import torch

    from lora_lab.bench.core import proc_status_kib, reset_hwm
    from lora_lab.config import compose
    from lora_lab.train import build
    from lora_lab.train.batches import TrainBatches
    from lora_lab.train.loss import training_loss
    from lora_lab.train.memory import planned, saved_for_backward
    from lora_lab.train.runtime import autocast, checkpoint_blocks, set_use_cache

    _, cfg = compose(overrides)
    p, _, _ = planned(cfg)
    quantized = cfg.model.quantize != "none"
    before = proc_status_kib("VmRSS") * 1024
    session = build(cfg)
    model, device, t = session.model, session.device, cfg.trainer
    model.to(device).train()
    set_use_cache(model, False)
    if t.gradient_checkpointing:  # as the trainer's loop applies it (lora_lab.train.loop), before the first step
        checkpoint_blocks(model)
    effect_quant = any(p_.dtype in (torch.uint8, torch.int8) for p_ in model.parameters())
    if quantized and not effect_quant:  # model.quantize is a key this checkout does not apply: nothing to measure
        return {"predicted": p.train_peak, "quantized": False}
    optimizer, _ = session.make_optimizer()
    trainable = [p_ for p_ in model.parameters() if p_.requires_grad]
    batches = TrainBatches(session.data, t.batch_size, cfg.seed, device, t.pad_to_multiple, padding_mask=False)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = 0  # max_memory_allocated counts everything allocated, the model included
    else:
        if not reset_hwm():  # the high-water mark starts again from the RSS now
            raise RuntimeError("bench plan on the CPU needs /proc/self/clear_refs (Linux)")
    tokens = 0
    loss_of = training_loss(t.loss_chunk)  # the trainer's loss: trainer.loss_chunk as the loop applies it
    for step in range(steps):
        batch, n = batches.get(step)
        tokens = max(tokens, int(batch["input_ids"].shape[1]))
        with autocast(device, session.autocast_dtype):
            loss = loss_of(model, model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status_kib("VmHWM") * 1024
    # What one forward saves for backward (after the measurement): with checkpointing only the blocks' inputs.
    batch, _ = batches.get(0)
    with autocast(device, session.autocast_dtype):
        saved = saved_for_backward(model, **batch)
    return {
        "predicted": p.train_peak,
        "predicted_parts": {part.name: part.bytes for part in p.parts},
        "measured": peak - before,
        "device": device.type,
        "tokens": tokens,
        "saved_bytes": saved,
        "quantized": (not quantized) or effect_quant,
    }


# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which activations
# come from the heap and are kept by the process when freed: the RSS then grows by ~half the activations over the
# first steps whatever the tensors need (measured: docs/memory.md). A fixed threshold makes the RSS follow the live
# tensors; `allocator="default"` measures what glibc's defaults give.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "262144"}


def measure(overrides: list[str], steps: int, allocator: str = "fixed") -> dict[str, Any]:
    """measure_child in a fresh subprocess (its own high-water mark), this checkout's code."""
    cmd = [sys.executable, "-m", "lora_lab.bench", "_planmem", str(steps), json.dumps(overrides)]
    env = dict(os.environ, **(FIXED_MMAP if allocator == "fixed" else {}))
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_plan_bench(
    steps: int = 3, shapes: Optional[list[str]] = None, kinds: Optional[list[str]] = None, allocator: str = "fixed"
) -> dict[str, Any]:
    """Every configuration measured in its own process; rows whose setting has no effect here are marked skipped."""
    from lora_lab.config import ModelConfig, TrainerConfig

    shapes = shapes or list(SHAPES)
    kinds = kinds or list(METHODS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora_lab-bench-plan-") as tmp:
        data = text_file(Path(tmp))
        os.environ.setdefault("LORA_LAB_OUTPUTS", str(Path(tmp) / "outputs"))
        saved_off: dict[tuple[str, str], int] = {}
        for row in configurations(data, shapes, kinds):
            key = (row["shape"], row["method"])
            if row["method"] in ("nf4", "int8") and not hasattr(ModelConfig(), "quantize"):
                rows.append({**row, "skipped": "model.quantize does not exist in this checkout"})
                continue
            if row["checkpointing"] == "on" and not hasattr(TrainerConfig(), "gradient_checkpointing"):
                rows.append({**row, "skipped": "trainer.gradient_checkpointing does not exist in this checkout"})
                continue
            res = measure(row["overrides"], steps, allocator)
            if "error" in res:
                rows.append({**row, "skipped": f"failed: {res['error'][:200]}"})
                continue
            if not res["quantized"]:
                rows.append(
                    {**row, **res, "skipped": f"{row['method']}: no weight came out quantized in this checkout"}
                )
                continue
            if row["checkpointing"] == "off":
                saved_off[key] = res["saved_bytes"]
            elif key in saved_off and res["saved_bytes"] > 0.7 * saved_off[key]:
                rows.append(
                    {
                        **row,
                        **res,
                        "skipped": "trainer.gradient_checkpointing has no effect in this checkout (a "
                        "forward saved as much as without it)",
                    }
                )
                continue
            ratio = res["predicted"] / max(1, res["measured"])
            rows.append({**row, **res, "ratio": ratio, "within": abs(ratio - 1) <= TOLERANCE})
            print(
                f"bench plan: {row['shape']} {row['method']} checkpointing={row['checkpointing']}: ratio {ratio:.3f}",
                file=sys.stderr,
            )
    return {"steps": steps, "tolerance": TOLERANCE, "allocator": allocator, "rows": rows}


def plan_table(res: dict[str, Any]) -> str:
    """The bench's rows as a Markdown table: predicted, measured, their ratio, whether within the tolerance."""
    from lora_lab.markdown import table
    from lora_lab.memplan import MIB

    rows = []
    for r in res["rows"]:
        rows.append(
            {
                "shape": r["shape"],
                "method": r["method"],
                "ckpt": r["checkpointing"],
                "predicted": r["predicted"] / MIB if "predicted" in r and "skipped" not in r else None,
                "measured": r["measured"] / MIB if "measured" in r and "skipped" not in r else None,
                "ratio": r.get("ratio"),
                "ok": ("yes" if r["within"] else "NO") if "within" in r else r.get("skipped", ""),
            }
        )
    cols = [
        ("shape", "shape", ""),
        ("method", "method", ""),
        ("ckpt", "checkpointing", ""),
        ("predicted", "predicted MiB", "{:,.0f}"),
        ("measured", "measured MiB", "{:,.0f}"),
        ("ratio", "predicted / measured", "{:.3f}"),
        ("ok", f"within {res['tolerance']:.0%}", ""),
    ]
    return table(rows, cols)


# ----------------------------------------------------------------------------------------------- published figures

BF16 = ["model.dtype=bfloat16", "trainer.precision=bf16", "data.format=text"]
TORCHTUNE_LORA = ["lora.r=8", "lora.alpha=16", "lora.targets=[q_proj,v_proj,o_proj,mlp]"]
CKPT = ["trainer.gradient_checkpointing=true"]
NF4 = ["model.quantize=nf4"]
# torchtune's recipes compute the loss in 8 chunks of the sequence (CEWithChunkedOutputLoss): 2 x 2048 / 8 positions.
TORCHTUNE_LOSS = ["trainer.loss_chunk=512"]
# (what, shape, overrides, the part compared ('peak' or a plan part), the published figure in bytes, its source).
PUBLISHED = [
    (
        "QLoRA LLaMA-65B (r=64 all linear, checkpointing, 1 x 512)",
        "llama-65b",
        [*BF16, *NF4, *CKPT, "lora.r=64", "trainer.batch_size=1", "trainer.eval_batch_size=1", "data.max_length=512"],
        "peak",
        48e9,
        "QLoRA: fits one 48 GB GPU (< 48 GB)",
    ),
    (
        "QLoRA LLaMA-7B: the 4-bit base",
        "llama-2-7b",
        [*BF16, *NF4, *CKPT, "lora.r=64", "trainer.batch_size=1", "trainer.eval_batch_size=1", "data.max_length=512"],
        "frozen weights",
        5048 * 2**20,
        "QLoRA Fig. 6: 4-bit base 5,048 MB",
    ),
    (
        "torchtune Llama-3.1-8B LoRA (2 x 2048, checkpointing, chunked loss)",
        "llama-8b",
        [
            *BF16,
            *TORCHTUNE_LORA,
            *CKPT,
            *TORCHTUNE_LOSS,
            "trainer.batch_size=2",
            "trainer.eval_batch_size=2",
            "data.max_length=2048",
        ],
        "peak",
        16.2 * 2**30,
        "torchtune README, RTX 4090: 16.2 GiB",
    ),
    (
        "torchtune Llama-3.1-8B QLoRA (2 x 2048, checkpointing, chunked loss)",
        "llama-8b",
        [
            *BF16,
            *TORCHTUNE_LORA,
            *CKPT,
            *TORCHTUNE_LOSS,
            *NF4,
            "trainer.batch_size=2",
            "trainer.eval_batch_size=2",
            "data.max_length=2048",
        ],
        "peak",
        7.4 * 2**30,
        "torchtune README, RTX 4090: 7.4 GiB",
    ),
    (
        "torchtune Llama-3.1-8B full (2 x 2048, checkpointing, chunked loss)",
        "llama-8b",
        [
            *BF16,
            *CKPT,
            *TORCHTUNE_LOSS,
            "method=full",
            "trainer.batch_size=2",
            "trainer.eval_batch_size=2",
            "data.max_length=2048",
        ],
        "peak",
        18.9 * 2**30,
        "torchtune README, RTX 4090: 18.9 GiB (8-bit paged AdamW, optimizer in backward)",
    ),
    (
        "Llama-3.2-1B LoRA, bf16 base (8 x 1024)",
        "llama-1b",
        [*BF16, "trainer.batch_size=8", "trainer.eval_batch_size=8", "data.max_length=1024"],
        "peak",
        None,
        "issue 21's GPU check: NF4 peak <= 0.5x this",
    ),
    (
        "Llama-3.2-1B LoRA, NF4 base (8 x 1024)",
        "llama-1b",
        [*BF16, *NF4, "trainer.batch_size=8", "trainer.eval_batch_size=8", "data.max_length=1024"],
        "peak",
        None,
        "issue 21's GPU check",
    ),
    (
        "Llama-3.2-1B LoRA, NF4 base, checkpointing, chunked loss (8 x 1024)",
        "llama-1b",
        [
            *BF16,
            *NF4,
            *CKPT,
            "trainer.loss_chunk=1024",
            "trainer.batch_size=8",
            "trainer.eval_batch_size=8",
            "data.max_length=1024",
        ],
        "peak",
        None,
        "issue 21's GPU check: what the 0.5x needs",
    ),
]


def published_plans() -> list[dict[str, Any]]:
    """The memory plan of each published configuration (PUBLISHED), on a CUDA device's terms (bf16 autocast, CUDA's
    fixed workspace), built on the meta device from the shape's real dims and vocabulary."""
    import torch

    from lora_lab.config import compose
    from lora_lab.memplan import plan
    from lora_lab.shapes import shape_config
    from lora_lab.train.memory import plan_input

    rows = []
    for what, shape, overrides, part, published, source in PUBLISHED:
        _, cfg = compose(["tracking.enabled=false", *overrides])
        p = plan(plan_input(cfg, torch.device("cuda"), shape_config(shape)))
        ours = p.total if part == "peak" else p.part(part)
        rows.append(
            {
                "what": what,
                "shape": shape,
                "overrides": overrides,
                "compared": part,
                "published": published,
                "source": source,
                "planned": ours,
                "frozen": p.part("frozen weights"),
                "activations": p.part("activations"),
                "logits": p.part("logits and loss"),
                "optimizer": p.part("optimizer state") + p.part("trainable weights") + p.part("gradients"),
                "train_peak": p.train_peak,
                "eval_peak": p.eval_peak,
            }
        )
    return rows


def published_table(rows: list[dict[str, Any]]) -> str:
    """The published figures beside the plan, in GiB."""
    from lora_lab.markdown import table
    from lora_lab.memplan import GIB

    def g(x: Optional[float]) -> Optional[float]:
        return None if x is None else x / GIB

    cols = [
        ("what", "configuration", ""),
        ("compared", "compared", ""),
        ("published", "published GiB", "{:.2f}"),
        ("planned", "planned GiB", "{:.2f}"),
        ("frozen", "frozen weights", "{:.2f}"),
        ("optimizer", "trainable + grads + AdamW", "{:.2f}"),
        ("activations", "activations", "{:.2f}"),
        ("logits", "logits + loss", "{:.2f}"),
        ("train_peak", "training step peak", "{:.2f}"),
        ("eval_peak", "evaluation peak", "{:.2f}"),
        ("source", "source", ""),
    ]
    gib = ("published", "planned", "frozen", "optimizer", "activations", "logits", "train_peak", "eval_peak")
    shown = [{**r, **{k: g(r[k]) for k in gib}} for r in rows]
    return table(shown, cols)
