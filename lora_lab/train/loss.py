"""The training loss of a step: the model's own (transformers' cross-entropy over the full (B, T, V) logits), or, for
a causal LM with trainer.loss_chunk > 0, the output head and the cross-entropy computed a chunk of positions at a
time under activation checkpointing, so the fp32 logits of the whole batch never exist at once. At a 128k vocabulary
those logits (and their log-softmax and gradient) are the largest tensors of a LoRA step: Llama-3.1-8B at 2 x 2048
holds ~6 GiB of them (torchtune's CEWithChunkedOutputLoss and Liger's fused linear cross-entropy do the same).

The evaluation of text and chat (lora_lab.train.evaluate) uses the same head_returns_hidden under trainer.loss_chunk.

Every position goes through the head, those without a label contribute nothing (cross-entropy's ignore_index), and
the mean is over the labelled ones, as transformers' loss takes it. Selecting the labelled positions first would save
head matmuls on a prompted task, but it needs their count on the host: a device sync per micro-batch, which the loop
otherwise avoids (lora_lab.train.loop reads the losses back once per trainer.sync_every steps).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of a position that carries no loss (transformers' ignore_index)

# Config keys of architectures whose forward changes the head's output before it becomes the logits (Gemma 2's
# soft-capping, Cohere's and Granite's scaling): a chunked loss that applies the head itself would skip that step.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# (what the step calls: the model, or DDP around it; the model itself; the batch) -> the micro-batch's mean loss
LossFn = Callable[[nn.Module, nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def model_loss(stepped: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model computes itself from batch['labels'] (mean over the positions that carry one)."""
    return stepped(**batch).loss


def check_chunkable(model: nn.Module) -> None:
    """Raise ValueError, naming the config key, for a model whose logits are not simply its head's output."""
    config = getattr(model, "config", None)
    for key in LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(
                f"trainer.loss_chunk: {type(model).__name__} transforms its head's output ({key}="
                f"{getattr(config, key)}); the chunked loss would skip that: set trainer.loss_chunk=0"
            )
    if _head_site(model) is None:
        raise ValueError(
            f"trainer.loss_chunk: {type(model).__name__} has no output head (get_output_embeddings); "
            "set trainer.loss_chunk=0"
        )


def training_loss(chunk: int) -> LossFn:
    """The step's loss function: the model's own for chunk 0, else chunked_loss with `chunk` positions a chunk."""
    if chunk <= 0:
        return model_loss
    return lambda stepped, model, batch: chunked_loss(model, batch, chunk, stepped)


def chunked_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk: int, stepped: nn.Module | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM over the positions with a label, the head applied `chunk`
    positions at a time; each chunk's logits are recomputed in backward instead of kept (same value and gradients
    as model_loss, up to the order of the sums). `stepped`: what runs the forward (DDP around `model`; default
    `model`), whose head is swapped for the call."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with head_returns_hidden(model) as (head, seen):
        (stepped or model)(**inputs)
    hidden = seen.input  # (B, T', H): what the head would have read, before a wrapper drops any position
    if hidden.shape[1] > labels.shape[1]:  # virtual tokens prepended (prompt tuning): they carry no label
        labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE)
    target = labels[:, 1:].reshape(-1)  # (B * (T' - 1),): position t predicts token t + 1
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B * (T' - 1), H)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.numel(), chunk):  # the count is the shape's: no device sync
        total = total + checkpoint(
            _chunk_sum, head, states[start : start + chunk], target[start : start + chunk], use_reentrant=False
        )
    # No labelled position: 0 with a gradient path (transformers' mean over nothing is NaN; the loop's divergence
    # check would stop a run on a batch that only lacks labels).
    return total / (target != IGNORE).sum().clamp(min=1)


def _chunk_sum(head: nn.Module, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()  # (n, V)
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")


def _head_site(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the module get_output_embeddings returns (a LoRA layer around it included)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if not isinstance(head, nn.Module):
        return None
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is head:
                return module, child_name
    return None


class _Seen(nn.Identity):
    """The output head's stand-in: returns its input, and keeps it. Prompt tuning drops the virtual tokens'
    logits after the head; the model's own loss scores the last virtual token's prediction of the first real one,
    so the chunked loss reads the head's input, not the model's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x
        return x


@contextlib.contextmanager
def head_returns_hidden(model: nn.Module) -> Iterator[tuple[nn.Module, _Seen]]:
    """Inside the block the model's output head is a _Seen (the forward's `logits` are the head's input); yields
    the head and the stand-in. The head is put back on leaving, whatever happens."""
    site = _head_site(model)
    if site is None:
        raise ValueError(f"trainer.loss_chunk: {type(model).__name__} has no output head (get_output_embeddings)")
    parent, attr = site
    head = getattr(parent, attr)
    # nn.Module.__setattr__ registers the replacement as the child of that name (and the head back afterwards).
    seen = _Seen()
    setattr(parent, attr, seen)
    try:
        yield head, seen
    finally:
        setattr(parent, attr, head)
