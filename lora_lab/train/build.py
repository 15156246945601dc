"""Building a Session: load the model and data, apply the method (lora_lab.adaptations: LoRA, full fine-tuning or a
comparison method).

Every input error surfaces here, before anything is written or logged: ConfigError (an over-long output_dir
too), models.ModelError, data.DataError, or ValueError for bad LoRA targets. `build_and_fit` is build + fit + close
in one call (no MLflow).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lora_lab import adaptations
from lora_lab.config import Config, ConfigError, outputs_root
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


# The longest name a run writes inside its folder: a checkpoint's temp folder and file
# (checkpoints/.step-0000000.<8 random>.tmp/weights.safetensors), with room to spare.
LONGEST_INSIDE = 96


def check_output_dir(path: Path) -> None:
    """Raise ConfigError (exit 2) when `path` cannot hold a run on its file system: a folder name longer than the
    file system allows (NAME_MAX, 255 bytes on most), or a path so long the run's files would pass PATH_MAX. Checked
    before anything is written, so an over-long name is a message naming it, not a traceback at the first write."""
    probe = path
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent

    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(probe, name)
        except (OSError, ValueError):
            return default

    name_max, path_max = limit("PC_NAME_MAX", 255), limit("PC_PATH_MAX", 4096)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ConfigError(
                f"output_dir: the folder name {part[:40]}... is {size} bytes long; the file system under {probe} "
                f"allows at most {name_max} per name: give a shorter output_dir"
            )
    size = len(os.fsencode(str(path)))
    if size + LONGEST_INSIDE > path_max:
        raise ConfigError(
            f"output_dir: {str(path)[:60]}... is {size} bytes long; the run's files inside it would pass the file "
            f"system's {path_max}-byte path limit: give a shorter output_dir"
        )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG and the like: not a folder this run can use as it stands
        return False


def prefix_cache_factory(model: torch.nn.Module) -> Callable[[], Any]:
    """A fresh transformers DynamicCache for `model` per call: how prefix tuning hands its keys/values to attention."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    return lambda: DynamicCache(config=config)


def build(cfg: Config, warm: Optional[Warm] = None, role: Optional[RunRole] = None) -> Session:
    """Load the model and data and apply LoRA (or unfreeze everything): every input error surfaces here, before
    anything is logged. Raises ConfigError, models.ModelError, data.DataError or ValueError (bad targets).

    `warm` (a sweep worker's lora_lab.train.warm.Warm): take the model, tokenizer and data from it when they are kept
    already; the caller hands them back with `warm.give_back()` once the session is done. Same seeding either way.
    `role`: who the run is and the overrides that made it (finish.RunRole; default: a plain run, no overrides)."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    t0 = time.perf_counter()
    # Nothing is written yet: the folder appears when the run starts (fit, fit_tracked), not on a bad input.
    output_dir = Path(cfg.output_dir).resolve() if cfg.output_dir else default_output_dir(cfg)
    check_output_dir(output_dir)
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
    seed_everything(cfg.seed)
    return Session(cfg, model, tokenizer, data, device, wrapped, time.perf_counter() - t0, output_dir, role)


def _prepare(cfg: Config, model: torch.nn.Module, data: Any, device: torch.device) -> list[str]:
    """Apply the method to the loaded model (seeded as the run's seed says) and check the data against it; returns
    the modules the method changed."""
    adaptation = adaptations.of(cfg.method)
    wrapped = adaptation.apply(model, cfg, prefix_cache_factory(model))  # seeded by the run's seed
    if not adaptation.trains_all and autocast_dtype(cfg.trainer.precision, device) == torch.bfloat16:
        store_frozen_in(model, torch.bfloat16)  # frozen weights only: trainable ones stay fp32
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
