"""Optimizer helpers: parameter groups (LoRA+), torch's fused AdamW where it runs, and the learning-rate schedule.

Torch and the standard library, plus lora_lab.targets (which modules are LoRA layers, for LoRA+'s lora_B group).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from lora_lab.targets import is_lora_layer

__all__ = ["param_groups", "adamw", "lr_lambda"]


def param_groups(model: nn.Module, lr: float, lr_ratio: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups over every parameter with requires_grad (LoRA+: lora_B gets lr * lr_ratio).

    Without LoRA layers (full fine-tuning) this is one group of all trainable parameters.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got lr={lr!r}")
    if not (isinstance(lr_ratio, (int, float)) and lr_ratio > 0):
        raise ValueError(f"lr_ratio must be > 0, got lr_ratio={lr_ratio!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")
    b_ids = {id(m.lora_B) for m in model.modules() if is_lora_layer(m)}
    main, b = [], []
    for p in model.parameters():
        if p.requires_grad:
            (b if id(p) in b_ids else main).append(p)
    groups = []
    if main:
        groups.append({"params": main, "lr": lr, "weight_decay": weight_decay})
    if b:
        groups.append({"params": b, "lr": lr * lr_ratio, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("param_groups: the model has no parameter with requires_grad")
    return groups


# torch's fused AdamW runs on these devices (CPU since torch 2.4). Without `fused`, torch picks foreach on CUDA but the
# single-tensor Python loop on the CPU: ~30 aten calls per tensor, 13k per step for a LoRA model's 420 tensors.
_FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (tensors or param groups), fused (one kernel for every tensor) where torch has it
    for all of them: floating tensors on CUDA or the CPU; otherwise torch's default. Same update as the per-tensor
    loop up to float rounding (~1e-7 relative)."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `step`: linear warmup, then constant or cosine to zero."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
