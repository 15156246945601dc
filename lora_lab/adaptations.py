"""The seven ways a run adapts its model (LoRA, full fine-tuning, BitFit, IA3, adapters, prompt, prefix tuning), as one
table: the only place that knows a method by its name.

Each entry says how the method is applied to a loaded model from the typed config, which of its settings are its own
(its config group), whether and how it folds into the weights for serving, what it saves, whether a warm sweep worker
can undo it exactly, and how people read it (label, key settings, the paper's name). Everything else asks the table:
`adaptations.of(cfg.method).merges`, never `cfg.method == "lora"`.

Imports: torch, the torch-only core (lora, methods, targets) and the typed config; nothing of Hydra, Optuna or MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from lora_lab import bases, lora, methods, targets
from lora_lab.config import METHOD_CHOICES, Config, ConfigError, LoraConfig
from lora_lab.methods import CacheFactory

Getter = Callable[[str], Any]  # a run's setting by config path ("lora.r"), None when not set


class Adaptation(Protocol):
    """What the training loop, the sweep, the records and the report may ask of a method."""

    name: str  # the value of `method`
    label: str  # for people: "LoRA", "full fine-tuning", "BitFit", ...
    group: Optional[str]  # the config group holding the method's own fields (lora, bitfit, ...); None: it has none
    merges: bool  # folds into the weights for serving: the merged model is checked against the unmerged one
    trains_all: bool  # every weight trains: checkpoints and the kept result are all weights, no adapter file
    warm_reusable: bool  # a warm sweep worker can undo it exactly and reuse the loaded base model
    trains_base: bool  # it trains the base layers' own weights or biases: refused on a quantized (frozen) base

    def refuse(self, cfg: Config) -> None:
        """ConfigError when `cfg` asks this method for what it cannot do, found before any model loads."""
        ...

    def apply(self, model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
        """Adapt `model` in place as `cfg` says; returns the modules changed (ConfigError: a combination it refuses)."""
        ...

    def check(self, model: nn.Module, cfg: Config) -> None:
        """Check `cfg` against a loaded model without changing it (a sweep's trials before any runs); ValueError."""
        ...

    def merge(self, model: nn.Module) -> None: ...

    def unmerge(self, model: nn.Module) -> None: ...

    def save(self, model: nn.Module, folder: str | os.PathLike, base_model_name: Optional[str]) -> None: ...

    def lr_ratio(self, cfg: Config) -> float:
        """LR of the second parameter group over the first (LoRA+'s B over A); 1.0: one LR."""
        ...

    def key_settings(self, get: Getter) -> list[str]:
        """The settings that tell two runs of this method apart, as short `key=value` texts."""
        ...

    def describe(self, get: Getter) -> str:
        """The label with the key settings, e.g. 'LoRA (r=8, alpha=16, targets=all-linear)'."""
        ...

    def paper_label(self, get: Getter) -> str:
        """The name the papers' tables use (Hu et al.: AdapterH, PreEmbed; LoRA's variants combined: DoRA+rsLoRA)."""
        ...


# ----------------------------------------------------------------------------------------------- LoRA's arguments


def lora_kwargs(model: nn.Module, c: LoraConfig, task: str) -> dict[str, Any]:
    """The typed LoraConfig as lora.apply_lora's plain keyword values (also what targets.resolve_targets takes, less
    r/alpha/dropout/rslora/init/variant). modules_to_save=null means the task head for seq_cls: a freshly initialised
    classifier must train, or LoRA learns against a random head."""
    saved = c.modules_to_save
    if saved is None:
        saved = targets.head_modules(model) if task == "seq_cls" else []
    return dict(
        r=c.r,
        alpha=c.alpha,
        dropout=c.dropout,
        targets=tuple(c.targets),
        target_regex=c.target_regex,
        exclude=tuple(c.exclude),
        layers=tuple(c.layers) if c.layers is not None else None,
        layers_pattern=tuple(c.layers_pattern) if c.layers_pattern else None,
        rslora=c.rslora,
        init=c.init,
        variant=c.variant,
        modules_to_save=tuple(saved),
    )


def lora_targets(model: nn.Module, c: LoraConfig, task: str = "causal_lm") -> list[str]:
    """The modules LoRA would wrap, without wrapping (the sweep checks each trial's targets with it)."""
    kw = lora_kwargs(model, c, task)
    for key in ("r", "alpha", "dropout", "rslora", "init", "variant"):
        del kw[key]
    return targets.resolve_targets(model, **kw)


# ----------------------------------------------------------------------------------------------- apply


def _heads(model: nn.Module, cfg: Config) -> list[str]:
    """A classifier's task head trains beside every method (a fresh head must learn); causal LMs keep theirs."""
    return targets.head_modules(model) if cfg.model.task == "seq_cls" else []


def _apply_lora(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    return lora.apply_lora(model, **lora_kwargs(model, cfg.lora, cfg.model.task))


def _apply_full(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    for p in model.parameters():
        p.requires_grad_(True)
    return []


def _named(apply: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """A comparison method's refusal of a model (ValueError from lora_lab.methods) as a ConfigError naming both."""

    def wrapped(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
        try:
            return apply(model, cfg, cache_factory)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"method={cfg.method} on model.name={cfg.model.name}: {exc}") from None

    return wrapped


@_named
def _apply_bitfit(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    return methods.apply_bitfit(model, add_missing=cfg.bitfit.add_missing, heads=_heads(model, cfg))


@_named
def _apply_ia3(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    return methods.apply_ia3(model, heads=_heads(model, cfg))


@_named
def _apply_adapter(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    a = cfg.adapter
    return methods.apply_adapter(
        model, bottleneck=a.bottleneck, placement=a.placement, activation=a.activation, heads=_heads(model, cfg)
    )


@_named
def _apply_prompt(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    if cfg.model.task == "seq_cls":
        raise ConfigError(
            "method=prompt: needs model.task=causal_lm (virtual tokens shift a classifier's pooled token)"
        )
    return methods.apply_prompt(model, n_tokens=cfg.prompt.n_tokens, init=cfg.prompt.init, seed=cfg.seed)


@_named
def _apply_prefix(model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
    c = cfg.prefix
    return methods.apply_prefix(
        model,
        n_tokens=c.n_tokens,
        projection=c.projection,
        hidden=c.hidden,
        cache_factory=cache_factory,
        seed=cfg.seed,
        heads=_heads(model, cfg),
    )


# ----------------------------------------------------------------------------------------------- labels


def _lora_settings(get: Getter) -> list[str]:
    return [f"r={get('lora.r')}", f"alpha={get('lora.alpha')}", "targets=" + "+".join(get("lora.targets") or [])]


def _lora_paper_label(get: Getter) -> str:
    parts = [
        {"dora": "DoRA"}.get(get("lora.variant") or "", ""),
        {"pissa": "PiSSA", "olora": "OLoRA"}.get(get("lora.init") or "", ""),
        "rsLoRA" if get("lora.rslora") is True else "",
        "LoRA+" if (get("lora.lr_ratio") or 1.0) != 1.0 else "",
    ]
    return "+".join(x for x in parts if x) or "LoRA"


def _no_merge(model: nn.Module) -> None:
    raise TypeError("this method changes the computation itself: it cannot be merged into the weights")


def _save_nothing(model: nn.Module, folder: str | os.PathLike, base_model_name: Optional[str]) -> None:
    raise TypeError("method=full keeps every weight: there is no adapter to save (export.merged writes the model)")


def _one_lr(cfg: Config) -> float:
    return 1.0


def _none(get: Getter) -> list[str]:
    return []


def _label(text: str) -> Callable[[Getter], str]:
    return lambda get: text


@dataclass(frozen=True)
class Method:
    """One row of the table (see Adaptation for what each field means)."""

    name: str
    label: str
    group: Optional[str]
    merges: bool
    trains_all: bool
    warm_reusable: bool
    apply_fn: Callable[..., list[str]]
    trains_base: bool = False
    merge_fn: Callable[[nn.Module], None] = _no_merge
    unmerge_fn: Callable[[nn.Module], None] = _no_merge
    save_fn: Callable[..., None] = methods.save
    lr_ratio_fn: Callable[[Config], float] = _one_lr
    key_settings_fn: Callable[[Getter], list[str]] = _none
    paper_label_fn: Optional[Callable[[Getter], str]] = None
    check_fn: Optional[Callable[[nn.Module, Config], Any]] = None
    # Fold the update in for good and drop the method's modules: a plain model (export.merged); None: not offered.
    unwrap_fn: Optional[Callable[[nn.Module], nn.Module]] = None
    kind: Optional[methods.Kind] = None  # a comparison method's object in lora_lab.methods (None: LoRA, full)

    def refuse(self, cfg: Config) -> None:
        if self.trains_base and cfg.model.quantize != "none":
            self._refuse_quantized(f"model.quantize={cfg.model.quantize}")

    def _refuse_quantized(self, what: str) -> None:
        frozen = ", ".join(m.name for m in METHODS.values() if not m.trains_base)
        raise ConfigError(
            f"method={self.name} with {what}: {self.label} trains the base layers' own "
            f"{'weights' if self.trains_all else 'biases'}, and a quantized base is frozen; use model.quantize=none, "
            f"or a method that leaves the base frozen ({frozen})"
        )

    def apply(self, model: nn.Module, cfg: Config, cache_factory: Optional[CacheFactory] = None) -> list[str]:
        self.refuse(cfg)
        if self.trains_base and bases.quantized_modules(model):  # a pre-quantized checkpoint, model.quantize=none
            self._refuse_quantized(f"the pre-quantized model.name={cfg.model.name}")
        torch.manual_seed(cfg.seed)  # the method's init is part of the run's seed, independent of model loading
        return self.apply_fn(model, cfg, cache_factory)

    def check(self, model: nn.Module, cfg: Config) -> None:
        if self.check_fn is not None:
            self.check_fn(model, cfg)

    def merge(self, model: nn.Module) -> None:
        self.merge_fn(model)

    def unmerge(self, model: nn.Module) -> None:
        self.unmerge_fn(model)

    def save(self, model: nn.Module, folder: str | os.PathLike, base_model_name: Optional[str]) -> None:
        self.save_fn(model, folder, base_model_name=base_model_name)

    def lr_ratio(self, cfg: Config) -> float:
        return self.lr_ratio_fn(cfg)

    def key_settings(self, get: Getter) -> list[str]:
        return self.key_settings_fn(get)

    def paper_label(self, get: Getter) -> str:
        return self.paper_label_fn(get) if self.paper_label_fn is not None else self.label

    def describe(self, get: Getter) -> str:
        """The label with the key settings: 'LoRA (r=8, alpha=16, targets=all-linear)', 'IA3'."""
        bits = self.key_settings(get)
        return f"{self.label} ({', '.join(bits)})" if bits else self.label


LORA = Method(
    name="lora",
    label="LoRA",
    group="lora",
    merges=True,
    trains_all=False,
    warm_reusable=True,
    apply_fn=_apply_lora,
    # Looked up at each call, not bound once: a test replaces lora.merge to check the merge check.
    merge_fn=lambda model: lora.merge(model),
    unmerge_fn=lambda model: lora.unmerge(model),
    save_fn=lora.save_adapter,
    unwrap_fn=lora.unwrap,
    lr_ratio_fn=lambda cfg: cfg.lora.lr_ratio,
    key_settings_fn=_lora_settings,
    paper_label_fn=_lora_paper_label,
    check_fn=lambda model, cfg: lora_targets(model, cfg.lora, cfg.model.task),  # bad targets raise, naming them
)
FULL = Method(
    name="full",
    label="full fine-tuning",
    group=None,
    merges=False,
    trains_all=True,
    warm_reusable=True,
    apply_fn=_apply_full,
    trains_base=True,
    save_fn=_save_nothing,
    paper_label_fn=_label("full FT"),
)


def _comparison(
    kind: methods.Kind,
    *,
    label: str,
    group: Optional[str],
    warm_reusable: bool,
    apply_fn: Callable[..., list[str]],
    trains_base: bool = False,
    key_settings_fn: Callable[[Getter], list[str]] = _none,
    paper_label_fn: Optional[Callable[[Getter], str]] = None,
) -> Method:
    """The row of one of lora_lab.methods' comparison methods: its name, whether it merges (the Kind's `folds`), how
    it merges and saves come from its Kind, so each is said once; it trains its own parameters, not all weights."""
    return Method(
        name=kind.name,
        label=label,
        group=group,
        merges=kind.folds,
        trains_all=False,
        warm_reusable=warm_reusable,
        apply_fn=apply_fn,
        trains_base=trains_base,
        merge_fn=methods.merge if kind.folds else _no_merge,
        unmerge_fn=methods.unmerge if kind.folds else _no_merge,
        save_fn=methods.save,
        key_settings_fn=key_settings_fn,
        paper_label_fn=paper_label_fn,
        kind=kind,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        LORA,
        FULL,
        _comparison(
            methods.BITFIT,  # merges: its biases are the model's own, nothing to fold, no extra inference cost
            label="BitFit",
            group="bitfit",
            warm_reusable=False,  # added zero biases change the model's structure
            apply_fn=_apply_bitfit,
            trains_base=True,  # the biases are the base layers' own
        ),
        _comparison(methods.IA3, label="IA3", group=None, warm_reusable=False, apply_fn=_apply_ia3),
        _comparison(
            methods.ADAPTER,
            label="adapters",
            group="adapter",
            warm_reusable=False,
            apply_fn=_apply_adapter,
            key_settings_fn=lambda get: [
                f"placement={get('adapter.placement')}",
                f"bottleneck={get('adapter.bottleneck')}",
            ],
            paper_label_fn=lambda get: "AdapterL" if get("adapter.placement") == "pfeiffer" else "AdapterH",
        ),
        _comparison(
            methods.PROMPT,
            label="prompt tuning",
            group="prompt",
            warm_reusable=False,
            apply_fn=_apply_prompt,
            key_settings_fn=lambda get: [f"n_tokens={get('prompt.n_tokens')}"],
            paper_label_fn=_label("PreEmbed"),
        ),
        _comparison(
            methods.PREFIX,
            label="prefix tuning",
            group="prefix",
            warm_reusable=False,
            apply_fn=_apply_prefix,
            key_settings_fn=lambda get: [f"n_tokens={get('prefix.n_tokens')}"],
            paper_label_fn=_label("PreLayer"),
        ),
    )
}
if tuple(METHODS) != METHOD_CHOICES:  # config validates `method` against its own tuple (config is a leaf)
    raise ImportError(f"adaptations.METHODS {tuple(METHODS)} != config.METHOD_CHOICES {METHOD_CHOICES}")


def of(name: str) -> Method:
    """The table's entry for `method=name`; ValueError naming the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: no such method {name!r}; expected one of {', '.join(METHODS)}") from None


def groups() -> set[str]:
    """Every method's own config group (lora, bitfit, adapter, prompt, prefix)."""
    return {m.group for m in METHODS.values() if m.group}
