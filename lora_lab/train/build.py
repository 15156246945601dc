"""Building a Session: load the model and data, apply the method (lora_lab.adaptations: LoRA, full fine-tuning or a
comparison method).

Every input error surfaces here, before anything is written or logged: ConfigError (an over-long output_dir
too), models.ModelError, data.DataError, or ValueError for bad LoRA targets. `build_and_fit` is build + fit + close
in one call (no MLflow).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lora_lab import adaptations, bases
from lora_lab.config import Config, ConfigError, outputs_root
from lora_lab.records import RunRecord
from lora_lab.train import distributed
from lora_lab.train.finish import RunRole
from lora_lab.train.loop import EvalCallback
from lora_lab.train.loss import check_chunkable
from lora_lab.train.runtime import autocast_dtype, pick_device, seed_everything, store_frozen_in
from lora_lab.train.session import Session
from lora_lab.train.warm import Warm


def default_output_dir(cfg: Config) -> Path:
    """outputs/runs/<time>-<method>-<pid>: a run's folder when output_dir is not given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return outputs_root() / "runs" / f"{stamp}-{cfg.method}-{os.getpid()}"


@functools.cache
def _prefix_cache_class() -> type:
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A DynamicCache that keeps only what it was first filled with (prefix tuning's keys/values): later updates
        of a layer return the prefix followed by the call's keys/values without storing them. A block run twice on
        one cache (activation checkpointing recomputes it during backward) so sees the same prefix both times,
        where a DynamicCache would have grown by the first run's keys."""

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    return PrefixCache


def prefix_cache_factory(model: torch.nn.Module) -> Callable[[], Any]:
    """A fresh transformers cache for `model` per call, holding the prefix only (PrefixCache above): how prefix
    tuning hands its keys/values to attention."""
    cls = _prefix_cache_class()
    config = getattr(model, "config", None)
    return lambda: cls(config=config)


def build(cfg: Config, warm: Optional[Warm] = None, role: Optional[RunRole] = None) -> Session:
    """Load the model and data and apply LoRA (or unfreeze everything): every input error surfaces here, before
    anything is logged. Raises ConfigError, models.ModelError, data.DataError or ValueError (bad targets).

    `warm` (a sweep worker's lora_lab.train.warm.Warm): take the model, tokenizer and data from it when they are kept
    already; the caller hands them back with `warm.give_back()` once the session is done. Same seeding either way.
    `role`: who the run is and the overrides that made it (finish.RunRole; default: a plain run, no overrides)."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    t0 = time.perf_counter()
    adaptations.of(cfg.method).refuse(cfg)  # a combination the method refuses, before any weight loads
    # Nothing is written yet: the folder appears when the run starts (fit, fit_tracked), not on a bad input.
    distributed.refuse(cfg)  # a multi-process combination that cannot work, also before any weight loads
    if cfg.trainer.devices > 1 and not distributed.active():
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices}: a multi-process run starts through `python -m lora_lab.train` "
            "(or torchrun), or inside distributed.group_for (a sweep's sweep.devices_per_trial); a session built in "
            "this process alone trains on one"
        )
    output_dir = Path(cfg.output_dir).resolve() if cfg.output_dir else default_output_dir(cfg)
    output_dir = distributed.from_main(output_dir)  # ranks started without output_dir: rank 0's folder is the run's
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    if warm is None:
        model, tokenizer = load_model(cfg.model)
        data = load_data(cfg.data, tokenizer)
    else:
        model, tokenizer, data = warm.take(cfg)
    try:
        wrapped = _prepare(cfg, model, data, device)
    except BaseException:
        if warm is not None:
            warm.give_back()
        raise
    # Every rank built the same model from the same seed; from here each draws its own randomness (dropout masks
    # for its own rows). Rank 0's, the only one of a 1-process run, is the run's seed.
    seed_everything(cfg.seed + distributed.rank())
    return Session(cfg, model, tokenizer, data, device, wrapped, time.perf_counter() - t0, output_dir, role)


def _prepare(cfg: Config, model: torch.nn.Module, data: Any, device: torch.device) -> list[str]:
    """Apply the method to the loaded model (seeded as the run's seed says) and check the data against it; returns
    the modules the method changed."""
    adaptation = adaptations.of(cfg.method)
    wrapped = adaptation.apply(model, cfg, prefix_cache_factory(model))  # seeded by the run's seed
    if not adaptation.trains_all and autocast_dtype(cfg.trainer.precision, device) == torch.bfloat16:
        store_frozen_in(model, torch.bfloat16)  # frozen weights only: trainable ones stay fp32
        if bases.quantized_modules(model):
            from lora_lab import quant

            quant.compute_in(model, torch.bfloat16)  # 4-/8-bit layers dequantize into the run's precision
    if cfg.trainer.loss_chunk:
        try:
            check_chunkable(model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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
