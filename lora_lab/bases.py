"""How a LoRA layer reaches its frozen base layer: one small interface, one entry per kind of base layer.

A LoRA layer never reads its base layer's weight by attribute: it asks a ``BaseLayer`` for the forward, the weight as
a dense (out, in) matrix (merge, DoRA's row norms, PiSSA / OLoRA's factorisation), a write-back of such a matrix, the
shape and the dtype. ``KINDS`` is the dispatcher list (as peft's ``dispatch_*`` functions): the first kind whose
``matches`` accepts a module wraps it. Today: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out), peft's
``fan_in_fan_out``). A quantized base (4-bit / 8-bit: lora_lab.quant's entries, added with ``register``) is one
more entry that dequantizes in ``dense`` and re-quantizes in ``write``; its ``quantized`` flag tells the LoRA layer
that ``write`` rounds (so a merge keeps a ``snapshot`` to ``restore`` on unmerge) and that its stored weight is no
GEMM operand.

Torch only; imports nothing from lora_lab.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = [
    "BaseLayer",
    "LinearBase",
    "Conv1DBase",
    "KINDS",
    "register",
    "base_of",
    "adaptable",
    "is_conv1d",
    "is_quantized",
    "quantized_modules",
]


class BaseLayer(Protocol):
    """A frozen base layer as a LoRA layer sees it (one implementation per kind of module)."""

    module: nn.Module
    fan_in_fan_out: bool  # the stored weight is (in, out): what the fused GEMM and peft's config need to know
    quantized: bool  # the stored weight is packed (4-bit / 8-bit): write() rounds, and no GEMM takes it as it is

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight parameter, in the module's own layout and dtype (model code and the fused GEMM)."""
        ...

    @property
    def bias(self) -> torch.Tensor | None: ...

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the dense weight (``dense()``'s)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output for x (..., in) -> (..., out)."""
        ...

    def dense(self) -> torch.Tensor:
        """The weight as a dense (out, in) matrix in ``dtype`` (a view of the stored weight where one exists)."""
        ...

    def write(self, weight: torch.Tensor) -> None:
        """Store a dense (out, in) weight (any floating dtype: cast to the stored one). Call under torch.no_grad()."""
        ...

    def snapshot(self) -> object:
        """A copy of the stored weight as it is (packed data and quantization state included), for ``restore``."""
        ...

    def restore(self, snap: object) -> None:
        """Put back exactly what ``snapshot`` copied (bit for bit). Call under torch.no_grad()."""
        ...


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2-style transformers Conv1D, by duck typing (no transformers import): a linear stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class LinearBase:
    """``nn.Linear``: weight stored (out, in)."""

    fan_in_fan_out = False
    quantized = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:
        # A packed (integer) weight is a quantized layer of a kind not registered here: never read it as a matrix.
        return isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense(self) -> torch.Tensor:
        return self.module.weight  # (out, in): the parameter itself

    def write(self, weight: torch.Tensor) -> None:
        w = self.module.weight
        w.copy_(weight.to(w.dtype))

    def snapshot(self) -> object:
        return self.module.weight.detach().clone()

    def restore(self, snap: object) -> None:
        self.module.weight.copy_(snap)


class Conv1DBase(LinearBase):
    """transformers' ``Conv1D`` (GPT-2): y = x W + b with W stored (in, out)."""

    fan_in_fan_out = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return is_conv1d(module)

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.module.weight.shape[1])

    def dense(self) -> torch.Tensor:
        return self.module.weight.t()  # (out, in), a view

    def write(self, weight: torch.Tensor) -> None:
        w = self.module.weight
        w.copy_(weight.t().to(w.dtype))


# The dispatcher list: the first kind that matches a module wraps it. A subclass of nn.Linear with its own storage
# (bitsandbytes' Linear4bit / Linear8bitLt, registered by lora_lab.quant) goes before LinearBase.
KINDS: list[type] = [LinearBase, Conv1DBase]


def register(kind: type) -> None:
    """Add a base-layer kind ahead of the ones already known (a subclass of nn.Linear must match before
    ``LinearBase``). Registering the same kind twice is a no-op."""
    if kind not in KINDS:
        KINDS.insert(0, kind)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a quantized linear of a registered kind (its weight is packed, not a float matrix)."""
    kind = next((k for k in KINDS if k.matches(module)), None)
    return kind is not None and kind.quantized


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the quantized linears in `model` (a LoRA layer's own ``base_layer`` included), in model order."""
    return [name for name, module in model.named_modules() if is_quantized(module)]


def adaptable(module: nn.Module) -> bool:
    """Whether some kind in ``KINDS`` can be the base of a LoRA layer: which modules LoRA can target."""
    return any(kind.matches(module) for kind in KINDS)


def base_of(module: nn.Module) -> BaseLayer:
    """The ``BaseLayer`` view of `module`; TypeError naming its type when no kind in ``KINDS`` matches."""
    for kind in KINDS:
        if kind.matches(module):
            return kind(module)
    raise TypeError(
        f"a LoRA layer cannot wrap a {type(module).__name__}: its base layer kinds are "
        f"{', '.join(k.__name__ for k in KINDS)}"
    )
