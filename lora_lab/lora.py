"""LoRA core: wrap linear layers of a torch model with low-rank adapters (Hu et al., 2021).

y = W0 x + scaling * B A dropout(x), with A (r, d_in), B (d_out, r), scaling = alpha / r
(or alpha / sqrt(r) with rsLoRA). Leaf module: imports torch, safetensors, the standard library and lora_lab.files
(stdlib-only file helpers) only.
Works on ``nn.Linear`` and on GPT-2-style ``Conv1D`` (detected by duck typing, weight stored (d_in, d_out)).
Variants: DoRA (``variant="dora"``) and PiSSA / OLoRA initialisation (``init="pissa"|"olora"``); modules trained in
full beside the adapter (``modules_to_save``, e.g. a new classification head). Output heads and layer indices are
read from the model (``head_modules``, ``layer_stacks``), never from a list of names.
Adapter files use PEFT's layout and key names, so adapters move both ways between lora_lab and peft.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.files import atomic_write

__all__ = [
    "LoraLayer",
    "ParamCount",
    "apply_lora",
    "resolve_targets",
    "resolve_modules_to_save",
    "head_modules",
    "layer_stacks",
    "fused_expert_parameters",
    "modules_to_save_of",
    "wrapped_modules",
    "count_parameters",
    "merge",
    "unmerge",
    "disable_adapters",
    "unwrap",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "param_groups",
    "adamw",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "atomic_write",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INITS = ("kaiming", "gaussian", "pissa", "olora")
MUTATING_INITS = ("pissa", "olora")  # inits that move part of W0 into A, B (the base weight keeps the residual)
VARIANTS = ("lora", "dora")
PRESETS = ("attn", "mlp", "all-linear")
_CONFIG_ATTR = "_lora_lab_config"  # model-level settings kept for save_adapter
_PEFT_PREFIX = "base_model.model."


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2-style transformers Conv1D: a linear whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLayer)) or _is_conv1d(module)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D."""
    w = module.weight
    if _is_conv1d(module):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skips the call entirely when the dtype is already right: on a launch-bound step every dispatch counts.
    return t if t.dtype == dtype else t.to(dtype)


class _LoraLinearFn(torch.autograd.Function):
    """Fused y = x W0^T + b + scale * (x A^T) B^T.

    One autograd node instead of five: the LoRA term is added inside the GEMM (addmm_, beta=1), the scale
    rides on the GEMM's alpha, and in backward the two input-gradient terms are summed inside a GEMM too,
    so no full-size (N, d_out) or (N, d_in) elementwise pass is spent on the adapter.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, fan_in_fan_out: bool, dtype: torch.dtype):  # type: ignore[override]
        # Everything is computed in `dtype` (the autocast dtype, else the weight's): fp32 adapters on a bf16 base
        # are cast here, once per call (r x d, small), as autocast would do for F.linear.
        off = torch.is_autocast_enabled(x.device.type)  # autocast off inside: dtypes are explicit here
        with torch.autocast(x.device.type, enabled=False) if off else contextlib.nullcontext():
            shape = x.shape
            x2 = _as(x.reshape(-1, shape[-1]), dtype)  # (N, d_in)
            weight, lora_A, lora_B = _as(weight, dtype), _as(lora_A, dtype), _as(lora_B, dtype)
            w_t = weight if fan_in_fan_out else weight.t()  # (d_in, d_out), a view
            # The output is allocated in its final shape and the GEMMs write through a 2-D view of it: the Function
            # returns that base tensor, not a view made inside it, so model code may modify it in place (y += 1).
            out = x2.new_empty(*shape[:-1], w_t.shape[1])  # (..., d_out)
            y = out.view(-1, w_t.shape[1])  # (N, d_out)
            if bias is not None:
                torch.addmm(_as(bias, dtype), x2, w_t, out=y)
            else:
                torch.mm(x2, w_t, out=y)
            h = x2.mm(lora_A.t())  # (N, r)
            y.addmm_(h, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x2, h, weight, lora_A, lora_B)
        ctx.scale, ctx.fan_in_fan_out, ctx.x_shape = scale, fan_in_fan_out, shape
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, h, weight, lora_A, lora_B = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = _as(grad_out.reshape(-1, grad_out.shape[-1]), x2.dtype)  # (N, d_out)
        grad_x = grad_w = grad_b = grad_a = grad_bb = None
        # The scale rides on the GEMMs' alpha (beta=0: the first argument only gives the shape and is ignored, NaNs
        # in it included): one kernel each instead of a GEMM and a multiply.
        if need_bb:
            grad_bb = torch.addmm(lora_B, g.t(), h, beta=0, alpha=scale)  # (d_out, r)
        g_h = torch.addmm(h, g, lora_B, beta=0, alpha=scale)  # (N, r)
        if need_a:
            grad_a = g_h.t().mm(x2)  # (r, d_in)
        if need_x:
            grad_x = g.mm(weight.t() if ctx.fan_in_fan_out else weight)  # (N, d_in): g W0, no view of a view
            grad_x.addmm_(g_h, lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:  # only when a user unfroze the base weight
            grad_w = x2.t().mm(g) if ctx.fan_in_fan_out else g.t().mm(x2)
        if need_b:
            grad_b = g.sum(0)
        # Gradients come back in the compute dtype; autograd casts each to its input's dtype (fp32 adapters).
        return grad_x, grad_w, grad_b, grad_a, grad_bb, None, None, None


class LoraLayer(nn.Module):
    """A Linear or Conv1D (``base_layer``) plus a low-rank update ``scaling * lora_B @ lora_A``.

    variant="dora" (Liu et al. 2024) adds a trainable per-output magnitude ``lora_magnitude_vector`` (d_out,): the
    layer computes m * (W0 + scaling B A) / ||W0 + scaling B A||_row, the norm treated as a constant (as in the paper
    and peft). init="pissa" / "olora" start A and B from the SVD / QR of W0 and keep the residual in the base weight;
    the initial A0, B0 are kept (non-persistent buffers) so the adapter can be saved as plain LoRA against W0.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        variant: str = "lora",
        module_name: str = "",
    ) -> None:
        super().__init__()
        _check_hparams(r, alpha, dropout, init, variant)
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.d_in, self.d_out = _dims(base_layer)
        self.r, self.alpha, self.rslora, self.init, self.variant = r, float(alpha), bool(rslora), init, variant
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = float(dropout)
        self.module_name = module_name  # for error messages only
        self.merged = False
        self.disabled = False
        self._dora_factor: torch.Tensor | None = None  # m / ||W0 + dW|| at merge time: unmerge divides it back out
        w = base_layer.weight
        # Adapters train in fp32 on a bf16/fp16 base (peft's autocast_adapter_dtype): their AdamW updates would
        # round away in 8 mantissa bits. The fused forward casts them to the compute dtype per call.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in, device=w.device, dtype=dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.d_out, r, device=w.device, dtype=dtype))  # (d_out, r)
        mutating = init in MUTATING_INITS
        if mutating and r > min(self.d_in, self.d_out):
            raise ValueError(
                f"init={init!r} needs r <= min(d_in, d_out) = {min(self.d_in, self.d_out)} "
                f"in {module_name or 'the layer'}, got r={r}"
            )
        # PiSSA / OLoRA: A and B at init, (r, d_in) and (d_out, r); None otherwise. Not in the state_dict.
        self.register_buffer("lora_A0", torch.empty_like(self.lora_A) if mutating else None, persistent=False)
        self.register_buffer("lora_B0", torch.empty_like(self.lora_B) if mutating else None, persistent=False)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if variant == "dora":
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.d_out, device=w.device, dtype=dtype))  # (d_out,)
        self.reset_lora_parameters()

    # Model code reads these from the layer it called (T5: self.wo.weight.dtype): they follow the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as in the paper / peft (kaiming-uniform a=sqrt(5), or normal std 1/r), B zero: step 0 = base.

        PiSSA / OLoRA: A, B from W0's principal singular vectors / QR factors, W0 <- W0 - scaling B A (step 0 = base).
        DoRA: the magnitude starts at the row norms of the layer's weight, so step 0 = base too.
        """
        if self.lora_A.device.type == "meta":  # sizing only: nothing to initialise
            return
        if self.init in MUTATING_INITS:
            self._init_from_weight()
        else:
            # Drawn on the CPU, whatever the layer's device: a seed gives the same A on every device (a model kept
            # on the GPU by a warm sweep worker starts where a freshly loaded one does).
            a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)  # (r, d_in)
            if self.init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.copy_(a)
            nn.init.zeros_(self.lora_B)
        if self.lora_magnitude_vector is not None:
            self.lora_magnitude_vector.copy_(self._weight_norm())

    def _init_from_weight(self) -> None:
        """PiSSA (peft's init_lora_weights="pissa") or OLoRA ("olora"), in fp32 as peft does, on the CPU (LAPACK on
        every device: the same factors wherever the model lives)."""
        w = self.base_layer.weight
        weight = (w.t() if self.fan_in_fan_out else w).to("cpu", torch.float32)  # (d_out, d_in)
        if self.init == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            sr = s[: self.r] / self.scaling  # so that scaling * B A is the rank-r SVD truncation of W0
            a = torch.diag(sr.sqrt()) @ vh[: self.r]  # (r, d_in)
            b = u[:, : self.r] @ torch.diag(sr.sqrt())  # (d_out, r)
        else:
            q, rr = torch.linalg.qr(weight)
            a, b = rr[: self.r], q[:, : self.r]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.lora_A0.copy_(a)
        self.lora_B0.copy_(b)
        residual = weight - self.scaling * b @ a  # (d_out, d_in)
        w.copy_((residual.t() if self.fan_in_fan_out else residual).to(w.dtype))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 (fp64 for fp64 weights), in the base weight's layout ((d_out, d_in); Conv1D
        (d_in, d_out))."""
        dt = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        delta = (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling  # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        """DoRA's ||W0 + scaling B A|| per output row, (d_out,), in the weight's dtype; a constant (no gradient)."""
        w = self.base_layer.weight
        lora_w = (self.lora_B @ self.lora_A).to(w.dtype)  # (d_out, d_in)
        full = (w.t() if self.fan_in_fan_out else w) + self.scaling * lora_w
        return torch.linalg.norm(full, dim=1).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op if already merged)."""
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (no-op if not merged). W0 comes back up to the rounding of
        its dtype: (W0 + dW) - dW is rounded twice, so in a bf16 weight a few entries move by one unit in the last
        place (~0.4%); whoever needs W0 bit-exact keeps a copy (the sweep's warm worker restores from one)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def _add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        if w.device.type == "meta":
            raise ValueError(f"cannot merge {self.module_name or 'LoRA layer'}: weights are on the meta device")
        delta = self.delta_weight()
        if self.lora_magnitude_vector is None:
            new = w.to(delta.dtype) + sign * delta  # fp32 (at least) whatever the weight dtype
        else:
            # DoRA, as peft: W' = m / ||W0 + dW|| * (W0 + dW) row-wise; unmerge divides by the same factor.
            rows = -1 if self.fan_in_fan_out else 0  # the output dimension of the stored weight
            shape = (1, -1) if rows == -1 else (-1, 1)
            if sign > 0:
                full = w.to(delta.dtype) + delta
                norm = torch.linalg.norm(full.t() if self.fan_in_fan_out else full, dim=1)  # (d_out,)
                factor = self.lora_magnitude_vector.to(delta.dtype) / norm
                new = factor.view(shape) * full
            else:
                factor = self._dora_factor
                new = w.to(delta.dtype) / factor.view(shape) - delta
        if not torch.isfinite(new).all():
            raise ValueError(f"refusing to write non-finite weights into {self.module_name or 'LoRA layer'}")
        w.copy_(new.to(w.dtype))
        if self.lora_magnitude_vector is not None:
            self._dora_factor = factor if sign > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude_vector is not None:
            return self._forward_dora(x)
        if self.merged:
            if not self.disabled:
                return self.base_layer(x)  # merged: the base call is the whole layer
            if self.lora_A0 is not None:
                return self._forward_original(x)
            scale = -self.scaling  # disabled while merged: subtract the update on the fly, weights untouched
        else:
            if self.disabled:
                return self.base_layer(x) if self.lora_A0 is None else self._forward_original(x)
            scale = self.scaling
        base = self.base_layer
        w = base.weight
        drop = self.dropout > 0.0 and self.training
        autocast = torch.is_autocast_enabled(x.device.type)
        if drop or not w.dtype.is_floating_point or not (autocast or x.dtype == w.dtype):
            return self._forward_composed(x, scale, drop)
        # One fused node under autocast too (a GPU step is launch-bound: the composed path costs ~5 more kernels).
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else w.dtype
        return _LoraLinearFn.apply(x, w, base.bias, self.lora_A, self.lora_B, scale, self.fan_in_fan_out, dtype)

    def _forward_composed(self, x: torch.Tensor, scale: float, drop: bool) -> torch.Tensor:
        """Plain-op path for dropout, mixed dtypes or autocast."""
        y = self.base_layer(x)  # (B, T, d_out)
        xd = F.dropout(x, self.dropout, training=True) if drop else x
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts; no fp32 copy of x
            xd = xd.to(self.lora_A.dtype)
        h = F.linear(xd, self.lora_A) * scale  # (B, T, r): scale on the small tensor
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def _lora_term(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(a.dtype), a) * self.scaling  # (B, T, r)
        return F.linear(h, b)  # (B, T, d_out)

    def _forward_original(self, x: torch.Tensor) -> torch.Tensor:
        """Disabled PiSSA / OLoRA layer: the original W0 = residual + scaling B0 A0 (minus the update if merged)."""
        y = self.base_layer(x)
        y = y + self._lora_term(x, self.lora_A0, self.lora_B0).to(y.dtype)
        if self.merged:
            y = y - self._lora_term(x, self.lora_A, self.lora_B).to(y.dtype)
        return y

    def _forward_dora(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA: y = m / ||W0 + dW|| * (x W0^T + scaling x A^T B^T) + b (peft's formula, dropout on the LoRA input)."""
        base = self.base_layer
        if self.merged:
            if not self.disabled:
                return base(x)
            w = base.weight
            shape = (1, -1) if self.fan_in_fan_out else (-1, 1)
            w0 = (w.to(self._dora_factor.dtype) / self._dora_factor.view(shape) - self.delta_weight()).to(w.dtype)
            return F.linear(x, w0.t() if self.fan_in_fan_out else w0, base.bias)
        if self.disabled:
            return base(x)
        w = base.weight
        w_out = w.t() if self.fan_in_fan_out else w  # (d_out, d_in)
        mag = (self.lora_magnitude_vector / self._weight_norm()).to(x.dtype)  # (d_out,)
        y = F.linear(x, w_out.to(x.dtype))  # (B, T, d_out), no bias
        if self.dropout > 0.0 and self.training:
            xd = F.dropout(x, self.dropout, training=True)
            # peft: the base term keeps the undropped input, the magnitude rescales the dropped one
            lora_out = self._lora_term(xd, self.lora_A, self.lora_B).to(x.dtype)  # (B, T, d_out)
            y = y + (mag - 1) * F.linear(xd, w_out.to(x.dtype)) + mag * lora_out
        else:
            y = mag * (y + self._lora_term(x, self.lora_A, self.lora_B).to(x.dtype))
        return y if base.bias is None else y + base.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"variant={self.variant}, init={self.init}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


def _check_hparams(r: Any, alpha: Any, dropout: Any, init: Any, variant: Any = "lora") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got alpha={alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number, got dropout={dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got init={init!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got variant={variant!r}")


# ----------------------------------------------------------------------------------------------- targets


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> Linear/Conv1D/LoraLayer, in model order; the base layers inside wrappers are not listed."""
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LoraLayer):
            wrappers.append(name)
        if _is_linear(module):
            found[name] = module
    return found


def _inside(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the model's output heads, found from the model itself (no name list):

    - the module ``get_output_embeddings()`` returns (lm_head, embed_out, T5/BART's lm_head ...);
    - the task head the model class puts around its base model: the top-level children of a transformers task model
      (``model.base_model`` is its backbone) other than the backbone, e.g. ``classifier`` (BERT, RoBERTa's
      ``classifier.dense``/``out_proj``), ``score`` (Llama), ``pre_classifier`` + ``classifier`` (DistilBERT);
    - any linear whose weight is tied to an input embedding.
    """
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    heads: list[str] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = None
        with contextlib.suppress(Exception):
            out = get_out()
        if isinstance(out, nn.Module) and id(out) in by_id:
            name = by_id[id(out)]
            parent = name.rpartition(".")[0]
            # A wrapped output layer: the LoraLayer is the head, not its base_layer.
            heads.append(parent if parent and isinstance(named[parent], LoraLayer) else name)
    backbone = getattr(model, "base_model", model)
    if isinstance(backbone, nn.Module) and backbone is not model:
        for name, child in model.named_children():
            if child is not backbone and any(True for _ in child.parameters()) and not _inside(name, heads):
                heads.append(name)
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in _linear_modules(model).items():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if id(base.weight) in embed_ids and not _inside(name, heads):
            heads.append(name)
    order = list(named)
    return sorted(heads, key=order.index)


def layer_stacks(model: nn.Module) -> list[str]:
    """The model's own layer lists: the outermost ``nn.ModuleList``s (``model.layers``, ``transformer.h``,
    ``encoder.block`` and ``decoder.block``, ``bert.encoder.layer`` ...). A module's layer index is its position in the
    stack that holds it, so T5's ``encoder.block.1.layer.0.SelfAttention.q`` is in layer 1 (as in peft)."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and not _inside(name, stacks):
            stacks.append(name)
    return stacks


def _layer_index(name: str, stacks: Sequence[str], layers_pattern: Sequence[str] | None) -> int | None:
    """Index of the layer holding module `name`: from the layer stacks, or, with peft's ``layers_pattern``, from the
    first '<pattern>.<i>.' component (peft's rule)."""
    if layers_pattern:
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    for stack in stacks:
        if name.startswith(stack + "."):
            idx = name[len(stack) + 1 :].split(".", 1)[0]
            return int(idx) if idx.isdigit() else None
    return None


def fused_expert_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Mixture-of-experts weights stored as fused 3-D parameters (transformers 5: ``mlp.experts.gate_up_proj``
    (E, 2I, d), ``down_proj`` (E, d, I)): name -> shape. They are not linear modules, so no preset covers them."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim == 3}


def _is_attn(name: str) -> bool:
    parents = name.split(".")[:-1]
    return any("attn" in p.lower() or "attention" in p.lower() for p in parents)


def _short_names(names: Sequence[str]) -> list[str]:
    """Unique suffixes after the layer index, e.g. 'self_attn.q_proj', for readable error messages."""
    out: list[str] = []
    for n in names:
        s = re.sub(r"^.*?\.\d+\.", "", n)
        if s not in out:
            out.append(s)
    return out


@dataclass
class _Model:
    """What targeting needs to know about a model, computed once per call."""

    linears: dict[str, nn.Module]
    heads: list[str]  # head modules (any type)
    head_linears: set[str]
    index: dict[str, int | None]  # linear -> layer index
    fused: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: nn.Module, layers_pattern: Sequence[str] | None = None) -> "_Model":
        linears = _linear_modules(model)
        heads = head_modules(model)
        stacks = layer_stacks(model)
        return cls(
            linears,
            heads,
            {n for n in linears if _inside(n, heads)},
            {n: _layer_index(n, stacks, layers_pattern) for n in linears},
            fused_expert_parameters(model),
        )

    def match(self, spec: str) -> list[str]:
        """Modules matched by one target: a preset, an exact module name, or a dotted suffix."""
        names = [n for n in self.linears if n not in self.head_linears] if spec in PRESETS else list(self.linears)
        if spec == "all-linear":
            return names
        if spec == "attn":
            return [n for n in names if _is_attn(n)]
        if spec == "mlp":  # inside a layer and not attention: MLP / feed-forward / router (T5 DenseReluDense, BART fc1)
            return [n for n in names if self.index[n] is not None and not _is_attn(n)]
        return [n for n in names if n == spec or n.endswith("." + spec)]

    def no_match_error(self, what: str, spec: str) -> ValueError:
        fused = [
            n
            for n in self.fused
            if n == spec
            or n.endswith("." + spec)
            or _inside(n.rpartition(".")[0], [spec])
            or n.rpartition(".")[0].endswith("." + spec)
        ]
        if fused:
            return ValueError(
                f"{what} {spec!r} names fused 3-D expert weights {fused[:4]}, which lora_lab cannot "
                f"adapt (peft's target_parameters is not supported); linear modules: "
                f"{_short_names(self.linears)}"
            )
        return ValueError(
            f"{what} {spec!r} matches no linear module; presets: {PRESETS}; "
            f"linear modules: {_short_names(list(self.linears))}"
        )


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None = None,
    *,
    target_regex: str | None = None,
    exclude: Sequence[str] = (),
    layers: Sequence[int] | int | None = None,
    layers_pattern: Sequence[str] | str | None = None,
    include_head: bool = False,
    modules_to_save: Sequence[str] = (),
) -> list[str]:
    """Names of the modules ``apply_lora`` would wrap (model order). Targets default to all-linear.

    Presets never include the output heads (``head_modules``) unless ``include_head``; ``layers`` are indices into
    the model's layer stacks (or peft's ``layers_pattern``); modules inside ``modules_to_save`` are never wrapped.
    On mixture-of-experts models whose experts are fused 3-D parameters, 'all-linear' and 'mlp' are refused: they
    would silently leave the experts out.
    """
    if isinstance(targets, str):
        targets = [targets]
    if targets is None:
        targets = () if target_regex is not None else ("all-linear",)
    if isinstance(exclude, str):
        exclude = [exclude]
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    info = _Model.of(model, layers_pattern)
    names = list(info.linears)
    chosen: set[str] = set()
    for spec in targets:
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"targets entries must be non-empty strings, got {spec!r}")
        if spec in ("all-linear", "mlp") and info.fused:
            experts = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in info.fused})
            raise ValueError(
                f"target {spec!r}: this model keeps its experts as fused 3-D parameters ({experts}), which lora_lab "
                f"cannot adapt, so {spec!r} would silently leave them out; name what to adapt instead: 'attn' "
                f"or module names from {_short_names(names)}"
            )
        hit = info.match(spec)
        if not hit:
            raise info.no_match_error("target", spec)
        chosen.update(hit)
    if target_regex is not None:
        try:
            pattern = re.compile(target_regex)
        except re.error as exc:
            raise ValueError(f"target_regex {target_regex!r} is not a valid regex: {exc}") from None
        hit = [n for n in names if pattern.fullmatch(n)]
        if not hit:
            raise ValueError(
                f"target_regex {target_regex!r} full-matches no linear module; linear modules: {_short_names(names)}"
            )
        chosen.update(hit)
    if include_head:
        if not info.head_linears:
            raise ValueError("include_head=True but the model has no recognisable linear output head")
        chosen.update(info.head_linears)
    for spec in exclude:
        hit = info.match(spec)
        if not hit:
            raise info.no_match_error("exclude", spec)
        chosen.difference_update(hit)
    if modules_to_save:
        saved = resolve_modules_to_save(model, modules_to_save)
        chosen = {n for n in chosen if not _inside(n, saved)}
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        wanted = {int(i) for i in layers}
        chosen = {n for n in chosen if info.index[n] in wanted}
    result = [n for n in names if n in chosen]
    if not result:
        raise ValueError(f"targets {list(targets)} with exclude={list(exclude)}, layers={layers} select no module")
    return result


def resolve_modules_to_save(model: nn.Module, specs: Sequence[str], *, strict: bool = True) -> list[str]:
    """Names of the modules trained in full and saved with the adapter (peft's ``modules_to_save``): each spec is a
    module name or dotted suffix. ``strict``: a spec matching nothing is an error (peft tolerates it on load)."""
    if isinstance(specs, str):
        specs = [specs]
    named = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"modules_to_save entries must be non-empty strings, got {spec!r}")
        hit = [n for n in named if (n == spec or n.endswith("." + spec)) and not _inside(n, found)]
        hit = [n for n in hit if not any(_inside(n, [h]) and n != h for h in hit)]  # outermost matches only
        if not hit and strict:
            raise ValueError(
                f"modules_to_save {spec!r} matches no module; top-level modules: "
                f"{[n for n, _ in model.named_children()]}, heads: {head_modules(model)}"
            )
        found.extend(h for h in hit if h not in found)
    order = {n: i for i, n in enumerate(named)}
    return sorted(found, key=order.__getitem__)


# -------------------------------------------------------------------------------------------- apply/wrap


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] | str | None = None,
    target_regex: str | None = None,
    exclude: Sequence[str] = (),
    layers: Sequence[int] | int | None = None,
    layers_pattern: Sequence[str] | str | None = None,
    rslora: bool = False,
    init: str = "kaiming",
    variant: str = "lora",
    include_head: bool = False,
    modules_to_save: Sequence[str] = (),
) -> list[str]:
    """Wrap the targeted linears with LoRA in place, freeze every other parameter except those of
    ``modules_to_save`` (trained in full, saved with the adapter), return the wrapped names.

    ``targets`` defaults to ("all-linear",) unless ``target_regex`` is given. ``variant`` "lora" or "dora";
    ``init`` "kaiming"/"gaussian" (B = 0) or "pissa"/"olora" (A, B from W0; the base weight keeps the residual).
    Works on meta-device models (nothing is allocated or initialised there), so parameter counts of big models
    need no download.
    """
    _check_hparams(r, alpha, dropout, init, variant)
    if variant == "dora" and init in MUTATING_INITS:
        raise ValueError(f"variant='dora' with init={init!r} is not supported (no conversion back to plain LoRA)")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    names = resolve_targets(
        model,
        targets,
        target_regex=target_regex,
        exclude=exclude,
        layers=layers,
        layers_pattern=layers_pattern,
        include_head=include_head,
        modules_to_save=modules_to_save,
    )
    saved = resolve_modules_to_save(model, modules_to_save) if modules_to_save else []
    _check_trainable_untied(model, saved)
    linears = _linear_modules(model)
    already = [n for n in names if isinstance(linears[n], LoraLayer)]
    if already:
        raise ValueError(f"modules already wrapped with LoRA: {already}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoraLayer(
            linears[name],
            r=r,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
            init=init,
            variant=variant,
            module_name=name,
        )
        setattr(parent, child, layer)
    cfg = getattr(model, _CONFIG_ATTR, None) or {}
    saved = sorted(set(saved) | set(cfg.get("modules_to_save", [])), key=[n for n, _ in model.named_modules()].index)
    _set_trainable(model, saved)
    settings = {
        "r": r,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "rslora": bool(rslora),
        "init": init,
        "variant": variant,
    }
    layer_list = None if layers is None else sorted({int(i) for i in ([layers] if isinstance(layers, int) else layers)})
    pattern = list(layers_pattern) if layers_pattern else None
    new_cfg = {**settings, "layers": layer_list, "layers_pattern": pattern, "modules_to_save": saved, "mixed": False}
    if cfg:  # a second call: save_adapter refuses mixed settings; wrapped names already pin the layers
        new_cfg["mixed"] = cfg.get("mixed", False) or any(cfg[k] != v for k, v in settings.items())
        same = cfg.get("layers") == layer_list and cfg.get("layers_pattern") == pattern
        new_cfg["layers"], new_cfg["layers_pattern"] = (layer_list, pattern) if same else (None, None)
    object.__setattr__(model, _CONFIG_ATTR, new_cfg)  # plain attribute, not a submodule
    return names


_TRAINABLE_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")


def _set_trainable(model: nn.Module, saved: Sequence[str]) -> None:
    """LoRA parameters and the parameters of modules_to_save train; everything else is frozen."""
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.rsplit(".", 1)[-1] in _TRAINABLE_LEAVES or _inside(pname.rpartition(".")[0], saved))


def _check_trainable_untied(model: nn.Module, saved: Sequence[str]) -> None:
    """A module trained in full must not share a weight with a frozen one (GPT-2's lm_head is wte)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for names in owners.values():
        inside = [n for n in names if _inside(n.rpartition(".")[0], saved)]
        if inside and len(inside) < len(names):
            raise ValueError(
                f"modules_to_save: {inside[0]} is tied to {[n for n in names if n not in inside][0]}; "
                "training it in full would change that module too"
            )


def modules_to_save_of(model: nn.Module) -> list[str]:
    """Names of the modules apply_lora set to train in full (saved with the adapter)."""
    return list((getattr(model, _CONFIG_ATTR, None) or {}).get("modules_to_save", []))


def _layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def wrapped_modules(model: nn.Module) -> list[str]:
    """Names of the LoRA-wrapped modules, in model order."""
    return [n for n, _ in _layers(model)]


# ------------------------------------------------------------------------------------------------ counts


@dataclass
class ParamCount:
    """Trainable and total parameters (tied weights once) plus one (name, d_in, d_out, r, n_params) per layer
    (n_params counts DoRA's magnitude too). Parameters of modules_to_save are trainable but not in ``modules``."""

    trainable: int
    total: int
    percent: float
    modules: list[tuple[str, int, int, int, int]] = field(default_factory=list)

    @property
    def lora(self) -> int:
        return sum(m[4] for m in self.modules)


def count_parameters(model: nn.Module) -> ParamCount:
    """The one parameter counter (logs and reports). Each LoRA layer is checked against r * (d_in + d_out) (+ d_out)."""
    modules = []
    for name, layer in _layers(model):
        d_in, d_out = _dims(layer.base_layer)
        mag = layer.lora_magnitude_vector
        n = layer.lora_A.numel() + layer.lora_B.numel() + (0 if mag is None else mag.numel())
        if tuple(layer.lora_A.shape) != (layer.r, d_in) or tuple(layer.lora_B.shape) != (d_out, layer.r):
            raise ValueError(
                f"{name}: lora_A {tuple(layer.lora_A.shape)} / lora_B {tuple(layer.lora_B.shape)} inconsistent "
                f"with r={layer.r}, d_in={d_in}, d_out={d_out}"
            )
        expected = layer.r * (d_in + d_out) + (0 if mag is None else d_out)  # DoRA: + one magnitude per output
        if n != expected:
            raise ValueError(
                f"{name}: {n} LoRA parameters, expected r * (d_in + d_out) (+ d_out with DoRA) = {expected}"
            )
        modules.append((name, d_in, d_out, layer.r, n))
    params = list(model.parameters())  # parameters() yields a tied tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParamCount(trainable, total, 100.0 * trainable / total if total else 0.0, modules)


# ------------------------------------------------------------------------------------------ merge / unwrap


def _check_untied(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, layer in layers:
        if counts.get(id(layer.base_layer.weight), 0) > 1:
            raise ValueError(f"cannot merge into {name}: its weight is tied to another module (e.g. the embedding)")


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (fp32 math, cast back). Idempotent."""
    layers = [(n, m) for n, m in _layers(model) if not m.merged]
    _check_untied(model, layers)
    for _, layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take every adapter back out of its base weight. Idempotent."""
    for _, layer in _layers(model):
        layer.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Base-model behaviour inside the block, merged or not, without touching any weight.

    A merged layer subtracts its update on the fly (W0 + dW)x - dW x, so the output equals the base up to the
    rounding of the merged weight in its dtype. PiSSA / OLoRA layers add back their initial B0 A0 (the original W0).
    modules_to_save are trained in place (no copy is kept, unlike peft), so they keep their trained weights here.
    """
    layers = [m for _, m in _layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def unwrap(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base modules back: state_dict keys are the base model's again."""
    merge(model)
    for name, layer in _layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, _CONFIG_ATTR):
        object.__delattr__(model, _CONFIG_ATTR)
    return model


# ---------------------------------------------------------------------------------------- state / files


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that trains, keyed like model.state_dict(): '<module>.lora_A', '<module>.lora_B', DoRA's
    '<module>.lora_magnitude_vector', and the state of each module in modules_to_save ('classifier.weight')."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers(model):
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
        if layer.lora_magnitude_vector is not None:
            out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    for name in modules_to_save_of(model):
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{name}.{k}"] = v.detach()
    return out


def _task_type(model: nn.Module, saved: Sequence[str]) -> str | None:
    # SEQ_CLS makes peft add 'classifier'/'score' to modules_to_save: only said when a head is saved with the adapter.
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "SEQ_CLS" if name.endswith("ForSequenceClassification") and saved else None


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, base_model_name: str | None = None, task_type: str | None = None
) -> None:
    """Write adapter_model.safetensors + adapter_config.json in PEFT's layout (atomically).

    DoRA: ``use_dora`` and '<module>.lora_magnitude_vector'. modules_to_save: their names in the config and their
    state under '<module>.<param>' (as peft). PiSSA / OLoRA: saved converted to plain LoRA against the original W0,
    as peft's ``path_initial_model_for_weight_conversion`` does: A' = [A; A0], B' = [B, -B0], r' = 2r, alpha' = 2 alpha
    (sqrt(2) alpha with rsLoRA), so any LoRA loader applies it to the unmodified base model.
    """
    layers = _layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layer")
    cfg = getattr(model, _CONFIG_ATTR, None) or {}
    first = layers[0][1]
    key = ("r", "alpha", "rslora", "dropout", "variant", "init")
    for name, layer in layers:
        if tuple(getattr(layer, k) for k in key) != tuple(getattr(first, k) for k in key):
            raise ValueError(f"save_adapter: {name} has r/alpha/rslora/dropout/variant/init unlike {layers[0][0]}")
    if cfg.get("mixed"):
        raise ValueError(
            "save_adapter: apply_lora was called with different settings; one adapter config cannot hold them"
        )
    if base_model_name is None:
        base_model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    converted = first.init in MUTATING_INITS
    tensors = {}
    for name, layer in layers:
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        if converted:  # scaling (B A - B0 A0) = scaling [B, -B0] [A; A0]
            a, b = torch.cat([a, layer.lora_A0], dim=0), torch.cat([b, -layer.lora_B0], dim=1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.to("cpu").contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.to("cpu").contiguous()
        if layer.lora_magnitude_vector is not None:
            magnitude = layer.lora_magnitude_vector.detach()
            tensors[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude.to("cpu").contiguous()
    saved = modules_to_save_of(model)
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"{_PEFT_PREFIX}{name}.{k}"] = v.detach().to("cpu").contiguous()
    r, alpha = first.r, first.alpha
    if converted:
        r, alpha = 2 * r, alpha * (math.sqrt(2.0) if first.rslora else 2.0)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _task_type(model, saved),
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "target_modules": [n for n, _ in layers],  # exact names: peft matches them as-is
        "use_rslora": first.rslora,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "modules_to_save": saved or None,
        "use_dora": first.variant == "dora",
        "inference_mode": True,
    }
    if cfg.get("layers") is not None:
        config["layers_to_transform"] = cfg["layers"]
        if cfg.get("layers_pattern"):
            config["layers_pattern"] = cfg["layers_pattern"]
    os.makedirs(folder, exist_ok=True)
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(os.path.join(folder, ADAPTER_WEIGHTS), data)
    atomic_write(os.path.join(folder, ADAPTER_CONFIG), (json.dumps(config, indent=2) + "\n").encode())


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: adapter config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} (per-module ranks) is not supported")
    if cfg.get("target_parameters"):
        raise ValueError(
            f"{path}: target_parameters={cfg['target_parameters']!r} (LoRA on fused expert weights) is not supported"
        )
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in ("gaussian", *MUTATING_INITS)):
        raise ValueError(f"{path}: init_lora_weights={init!r} is not supported (true, 'gaussian', 'pissa', 'olora')")
    if "r" not in cfg or "target_modules" not in cfg:
        raise ValueError(f"{path}: missing 'r' or 'target_modules'")
    return cfg


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: adapter weights not found") from None
    try:
        return safetensors.torch.load(data)  # safetensors only: never unpickle
    except Exception as exc:  # SafetensorError and friends: corrupt or truncated
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def _peft_key(key: str) -> str:
    """peft keys as lora_lab writes them: some peft versions keep the adapter name ('.default') or a '.weight'."""
    key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
    key = re.sub(r"\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$", ".lora_magnitude_vector", key)
    return key.replace(".modules_to_save.default.", ".")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load a PEFT-layout LoRA adapter; wraps the model from the config first if it is not wrapped yet.

    Reads DoRA (use_dora), modules_to_save (names that match no module are skipped, as peft does), layers_pattern,
    and PiSSA / OLoRA adapters saved unconverted (the init is redone on this base model, then A, B are loaded).
    """
    cfg_path = os.path.join(folder, ADAPTER_CONFIG)
    w_path = os.path.join(folder, ADAPTER_WEIGHTS)
    cfg = _read_config(cfg_path)
    tensors = _read_weights(w_path)
    if not _layers(model):
        tm = cfg["target_modules"]
        targets, regex = (
            (None, tm)
            if isinstance(tm, str) and tm != "all-linear"
            else ([tm] if isinstance(tm, str) else list(tm), None)
        )
        init = cfg.get("init_lora_weights", True)
        exclude = cfg.get("exclude_modules") or ()
        if isinstance(exclude, str):
            raise ValueError(f"{cfg_path}: exclude_modules as a regex is not supported")
        try:
            saved = resolve_modules_to_save(model, cfg.get("modules_to_save") or (), strict=False)
            apply_lora(
                model,
                r=cfg["r"],
                alpha=cfg.get("lora_alpha", 8),
                dropout=cfg.get("lora_dropout", 0.0),
                targets=targets,
                target_regex=regex,
                exclude=exclude,
                layers=cfg.get("layers_to_transform"),
                layers_pattern=cfg.get("layers_pattern") or None,
                rslora=bool(cfg.get("use_rslora", False)),
                init=init if init in ("gaussian", *MUTATING_INITS) else "kaiming",
                variant="dora" if cfg.get("use_dora") else "lora",
                modules_to_save=saved,
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
    layers = dict(_layers(model))
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"load_adapter: unmerge first, merged modules: {merged[:3]}")
    expected: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.lora_magnitude_vector is not None:
            expected[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for name in modules_to_save_of(model):
        for k, v in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{_PEFT_PREFIX}{name}.{k}"] = v
    tensors = {_peft_key(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{w_path}: missing keys {missing[:5]} ({len(missing)}), "
            f"unexpected keys {unexpected[:5]} ({len(unexpected)})"
        )
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
        for k, p in expected.items()
        if tensors[k].shape != p.shape
    ]
    if bad:
        raise ValueError(f"{w_path}: mis-shaped keys: {bad[:5]}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
    return list(layers)


# ------------------------------------------------------------------------------------------- optimizer


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
    b_ids = {id(m.lora_B) for _, m in _layers(model)}
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
