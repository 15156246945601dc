"""The methods LoRA is measured against (Hu et al. 2021, Tables 2-4), on the same frozen base: torch core, as lora.py.

- ``bitfit``  (Ben Zaken et al. 2021): only biases train. Models without biases (Llama, SmolLM2) get zero-initialised
  biases on every linear layer inside the layer stack (the choice of BitFit's follow-ups), so step 0 equals the base
  model and BitFit works on the default model; ``add_missing=False`` refuses such models instead, naming them.
- ``ia3``     (Liu et al. 2022): learned vectors rescale keys, values (outputs of the key/value projections) and the
  MLP's intermediate activation (the input of its down projection); initialised to ones. Mergeable into the weights.
- ``adapter`` (Houlsby et al. 2019; Lin et al. 2020 / Pfeiffer et al. 2021): a bottleneck h + up(act(down(h))) on the
  attention output and the MLP output (``houlsby``) or on the MLP output only (``pfeiffer``, Hu et al.'s AdapterL);
  the up projection is zero-initialised, so step 0 equals the base model. Not mergeable (a nonlinearity).
- ``prompt``  (Lester et al. 2021, Hu et al.'s PreEmbed): n trainable virtual-token embeddings prepended to the input.
- ``prefix``  (Li & Liang 2021, PreLayer): trainable key/value prefixes in every attention layer, fed through the
  model's KV-cache interface (so grouped-query attention gets prefixes of its key/value heads), optionally produced by
  a reparameterisation MLP during training.

Torch and stdlib, plus lora_lab's targets (the repeated blocks the methods adapt per layer), bases (IA3's merge reads
and writes a weight through it, so a quantized base merges too) and peft_io (the file format): the model is passed
in, layers are found from its module tree, and the prefix cache is built by a factory the caller passes (train.py
gives transformers' ``DynamicCache``). Files: peft's layout for the methods peft has
(PROMPT_TUNING, PREFIX_TUNING, IA3: adapter_config.json + adapter_model.safetensors), lora_lab's for BitFit and adapters
(the same two files, with ``"peft_type": "LORA_LAB_BITFIT"`` / ``"LORA_LAB_ADAPTER"``); save / load read the model,
lora_lab.peft_io writes and reads the files.

Each method is one ``Kind`` object (BITFIT, IA3, ADAPTER, PROMPT, PREFIX): its parameters, whether it folds into the
weights, its peft_type, file config and file tensors, and how a read file is applied; the model records which one it
carries, and the code asks that object (lora_lab.adaptations' table rows are built from them).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab import peft_io
from lora_lab.bases import base_of
from lora_lab.targets import repeated_blocks

CacheFactory = Callable[[], Any]  # a fresh attention cache per forward (prefix tuning's keys/values travel in it)
IGNORE = -100  # label of positions without loss (transformers' convention)

# Names of the projections, as the model families call them (Llama/Mistral/Qwen/SmolLM2, BERT, DistilBERT, OPT, T5).
KEY_NAMES = ("k_proj", "key", "k_lin", "k")
VALUE_NAMES = ("v_proj", "value", "v_lin", "v")
ATTN_OUT_NAMES = ("o_proj", "out_proj", "out_lin", "o", "attention.output.dense")
MLP_DOWN_NAMES = ("down_proj", "fc2", "lin2", "wo", "w2", "output.dense")


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _ends_in(name: str, suffix: str) -> bool:
    """`name` is `suffix` or ends in it at a dot ('mlp.down_proj' ends in 'down_proj', not in 'proj')."""
    return name == suffix or name.endswith("." + suffix)


def _find(
    block_name: str, block: nn.Module, names: Sequence[str], what: str, model: nn.Module, *, unless: Sequence[str] = ()
) -> list[str]:
    """Linear modules of `block` whose name ends in one of `names` (the first name that matches anything) and in
    none of `unless`."""
    for suffix in names:
        found = [
            f"{block_name}.{n}"
            for n, m in block.named_modules()
            if _linear(m) and _ends_in(n, suffix) and not any(_ends_in(n, u) for u in unless)
        ]
        if found:
            return found
    raise ValueError(
        f"{type(model).__name__}: layer {block_name} has no {what} linear (looked for {', '.join(names)}); "
        f"fused projections such as GPT-2's c_attn are not supported by this method"
    )


def _mlp_down(block_name: str, block: nn.Module, model: nn.Module) -> list[str]:
    """The MLP down projection(s) of one layer. BERT's is `output.dense`, a suffix its attention output
    `attention.output.dense` ends in too: a module named as an attention output is never the MLP's."""
    return _find(block_name, block, MLP_DOWN_NAMES, "MLP down projection", model, unless=ATTN_OUT_NAMES)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def frozen_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's frozen floating-point weights (those a merge rounds into, those a prefix must match):
    what it computes in when no autocast is on (model.dtype=bfloat16 with trainer.precision=fp32 computes in bf16)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _train_heads(model: nn.Module, heads: Sequence[str]) -> None:
    for name in heads:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- BitFit


def apply_bitfit(model: nn.Module, *, add_missing: bool = True, heads: Sequence[str] = ()) -> list[str]:
    """Freeze everything but the biases. Linear layers in the layer stack without a bias get a zero one (add_missing),
    else a model without any bias is refused. Returns the names of the trainable biases."""
    freeze(model)
    added = []
    if add_missing:
        for block_name, block in repeated_blocks(model):
            for n, m in block.named_modules():
                if _linear(m) and m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
                    added.append(f"{block_name}.{n}.bias")
    names = [n for n, _ in model.named_parameters() if n.rpartition(".")[2] == "bias"]
    if not names:
        raise ValueError(
            f"method=bitfit: {type(model).__name__} has no bias parameters; set bitfit.add_missing=true to add "
            f"zero-initialised biases to its linear layers"
        )
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    _train_heads(model, heads)
    model._lora_lab_method = {"method": BITFIT.name, "add_missing": add_missing, "added": added}
    return names


# ----------------------------------------------------------------------------------------------- (IA)3


class IA3Linear(nn.Module):
    """A linear whose output (key/value projections) or input (the MLP's down projection: `feedforward`) is rescaled
    element-wise by the learned vector ``ia3_l`` (ones at init). merge() folds it into the weight (and the bias for
    output scaling) and keeps the original weight, so unmerge() restores it bit for bit."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        n = base_layer.in_features if feedforward else base_layer.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base_layer.weight.device, dtype=torch.float32))  # (n,)
        self.merged = False
        self._original: Optional[tuple[object, Optional[torch.Tensor]]] = None  # (base snapshot, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(x * self.ia3_l.to(x.dtype))
        out = self.base_layer(x)
        return out * self.ia3_l.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # Through the base-layer view (lora_lab.bases): a quantized base dequantizes, scales and re-quantizes.
        view, b = base_of(self.base_layer), self.base_layer.bias
        self._original = (view.snapshot(), None if b is None else b.data.clone())
        scale = self.ia3_l.float()
        w = view.dense().float()  # (out, in): scale rows for output scaling, columns for input scaling, in fp32
        view.write(w * (scale[None, :] if self.feedforward else scale[:, None]))
        if b is not None and not self.feedforward:
            b.data = (b.float() * scale).to(b.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._original is None:
            return
        w, b = self._original
        base_of(self.base_layer).restore(w)
        if b is not None:
            self.base_layer.bias.data = b
        self._original, self.merged = None, False


def ia3_targets(model: nn.Module) -> list[tuple[str, bool]]:
    """(module name, feedforward) of every key/value projection and MLP down projection in the layer stack."""
    out: list[tuple[str, bool]] = []
    for block_name, block in repeated_blocks(model):
        for name in _find(block_name, block, KEY_NAMES, "key projection", model):
            out.append((name, False))
        for name in _find(block_name, block, VALUE_NAMES, "value projection", model):
            out.append((name, False))
        for name in _mlp_down(block_name, block, model):
            out.append((name, True))
    return out


def apply_ia3(model: nn.Module, *, heads: Sequence[str] = ()) -> list[str]:
    """Wrap keys, values and the MLP down projections in IA3Linear; freeze the rest. Returns the wrapped names."""
    freeze(model)
    targets = ia3_targets(model)
    for name, ff in targets:
        _set_module(model, name, IA3Linear(model.get_submodule(name), ff))
    _train_heads(model, heads)
    model._lora_lab_method = {"method": IA3.name}
    return [n for n, _ in targets]


# ----------------------------------------------------------------------------------------------- adapters


class AdapterLinear(nn.Module):
    """A sub-layer's output projection followed by a bottleneck adapter: h + up(act(down(h))), h = base(x).
    up is zero-initialised (weight and bias), so the adapted layer starts as the base layer exactly."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, activation: str) -> None:
        super().__init__()
        d = base_layer.out_features
        dev = base_layer.weight.device
        self.base_layer = base_layer
        self.adapter_down = nn.Linear(d, bottleneck, device=dev)  # default (Kaiming-uniform) init
        self.adapter_up = nn.Linear(bottleneck, d, device=dev)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (B, T, d)
        z = self.adapter_down(h.to(self.adapter_down.weight.dtype))  # (B, T, r)
        z = F.gelu(z) if self.activation == "gelu" else F.relu(z)
        return h + self.adapter_up(z).to(h.dtype)


def adapter_targets(model: nn.Module, placement: str) -> list[str]:
    """Houlsby: the attention output and MLP output projections of every layer; pfeiffer: the MLP output only."""
    out: list[str] = []
    for block_name, block in repeated_blocks(model):
        if placement == "houlsby":
            out += _find(block_name, block, ATTN_OUT_NAMES, "attention output projection", model)
        out += _mlp_down(block_name, block, model)
    return out


def apply_adapter(
    model: nn.Module,
    *,
    bottleneck: int = 16,
    placement: str = "houlsby",
    activation: str = "relu",
    heads: Sequence[str] = (),
) -> list[str]:
    """Insert bottleneck adapters (placement 'houlsby' or 'pfeiffer'); freeze the rest. Returns the wrapped names."""
    if placement not in ("houlsby", "pfeiffer"):
        raise ValueError(f"adapter.placement: expected houlsby or pfeiffer, got {placement!r}")
    if not (isinstance(bottleneck, int) and bottleneck >= 1):
        raise ValueError(f"adapter.bottleneck: expected an integer >= 1, got {bottleneck!r}")
    freeze(model)
    targets = adapter_targets(model, placement)
    for name in targets:
        _set_module(model, name, AdapterLinear(model.get_submodule(name), bottleneck, activation))
    _train_heads(model, heads)
    model._lora_lab_method = {
        "method": ADAPTER.name,
        "bottleneck": bottleneck,
        "placement": placement,
        "activation": activation,
    }
    return targets


# ----------------------------------------------------------------------------------------------- prompt / prefix


def _model_dims(model: nn.Module) -> dict[str, int]:
    """Width, layers, key/value heads and head size, from the model's own config object when it has one."""
    c = getattr(model, "config", None)
    if c is not None and hasattr(c, "get_text_config"):
        c = c.get_text_config()

    def get(*names: str) -> Optional[int]:
        for n in names:
            v = getattr(c, n, None)
            if isinstance(v, int):
                return v
        return None

    d = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    if d is None or heads is None:
        raise ValueError(f"{type(model).__name__}: cannot read hidden_size / num_attention_heads from its config")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or d // heads
    layers = len(repeated_blocks(model))
    return {"d": d, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "layers": layers}


class PromptEncoder(nn.Module):
    """Prompt tuning's virtual tokens (``embedding.weight``: (n, d)), or prefix tuning's per-layer keys and values:
    ``embedding.weight`` (n, L * 2 * kv_dim) directly, or with ``projection`` an MLP from (n, kv_dim) embeddings
    (peft's PrefixEncoder: Linear, Tanh, Linear). ``forward()`` returns the (n, width) output either way."""

    def __init__(self, n: int, width: int, *, project_from: Optional[int] = None, hidden: int = 0, device=None):
        super().__init__()
        self.projection = project_from is not None
        if self.projection:
            self.embedding = nn.Embedding(n, project_from, device=device)
            self.transform = nn.Sequential(
                nn.Linear(project_from, hidden, device=device), nn.Tanh(), nn.Linear(hidden, width, device=device)
            )
        else:
            self.embedding = nn.Embedding(n, width, device=device)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight  # (n, k)
        return self.transform(w) if self.projection else w


class _Hooks:
    """The forward pre-hook and hook that put the method's n virtual positions into every call of the top model: the
    input and attention mask handling both methods share; a subclass says what fills the positions."""

    method = ""  # the method's name, for error messages

    def __init__(self, model: nn.Module, n: int) -> None:
        self.model, self.n = model, n

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            raise ValueError(f"method={self.method}: the model was called without input_ids or inputs_embeds")
        b, n = ref.shape[0], self.n
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"method={self.method}: expected a 2-D attention_mask, got {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, n + T)
        self.insert(kwargs, ids, embeds, b, ref.device)
        return args, kwargs

    def insert(
        self, kwargs: dict, ids: Optional[torch.Tensor], embeds: Optional[torch.Tensor], b: int, dev: torch.device
    ) -> None:
        """Put the n positions into the call's keyword arguments (in place)."""
        raise NotImplementedError

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output


class _PromptHooks(_Hooks):
    """Prompt tuning: the virtual-token embeddings go in front of the input's; their logits are dropped again."""

    method = "prompt"

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__(model, n)
        self.strip_len: Optional[int] = None  # sequence length with virtual tokens of the current call

    def insert(
        self, kwargs: dict, ids: Optional[torch.Tensor], embeds: Optional[torch.Tensor], b: int, dev: torch.device
    ) -> None:
        n, pos = self.n, kwargs.get("position_ids")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(ids)  # (B, T, d)
        prompts = self.model.lora_lab_prompt().to(embeds.dtype)[None].expand(b, -1, -1)  # (B, n, d)
        kwargs.pop("input_ids", None)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, n + T, d)
        if pos is not None:  # virtual tokens at 0..n-1, the real ones after them (as without position_ids)
            virt = torch.arange(n, device=dev, dtype=pos.dtype)[None].expand(pos.shape[0], -1)
            kwargs["position_ids"] = torch.cat([virt, pos + n], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2:
            kwargs["labels"] = torch.cat([labels.new_full((b, n), IGNORE), labels], dim=1)
        self.strip_len = kwargs["inputs_embeds"].shape[1]

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Drop the virtual tokens' logits, so logits line up with the caller's input_ids."""
        if self.strip_len is not None:
            logits = getattr(output, "logits", None)
            if logits is not None and logits.dim() == 3 and logits.shape[1] == self.strip_len:
                output.logits = logits[:, self.n :]
            self.strip_len = None
        return output


class _PrefixHooks(_Hooks):
    """Prefix tuning: every layer's key/value prefixes go into a fresh attention cache made by `cache_factory`."""

    method = "prefix"

    def __init__(self, model: nn.Module, n: int, cache_factory: CacheFactory) -> None:
        super().__init__(model, n)
        self.cache_factory = cache_factory
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"

    def insert(
        self, kwargs: dict, ids: Optional[torch.Tensor], embeds: Optional[torch.Tensor], b: int, dev: torch.device
    ) -> None:
        n, pos = self.n, kwargs.get("position_ids")
        dims = self.model._lora_lab_method["dims"]
        kv = self.model.lora_lab_prompt()  # (n, L * 2 * kv_heads * head_dim)
        dtype = frozen_dtype(self.model)
        if torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        kv = kv.to(dtype).view(n, dims["layers"] * 2, dims["kv_heads"], dims["head_dim"])
        kv = kv.permute(1, 2, 0, 3)  # (2L, kv_heads, n, head_dim)
        cache = self.cache_factory()
        cache_position = torch.arange(n, device=dev)
        for i in range(dims["layers"]):
            k = kv[2 * i][None].expand(b, -1, -1, -1)  # (B, kv_heads, n, head_dim)
            v = kv[2 * i + 1][None].expand(b, -1, -1, -1)
            cache.update(k, v, i, {"cache_position": cache_position})
        kwargs[self.cache_key] = cache
        kwargs["use_cache"] = True  # the cache carries the prefix; it is rebuilt for every call
        if pos is not None:  # the real tokens sit after the n prefix positions, as without position_ids
            kwargs["position_ids"] = pos + n


def _install(model: nn.Module, hooks: _Hooks) -> None:
    model._lora_lab_handles = (
        model.register_forward_pre_hook(hooks.pre, with_kwargs=True),
        model.register_forward_hook(hooks.post, with_kwargs=True),
    )


def apply_prompt(
    model: nn.Module, *, n_tokens: int = 20, init: str = "vocab", seed: int = 0, heads: Sequence[str] = ()
) -> list[str]:
    """Prompt tuning: `n_tokens` trainable virtual-token embeddings prepended to every input (init 'vocab': copies
    of randomly drawn vocabulary embeddings; 'random': N(0, std of the embedding matrix)). Freezes the rest."""
    if init not in ("vocab", "random"):
        raise ValueError(f"prompt.init: expected vocab or random, got {init!r}")
    if not (isinstance(n_tokens, int) and n_tokens >= 1):
        raise ValueError(f"prompt.n_tokens: expected an integer >= 1, got {n_tokens!r}")
    freeze(model)
    table = model.get_input_embeddings().weight  # (V, d)
    enc = PromptEncoder(n_tokens, table.shape[1], device=table.device)
    if table.device.type != "meta":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if init == "vocab":
                idx = torch.randint(0, table.shape[0], (n_tokens,), generator=g)
                enc.embedding.weight.copy_(table[idx.to(table.device)].float())
            else:
                noise = torch.randn(n_tokens, table.shape[1], generator=g)
                enc.embedding.weight.copy_(noise * table.float().std().cpu())
    model.lora_lab_prompt = enc
    _install(model, _PromptHooks(model, n_tokens))
    _train_heads(model, heads)
    model._lora_lab_method = {"method": PROMPT.name, "n_tokens": n_tokens, "init": init, "d": table.shape[1]}
    return ["lora_lab_prompt"]


def apply_prefix(
    model: nn.Module,
    *,
    n_tokens: int = 10,
    projection: bool = False,
    hidden: int = 512,
    cache_factory: CacheFactory,
    seed: int = 0,
    heads: Sequence[str] = (),
) -> list[str]:
    """Prefix tuning: n trainable key/value vectors per attention layer (of the model's key/value heads, so GQA is
    covered), handed to the model as a pre-filled KV cache made by `cache_factory`. With `projection`, an MLP produces
    them from (n, kv_dim) embeddings during training (Li & Liang's reparameterisation); saved files hold its output."""
    if not (isinstance(n_tokens, int) and n_tokens >= 1):
        raise ValueError(f"prefix.n_tokens: expected an integer >= 1, got {n_tokens!r}")
    freeze(model)
    dims = _model_dims(model)
    kv_dim = dims["kv_heads"] * dims["head_dim"]
    width = dims["layers"] * 2 * kv_dim
    dev = model.get_input_embeddings().weight.device
    if dev.type != "meta":
        torch.manual_seed(seed)
    enc = PromptEncoder(n_tokens, width, project_from=kv_dim if projection else None, hidden=hidden, device=dev)
    model.lora_lab_prompt = enc
    _install(model, _PrefixHooks(model, n_tokens, cache_factory))
    _train_heads(model, heads)
    model._lora_lab_method = {
        "method": PREFIX.name,
        "n_tokens": n_tokens,
        "projection": projection,
        "hidden": hidden,
        "dims": dims,
    }
    return ["lora_lab_prompt"]


# ----------------------------------------------------------------------------------------------- files, by method

Common = dict[str, Any]  # the adapter_config.json keys every method's file has: base_model_name, task_type
Paths = tuple[Path, Path]  # (adapter_config.json, adapter_model.safetensors) of a saved method
Loader = Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor], Paths, Optional[CacheFactory]], None]


def _own_file_config(model: nn.Module, common: Common) -> dict[str, Any]:
    """lora_lab's own types: the settings the apply function recorded on the model, and the biases it added."""
    info = model._lora_lab_method
    keep = {k: v for k, v in info.items() if k not in ("method", "added")}
    return peft_io.own_config(info["method"], keep, info.get("added", []), **common)


def _ia3_file_config(model: nn.Module, common: Common) -> dict[str, Any]:
    return peft_io.ia3_config(ia3_targets_of(model), **common)


def _prompt_file_config(model: nn.Module, common: Common) -> dict[str, Any]:
    info = model._lora_lab_method
    heads = _model_dims(model)["heads"]
    layers = len(repeated_blocks(model))
    return peft_io.prompt_config(n_tokens=info["n_tokens"], token_dim=info["d"], heads=heads, layers=layers, **common)


def _prefix_file_config(model: nn.Module, common: Common) -> dict[str, Any]:
    info = model._lora_lab_method
    dims = info["dims"]
    return peft_io.prefix_config(
        n_tokens=info["n_tokens"],
        kv_heads=dims["kv_heads"],
        head_dim=dims["head_dim"],
        layers=dims["layers"],
        hidden=info["hidden"],
        **common,
    )


def ia3_targets_of(model: nn.Module) -> list[tuple[str, bool]]:
    """(module name, feedforward) of every IA3 layer of an adapted model."""
    return [(n, m.feedforward) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """BitFit's and the adapters' files: the trained parameters under their module names."""
    return {name: p.detach().cpu().contiguous() for name, p in method_parameters(model).items()}


def _ia3_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """IA3's file: each vector under peft's key, in peft's (out, 1) / (1, in) layout."""
    out = {}
    for name, p in method_parameters(model).items():
        feedforward = model.get_submodule(name.rpartition(".")[0]).feedforward
        key, t = peft_io.ia3_tensor(name, p.detach().cpu().contiguous(), feedforward)
        out[key] = t
    return out


def _virtual_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Prompt and prefix tuning's file: the encoder's (n, width) output (a prefix projection's, not its weights)."""
    with torch.no_grad():
        return {peft_io.PROMPT_KEY: model.lora_lab_prompt().detach().float().cpu().contiguous()}


def _copy_named(model: nn.Module, weights: dict[str, torch.Tensor], w_path: Path) -> None:
    params = dict(model.named_parameters())
    for key, t in weights.items():
        if key not in params:
            raise ValueError(f"{w_path}: key {key} is not a parameter of {type(model).__name__}")
        peft_io.copy_tensor(params[key], t, w_path)


def _misfit(key: str, file_shape: Sequence[int], expected: Sequence[int], w_path: Path) -> ValueError:
    return ValueError(f"{w_path}: key {key}: file {tuple(file_shape)} vs config and model {tuple(expected)}")


def _virtual_rows(weights: dict, n: int, width: int, w_path: Path, *, exact: bool) -> torch.Tensor:
    """The file's (n, width) prompt/prefix tensor, checked before anything of n rows is built: a config's
    num_virtual_tokens must not allocate what the file does not hold (peft may keep more rows for a prompt)."""
    t = weights.get(peft_io.PROMPT_KEY)
    if t is None:
        raise ValueError(f"{w_path}: no {peft_io.PROMPT_KEY} tensor")
    fits = t.dim() == 2 and t.shape[1] == width and (t.shape[0] == n if exact else t.shape[0] >= n)
    if not fits:
        raise _misfit(peft_io.PROMPT_KEY, t.shape, (n, width), w_path)
    return t[:n]


def _load_bitfit(
    model: nn.Module, cfg: dict, weights: dict, paths: Paths, cache_factory: Optional[CacheFactory]
) -> None:
    apply_bitfit(model, add_missing=bool(cfg.get("add_missing", True)))
    _copy_named(model, weights, paths[1])


def _load_adapter(
    model: nn.Module, cfg: dict, weights: dict, paths: Paths, cache_factory: Optional[CacheFactory]
) -> None:
    downs = {k: t.shape for k, t in weights.items() if k.endswith(".adapter_down.weight")}
    if not downs:
        raise ValueError(f"{paths[1]}: no adapter tensors (keys ending in .adapter_down.weight)")
    for key, shape in downs.items():  # (bottleneck, d): the config's bottleneck before any adapter is built
        if shape[0] != cfg["bottleneck"]:
            raise _misfit(key, shape, (cfg["bottleneck"], *shape[1:]), paths[1])
    apply_adapter(model, bottleneck=cfg["bottleneck"], placement=cfg["placement"], activation=cfg["activation"])
    _copy_named(model, weights, paths[1])


def _load_ia3(model: nn.Module, cfg: dict, weights: dict, paths: Paths, cache_factory: Optional[CacheFactory]) -> None:
    apply_ia3(model)
    own = method_parameters(model)
    for key, t in weights.items():
        name = peft_io.ia3_parameter(key)
        if name not in own:
            raise ValueError(f"{paths[1]}: key {key} has no IA3 layer in {type(model).__name__}")
        peft_io.copy_tensor(own[name], t.reshape(-1), paths[1])


def _load_prompt(
    model: nn.Module, cfg: dict, weights: dict, paths: Paths, cache_factory: Optional[CacheFactory]
) -> None:
    n = int(cfg["num_virtual_tokens"])
    rows = _virtual_rows(weights, n, model.get_input_embeddings().weight.shape[1], paths[1], exact=False)
    apply_prompt(model, n_tokens=n, init="random")
    peft_io.copy_tensor(model.lora_lab_prompt.embedding.weight, rows, paths[1])


def _load_prefix(
    model: nn.Module, cfg: dict, weights: dict, paths: Paths, cache_factory: Optional[CacheFactory]
) -> None:
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(f"{paths[0]}: num_transformer_submodules={cfg['num_transformer_submodules']} unsupported")
    if cache_factory is None:
        raise ValueError("loading a prefix needs cache_factory (e.g. transformers.DynamicCache)")
    n, dims = int(cfg["num_virtual_tokens"]), _model_dims(model)
    rows = _virtual_rows(weights, n, dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"], paths[1], exact=True)
    apply_prefix(model, n_tokens=n, projection=False, cache_factory=cache_factory)
    peft_io.copy_tensor(model.lora_lab_prompt.embedding.weight, rows, paths[1])


# ----------------------------------------------------------------------------------------------- one object per method


@dataclass(frozen=True)
class Kind:
    """One comparison method as the code meets it on a model: which parameters are its own, whether it folds into the
    weights, and its files (peft_type, adapter_config.json, the tensors under their file keys, loading them back).
    lora_lab.adaptations' row for the method is built from it; the code asks it instead of comparing names."""

    name: str  # the value of `method`
    file_type: str  # peft_type of its adapter_config.json
    owns: Callable[[str, nn.Parameter], bool]  # (name, parameter): the method's own (trained and saved)
    folds: bool  # merge() leaves a plain model (IA3: vectors into the weights; BitFit: its biases are the model's)
    file_config: Callable[[nn.Module, Common], dict[str, Any]]  # adapter_config.json of the adapted model
    file_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]  # adapter_model.safetensors' tensors, by file key
    load_file: Loader  # apply the method to a plain model as a read config says, then copy the file's tensors in

    def parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's own trained parameters of `model`, by name."""
        return {n: p for n, p in model.named_parameters() if self.owns(n, p)}


def _is_trained_bias(name: str, p: nn.Parameter) -> bool:
    return name.rpartition(".")[2] == "bias" and p.requires_grad  # heads trained alongside are not BitFit's


def _is_ia3_vector(name: str, p: nn.Parameter) -> bool:
    return name.endswith(".ia3_l")


def _is_adapter_weight(name: str, p: nn.Parameter) -> bool:
    return ".adapter_down." in name or ".adapter_up." in name


def _is_virtual(name: str, p: nn.Parameter) -> bool:
    return name.startswith("lora_lab_prompt.")


BITFIT = Kind(
    name="bitfit",
    file_type=peft_io.OWN_TYPES["bitfit"],
    owns=_is_trained_bias,
    folds=True,  # its biases are the model's own: nothing to fold, no extra inference cost
    file_config=_own_file_config,
    file_tensors=_named_tensors,
    load_file=_load_bitfit,
)
IA3 = Kind(
    name="ia3",
    file_type=peft_io.PEFT_TYPES["ia3"],
    owns=_is_ia3_vector,
    folds=True,
    file_config=_ia3_file_config,
    file_tensors=_ia3_tensors,
    load_file=_load_ia3,
)
ADAPTER = Kind(
    name="adapter",
    file_type=peft_io.OWN_TYPES["adapter"],
    owns=_is_adapter_weight,
    folds=False,  # a nonlinearity between down and up
    file_config=_own_file_config,
    file_tensors=_named_tensors,
    load_file=_load_adapter,
)
PROMPT = Kind(
    name="prompt",
    file_type=peft_io.PEFT_TYPES["prompt"],
    owns=_is_virtual,
    folds=False,
    file_config=_prompt_file_config,
    file_tensors=_virtual_tensors,
    load_file=_load_prompt,
)
PREFIX = Kind(
    name="prefix",
    file_type=peft_io.PEFT_TYPES["prefix"],
    owns=_is_virtual,
    folds=False,
    file_config=_prefix_file_config,
    file_tensors=_virtual_tensors,
    load_file=_load_prefix,
)
KINDS: dict[str, Kind] = {k.name: k for k in (BITFIT, IA3, ADAPTER, PROMPT, PREFIX)}
BY_FILE_TYPE: dict[str, Kind] = {k.file_type: k for k in KINDS.values()}


# ----------------------------------------------------------------------------------------------- an adapted model


def method_of(model: nn.Module) -> Optional[str]:
    """The name of the comparison method applied to `model`; None: none is."""
    info = getattr(model, "_lora_lab_method", None)
    return None if info is None else info["method"]


def kind_of(model: nn.Module) -> Optional[Kind]:
    """The comparison method applied to `model`; None: none is."""
    name = method_of(model)
    return None if name is None else KINDS[name]


def _applied(model: nn.Module) -> Kind:
    kind = kind_of(model)
    if kind is None:
        raise ValueError("no method applied to this model")
    return kind


def method_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's own trained parameters, by name (what is saved; heads trained alongside are not included)."""
    return _applied(model).parameters(model)


def count_method_parameters(model: nn.Module) -> int:
    """Parameters the method adds or trains (works on the meta device: numel only)."""
    return sum(p.numel() for p in method_parameters(model).values())


def merge(model: nn.Module) -> None:
    """Fold the applied method into the weights (idempotent): IA3's vectors; BitFit has nothing to fold; a method
    that does not fold (adapters, prompt, prefix) raises."""
    kind = kind_of(model)
    if kind is None or not kind.folds:
        name = None if kind is None else kind.name
        raise ValueError(f"method={name}: cannot be merged into the weights (it changes the computation itself)")
    for m in model.modules():
        if isinstance(m, IA3Linear):
            m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge() exactly (the original weights were kept)."""
    for m in model.modules():
        if isinstance(m, IA3Linear):
            m.unmerge()


def method_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved tensors under their file keys: peft's for prompt/prefix/IA3, module names for BitFit/adapters."""
    return _applied(model).file_tensors(model)


def save(model: nn.Module, folder: str | os.PathLike, base_model_name: Optional[str] = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `folder` (each file atomically)."""
    common = {"base_model_name": base_model_name, "task_type": peft_io.method_task_type(type(model).__name__)}
    config = _applied(model).file_config(model, common)
    # As these files have always been written: no safetensors metadata, no final newline (adapter_bytes counts them).
    peft_io.write_adapter(folder, method_state_dict(model), config, metadata=None, final_newline=False)


def load(model: nn.Module, folder: str | os.PathLike, cache_factory: Optional[CacheFactory] = None) -> str:
    """Apply the method saved in `folder` (by lora_lab or peft) to a plain `model` and load its weights; returns the
    method's name. Raises ValueError naming the file when it is not one of these methods or does not fit."""
    cfg_path, w_path = peft_io.method_files(folder)
    cfg = peft_io.read_config(cfg_path)
    file_type = cfg.get("peft_type")
    weights = peft_io.read_weights(w_path)
    kind = BY_FILE_TYPE.get(file_type) if isinstance(file_type, str) else None
    if kind is None:
        known = [*peft_io.PEFT_TYPES.values(), *peft_io.OWN_TYPES.values()]
        raise ValueError(f"{cfg_path}: peft_type={file_type!r} is not one of {', '.join(known)}")
    kind.load_file(model, cfg, weights, (cfg_path, w_path), cache_factory)
    return kind.name
