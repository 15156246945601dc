"""Batches on their way to the device: the training micro-batches as tensors, and the host->device batch helpers.

Training batches come from `TrainBatches` (rows padded once into tables, a batch an index_select and a trim, pinned
and copied without blocking on CUDA); evaluation batches are collated rows (lora_lab.data.collate) moved by
`to_device`, or left-padded prompts from `prompt_batch`.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainBatches:
    """Training micro-batches as tensors, in the order `rows(micro)` gives; `rank` of `world_size` processes takes
    every world_size-th micro-batch of that order.

    The rows are padded once into (N, T) tables, so a batch is an index_select and a trim instead of a Python
    collate per step; on CUDA each batch is built in pinned memory and copied without blocking the host.

    `padding_mask=False` leaves the attention mask out, for causal LMs: the rows are right-padded, so the causal
    mask alone keeps every real token from seeing the padding after it, and the padded positions' outputs carry no
    label. Without a padding mask transformers neither reads the mask back to the host to decide whether it can be
    skipped (a device sync in every forward on CUDA) nor keeps SDPA off its flash kernel.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seed: int,
        device: torch.device,
        pad_to_multiple: int = 1,
        padding_mask: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from lora_lab.data import IGNORE

        rows = data.train["input_ids"]
        labels = data.train["labels"]
        self.n, self.batch_size, self.seed, self.device, self.multiple = (
            len(rows),
            batch_size,
            seed,
            device,
            pad_to_multiple,
        )
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (N,)
        width = -(-int(self.lengths.max()) // pad_to_multiple) * pad_to_multiple
        self.ids = torch.full((self.n, width), data.pad_id, dtype=torch.long)  # (N, T)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        self.mask = (torch.arange(width)[None, :] < self.lengths[:, None]).long()  # (N, T)
        self.per_token = bool(labels) and isinstance(labels[0], (list, tuple))
        if self.per_token:
            self.labels = torch.full((self.n, width), IGNORE, dtype=torch.long)  # (N, T)
            for i, lab in enumerate(labels):
                self.labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        else:
            self.labels = torch.tensor([int(v) for v in labels], dtype=torch.long)  # (N,)
        self._perm: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))
        self.pin = device.type == "cuda"
        self.padding_mask = padding_mask
        # A rank's micro-batch m is micro-batch m x world_size + rank of the one global order: the ranks' micro-batches
        # of a step together are those of a 1-process run with world_size times the accumulation.
        self.rank, self.world_size = rank, world_size

    def rows(self, micro: int) -> torch.Tensor:
        """Row indices of micro-batch number `micro`: a seeded permutation per epoch, last partial batch dropped,
        so the data order is a pure function of (seed, micro) and a resumed run sees the same batches."""
        per_epoch = max(1, self.n // self.batch_size)
        epoch, j = divmod(micro, per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        perm = self._perm[1]
        return perm[j * self.batch_size : (j + 1) * self.batch_size] if self.n >= self.batch_size else perm

    def get(self, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        """This rank's micro-batch `micro` on the device, and its number of real (unpadded) tokens (known without a
        sync)."""
        idx = self.rows(micro * self.world_size + self.rank)
        lengths = self.lengths[idx]
        width = -(-int(lengths.max()) // self.multiple) * self.multiple
        batch = {
            "input_ids": self.ids[idx, :width],
            "labels": self.labels[idx, :width] if self.per_token else self.labels[idx],
        }
        if self.padding_mask:
            batch["attention_mask"] = self.mask[idx, :width]
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, int(lengths.sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch (lora_lab.data.collate) on the device, without blocking the host; its class_label column,
    which the model does not take, left out."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "class_label"}


def prompt_batch(
    rows: list[dict], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' prompts (prompt_ids) left-padded on the device: input ids, attention mask and position ids, each
    (B, T). Left padding puts every prompt's last token at the same position; the positions count real tokens from
    0, as with right padding."""
    seqs = [list(r["prompt_ids"]) for r in rows]
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, q in enumerate(seqs):
        ids[i, width - len(q) :] = torch.tensor(q, dtype=torch.long)
        mask[i, width - len(q) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1, as with right padding
    return ids.to(device), mask.to(device), positions.to(device)
