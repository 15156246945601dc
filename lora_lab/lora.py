"""The LoRA layer (Hu et al., 2021): its fused autograd node, apply, count, merge/unmerge/disable/unwrap, save/load.

The trained state (``lora_state_dict``) and the adapter entry points (``save_adapter`` / ``load_adapter``) live here.

y = W0 x + scaling * B A dropout(x), with A (r, d_in), B (d_out, r), scaling = alpha / r
(or alpha / sqrt(r) with rsLoRA). The frozen base layer is reached through lora_lab.bases (``nn.Linear``, GPT-2's
``Conv1D``; one entry per kind), the modules to wrap are found by lora_lab.targets, and adapter files are written and
read in peft's layout by lora_lab.peft_io, so adapters move both ways between lora_lab and peft.
Variants: DoRA (``variant="dora"``) and PiSSA / OLoRA initialisation (``init="pissa"|"olora"``); modules trained in
full beside the adapter (``modules_to_save``, e.g. a new classification head).
Torch core: imports torch, the standard library and lora_lab's bases, targets and peft_io only.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab import peft_io
from lora_lab.bases import BaseLayer, base_of, quantized_modules
from lora_lab.targets import inside, linear_modules, resolve_modules_to_save, resolve_targets

__all__ = [
    "LoraLayer",
    "ParamCount",
    "apply_lora",
    "modules_to_save_of",
    "wrapped_modules",
    "count_parameters",
    "merge",
    "unmerge",
    "disable_adapters",
    "unwrap",
    "lora_state_dict",
    "planned_state_shapes",
    "save_adapter",
    "load_adapter",
]

INITS = ("kaiming", "gaussian", "pissa", "olora")
MUTATING_INITS = ("pissa", "olora")  # inits that move part of W0 into A, B (the base weight keeps the residual)
VARIANTS = ("lora", "dora")
_CONFIG_ATTR = "_lora_lab_config"  # model-level settings kept for save_adapter


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
    """A base layer (``base_layer``: any kind lora_lab.bases knows, e.g. nn.Linear or GPT-2's Conv1D) plus a low-rank
    update ``scaling * lora_B @ lora_A``; the base layer is reached through ``base`` (a ``bases.BaseLayer``).

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
        # Every read and write of the frozen weight goes through this view of base_layer (dense (out, in), shape,
        # dtype), so another kind of base (a quantized one) is one more entry in bases.KINDS, not a branch here.
        self.base: BaseLayer = base_of(base_layer)
        self.d_in, self.d_out = self.base.in_features, self.base.out_features
        self.r, self.alpha, self.rslora, self.init, self.variant = r, float(alpha), bool(rslora), init, variant
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = float(dropout)
        self.module_name = module_name  # for error messages only
        self.merged = False
        self.disabled = False
        self._dora_factor: torch.Tensor | None = None  # m / ||W0 + dW|| at merge time: unmerge divides it back out
        self._unmerged: object | None = None  # a quantized base's stored weight before the merge (base.snapshot())
        device = self.base.device
        # Adapters train in fp32 on a bf16/fp16 base (peft's autocast_adapter_dtype): their AdamW updates would
        # round away in 8 mantissa bits. The fused forward casts them to the compute dtype per call.
        dtype = self.base.dtype if self.base.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in, device=device, dtype=dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.d_out, r, device=device, dtype=dtype))  # (d_out, r)
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
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.d_out, device=device, dtype=dtype))  # (d_out,)
        self.reset_lora_parameters()

    # Model code reads these from the layer it called (T5: self.wo.weight.dtype): they follow the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base weight is stored (d_in, d_out) (GPT-2's Conv1D): peft's config key of that name."""
        return self.base.fan_in_fan_out

    def rebase(self, base_layer: nn.Module) -> None:
        """Put another module of the same shape under this layer (a dense copy of a quantized base: what
        lora_lab.quant.dense_copy does); every later read and write goes through its view."""
        view = base_of(base_layer)
        if (view.in_features, view.out_features) != (self.d_in, self.d_out):
            raise ValueError(
                f"{self.module_name or 'LoRA layer'}: a base of shape ({view.out_features}, {view.in_features}) "
                f"cannot replace one of ({self.d_out}, {self.d_in})"
            )
        self.base_layer, self.base = base_layer, view

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
        weight = self.base.dense().to("cpu", torch.float32)  # (d_out, d_in)
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
        self.base.write(weight - self.scaling * b @ a)  # the residual, (d_out, d_in)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (d_out, d_in), in fp32 (fp64 for an fp64 base)."""
        dt = torch.promote_types(self.base.dtype, torch.float32)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling  # (d_out, d_in)

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        """DoRA's ||W0 + scaling B A|| per output row, (d_out,), in the weight's dtype; a constant (no gradient)."""
        w = self.base.dense()  # (d_out, d_in)
        lora_w = (self.lora_B @ self.lora_A).to(w.dtype)  # (d_out, d_in)
        return torch.linalg.norm(w + self.scaling * lora_w, dim=1).to(w.dtype)

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
        place (~0.4%); whoever needs W0 bit-exact keeps a copy (the sweep's warm worker restores from one). A
        quantized base gets its stored weight back exactly: the merge kept it (subtracting would round to 4 or 8
        bits once more)."""
        if self.merged:
            if self._unmerged is not None:
                self.base.restore(self._unmerged)
                self._unmerged, self._dora_factor = None, None
            else:
                self._add_to_weight(-1.0)
            self.merged = False

    def _add_to_weight(self, sign: float) -> None:
        if self.base.device.type == "meta":
            raise ValueError(f"cannot merge {self.module_name or 'LoRA layer'}: weights are on the meta device")
        if sign > 0 and self.base.quantized:
            self._unmerged = self.base.snapshot()  # W0 as stored; the merged weight is W0 + dW re-quantized
        w = self.base.dense()  # (d_out, d_in)
        delta = self.delta_weight()
        if self.lora_magnitude_vector is None:
            new = w.to(delta.dtype) + sign * delta  # fp32 (at least) whatever the weight dtype
        elif sign > 0:
            # DoRA, as peft: W' = m / ||W0 + dW|| * (W0 + dW) row-wise; unmerge divides by the same factor.
            full = w.to(delta.dtype) + delta
            factor = self.lora_magnitude_vector.to(delta.dtype) / torch.linalg.norm(full, dim=1)  # (d_out,)
            new = factor.view(-1, 1) * full
        else:
            factor = self._dora_factor
            new = w.to(delta.dtype) / factor.view(-1, 1) - delta
        if not torch.isfinite(new).all():
            raise ValueError(f"refusing to write non-finite weights into {self.module_name or 'LoRA layer'}")
        self.base.write(new)
        if self.lora_magnitude_vector is not None:
            self._dora_factor = factor if sign > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude_vector is not None:
            return self._forward_dora(x)
        base = self.base
        if self.merged:
            if not self.disabled:
                return base.forward(x)  # merged: the base call is the whole layer
            if self.lora_A0 is not None:
                return self._forward_original(x)
            scale = -self.scaling  # disabled while merged: subtract the update on the fly, weights untouched
        else:
            if self.disabled:
                return base.forward(x) if self.lora_A0 is None else self._forward_original(x)
            scale = self.scaling
        w = base.weight
        drop = self.dropout > 0.0 and self.training
        autocast = torch.is_autocast_enabled(x.device.type)
        # A stored weight the GEMM cannot take as it is (a quantized base: packed, not a matrix) goes the composed
        # way: the base layer's own forward, then the LoRA term.
        if drop or base.quantized or not w.dtype.is_floating_point or not (autocast or x.dtype == w.dtype):
            return self._forward_composed(x, scale, drop)
        # One fused node under autocast too (a GPU step is launch-bound: the composed path costs ~5 more kernels).
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else w.dtype
        return _LoraLinearFn.apply(x, w, base.bias, self.lora_A, self.lora_B, scale, base.fan_in_fan_out, dtype)

    def _forward_composed(self, x: torch.Tensor, scale: float, drop: bool) -> torch.Tensor:
        """Plain-op path for dropout, mixed dtypes or autocast."""
        y = self.base.forward(x)  # (B, T, d_out)
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
        y = self.base.forward(x)
        y = y + self._lora_term(x, self.lora_A0, self.lora_B0).to(y.dtype)
        if self.merged:
            y = y - self._lora_term(x, self.lora_A, self.lora_B).to(y.dtype)
        return y

    def _forward_dora(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA: y = m / ||W0 + dW|| * (x W0^T + scaling x A^T B^T) + b (peft's formula, dropout on the LoRA input)."""
        base = self.base
        if self.merged:
            if not self.disabled:
                return base.forward(x)
            w = base.dense()  # (d_out, d_in), merged
            w0 = (w.to(self._dora_factor.dtype) / self._dora_factor.view(-1, 1) - self.delta_weight()).to(w.dtype)
            return F.linear(x, w0, base.bias)
        if self.disabled:
            return base.forward(x)
        w_out = base.dense()  # (d_out, d_in)
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
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    names, saved = _plan(
        model,
        r=r,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        target_regex=target_regex,
        exclude=exclude,
        layers=layers,
        layers_pattern=layers_pattern,
        rslora=rslora,
        init=init,
        variant=variant,
        include_head=include_head,
        modules_to_save=modules_to_save,
    )
    linears = linear_modules(model)
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


def _plan(
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
) -> tuple[list[str], list[str]]:
    """apply_lora's checks and choices, allocating nothing: (the modules to wrap, the modules to train in full)."""
    _check_hparams(r, alpha, dropout, init, variant)
    if variant == "dora" and init in MUTATING_INITS:
        raise ValueError(f"variant='dora' with init={init!r} is not supported (no conversion back to plain LoRA)")
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
    linears = linear_modules(model)
    already = [n for n in names if isinstance(linears[n], LoraLayer)]
    if already:
        raise ValueError(f"modules already wrapped with LoRA: {already}")
    return names, saved


def planned_state_shapes(model: nn.Module, **apply_kwargs: Any) -> dict[str, tuple[int, ...]]:
    """The keys and shapes lora_state_dict(model) will have after apply_lora(model, **apply_kwargs), found without
    wrapping or allocating anything (load_adapter checks a file against them before it builds a layer)."""
    names, saved = _plan(model, **apply_kwargs)
    r, dora = apply_kwargs["r"], apply_kwargs.get("variant", "lora") == "dora"
    linears = linear_modules(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        base = base_of(linears[name])
        shapes[f"{name}.lora_A"] = (r, base.in_features)
        shapes[f"{name}.lora_B"] = (base.out_features, r)
        if dora:
            shapes[f"{name}.lora_magnitude_vector"] = (base.out_features,)
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            shapes[f"{name}.{k}"] = tuple(v.shape)
    return shapes


_TRAINABLE_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")


def _set_trainable(model: nn.Module, saved: Sequence[str]) -> None:
    """LoRA parameters and the parameters of modules_to_save train; everything else is frozen."""
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.rsplit(".", 1)[-1] in _TRAINABLE_LEAVES or inside(pname.rpartition(".")[0], saved))


def _check_trainable_untied(model: nn.Module, saved: Sequence[str]) -> None:
    """A module trained in full must not share a weight with a frozen one (GPT-2's lm_head is wte)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for names in owners.values():
        trained = [n for n in names if inside(n.rpartition(".")[0], saved)]
        if trained and len(trained) < len(names):
            raise ValueError(
                f"modules_to_save: {trained[0]} is tied to {[n for n in names if n not in trained][0]}; "
                "training it in full would change that module too"
            )


def modules_to_save_of(model: nn.Module) -> list[str]:
    """Names of the modules apply_lora set to train in full (saved with the adapter)."""
    return list((getattr(model, _CONFIG_ATTR, None) or {}).get("modules_to_save", []))


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(name) for name in quantized_modules(model)]


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
        d_in, d_out = layer.base.in_features, layer.base.out_features
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
    # A quantized base's weight is packed (two 4-bit values a byte): it counts as the (out, in) matrix it stands for.
    packed = {id(v.weight): v.in_features * v.out_features for v in map(base_of, _quantized_layers(model))}
    total = sum(packed.get(id(p), p.numel()) for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParamCount(trainable, total, 100.0 * trainable / total if total else 0.0, modules)


# ------------------------------------------------------------------------------------------ merge / unwrap


def _check_untied(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, layer in layers:
        if counts.get(id(layer.base.weight), 0) > 1:
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


def unwrap(model: nn.Module, *, fold: bool = True) -> nn.Module:
    """Merge, then put the plain base modules back: state_dict keys are the base model's again. fold=False: the
    update is dropped instead (unmerged first), the base modules come back as they are."""
    if fold:
        merge(model)
    else:
        unmerge(model)
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
    state = lora_state_dict(model)
    if converted:  # scaling (B A - B0 A0) = scaling [B, -B0] [A; A0]
        for name, layer in layers:
            state[f"{name}.lora_A"] = torch.cat([state[f"{name}.lora_A"], layer.lora_A0], dim=0)
            state[f"{name}.lora_B"] = torch.cat([state[f"{name}.lora_B"], -layer.lora_B0], dim=1)
    tensors = {peft_io.lora_key(k): v.to("cpu").contiguous() for k, v in state.items()}
    saved = modules_to_save_of(model)
    r, alpha = first.r, first.alpha
    if converted:
        r, alpha = 2 * r, alpha * (math.sqrt(2.0) if first.rslora else 2.0)
    config = peft_io.lora_config(
        r=r,
        alpha=alpha,
        dropout=first.dropout,
        target_modules=[n for n, _ in layers],
        rslora=first.rslora,
        init=first.init,
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        modules_to_save=saved,
        use_dora=first.variant == "dora",
        task_type=task_type if task_type is not None else peft_io.lora_task_type(type(model).__name__, bool(saved)),
        base_model_name=base_model_name,
        layers=cfg.get("layers"),
        layers_pattern=cfg.get("layers_pattern"),
    )
    peft_io.write_adapter(folder, tensors, config, metadata={"format": "pt"})


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load a PEFT-layout LoRA adapter; wraps the model from the config first if it is not wrapped yet.

    Reads DoRA (use_dora), modules_to_save (names that match no module are skipped, as peft does), layers_pattern,
    and PiSSA / OLoRA adapters saved unconverted (the init is redone on this base model, then A, B are loaded).
    """
    cfg_path = os.path.join(folder, peft_io.ADAPTER_CONFIG)
    w_path = os.path.join(folder, peft_io.ADAPTER_WEIGHTS)
    cfg = peft_io.read_lora_config(cfg_path)
    file_shapes = {peft_io.normalize_key(k): s for k, s in peft_io.read_shapes(w_path).items()}  # the header only
    if not _layers(model):
        kwargs, save_specs = peft_io.lora_apply_kwargs(cfg, cfg_path)
        try:
            kwargs["modules_to_save"] = resolve_modules_to_save(model, save_specs, strict=False)
            planned = planned_state_shapes(model, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
        # The config against the file and the model before any layer is built: a forged r=10**9 would otherwise
        # allocate r * d_in floats per layer before the tensors' shapes are looked at.
        peft_io.check_shapes({peft_io.lora_key(k): s for k, s in planned.items()}, file_shapes, w_path)
        try:
            apply_lora(model, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
    tensors = peft_io.read_weights(w_path)
    layers = dict(_layers(model))
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"load_adapter: unmerge first, merged modules: {merged[:3]}")
    # lora_state_dict's tensors share their parameters' storage: loading copies into the model in place.
    expected = {peft_io.lora_key(k): v for k, v in lora_state_dict(model).items()}
    peft_io.load_tensors(expected, {peft_io.normalize_key(k): v for k, v in tensors.items()}, w_path)
    return list(layers)
