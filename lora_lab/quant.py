"""A 4-bit or 8-bit frozen base (QLoRA) through bitsandbytes: the one module of lora_lab that imports it.

- ``Linear4bitBase`` / ``Linear8bitBase``: the ``bases.BaseLayer`` entries for ``bnb.nn.Linear4bit`` (NF4 / FP4)
  and ``bnb.nn.Linear8bitLt`` (LLM.int8), registered into ``bases.KINDS`` when this module is imported: the LoRA
  layer reaches a quantized base through the same interface as ``nn.Linear`` (forward, a dequantized dense read,
  a re-quantizing write, shape, dtype, device).
- ``quantize_model``: a loaded float model's frozen linears become bitsandbytes layers in place (the output and task
  heads, embeddings and norms stay in the model's dtype: no fp32 upcast); ``prepare`` makes a model that transformers
  loaded pre-quantized behave the same way.
- ``frozen_bytes``, ``quantization_of``: what a model's quantized linears are and cost, measured from the tensors.
- ``dense_copy``: a copy of a model whose quantized linears are plain ``nn.Linear`` holding the dequantized weights
  (what a user serves after merging: a merge into it rounds nothing).

bitsandbytes' CPU backend repacks a 4-bit weight for its AVX512-BF16 kernel on the first eval forward without
gradients (absmax rounded to bf16, compute in bf16): a different model from the one that trained, and slower here
without the `kernels` package. Every layer this module makes, prepares or wraps has that repacking switched off.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from lora_lab import bases
from lora_lab.targets import head_modules, inside

log = logging.getLogger(__name__)

__all__ = [
    "Linear4bitBase",
    "Linear8bitBase",
    "QUANT_TYPES",
    "BLOCKSIZE",
    "INT8_THRESHOLD",
    "quantize_model",
    "prepare",
    "quantization_of",
    "frozen_bytes",
    "dense_copy",
    "compute_in",
]

QUANT_TYPES = ("nf4", "fp4", "int8")  # model.quantize's values other than 'none'
BLOCKSIZE = 64  # QLoRA's first-level block; the absmax of each block is quantized again in blocks of 256
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (transformers' llm_int8_threshold default)


def _bnb() -> Any:
    import bitsandbytes as bnb

    return bnb


def _no_cpu_repack(module: nn.Module) -> None:
    # See the module docstring: the eval forward must compute what the training forward does.
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


class _BnbLinear:
    """What both bitsandbytes linears share as a ``bases.BaseLayer``: stored (out, in), shapes and bias on the
    module, the weight's device."""

    fan_in_fan_out = False
    quantized = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return int(self.module.in_features)

    @property
    def out_features(self) -> int:
        return int(self.module.out_features)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device


class Linear4bitBase(_BnbLinear):
    """``bnb.nn.Linear4bit``: the weight is a packed ``Params4bit`` ((out * in / 2, 1) uint8) with its QuantState
    (absmax per block of 64, itself 8-bit quantized per 256 with double quantization)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        _no_cpu_repack(module)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, _bnb().nn.Linear4bit)

    @property
    def _state(self) -> Any:
        state = self.module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("a 4-bit weight repacked for bitsandbytes' CPU kernel cannot be read as a dense matrix")
        return state

    @property
    def dtype(self) -> torch.dtype:
        """What the layer computes in: its compute dtype, else the dtype its weight was quantized from."""
        return self.module.compute_dtype or self._state.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense(self) -> torch.Tensor:
        w = _bnb().functional.dequantize_4bit(self.module.weight.data, self._state)  # (out, in), the state's dtype
        return w.to(self.dtype)

    def write(self, weight: torch.Tensor) -> None:
        state, param = self._state, self.module.weight
        packed, new = _bnb().functional.quantize_4bit(
            weight.to(device=param.device, dtype=state.dtype).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=param.quant_storage,
        )
        new.code = state.code  # the same code book (shared between layers: _share_codes)
        if new.nested and state.nested:
            new.state2.code = state.state2.code
        param.data = packed
        param.quant_state = new
        self.module.quant_state = new

    def snapshot(self) -> object:
        return self.module.weight.data.clone(), _copy_state(self._state)

    def restore(self, snap: object) -> None:
        data, state = snap
        param = self.module.weight
        param.data = data.clone()
        param.quant_state = _copy_state(state)
        self.module.quant_state = param.quant_state


def _copy_state(state: Any) -> Any:
    """A deep copy of a 4-bit QuantState that keeps its code books shared (constants, read only)."""
    memo: dict[int, Any] = {id(state.code): state.code}
    if state.nested:
        memo[id(state.state2.code)] = state.state2.code
    return copy.deepcopy(state, memo)


class Linear8bitBase(_BnbLinear):
    """``bnb.nn.Linear8bitLt`` (has_fp16_weights=False): an int8 (out, in) weight CB and one scale per output row
    SCB (absmax / 127); bitsandbytes moves both from the weight to the layer's state at its first forward."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, _bnb().nn.Linear8bitLt)

    @property
    def dtype(self) -> torch.dtype:
        """What the layer computes in (set by quantize_model / prepare: the model's dtype)."""
        return getattr(self.module, "compute_dtype", None) or torch.float32

    def _scb(self) -> torch.Tensor:
        scb = getattr(self.module.weight, "SCB", None)
        return scb if scb is not None else self.module.state.SCB  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense(self) -> torch.Tensor:
        cb = self.module.weight.data  # (out, in) int8
        return _bnb().functional.int8_vectorwise_dequant(cb, self._scb()).to(self.dtype)

    def _store(self, cb: torch.Tensor, scb: torch.Tensor) -> None:
        # Where bitsandbytes looks first: a weight that carries CB/SCB is moved into the state at the next forward.
        param = self.module.weight
        param.data = cb
        param.CB, param.SCB = cb, scb
        self.module.state.CB = self.module.state.SCB = None

    def write(self, weight: torch.Tensor) -> None:
        w = weight.to(device=self.device, dtype=torch.float16).contiguous()  # bitsandbytes quantizes from fp16
        cb, scb, _ = _bnb().functional.int8_vectorwise_quant(w)
        self._store(cb, scb)

    def snapshot(self) -> object:
        return self.module.weight.data.clone(), self._scb().clone()

    def restore(self, snap: object) -> None:
        cb, scb = snap
        self._store(cb.clone(), scb.clone())


bases.register(Linear8bitBase)
bases.register(Linear4bitBase)


# ----------------------------------------------------------------------------------------------- conversion


def _frozen_linears(model: nn.Module) -> list[str]:
    """The plain nn.Linear modules a quantized base stores packed: all of them but the output / task heads and any
    tied to an embedding (head_modules finds both)."""
    heads = head_modules(model)
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not inside(name, heads) and m.weight.device.type != "meta"
    ]


def _convert(linear: nn.Linear, how: str) -> nn.Module:
    """One nn.Linear as a bitsandbytes layer holding its weight quantized (on the linear's device)."""
    bnb = _bnb()
    w, device, dtype = linear.weight.data, linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if how == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False)._quantize(device)
        new.compute_dtype = dtype
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type=how,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            w, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=True, quant_type=how, module=new
        )._quantize(device)
        _no_cpu_repack(new)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    new.train(linear.training)
    return new


def quantize_model(model: nn.Module, how: str) -> list[str]:
    """Replace the model's frozen nn.Linear modules (not its heads) by bitsandbytes layers in place: 'nf4' / 'fp4'
    (Linear4bit, double quantization, blocksize 64, computing in the weight's dtype) or 'int8' (Linear8bitLt,
    LLM.int8 with outlier threshold 6.0). Returns the converted names. Embeddings, norms and heads are untouched."""
    if how not in QUANT_TYPES:
        raise ValueError(f"model.quantize: expected one of none, {', '.join(QUANT_TYPES)}, got {how!r}")
    names = _frozen_linears(model)
    if not names:
        raise ValueError(f"model.quantize={how}: {type(model).__name__} has no linear layer to quantize")
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, _convert(getattr(holder, child), how))
    _share_codes(model)
    model.lora_lab_quantize = how  # plain attribute: what the model's frozen linears are (quantization_of)
    return names


def _share_codes(model: nn.Module) -> None:
    """One copy of each 4-bit code book (16 values) and nested 8-bit code book (256 values) for all layers:
    bitsandbytes gives every layer its own (1.1 KiB a layer, 0.2 bits per parameter of a 64 x 64 layer). They are
    constants, read only."""
    shared: dict[tuple, torch.Tensor] = {}

    def one(t: torch.Tensor) -> torch.Tensor:
        return shared.setdefault((t.device, t.dtype, tuple(t.tolist())), t)

    for module in model.modules():
        if Linear4bitBase.matches(module):
            state = module.weight.quant_state
            state.code = one(state.code)
            if state.nested:
                state.state2.code = one(state.state2.code)


def prepare(model: nn.Module) -> Optional[str]:
    """A model as transformers loaded it: when it holds bitsandbytes layers (a pre-quantized checkpoint), switch
    off the CPU repacking, give int8 layers their compute dtype and return what they are ('nf4', 'fp4', 'int8');
    None for a float model."""
    how = quantization_of(model)
    if how is None:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for module in model.modules():
        _no_cpu_repack(module)
        if Linear8bitBase.matches(module) and getattr(module, "compute_dtype", None) is None:
            module.compute_dtype = dtype
    _share_codes(model)
    model.lora_lab_quantize = how
    return how


def quantization_of(model: nn.Module) -> Optional[str]:
    """'nf4', 'fp4' or 'int8' when the model's linears are bitsandbytes layers (the first one found says which),
    None when it has none."""
    for module in model.modules():
        if Linear4bitBase.matches(module):
            return str(module.weight.quant_type)
        if Linear8bitBase.matches(module):
            return "int8"
    return None


def compute_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Make the quantized linears compute (and dequantize) in `dtype` (a bf16 run's autocast dtype); returns how
    many. The packed weights are untouched."""
    n = 0
    for module in model.modules():
        if Linear4bitBase.matches(module):
            module.compute_dtype = dtype
            module.weight.quant_state.dtype = dtype
            n += 1
        elif Linear8bitBase.matches(module):
            module.compute_dtype = dtype
            n += 1
    return n


def frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of the model's quantized linear weights, measured from the stored tensors: the packed
    weight plus its quantization state (4-bit: absmax, the 16-entry code, the nested absmax, code and offset;
    int8: the per-row scales), each storage counted once (bitsandbytes shares the nested code between layers).
    Biases are not counted (they stay in the model's dtype)."""
    seen: dict[int, int] = {}

    def count(t: Optional[torch.Tensor]) -> None:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    params = 0
    for module in model.modules():
        if Linear4bitBase.matches(module):
            state = module.weight.quant_state
            for t in (module.weight.data, state.absmax, state.code, state.offset):
                count(t)
            if state.nested:
                count(state.state2.absmax)
                count(state.state2.code)
            params += module.in_features * module.out_features
        elif Linear8bitBase.matches(module):
            count(module.weight.data)
            count(Linear8bitBase(module)._scb())
            params += module.in_features * module.out_features
    return sum(seen.values()), params


def _dense_linear(module: nn.Module) -> nn.Linear:
    view = bases.base_of(module)
    w = view.dense().detach()  # (out, in) in the layer's compute dtype
    linear = nn.Linear(view.in_features, view.out_features, bias=view.bias is not None, device="meta")
    linear.weight = nn.Parameter(w.clone(), requires_grad=False)
    if view.bias is not None:
        linear.bias = nn.Parameter(view.bias.detach().to(w.dtype).clone(), requires_grad=view.bias.requires_grad)
    linear.train(module.training)
    return linear


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose quantized linears are nn.Linear with the dequantized weights in their compute
    dtype (a LoRA layer's base_layer included: the layer is rebased). The copy computes what the quantized model
    does; merging an adapter into it rounds nothing to 4 or 8 bits. Loads and saves as a plain model."""
    from lora_lab.lora import LoraLayer

    dense = copy.deepcopy(model)
    for module in dense.modules():
        # A block compiled in place (trainer.compile) keeps torch.compile's wrapper of the *original* block's call:
        # copied, it would run the quantized model. The copy runs eager (as evaluations do).
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    for name in bases.quantized_modules(dense):
        parent, _, child = name.rpartition(".")
        holder = dense.get_submodule(parent) if parent else dense
        linear = _dense_linear(getattr(holder, child))
        if isinstance(holder, LoraLayer) and child == "base_layer":
            holder.rebase(linear)
        else:
            setattr(holder, child, linear)
    # A dense model: nothing may treat it as a bitsandbytes one (peft's dispatch, save_pretrained's config).
    if "lora_lab_quantize" in vars(dense):
        object.__delattr__(dense, "lora_lab_quantize")
    for attr, plain in (("hf_quantizer", None), ("is_loaded_in_4bit", False), ("is_loaded_in_8bit", False)):
        if attr in vars(dense):
            setattr(dense, attr, plain)
    config = getattr(dense, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return dense
