"""The memory plan: a run's predicted peak memory from its model's shape, its parameter counts and its settings.

A leaf (plain arithmetic, no torch): `PlanInput` is a typed record of numbers (lora_lab.train.memory fills it from a
config and a meta-device model, the bench and the docs from named shapes), `plan()` turns it into a `Plan` (its parts,
the training and evaluation peaks), `table()` prints it and `fitting_settings()` names the overrides that would make
a run fit a device's memory. The formulas and where their coefficients come from are in docs/memory.md.

Several devices (trainer.devices=N) are planned per device: under DDP each holds the whole model (and a bucket copy of
the trainable gradients), under FSDP2 (`sharded`) the weights, gradients and optimizer state are divided by N, plus
the units FSDP2 gathers whole while it computes (one repeated block at a time, and the root's own parameters).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from lora_lab.markdown import table as markdown_table

MIB = 2**20
GIB = 2**30

# Bytes per quantized weight: NF4/FP4 pack 2 weights a byte, plus (double quantization, blocksize 64) one 8-bit absmax
# per 64 weights and one fp32 constant per 256 absmax blocks: 4.127 bits (QLoRA, Dettmers et al. 2023). LLM.int8: one
# byte a weight, plus one fp32 scale per output row (QUANT_ROW_BYTES).
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
QUANT_ROW_BYTES = {"nf4": 0.0, "fp4": 0.0, "int8": 4.0}
QUANTIZE_CHOICES = ("none", *QUANT_BYTES)
# LLM.int8 (bitsandbytes' MatMul8bitLt) keeps each layer's input quantized, with its statistics, on ctx.tensors, outside
# autograd's saved tensors: bytes per input feature per token, measured on the CPU (docs/memory.md).
INT8_INPUT_BYTES = 2
# ...and under activation checkpointing every block still keeps it (the checkpoint's hooks never see ctx.tensors), and
# more: 4.15 (tiny-llama) and 4.36 (SmolLM2-135M) bytes per input feature per token measured, so a fit, not a
# prediction (docs/memory.md).
INT8_CHECKPOINTED_INPUT_BYTES = 4.25
ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, each of its parameter's dtype
# Logits and loss in training, per (token, vocabulary entry), in the loss's fp32: at the start of the backward pass the
# log-softmax output (saved), the gradient nll_loss hands it and the gradient it hands the head are alive together.
TRAIN_LOGIT_COPIES = 3
LOSS_CHUNK = 1024  # the trainer.loss_chunk a refusal suggests: a 128k vocabulary's chunk is 0.5 GiB of fp32 logits
EVAL_LOGIT_COPIES = 2  # evaluation (no grad): the logits and their log-softmax
MARGIN = 0.05  # of activations and loss buffers: allocator rounding and fragmentation
# Fixed workspace: on the CPU the tokenized data, the tokenizer and allocator arenas the process grows beside the
# tensors (measured: docs/memory.md); on CUDA kernels' workspaces (cuBLAS) and the caching allocator's rounding.
FIXED_WORKSPACE = {"cpu": 128 * MIB, "cuda": 256 * MIB}


@dataclass(frozen=True)
class PlanInput:
    """What the plan needs to know, as plain numbers: the model's shape, its parameters by role, and the run's
    settings. One token's activations follow a Llama decoder block (docs/memory.md); other architectures are read
    through the same dims (hidden, MLP width, heads), an estimate."""

    hidden: int  # d
    layers: int  # repeated blocks
    heads: int  # attention heads
    kv_heads: int  # key/value heads
    head_dim: int  # d / heads for most models
    intermediate: int  # MLP width
    vocab: int  # output classes of the loss: the vocabulary (causal_lm) or the labels (seq_cls)
    frozen_linear: int  # frozen weights of the linear layers outside the output head (what model.quantize packs)
    frozen_linear_rows: int  # their output rows (int8 keeps one scale per row)
    frozen_linear_inputs: int  # their input features, summed (int8 keeps each one's input, quantized, for backward)
    largest_linear: int  # weights of the largest such layer (a quantized one is dequantized for each matmul)
    frozen_other: int  # every other frozen parameter: embeddings, norms, biases, the output head
    frozen_bytes: int  # bytes per frozen parameter as stored (4 fp32, 2 bf16)
    trainable: int  # parameters with requires_grad
    trainable_bytes: int  # bytes per trainable parameter (its gradient and AdamW moments are the same dtype)
    trains_all: bool  # every weight trains (full fine-tuning): every linear's input is saved for its weight gradient
    head_trains: int  # trainable parameters of the output head/embedding (their gradient arrives first in backward)
    lora_rank_per_layer: int  # sum of the LoRA ranks in one block (each wrapped linear saves its (B, T, r) A output)
    batch: int  # micro-batch rows (trainer.batch_size)
    seq: int  # tokens per row (data.max_length, + prompt.n_tokens virtual tokens): an upper bound
    eval_batch: int  # rows per evaluation batch
    eval_logit_rows: int  # positions per evaluation row that get logits over the vocabulary (1: the last token only)
    compute_bytes: int  # activations' bytes: 2 under bf16 autocast, else 4
    causal_lm: bool = True  # a loss over the vocabulary at every position (else one per row: a classifier)
    quantize: str = "none"  # model.quantize: none, nf4, fp4, int8
    checkpointing: bool = False  # trainer.gradient_checkpointing: only each block's input is kept, the block recomputed
    device: str = "cpu"  # cpu or cuda: which fixed workspace applies
    grad_accum: int = 1  # micro-batches per step (memory does not grow with it; kept for the suggestions)
    quantizable: bool = True  # the method leaves the base layers frozen (adaptations' trains_base: a 4-bit base serves)
    loss_chunk: int = 0  # trainer.loss_chunk: positions whose logits exist at once in the loss (0: every position)
    devices: int = 1  # trainer.devices: processes, one device each; the plan is one device's
    sharded: bool = False  # FSDP2 (trainer.parallel): weights, gradients and optimizer state divided by `devices`
    block_weights: int = 0  # bytes of the largest repeated block's parameters as stored (FSDP2 gathers one at a time)
    block_trainable: int = 0  # bytes of its trainable parameters (their whole gradients exist until reduce-scattered)
    root_weights: int = 0  # bytes of the parameters outside the repeated blocks (embeddings, head, final norm)
    root_trainable: int = 0  # bytes of the trainable ones among them

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.devices < 1:
            raise ValueError(f"devices: expected an integer >= 1, got {self.devices!r}")
        if self.sharded and (self.quantize != "none" or self.loss_chunk):
            raise ValueError(
                f"sharded: FSDP2 runs neither a quantized base (quantize={self.quantize}) nor the chunked loss "
                f"(loss_chunk={self.loss_chunk}); expected quantize=none and loss_chunk=0"
            )

    @property
    def shards(self) -> int:
        """What the sharded parts are divided by: the devices under FSDP2, else 1 (each device holds the whole)."""
        return self.devices if self.sharded else 1

    @property
    def strategy(self) -> str:
        """How the plan spreads the run: 'one device', 'ddp' or 'fsdp'."""
        return "one device" if self.devices == 1 else "fsdp" if self.sharded else "ddp"


@dataclass(frozen=True)
class Part:
    """One line of the plan: what it is, its bytes, how it was counted."""

    name: str
    bytes: int
    how: str


@dataclass(frozen=True)
class Plan:
    """The predicted memory of a run: `parts` of the training step (they sum to `train_peak`), the evaluation's peak,
    and the peak of the two (`total`)."""

    inp: PlanInput
    parts: tuple[Part, ...]
    train_peak: int
    eval_peak: int

    @property
    def total(self) -> int:
        """The predicted peak: the larger of the training step's and an evaluation's."""
        return max(self.train_peak, self.eval_peak)

    def part(self, name: str) -> int:
        """Bytes of the part called `name`."""
        return next(p.bytes for p in self.parts if p.name == name)


def frozen_weight_bytes(inp: PlanInput) -> int:
    """Bytes of the frozen parameters: linear weights packed as model.quantize says, the rest as stored."""
    if inp.quantize == "none":
        linear = inp.frozen_linear * inp.frozen_bytes
    else:
        linear = inp.frozen_linear * QUANT_BYTES[inp.quantize] + inp.frozen_linear_rows * QUANT_ROW_BYTES[inp.quantize]
    return int(linear + inp.frozen_other * inp.frozen_bytes)


def block_elements(inp: PlanInput) -> int:
    """Elements one block saves for backward per token (a Llama decoder block, SDPA attention; measured with
    torch.autograd.graph.saved_tensors_hooks, docs/memory.md): 6d + 4 MLP + 2 kv + heads + ranks + 2 on a frozen base
    (LoRA: the base's inputs are the adapters' inputs too), 8d + 4 MLP + 2 kv + heads + 2 when every weight trains."""
    kv = inp.kv_heads * inp.head_dim
    d = 8 * inp.hidden if inp.trains_all else 6 * inp.hidden + inp.lora_rank_per_layer
    return d + 4 * inp.intermediate + 2 * kv + inp.heads + 2


def block_bytes(inp: PlanInput, rows: int) -> int:
    """Bytes one block saves for `rows` rows of inp.seq tokens; the two RMSNorms keep their fp32 internals (4d)
    whatever the autocast dtype."""
    tokens = rows * inp.seq
    elems = block_elements(inp)
    return tokens * ((elems - 4 * inp.hidden) * inp.compute_bytes + 4 * inp.hidden * 4)


def layer_temporaries(inp: PlanInput, rows: int) -> int:
    """Bytes alive inside one block beyond what it saves: the gradients of its MLP and residual in backward (or its
    forward temporaries), and for a quantized base the dequantized copy of its largest weight."""
    tokens = rows * inp.seq
    own = tokens * (2 * inp.hidden + 3 * inp.intermediate) * inp.compute_bytes
    dequant = inp.largest_linear * inp.compute_bytes if inp.quantize != "none" else 0
    return own + dequant


def share(nbytes: int, shards: int) -> int:
    """One device's part of `nbytes` divided over `shards` (FSDP2 pads each parameter to a multiple: rounded up)."""
    return -(-int(nbytes) // shards)


def gathered_bytes(inp: PlanInput, training: bool) -> int:
    """Bytes FSDP2 holds whole beside the shards (0 unsharded): the root's own parameters, which stay gathered from
    its forward to the end of its backward, and the repeated block being computed; in training also their trainable
    parameters' whole gradients, alive until they are reduce-scattered."""
    if not inp.sharded:
        return 0
    weights = inp.root_weights + inp.block_weights
    return weights + (inp.root_trainable + inp.block_trainable if training else 0)


def plan(inp: PlanInput) -> Plan:
    """The predicted peak memory of one run on one of its devices: parameters, gradients, AdamW state, activations,
    loss buffers and a workspace margin (the training step), and an evaluation's peak beside it. Each device's rows
    are its own micro-batch's, so activations and logits do not depend on the number of devices; under FSDP2 the
    parameters, gradients and AdamW state are one device's shards."""
    b, t, v = inp.batch, inp.seq, inp.vocab
    n = inp.shards
    frozen = share(frozen_weight_bytes(inp), n)
    trainable = share(inp.trainable * inp.trainable_bytes, n)
    grads = trainable
    adam = ADAM_MOMENTS * trainable
    if inp.checkpointing:
        # Each block keeps only its input (the residual stream, in the compute dtype); in backward one block at a
        # time is run again and its activations are alive while its gradients are computed.
        acts = inp.layers * b * t * inp.hidden * inp.compute_bytes + block_bytes(inp, b)
        acts_how = (
            f"checkpointing: {inp.layers} block inputs of {b} x {t} x {inp.hidden}, plus one block recomputed "
            f"({block_elements(inp)} values/token)"
        )
    else:
        acts = inp.layers * block_bytes(inp, b)
        acts_how = f"{inp.layers} blocks x {b} x {t} tokens x {block_elements(inp)} values saved for backward"
    if inp.quantize == "int8":
        # Every block's linears keep their input, checkpointed or not.
        per_feature = INT8_CHECKPOINTED_INPUT_BYTES if inp.checkpointing else INT8_INPUT_BYTES
        acts += int(b * t * inp.frozen_linear_inputs * per_feature)
        acts_how += "; LLM.int8 keeps each linear's input quantized"
    # Outside the blocks: the final norm (and, when the head trains, its input) saved for backward.
    acts += b * t * inp.hidden * 4 * (3 if inp.trains_all else 1)
    if inp.causal_lm and inp.loss_chunk:
        rows = min(b * t, inp.loss_chunk)
        # One chunk's logits at a time (recomputed in backward), plus the head's input at every position, kept for
        # the chunks' recomputation.
        logits = rows * v * (TRAIN_LOGIT_COPIES * 4 + (inp.compute_bytes if inp.compute_bytes < 4 else 0))
        logits += b * t * inp.hidden * inp.compute_bytes
        logits_how = f"chunks of {rows} x {v} (trainer.loss_chunk), fp32; the head's input {b} x {t} x {inp.hidden}"
    elif inp.causal_lm:
        logits = b * t * v * (TRAIN_LOGIT_COPIES * 4 + (inp.compute_bytes if inp.compute_bytes < 4 else 0))
        logits_how = f"{b} x {t} x {v}: log-softmax, its gradient and the head's, fp32"
    else:
        logits = b * v * TRAIN_LOGIT_COPIES * 4
        logits_how = f"{b} x {v} classifier logits, fp32"
    temporaries = layer_temporaries(inp, b)
    margin = int(MARGIN * (acts + logits)) + FIXED_WORKSPACE[inp.device] + temporaries
    # Gradients fill as activations free: the backward pass starts with every activation and the head's gradient,
    # and ends with every gradient and no activation; the peak holds the larger of the two.
    in_flight = acts + logits + inp.head_trains * inp.trainable_bytes
    overlap = acts + logits + grads - max(in_flight, grads)
    quant = "" if inp.quantize == "none" else f" ({inp.frozen_linear:,} linear weights as {inp.quantize})"
    per = f", 1/{n} each (FSDP2 shards)" if n > 1 else ""
    parts = [
        Part("frozen weights", frozen, f"{inp.frozen_linear + inp.frozen_other:,} parameters{quant}{per}"),
        Part("trainable weights", trainable, f"{inp.trainable:,} parameters x {inp.trainable_bytes} B{per}"),
        Part("gradients", grads, f"one per trainable parameter, same dtype{per}"),
        Part("optimizer state", adam, f"AdamW: {ADAM_MOMENTS} moments per trainable parameter{per}"),
    ]
    if inp.sharded:
        parts.append(
            Part(
                "gathered units",
                gathered_bytes(inp, training=True),
                "FSDP2: the root's own parameters (gathered from forward to backward) and one repeated block at a "
                "time, whole, with their trainable parameters' gradients until reduce-scattered",
            )
        )
    elif inp.strategy == "ddp":
        # DDP's reducer copies every trainable gradient into its buckets (gradient_as_bucket_view off: torch's
        # default), and keeps the buckets for the whole run.
        parts.append(Part("DDP gradient buckets", grads, "DDP: a bucket copy of every trainable gradient"))
    parts += [
        Part("activations", acts, acts_how),
        Part("logits and loss", logits, logits_how),
        Part("workspace", margin, f"block temporaries, {MARGIN:.0%} of activations + loss, fixed {inp.device}"),
        Part("overlap", -overlap, "gradients fill as activations free in backward"),
    ]
    train_peak = sum(p.bytes for p in parts)
    eval_rows = inp.eval_batch * (inp.eval_logit_rows if inp.causal_lm else 1)
    eval_copy = EVAL_LOGIT_COPIES * 4 + (inp.compute_bytes if inp.compute_bytes < 4 else 0)
    if inp.causal_lm and inp.loss_chunk and inp.eval_logit_rows > 1:
        # Token scoring in chunks too: one chunk's logits, the probe's (about one chunk), and the head's input
        # (with its gathered labelled rows) instead of every position's logits.
        rows = min(eval_rows, inp.loss_chunk)
        eval_logits = rows * v * (eval_copy + 4) + 2 * eval_rows * inp.hidden * inp.compute_bytes
    else:
        eval_logits = eval_rows * v * eval_copy
    buckets = grads if inp.strategy == "ddp" else 0  # DDP's buckets outlive the step
    eval_peak = (
        frozen
        + trainable
        + adam
        + gathered_bytes(inp, training=False)
        + buckets
        + eval_logits
        + layer_temporaries(inp, inp.eval_batch)
        + inp.eval_batch * t * inp.hidden * inp.compute_bytes * 2
        + FIXED_WORKSPACE[inp.device]
    )
    return Plan(inp, tuple(parts), int(train_peak), int(eval_peak))


def fitting_settings(inp: PlanInput, available: int, limit: int = 3) -> list[tuple[str, int]]:
    """Overrides that would bring the plan under `available` bytes, fewest changes first: over several devices
    FSDP2 in place of DDP, a 4-bit base, activation checkpointing, then smaller micro-batches with more accumulation
    (the same effective batch). Combinations FSDP2 refuses (a quantized base, the chunked loss) are not offered.
    Each entry is (the overrides, the predicted peak)."""
    changes: list[tuple[str, dict[str, Any]]] = []
    if inp.strategy == "ddp":
        changes.append(("trainer.parallel=fsdp", {"sharded": True}))
    if inp.quantize == "none" and inp.quantizable and not inp.trains_all:
        changes.append(("model.quantize=nf4", {"quantize": "nf4"}))
    if not inp.checkpointing:
        changes.append(("trainer.gradient_checkpointing=true", {"checkpointing": True}))
    if inp.causal_lm and not inp.loss_chunk:
        changes.append((f"trainer.loss_chunk={LOSS_CHUNK}", {"loss_chunk": LOSS_CHUNK}))
    tries: list[tuple[list[str], PlanInput]] = []
    for n in range(1, len(changes) + 1):  # every combination, fewest changes first
        for combo in itertools.combinations(changes, n):
            fields = {k: v for _, change in combo for k, v in change.items()}
            try:
                tries.append(([o for o, _ in combo], replace(inp, **fields)))
            except ValueError:  # a combination FSDP2 refuses (PlanInput's own check): not offered
                continue
    base_sets = [([], inp)] + tries
    batch = inp.batch
    while batch > 1:
        batch = max(1, batch // 2)
        accum = inp.grad_accum * math.ceil(inp.batch / batch)
        for extra, base in base_sets:
            smaller = replace(base, batch=batch, grad_accum=accum)
            tries.append(([*extra, f"trainer.batch_size={batch}", f"trainer.grad_accum={accum}"], smaller))
    found = []
    for overrides, candidate in [([], inp), *tries]:
        overrides, candidate = smaller_eval_batch(overrides, candidate, available)
        if not overrides or any(set(o.split()) <= set(overrides) for o, _ in found):
            continue  # nothing changed, or more changes than a setting that fits already
        peak = plan(candidate).total
        if peak <= available:
            found.append((" ".join(overrides), peak))
            if len(found) == limit:
                break
    return found


def smaller_eval_batch(overrides: list[str], inp: PlanInput, available: int) -> tuple[list[str], PlanInput]:
    """`overrides` and `inp` with trainer.eval_batch_size halved until the evaluation's peak fits (when it is what
    does not fit)."""
    start = inp.eval_batch
    while inp.eval_batch > 1 and plan(inp).eval_peak > available:
        inp = replace(inp, eval_batch=max(1, inp.eval_batch // 2))
    if inp.eval_batch != start:
        overrides = [*overrides, f"trainer.eval_batch_size={inp.eval_batch}"]
    return overrides, inp


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB)."""
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / MIB:,.1f} MiB"


def table(p: Plan, available: Optional[int] = None, device: str = "") -> str:
    """The plan as a Markdown table a terminal shows as it is: each part, the peaks, the device and the verdict."""
    rows = [{"part": part.name, "memory": gib(part.bytes), "how": part.how} for part in p.parts]
    rows.append({"part": "training step peak", "memory": gib(p.train_peak), "how": "sum of the lines above"})
    eval_how = f"no grad, {p.inp.eval_batch} rows; weights and optimizer state stay"
    rows.append({"part": "evaluation peak", "memory": gib(p.eval_peak), "how": eval_how})
    per = f" per device ({p.inp.strategy} over {p.inp.devices})" if p.inp.devices > 1 else ""
    rows.append({"part": "**peak**", "memory": f"**{gib(p.total)}**", "how": f"the larger of the two{per}"})
    if available is not None:
        verdict = "fits" if p.total <= available else "does NOT fit"
        share = f"{100 * p.total / max(1, available):.0f}% of it"
        rows.append({"part": "device", "memory": gib(available), "how": f"{device}: {verdict} ({share})"})
    return markdown_table(rows, [("part", "part", ""), ("memory", "memory", ""), ("how", "how", "")])


def refusal(p: Plan, available: int, device: str, fixes: list[tuple[str, int]]) -> str:
    """Why a run is refused: its peak against the device's memory, and the settings that would fit."""
    per = f" per device ({p.inp.strategy} over {p.inp.devices} devices)" if p.inp.devices > 1 else ""
    head = (
        f"the memory plan needs {gib(p.total)} at its peak{per} (frozen weights {gib(p.part('frozen weights'))}, "
        f"activations {gib(p.part('activations'))}, logits {gib(p.part('logits and loss'))}, optimizer state "
        f"{gib(p.part('optimizer state'))}) but {device} has {gib(available)}"
    )
    if fixes:
        ways = "; ".join(f"{o} ({gib(peak)})" for o, peak in fixes)
        tail = f"; settings that fit: {ways}"
    else:
        tail = (
            "; no setting tried fits (a 4-bit base, checkpointing, micro-batch 1): a smaller model or data.max_length"
        )
    return head + tail + " (python -m lora_lab.plan shows every part; trainer.memory_check=false skips the check)"
