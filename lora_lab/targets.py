"""Model introspection: linear modules, heads, layer stacks, fused experts, target resolution, the repeated blocks.

Everything here is read from the model's module tree, never from a list of model names: the output heads
(``head_modules``), the layer lists (``layer_stacks``: a module's layer index is its position in the stack that holds
it, as in peft), the targets LoRA wraps (``resolve_targets``: presets ``attn`` / ``mlp`` / ``all-linear``, names,
suffixes, a regex, layers; peft's ``all-linear`` where peft defines it), the modules trained in full
(``resolve_modules_to_save``), and the repeated blocks (``repeated_blocks``) that the methods adapt per layer and
that regional compilation (later activation checkpointing and FSDP wrapping) works on.

Torch only, plus lora_lab.bases (which module kinds a LoRA layer can wrap). A LoRA layer is recognised by its shape
(a ``base_layer`` and a ``lora_A``), so this module does not import lora_lab.lora, which imports it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from lora_lab.bases import adaptable

__all__ = [
    "PRESETS",
    "is_lora_layer",
    "is_linear",
    "linear_modules",
    "inside",
    "head_modules",
    "layer_stacks",
    "layer_index",
    "fused_expert_parameters",
    "resolve_targets",
    "resolve_modules_to_save",
    "repeated_blocks",
]

PRESETS = ("attn", "mlp", "all-linear")


def is_lora_layer(module: nn.Module) -> bool:
    """A LoRA layer (lora.LoraLayer, or one built like it, as peft's): it holds the layer it adapts as ``base_layer``
    and has its own ``lora_A``. It stands in for that layer: targeting sees it, not its base layer."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A")


def is_linear(module: nn.Module) -> bool:
    """A module LoRA can target (a kind lora_lab.bases knows: nn.Linear, GPT-2's Conv1D), or a LoRA layer."""
    return adaptable(module) or is_lora_layer(module)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> Linear/Conv1D/LoRA layer, in model order; the base layers inside LoRA layers are not listed."""
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if is_lora_layer(module):
            wrappers.append(name)
        if is_linear(module):
            found[name] = module
    return found


def inside(name: str, roots: Sequence[str]) -> bool:
    """Whether module `name` is one of `roots` or sits below one of them."""
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
            # A wrapped output layer: the LoRA layer is the head, not its base_layer.
            heads.append(parent if parent and is_lora_layer(named[parent]) else name)
    backbone = getattr(model, "base_model", model)
    if isinstance(backbone, nn.Module) and backbone is not model:
        for name, child in model.named_children():
            if child is not backbone and any(True for _ in child.parameters()) and not inside(name, heads):
                heads.append(name)
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in linear_modules(model).items():
        base = module.base_layer if is_lora_layer(module) else module
        if id(base.weight) in embed_ids and not inside(name, heads):
            heads.append(name)
    order = list(named)
    return sorted(heads, key=order.index)


def layer_stacks(model: nn.Module) -> list[str]:
    """The model's own layer lists: the outermost ``nn.ModuleList``s (``model.layers``, ``transformer.h``,
    ``encoder.block`` and ``decoder.block``, ``bert.encoder.layer`` ...). A module's layer index is its position in the
    stack that holds it, so T5's ``encoder.block.1.layer.0.SelfAttention.q`` is in layer 1 (as in peft)."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and not inside(name, stacks):
            stacks.append(name)
    return stacks


def layer_index(name: str, stacks: Sequence[str], layers_pattern: Sequence[str] | None = None) -> int | None:
    """Index of the layer holding module `name`: from the layer stacks, or, with peft's ``layers_pattern``, from the
    first '<pattern>.<i>.' component (peft's rule). None outside every layer."""
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


def repeated_blocks(model: nn.Module, *, min_blocks: int = 1) -> list[tuple[str, nn.Module]]:
    """The model's repeated decoder/encoder blocks, as (name, block) in order: the ``nn.ModuleList`` of at least
    `min_blocks` blocks of one type that holds the most parameters (Llama's ``model.layers``, GPT-2's
    ``transformer.h``, BERT's ``bert.encoder.layer``); the first such list on a tie. ValueError naming the model class
    when there is none."""
    best: list[tuple[str, nn.Module]] = []
    best_n = 0  # a list of blocks without parameters is no layer stack
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= max(1, min_blocks):
            if len({type(m) for m in module}) == 1:
                n = sum(p.numel() for p in module.parameters())
                if n > best_n:
                    best, best_n = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(module)], n
    if not best:
        raise ValueError(f"{type(model).__name__}: no list of repeated layers found (expected e.g. model.layers)")
    return best


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
        linears = linear_modules(model)
        heads = head_modules(model)
        stacks = layer_stacks(model)
        return cls(
            linears,
            heads,
            {n for n in linears if inside(n, heads)},
            {n: layer_index(n, stacks, layers_pattern) for n in linears},
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
            or inside(n.rpartition(".")[0], [spec])
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
    """Names of the modules ``lora.apply_lora`` would wrap (model order). Targets default to all-linear.

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
        chosen = {n for n in chosen if not inside(n, saved)}
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
        hit = [n for n in named if (n == spec or n.endswith("." + spec)) and not inside(n, found)]
        hit = [n for n in hit if not any(inside(n, [h]) and n != h for h in hit)]  # outermost matches only
        if not hit and strict:
            raise ValueError(
                f"modules_to_save {spec!r} matches no module; top-level modules: "
                f"{[n for n, _ in model.named_children()]}, heads: {head_modules(model)}"
            )
        found.extend(h for h in hit if h not in found)
    order = {n: i for i, n in enumerate(named)}
    return sorted(found, key=order.__getitem__)
