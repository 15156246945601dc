"""Everything that can be wrong with a study, found before anything is written (bad input: exit 2, nothing created)."""

from __future__ import annotations

from typing import Optional

from lora_lab import adaptations
from lora_lab.config import Config, ConfigError, SweepConfig, compose
from lora_lab.memplan import Plan
from lora_lab.sweep import search
from lora_lab.sweep.compare import full_settings
from lora_lab.sweep.study import Study
from lora_lab.train import distributed
from lora_lab.train.memory import DoesNotFit, check_fits, planned


def check_study(spec: SweepConfig) -> None:
    """The study file's own checks, before any storage, tracking store or folder exists: the space is sampled once
    (and every tied/map entry resolves for every value), and a grid sampler gets a finite grid."""
    search.check_space(spec.space)
    if spec.sampler == "grid":
        search.grid(spec.space)


def study_configs(st: Study) -> list[tuple[str, Config]]:
    """The study's base config and one per extreme value of each space entry (search.preview), each with what
    names it in a message; ConfigError names the entry whose value does not compose."""
    configs = [("the study's base config", st.base_cfg)]
    for extra in search.preview(st.spec.space):
        try:
            configs.append((f"sweep.space: {' '.join(extra)}", compose(st.base_overrides + extra)[1]))
        except ConfigError as exc:
            raise ConfigError(f"sweep.space: {' '.join(extra)}: {exc}") from None
    return configs


def check_devices(st: Study) -> None:
    """sweep.devices_per_trial = K > 1 on a GPU host: every trial's ranks need a GPU of their own, so the workers'
    devices (sweep.workers, a multiple of K) must be GPUs this process sees."""
    import torch

    spec = st.spec
    if spec.devices_per_trial == 1 or distributed.pick_type(st.base_cfg.trainer.device) != "cuda":
        return
    gpus, k = torch.cuda.device_count(), spec.devices_per_trial
    if spec.workers > gpus:
        raise ConfigError(
            f"sweep.workers={spec.workers}: with sweep.devices_per_trial={k} each rank of a trial needs a GPU of its "
            f"own, and torch sees {gpus} here; give a multiple of {k} up to {gpus // k * k}"
        )


def check_memory(configs: list[tuple[str, Config]]) -> None:
    """Every config's memory plan fits its device (lora_lab.train.memory), before any weight loads; DoesNotFit
    names the config (the base or the space entry's value), the numbers and the settings that would fit."""
    for what, cfg in configs:
        try:
            check_fits(cfg)
        except DoesNotFit as exc:
            raise DoesNotFit(f"{what}: {exc}") from None


def largest_plan(st: Study) -> Optional[Plan]:
    """The largest memory plan among the study's configs (base and each entry's extremes), or None where a model
    cannot be planned (its config does not build on the meta device)."""
    plans = []
    for _, cfg in study_configs(st):
        try:
            plans.append(planned(cfg)[0])
        except (ValueError, TypeError, NotImplementedError):
            return None
    return max(plans, key=lambda p: p.total)


def preflight(st: Study) -> None:
    """Each space entry's extreme values compose and validate, fit the device by the memory plan (before any weight
    loads), the model and data load, and every target choice matches modules; the loaded base model then starts
    this process's warm holder."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    named = study_configs(st)
    configs = [cfg for _, cfg in named]
    check_devices(st)
    for cfg in configs:  # what a method refuses whatever the model (full FT on a quantized base), before loading
        adaptations.of(cfg.method).refuse(cfg)
        distributed.refuse(cfg)  # and what cannot run over sweep.devices_per_trial processes
    if st.spec.compare_full:  # the comparison runs at the study's end: refused now, not after every trial ran
        full = compose(st.base_overrides + full_settings(st))[1]
        try:
            adaptations.FULL.refuse(full)
            distributed.refuse(full)
        except ConfigError as exc:
            raise ConfigError(f"sweep.compare_full: {exc}") from None
        named.append(("sweep.compare_full's full fine-tuning", full))  # and it must fit, as every trial must
    check_memory(named)  # after the refusals: a method refused outright is named as such, not as too big
    base = st.base_cfg
    model, tokenizer = load_model(base.model)
    data = load_data(base.data, tokenizer)
    for cfg in configs:
        if "accuracy" in st.spec.objectives and cfg.data.format not in ("prompted", "classification"):
            raise ConfigError(f"sweep.objectives: accuracy needs labelled data, but data.format={cfg.data.format}")
        if "merged_val_loss" in st.spec.objectives and not adaptations.of(cfg.method).merges:
            merging = ", ".join(m.name for m in adaptations.METHODS.values() if m.merges)
            raise ConfigError(
                f"sweep.objectives: merged_val_loss needs a method that merges ({merging}), "
                f"but a trial can run method={cfg.method}"
            )
        adaptations.of(cfg.method).check(model, cfg)
    from lora_lab.plots import loss_curve  # noqa: F401 - matplotlib, imported here rather than in the first trial

    if st.warm is not None and st.spec.workers == 1 and st.spec.trials_per_device in (1, "auto"):
        st.warm.keep(base, model, tokenizer, data)  # this process runs (the first) trials: it starts warm
    del model
