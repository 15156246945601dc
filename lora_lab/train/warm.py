"""Warm sweep workers: what a trial's overrides do not change stays loaded from one trial to the next.

A sweep worker runs many trials that differ in a few overrides (LoRA rank, LR, targets). Loading the base model, its
tokenizer and the tokenized data is the same work every time, so a `Warm` holder keeps them, keyed by everything
they depend on (the resolved model.* and data.* config, trainer.precision and trainer.device). A trial whose key
differs rebuilds them.

Reuse must not change a result: a trial on the kept model gives the same numbers (to 1e-6) as a fresh process. So:
- every parameter and buffer is kept as loaded, as a CPU copy; after a trial, LoRA is taken out (lora.unwrap) and
  each parameter the trial could have changed is copied back from it: the trainable ones (all of them under full
  fine-tuning; the modules_to_save under LoRA), those inside wrapped modules (a merge/unmerge round trip, PiSSA's
  residual) and any whose dtype changed (frozen weights stored in bf16). Buffers always; requires_grad as loaded. A
  quantized base's linears (model.quantize) are put back from a snapshot of their packed data and quantization
  state; model.quantize is part of the key (it is a model.* field).
- methods other than LoRA and full fine-tuning (BitFit adds biases, prompt/prefix tuning hook the forward), and
  compiled runs (torch.compile keeps graphs guarded on the modules), have no clean undo here: their model is dropped
  and the next trial loads afresh.
- the run's seeding is build()'s, unchanged: it seeds before loading, before LoRA init and again before training, and
  loading a model consumes no randomness the run sees later, except a pretrained model's freshly initialised
  classification head, which depends on the seed: then the seed is part of the key.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from lora_lab import adaptations, bases, lora
from lora_lab.train.runtime import free_memory, set_use_cache, uncheckpoint_blocks

if TYPE_CHECKING:
    from lora_lab.config import Config

log = logging.getLogger("lora_lab")


def warm_key(cfg: "Config") -> str:
    """What the loaded model, tokenizer and data depend on, as one string."""
    key: dict[str, Any] = {
        "model": asdict(cfg.model),
        "data": asdict(cfg.data),
        "precision": cfg.trainer.precision,
        "device": cfg.trainer.device,
    }
    if cfg.model.task == "seq_cls" and cfg.model.name != "tiny":
        # from_pretrained initialises the new classification head from the global RNG, which build() seeded.
        key["seed"] = cfg.seed
    return json.dumps(key, sort_keys=True, default=str)


@dataclass
class _Entry:
    key: str
    model: torch.nn.Module
    tokenizer: Any
    data: Any
    params: dict[str, torch.Tensor]  # name -> CPU copy as loaded
    buffers: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    quantized: dict[str, object]  # name -> bases.BaseLayer.snapshot() of each quantized linear as loaded
    training: bool
    use_cache: Optional[bool]


class Warm:
    """Keeps one loaded model, its tokenizer and tokenized data between a worker's trials.

    `take(cfg)` hands them out (loading them when the key changed); `give_back()` after the trial, whatever its end,
    makes the model the loaded one again, or drops it when that cannot be done exactly. hits/misses count takes.
    """

    def __init__(self) -> None:
        self.entry: Optional[_Entry] = None
        self.in_use: Optional["Config"] = None
        self.hits = 0
        self.misses = 0
        self.last_hit = False

    def take(self, cfg: "Config") -> tuple[torch.nn.Module, Any, Any]:
        """The model, tokenizer and data for `cfg`: the kept ones when the key matches, else freshly loaded."""
        if self.in_use is not None:
            raise RuntimeError("Warm.take: the kept model is still in use by another session (give_back first)")
        key = warm_key(cfg)
        if self.entry is not None and self.entry.key == key:
            self.hits += 1
            self.last_hit = True
        else:
            self.load(cfg)
            self.misses += 1
            self.last_hit = False
        self.in_use = cfg
        e = self.entry
        return e.model, e.tokenizer, e.data

    def load(self, cfg: "Config") -> None:
        """Load `cfg`'s model, tokenizer and data afresh and keep them (what was kept is dropped first, to free it)."""
        from lora_lab.data import load_data
        from lora_lab.models import load_model

        self.drop()
        model, tokenizer = load_model(cfg.model)
        self.keep(cfg, model, tokenizer, load_data(cfg.data, tokenizer))

    def keep(self, cfg: "Config", model: torch.nn.Module, tokenizer: Any, data: Any) -> None:
        """Keep a model, tokenizer and data loaded elsewhere for `cfg` (the sweep's preflight loads the base model:
        the first trial takes it from here instead of loading it again). They must be as load_model and load_data
        returned them: untouched by any method."""
        if self.in_use is not None:
            raise RuntimeError("Warm.keep: the kept model is in use (give_back first)")
        self.drop()
        self.entry = _Entry(
            key=warm_key(cfg),
            model=model,
            tokenizer=tokenizer,
            data=data,
            params={n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
            buffers={n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()},
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            quantized={n: bases.base_of(model.get_submodule(n)).snapshot() for n in bases.quantized_modules(model)},
            training=model.training,
            use_cache=getattr(getattr(model, "config", None), "use_cache", None),
        )

    def give_back(self) -> None:
        """Undo what the trial did to the kept model (see the module docstring), or drop it. Idempotent."""
        cfg, self.in_use = self.in_use, None
        if cfg is None or self.entry is None:
            return
        why = ""
        if not adaptations.of(cfg.method).warm_reusable:
            why = f"method={cfg.method} has no exact undo"
        elif cfg.trainer.compile:
            why = "trainer.compile=true left compiled blocks"
        else:
            try:
                why = self._restore()
            except Exception as exc:  # noqa: BLE001 - a model that cannot be restored is simply loaded again
                why = f"{type(exc).__name__}: {exc}"
        if why:
            log.info("warm worker: not keeping the model (%s); the next trial loads it afresh", why)
            self.drop()

    def _restore(self) -> str:
        e = self.entry
        model = e.model
        uncheckpoint_blocks(model)  # trainer.gradient_checkpointing: the blocks' plain forwards back
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        wrapped = lora.wrapped_modules(model)
        if wrapped:
            lora.unwrap(model, fold=False)  # the wrapped modules' weights are copied back below
        inside = {id(p) for name in wrapped for p in model.get_submodule(name).parameters()}
        names = [n for n, _ in model.named_parameters()]
        if set(names) != set(e.params) or {n for n, _ in model.named_buffers()} != set(e.buffers):
            return "the trial changed the model's parameters or buffers"
        with torch.no_grad():
            for name, p in model.named_parameters():
                kept = e.params[name]
                if id(p) in trained or id(p) in inside or p.dtype != kept.dtype or p.shape != kept.shape:
                    if p.dtype == kept.dtype and p.shape == kept.shape:
                        p.data.copy_(kept)
                    else:
                        p.data = kept.to(p.device, copy=True)
                p.grad = None
                p.requires_grad_(e.requires_grad[name])
            for name, b in model.named_buffers():
                b.copy_(e.buffers[name])
            for name, snap in e.quantized.items():  # packed data and quantization state (PiSSA's residual, a merge)
                bases.base_of(model.get_submodule(name)).restore(snap)
        model.train(e.training)
        if e.use_cache is not None:
            set_use_cache(model, e.use_cache)
        return ""

    def drop(self) -> None:
        """Forget the kept model and data (the next take loads afresh)."""
        if self.entry is not None:
            self.entry = None
            gc.unfreeze()  # a sweep worker freezes what lives between trials (sweep.worker_loop): this model too
            free_memory()  # the one place that frees a model's memory (Session.close too)
