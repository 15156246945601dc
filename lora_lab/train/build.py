"""Building a Session: load the model and data, apply the method (LoRA, full fine-tuning or a comparison method).

Every input error surfaces here, before anything is written or logged: ConfigError, models.ModelError,
data.DataError, or ValueError for bad LoRA targets. `build_and_fit` is build + fit + close in one call (no MLflow).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lora_lab import lora, methods
from lora_lab.config import Config, ConfigError, LoraConfig, outputs_root
from lora_lab.records import RunRecord
from lora_lab.train.finish import RunRole
from lora_lab.train.loop import EvalCallback
from lora_lab.train.runtime import autocast_dtype, pick_device, seed_everything, store_frozen_in
from lora_lab.train.session import Session
from lora_lab.train.warm import Warm


def default_output_dir(cfg: Config) -> Path:
    """outputs/runs/<time>-<method>-<pid>: a run's folder when output_dir is not given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return outputs_root() / "runs" / f"{stamp}-{cfg.method}-{os.getpid()}"


def lora_kwargs(model: torch.nn.Module, c: LoraConfig, task: str) -> dict[str, Any]:
    """The typed LoraConfig as lora.apply_lora's plain keyword values (also what lora.resolve_targets takes, less
    r/alpha/dropout/rslora/init/variant). modules_to_save=null means the task head for seq_cls: a freshly initialised
    classifier must train, or LoRA learns against a random head."""
    saved = c.modules_to_save
    if saved is None:
        saved = lora.head_modules(model) if task == "seq_cls" else []
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


def lora_targets(model: torch.nn.Module, c: LoraConfig, task: str = "causal_lm") -> list[str]:
    """The modules apply_lora_config would wrap, without wrapping (the sweep checks each trial's targets with it)."""
    kw = lora_kwargs(model, c, task)
    for key in ("r", "alpha", "dropout", "rslora", "init", "variant"):
        del kw[key]
    return lora.resolve_targets(model, **kw)


def apply_lora_config(model: torch.nn.Module, c: LoraConfig, task: str = "causal_lm") -> list[str]:
    """Wrap `model` as the config says (the one place a LoraConfig becomes lora.apply_lora's arguments)."""
    return lora.apply_lora(model, **lora_kwargs(model, c, task))


def prefix_cache_factory(model: torch.nn.Module) -> Callable[[], Any]:
    """A fresh transformers DynamicCache for `model` per call: how prefix tuning hands its keys/values to attention."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    return lambda: DynamicCache(config=config)


def apply_method(model: torch.nn.Module, cfg: Config) -> list[str]:
    """Apply cfg.method (bitfit, ia3, adapter, prompt, prefix: lora_lab.methods) to `model` as the config says; for
    seq_cls the task head trains too. Returns the modules it changed. Raises ConfigError for a combination the loop
    cannot serve (prompt tuning shifts a classifier's pooled token)."""
    if cfg.method == "prompt" and cfg.model.task == "seq_cls":
        raise ConfigError(
            "method=prompt: needs model.task=causal_lm (virtual tokens shift a classifier's pooled token)"
        )
    heads = lora.head_modules(model) if cfg.model.task == "seq_cls" else []
    try:
        if cfg.method == "bitfit":
            return methods.apply_bitfit(model, add_missing=cfg.bitfit.add_missing, heads=heads)
        if cfg.method == "ia3":
            return methods.apply_ia3(model, heads=heads)
        if cfg.method == "adapter":
            a = cfg.adapter
            return methods.apply_adapter(
                model, bottleneck=a.bottleneck, placement=a.placement, activation=a.activation, heads=heads
            )
        if cfg.method == "prompt":
            return methods.apply_prompt(model, n_tokens=cfg.prompt.n_tokens, init=cfg.prompt.init, seed=cfg.seed)
        if cfg.method == "prefix":
            c = cfg.prefix
            return methods.apply_prefix(
                model,
                n_tokens=c.n_tokens,
                projection=c.projection,
                hidden=c.hidden,
                cache_factory=prefix_cache_factory(model),
                seed=cfg.seed,
                heads=heads,
            )
    except ValueError as exc:
        raise ConfigError(f"method={cfg.method} on model.name={cfg.model.name}: {exc}") from None
    raise ConfigError(f"method: no such method {cfg.method!r}")


def build(cfg: Config, warm: Optional[Warm] = None, role: Optional[RunRole] = None) -> Session:
    """Load the model and data and apply LoRA (or unfreeze everything): every input error surfaces here, before
    anything is logged. Raises ConfigError, models.ModelError, data.DataError or ValueError (bad targets).

    `warm` (a sweep worker's lora_lab.train.warm.Warm): take the model, tokenizer and data from it when they are kept
    already; the caller hands them back with `warm.give_back()` once the session is done. Same seeding either way.
    `role`: who the run is and the overrides that made it (finish.RunRole; default: a plain run, no overrides)."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    t0 = time.perf_counter()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    if warm is None:
        model, tokenizer = load_model(cfg.model)
        data = load_data(cfg.data, tokenizer, seed=cfg.seed)
    else:
        model, tokenizer, data = warm.take(cfg)
    try:
        wrapped = _prepare(cfg, model, data, device)
    except BaseException:
        if warm is not None:
            warm.give_back()
        raise
    seed_everything(cfg.seed)
    # Nothing is written yet: the folder appears when the run starts (fit, fit_tracked), not on a bad input.
    output_dir = Path(cfg.output_dir).resolve() if cfg.output_dir else default_output_dir(cfg)
    return Session(cfg, model, tokenizer, data, device, wrapped, time.perf_counter() - t0, output_dir, role)


def _prepare(cfg: Config, model: torch.nn.Module, data: Any, device: torch.device) -> list[str]:
    """Apply the method to the loaded model (seeded as the run's seed says) and check the data against it; returns
    the modules the method changed."""
    if cfg.method == "lora":
        torch.manual_seed(cfg.seed)  # LoRA init is part of the run's seed, independent of model loading
        wrapped = apply_lora_config(model, cfg.lora, cfg.model.task)
    elif cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        wrapped = []
    else:
        torch.manual_seed(cfg.seed)  # the method's init is part of the run's seed, as LoRA's
        wrapped = apply_method(model, cfg)
    if cfg.method != "full" and autocast_dtype(cfg.trainer.precision, device) == torch.bfloat16:
        store_frozen_in(model, torch.bfloat16)
    if cfg.data.format == "classification":
        labels = set(data.train["labels"]) | set(data.val["labels"])
        if max(labels) >= cfg.model.num_labels:
            raise ConfigError(
                f"model.num_labels={cfg.model.num_labels}: the data has class {max(labels)}; "
                f"expected labels 0..{cfg.model.num_labels - 1}"
            )
    return wrapped


def build_and_fit(cfg: Config, on_eval: Optional[EvalCallback] = None) -> RunRecord:
    """Build and fit in one call (no MLflow), then close the session: for tests and notebooks."""
    session = build(cfg)
    try:
        return session.fit(on_eval)
    finally:
        session.close()
