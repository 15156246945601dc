"""LoRA core: wrap linear layers of a torch model with low-rank adapters (Hu et al., 2021).

y = W0 x + scaling * B A dropout(x), with A (r, d_in), B (d_out, r), scaling = alpha / r
(or alpha / sqrt(r) with rsLoRA). Leaf module: imports torch, safetensors and the standard library only.
Works on ``nn.Linear`` and on GPT-2-style ``Conv1D`` (detected by duck typing, weight stored (d_in, d_out)).
Adapter files use PEFT's layout and key names, so adapters move both ways between lora_lab and peft.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoraLayer",
    "ParamCount",
    "apply_lora",
    "resolve_targets",
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
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "atomic_write",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INITS = ("kaiming", "gaussian")
PRESETS = ("attn", "mlp", "all-linear")
# Last name component of output heads that all-linear leaves alone (peft does the same).
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "embed_out", "output"}
_CONFIG_ATTR = "_lora_lab_config"  # model-level settings kept for save_adapter
_PEFT_PREFIX = "base_model.model."
# A layer index component: ".layers.3.", ".layer.3." (BERT), ".h.3." (GPT-2), ".blocks.3.".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_MLP_WORDS = {"mlp", "feed_forward", "ffn", "intermediate", "experts", "block_sparse_moe"}


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
            x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, d_in)
            weight, lora_A, lora_B = weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
            w_t = weight if fan_in_fan_out else weight.t()  # (d_in, d_out), a view
            y = torch.addmm(bias.to(dtype), x2, w_t) if bias is not None else x2.mm(w_t)  # (N, d_out)
            h = x2.mm(lora_A.t())  # (N, r)
            y.addmm_(h, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x2, h, weight, lora_A, lora_B)
        ctx.scale, ctx.fan_in_fan_out, ctx.x_shape = scale, fan_in_fan_out, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, h, weight, lora_A, lora_B = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, d_out)
        grad_x = grad_w = grad_b = grad_a = grad_bb = None
        if need_bb:
            grad_bb = g.t().mm(h).mul_(scale)  # (d_out, r)
        g_h = g.mm(lora_B).mul_(scale)  # (N, r)
        if need_a:
            grad_a = g_h.t().mm(x2)  # (r, d_in)
        if need_x:
            w_t = weight if ctx.fan_in_fan_out else weight.t()  # (d_in, d_out)
            grad_x = g.mm(w_t.t())  # (N, d_in)
            grad_x.addmm_(g_h, lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:  # only when a user unfroze the base weight
            grad_w = x2.t().mm(g) if ctx.fan_in_fan_out else g.t().mm(x2)
        if need_b:
            grad_b = g.sum(0)
        # Gradients come back in the compute dtype; autograd casts each to its input's dtype (fp32 adapters).
        return grad_x, grad_w, grad_b, grad_a, grad_bb, None, None, None


class LoraLayer(nn.Module):
    """A Linear or Conv1D (``base_layer``) plus a low-rank update ``scaling * lora_B @ lora_A``."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        module_name: str = "",
    ) -> None:
        super().__init__()
        _check_hparams(r, alpha, dropout, init)
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.d_in, self.d_out = _dims(base_layer)
        self.r, self.alpha, self.rslora, self.init = r, float(alpha), bool(rslora), init
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = float(dropout)
        self.module_name = module_name  # for error messages only
        self.merged = False
        self.disabled = False
        w = base_layer.weight
        # Adapters train in fp32 on a bf16/fp16 base (peft's autocast_adapter_dtype): their AdamW updates would
        # round away in 8 mantissa bits. The fused forward casts them to the compute dtype per call.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in, device=w.device, dtype=dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.d_out, r, device=w.device, dtype=dtype))  # (d_out, r)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as in the paper / peft (kaiming-uniform a=sqrt(5), or normal std 1/r), B zero: step 0 = base."""
        if self.lora_A.device.type == "meta":  # sizing only: nothing to initialise
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 (fp64 for fp64 weights), in the base weight's layout ((d_out, d_in); Conv1D (d_in, d_out))."""
        dt = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        delta = (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling  # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op if already merged)."""
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (no-op if not merged)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def _add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        if w.device.type == "meta":
            raise ValueError(f"cannot merge {self.module_name or 'LoRA layer'}: weights are on the meta device")
        delta = self.delta_weight()
        new = w.to(delta.dtype) + sign * delta  # fp32 (at least) whatever the weight dtype
        if not torch.isfinite(new).all():
            raise ValueError(f"refusing to write non-finite weights into {self.module_name or 'LoRA layer'}")
        w.copy_(new.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if not self.disabled:
                return self.base_layer(x)  # merged: the base call is the whole layer
            scale = -self.scaling  # disabled while merged: subtract the update on the fly, weights untouched
        else:
            if self.disabled:
                return self.base_layer(x)
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

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


def _check_hparams(r: Any, alpha: Any, dropout: Any, init: Any) -> None:
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


def _head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """Output heads: lm_head/classifier/score..., the output embedding, or any linear tied to an embedding."""
    heads = {n for n in linears if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        with contextlib.suppress(Exception):
            out = get_out()
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in linears.items():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if out is not None and (module is out or base is out):
            heads.add(name)
        if id(base.weight) in embed_ids:
            heads.add(name)
    return heads


def _is_attn(name: str) -> bool:
    parents = name.split(".")[:-1]
    return any("attn" in p.lower() or "attention" in p.lower() for p in parents)


def _is_mlp(name: str) -> bool:
    if _is_attn(name) or not _LAYER_RE.search(name):
        return False
    parents = name.split(".")[:-1]
    if any(p.lower() in _MLP_WORDS or "mlp" in p.lower() for p in parents):
        return True
    # BERT: layer.N.output.dense is the feed-forward output (the attention one sits under "attention").
    return re.search(r"(?:^|\.)(?:layers|layer|h|blocks)\.\d+\.output\.dense$", name) is not None


def _match(spec: str, names: list[str], heads: set[str]) -> list[str]:
    """Modules matched by one target: a preset, an exact module name, or a dotted suffix."""
    if spec == "all-linear":
        return [n for n in names if n not in heads]
    if spec == "attn":
        return [n for n in names if n not in heads and _is_attn(n)]
    if spec == "mlp":
        return [n for n in names if n not in heads and _is_mlp(n)]
    return [n for n in names if n == spec or n.endswith("." + spec)]


def _short_names(names: Sequence[str]) -> list[str]:
    """Unique suffixes after the layer index, e.g. 'self_attn.q_proj', for readable error messages."""
    out: list[str] = []
    for n in names:
        s = re.sub(r"^.*?(?:layers|layer|h|blocks)\.\d+\.", "", n)
        if s not in out:
            out.append(s)
    return out


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None = None,
    *,
    target_regex: str | None = None,
    exclude: Sequence[str] = (),
    layers: Sequence[int] | None = None,
    include_head: bool = False,
) -> list[str]:
    """Names of the modules ``apply_lora`` would wrap (model order). Targets default to all-linear."""
    if isinstance(targets, str):
        targets = [targets]
    if targets is None:
        targets = () if target_regex is not None else ("all-linear",)
    if isinstance(exclude, str):
        exclude = [exclude]
    linears = _linear_modules(model)
    names = list(linears)
    heads = _head_names(model, linears)
    chosen: set[str] = set()
    for spec in targets:
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"targets entries must be non-empty strings, got {spec!r}")
        hit = _match(spec, names, heads)
        if not hit:
            raise ValueError(
                f"target {spec!r} matches no linear module; presets: {PRESETS}; "
                f"linear modules: {_short_names(names)}"
            )
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
        if not heads:
            raise ValueError("include_head=True but the model has no recognisable output head")
        chosen.update(heads)
    for spec in exclude:
        hit = _match(spec, names, heads)
        if not hit:
            raise ValueError(f"exclude {spec!r} matches no linear module; linear modules: {_short_names(names)}")
        chosen.difference_update(hit)
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        wanted = {int(i) for i in layers}
        chosen = {n for n in chosen if _layer_index(n) in wanted}
    result = [n for n in names if n in chosen]
    if not result:
        raise ValueError(f"targets {list(targets)} with exclude={list(exclude)}, layers={layers} select no module")
    return result


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
    layers: Sequence[int] | None = None,
    rslora: bool = False,
    init: str = "kaiming",
    include_head: bool = False,
) -> list[str]:
    """Wrap the targeted linears with LoRA in place, freeze every non-LoRA parameter, return wrapped names.

    ``targets`` defaults to ("all-linear",) unless ``target_regex`` is given. Works on meta-device models
    (nothing is allocated or initialised there), so parameter counts of big models need no download.
    """
    _check_hparams(r, alpha, dropout, init)
    names = resolve_targets(
        model, targets, target_regex=target_regex, exclude=exclude, layers=layers, include_head=include_head
    )
    linears = _linear_modules(model)
    already = [n for n in names if isinstance(linears[n], LoraLayer)]
    if already:
        raise ValueError(f"modules already wrapped with LoRA: {already}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoraLayer(
            linears[name], r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, module_name=name
        )
        setattr(parent, child, layer)
    for pname, p in model.named_parameters():
        leaf = pname.rsplit(".", 1)[-1]
        p.requires_grad_(leaf in ("lora_A", "lora_B"))
    cfg = getattr(model, _CONFIG_ATTR, None) or {}
    settings = {"r": r, "alpha": float(alpha), "dropout": float(dropout), "rslora": bool(rslora), "init": init}
    layer_list = None if layers is None else sorted({int(i) for i in ([layers] if isinstance(layers, int) else layers)})
    new_cfg = {**settings, "layers": layer_list, "mixed": False}
    if cfg:  # a second call: save_adapter refuses mixed settings; wrapped names already pin the layers
        new_cfg["mixed"] = cfg.get("mixed", False) or any(cfg[k] != v for k, v in settings.items())
        new_cfg["layers"] = layer_list if cfg.get("layers") == layer_list else None
    object.__setattr__(model, _CONFIG_ATTR, new_cfg)  # plain attribute, not a submodule
    return names


def _layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def wrapped_modules(model: nn.Module) -> list[str]:
    """Names of the LoRA-wrapped modules, in model order."""
    return [n for n, _ in _layers(model)]


# ------------------------------------------------------------------------------------------------ counts


@dataclass
class ParamCount:
    """Trainable and total parameters (tied weights once) plus one (name, d_in, d_out, r, n_params) per layer."""

    trainable: int
    total: int
    percent: float
    modules: list[tuple[str, int, int, int, int]] = field(default_factory=list)

    @property
    def lora(self) -> int:
        return sum(m[4] for m in self.modules)


def count_parameters(model: nn.Module) -> ParamCount:
    """The one parameter counter (logs and reports). Each LoRA layer is checked against r * (d_in + d_out)."""
    modules = []
    for name, layer in _layers(model):
        d_in, d_out = _dims(layer.base_layer)
        n = layer.lora_A.numel() + layer.lora_B.numel()
        if tuple(layer.lora_A.shape) != (layer.r, d_in) or tuple(layer.lora_B.shape) != (d_out, layer.r):
            raise ValueError(
                f"{name}: lora_A {tuple(layer.lora_A.shape)} / lora_B {tuple(layer.lora_B.shape)} inconsistent "
                f"with r={layer.r}, d_in={d_in}, d_out={d_out}"
            )
        if n != layer.r * (d_in + d_out):
            raise ValueError(f"{name}: {n} LoRA parameters, expected r * (d_in + d_out) = {layer.r * (d_in + d_out)}")
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
    rounding of the merged weight in its dtype.
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
    """LoRA tensors keyed like model.state_dict(): '<module>.lora_A', '<module>.lora_B'."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers(model):
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
    return out


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file, no file, or the complete new one.

    The bytes go to a temp file in the same folder (created if missing), are fsynced, then `os.replace`d onto
    `path` (atomic on POSIX within one filesystem). On any error the temp file is removed and `path` is untouched.
    This is the project's single atomic writer: text writers encode and call it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _task_type(model: nn.Module) -> str | None:
    # Only CAUSAL_LM is inferred: SEQ_CLS would make peft add the classifier to modules_to_save.
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, base_model_name: str | None = None, task_type: str | None = None
) -> None:
    """Write adapter_model.safetensors + adapter_config.json in PEFT's layout (atomically)."""
    layers = _layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layer")
    cfg = getattr(model, _CONFIG_ATTR, None) or {}
    first = layers[0][1]
    for name, layer in layers:
        if (layer.r, layer.alpha, layer.rslora, layer.dropout) != (first.r, first.alpha, first.rslora, first.dropout):
            raise ValueError(f"save_adapter: {name} has r/alpha/rslora/dropout different from {layers[0][0]}")
    if cfg.get("mixed"):
        raise ValueError("save_adapter: apply_lora was called with different settings; one adapter config cannot hold them")
    if base_model_name is None:
        base_model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    tensors = {}
    for name, layer in layers:
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().to("cpu").contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().to("cpu").contiguous()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _task_type(model),
        "base_model_name_or_path": base_model_name,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": [n for n, _ in layers],  # exact names: peft matches them as-is
        "use_rslora": first.rslora,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
    }
    if cfg.get("layers") is not None:
        config["layers_to_transform"] = cfg["layers"]
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
    for key in ("use_dora",):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} (per-module ranks) is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={cfg.get('modules_to_save')!r} is not supported")
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


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load a PEFT-layout LoRA adapter; wraps the model from the config first if it is not wrapped yet."""
    cfg_path = os.path.join(folder, ADAPTER_CONFIG)
    w_path = os.path.join(folder, ADAPTER_WEIGHTS)
    cfg = _read_config(cfg_path)
    tensors = _read_weights(w_path)
    if not _layers(model):
        tm = cfg["target_modules"]
        targets, regex = (None, tm) if isinstance(tm, str) and tm != "all-linear" else ([tm] if isinstance(tm, str) else list(tm), None)
        init = cfg.get("init_lora_weights", True)
        exclude = cfg.get("exclude_modules") or ()
        if isinstance(exclude, str):
            raise ValueError(f"{cfg_path}: exclude_modules as a regex is not supported")
        try:
            apply_lora(
                model,
                r=cfg["r"],
                alpha=cfg.get("lora_alpha", 8),
                dropout=cfg.get("lora_dropout", 0.0),
                targets=targets,
                target_regex=regex,
                exclude=exclude,
                layers=cfg.get("layers_to_transform"),
                rslora=bool(cfg.get("use_rslora", False)),
                init="gaussian" if init == "gaussian" else "kaiming",
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
    layers = dict(_layers(model))
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"load_adapter: unmerge first, merged modules: {merged[:3]}")
    expected = {}
    for name, layer in layers.items():
        expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    # peft may keep the adapter name in keys ("lora_A.default.weight") in some versions: accept it.
    tensors = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{w_path}: missing keys {missing[:5]} ({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}" for k, p in expected.items() if tensors[k].shape != p.shape]
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
