"""Everything that can be wrong with a study, found before anything is written (bad input: exit 2, nothing created)."""

from __future__ import annotations

from lora_lab import adaptations
from lora_lab.config import ConfigError, SweepConfig, compose
from lora_lab.sweep import search
from lora_lab.sweep.study import Study


def check_study(spec: SweepConfig) -> None:
    """The study file's own checks, before any storage, tracking store or folder exists: the space is sampled once
    (and every tied/map entry resolves for every value), and a grid sampler gets a finite grid."""
    search.check_space(spec.space)
    if spec.sampler == "grid":
        search.grid(spec.space)


def preflight(st: Study) -> None:
    """Each space entry's extreme values compose and validate, the model and data load, and every target choice
    matches modules; the loaded base model then starts this process's warm holder."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    configs = [st.base_cfg]
    for extra in search.preview(st.spec.space):
        try:
            configs.append(compose(st.base_overrides + extra)[1])
        except ConfigError as exc:
            raise ConfigError(f"sweep.space: {' '.join(extra)}: {exc}") from None
    for cfg in configs:  # what a method refuses whatever the model (full FT on a quantized base), before loading
        adaptations.of(cfg.method).refuse(cfg)
    if st.spec.compare_full:  # the comparison runs at the study's end: refused now, not after every trial ran
        full = compose(st.base_overrides + ["method=full", *st.spec.full_overrides])[1]
        try:
            adaptations.FULL.refuse(full)
        except ConfigError as exc:
            raise ConfigError(
                f"sweep.compare_full: {exc} (sweep.full_overrides=[model.quantize=none] compares with full "
                f"fine-tuning of the unquantized base)"
            ) from None
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
