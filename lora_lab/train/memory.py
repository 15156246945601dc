"""A run's memory plan from its config, before any weight loads: the model built on the meta device, the method
applied to it, its parameters counted by role, and lora_lab.memplan's arithmetic; the device's free memory; the check
that refuses a run that cannot fit (exit 2 in the train CLI and the sweep preflight). Over several devices the plan is
one device's, under the strategy the run uses (lora_lab.train.distributed.strategy), and trainer.parallel=auto picks
that strategy from the plan (`auto_strategy`, settled for the run by the memory check).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from lora_lab import adaptations, targets
from lora_lab.config import Config, ConfigError
from lora_lab.errors import first_line
from lora_lab.memplan import Plan, PlanInput, fitting_settings, gib, plan, refusal
from lora_lab.train import distributed
from lora_lab.train.runtime import autocast_dtype, pick_device, store_frozen_in

log = logging.getLogger("lora_lab")


class DoesNotFit(ConfigError):
    """The memory plan says the run cannot fit the device: bad input (exit 2), found before anything loads. The
    message has the numbers and the settings that would fit."""


def dims(config: Any) -> dict[str, int]:
    """hidden, layers, heads, kv_heads, head_dim, intermediate and vocab of a transformers config, read under the
    names Llama, GPT-2, BERT and their kin use."""

    def first(*names: str, default: Any = None) -> Any:
        for n in names:
            value = getattr(config, n, None)
            if value is not None:
                return value
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head", "num_heads"))
    return dict(
        hidden=hidden,
        layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(first("num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)),
        intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden)),
        vocab=int(first("vocab_size")),
    )


def counts(model: nn.Module) -> dict[str, Any]:
    """The parameters of a model (on any device, meta included) by their role in the plan: frozen linear weights
    outside the output head (what model.quantize packs), their rows, the largest one, the other frozen parameters,
    the trainable ones, the head's trainable ones and the LoRA ranks."""
    heads = targets.head_modules(model)
    seen: set[int] = set()
    linear_w = linear_rows = linear_inputs = largest = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or targets.inside(name, heads):
            continue
        w = module.weight
        if w.requires_grad:
            continue  # a trainable linear (an adapter's, or every one under full fine-tuning) stays as it is
        if id(w) not in seen:
            seen.add(id(w))
            linear_w += w.numel()
            linear_rows += w.shape[0]
            linear_inputs += w.shape[1]
            largest = max(largest, w.numel())
    params = list(model.parameters())  # a tied tensor once
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    head_params = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embed, nn.Module):
        head_params |= {id(p) for p in embed.parameters()}
    ranks = sum(int(m.r) for m in model.modules() if targets.is_lora_layer(m))
    # FSDP2's units (lora_lab.train.distributed.wrap): each repeated block, and the root with everything else.
    try:
        blocks = [block for _, block in targets.repeated_blocks(model)]
    except ValueError:
        blocks = []
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    block_sizes = [
        (_nbytes(block.parameters()), _nbytes(p for p in block.parameters() if p.requires_grad)) for block in blocks
    ]
    block_weights, block_trainable = max(block_sizes, default=(0, 0))
    root = [p for p in params if id(p) not in in_blocks]
    return dict(
        frozen_linear=linear_w,
        frozen_linear_rows=linear_rows,
        frozen_linear_inputs=linear_inputs,
        largest_linear=largest,
        frozen_other=sum(p.numel() for p in frozen) - linear_w,
        frozen_bytes=max((p.element_size() for p in frozen), default=4),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=max((p.element_size() for p in trainable), default=4),
        head_trains=sum(p.numel() for p in trainable if id(p) in head_params),
        ranks=ranks,
        block_weights=block_weights,
        block_trainable=block_trainable,
        root_weights=_nbytes(root),
        root_trainable=_nbytes(p for p in root if p.requires_grad),
    )


def _nbytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def plan_input(cfg: Config, device: torch.device, config: Any = None, sharded: Optional[bool] = None) -> PlanInput:
    """The plan's input for the run `cfg` on `device`: the model of cfg.model on the meta device (lora_lab.models:
    no weight loads, even for a 70B config), the method applied to it as build() applies it, the run's shapes.
    `config`: a transformers config to plan instead of cfg.model.name's (a named shape). `sharded`: whether its
    trainer.devices shard the model (FSDP2) or each holds it whole (DDP); None: as distributed.strategy says.
    ConfigError when FSDP2 is asked for a run it cannot shard (distributed.fsdp_refusal)."""
    from lora_lab import methods

    devices = cfg.trainer.devices
    if sharded is None:
        # trainer.parallel=auto decides from the plan and keeps the choice for the run (wrap makes rank 0's every
        # rank's); the memory check's plan is made here, under that choice
        sharded = devices > 1 and distributed.settle_strategy(cfg, lambda c: auto_strategy(c, config)) == "fsdp"
    if sharded:
        why = distributed.fsdp_refusal(cfg)
        if why is not None:
            raise ConfigError(why)
    from lora_lab.models import meta_model
    from lora_lab.train.build import prefix_cache_factory

    adaptation = adaptations.of(cfg.method)
    adaptation.refuse(cfg)  # a combination the method refuses (full FT on a quantized base) has no plan
    model = meta_model(cfg.model, config)
    adaptation.apply(model, cfg, prefix_cache_factory(model))
    dtype = autocast_dtype(cfg.trainer.precision, device)
    if not adaptation.trains_all and dtype == torch.bfloat16:
        store_frozen_in(model, torch.bfloat16)  # as build() stores a frozen base under bf16 autocast
    c = counts(model)
    d = dims(model.config)
    virtual = cfg.prompt.n_tokens if methods.kind_of(model) is methods.PROMPT else 0  # prepended to every row
    # Evaluation logits: a prompted task scores the label words after each prompt (the last position's logits);
    # text and chat score every position.
    eval_rows = 1 if cfg.data.format == "prompted" else cfg.data.max_length + virtual
    causal = cfg.model.task == "causal_lm"
    return PlanInput(
        **{k: v for k, v in d.items() if k != "vocab"},
        vocab=d["vocab"] if causal else cfg.model.num_labels,
        frozen_linear=c["frozen_linear"],
        frozen_linear_rows=c["frozen_linear_rows"],
        frozen_linear_inputs=c["frozen_linear_inputs"],
        largest_linear=c["largest_linear"],
        frozen_other=c["frozen_other"],
        frozen_bytes=c["frozen_bytes"],
        trainable=c["trainable"],
        trainable_bytes=c["trainable_bytes"],
        trains_all=adaptation.trains_all,
        head_trains=c["head_trains"],
        lora_rank_per_layer=c["ranks"] // max(1, d["layers"]),
        batch=cfg.trainer.batch_size,
        seq=cfg.data.max_length + virtual,
        eval_batch=cfg.trainer.eval_batch_size,
        eval_logit_rows=eval_rows,
        compute_bytes=2 if dtype == torch.bfloat16 else getattr(torch, cfg.model.dtype).itemsize,
        causal_lm=causal,
        quantize=cfg.model.quantize,
        checkpointing=cfg.trainer.gradient_checkpointing,
        device=device.type,
        grad_accum=cfg.trainer.grad_accum,
        quantizable=not adaptation.trains_base,
        loss_chunk=cfg.trainer.loss_chunk,
        devices=devices,
        sharded=sharded,
        block_weights=c["block_weights"],
        block_trainable=c["block_trainable"],
        root_weights=c["root_weights"],
        root_trainable=c["root_trainable"],
    )


def planned(cfg: Config, config: Any = None, sharded: Optional[bool] = None) -> tuple[Plan, int, str]:
    """The run's plan (one device's, under the run's strategy), the memory one device offers it
    (`device_capacity`) and the device's description (`config`, `sharded`: see plan_input)."""
    device = pick_device(cfg.trainer.device)
    return plan(plan_input(cfg, device, config, sharded)), *device_capacity(cfg, device)


def device_capacity(cfg: Config, device: torch.device) -> tuple[int, str]:
    """The bytes one device offers one rank of the run, and how they were read (`free_memory_of`): a GPU's free
    memory is its rank's own; the CPU's available RAM is shared by the ranks on this host (LOCAL_WORLD_SIZE as the
    launcher set it, else trainer.devices), so each gets its share."""
    available, where = free_memory_of(device)
    if device.type == "cuda" or cfg.trainer.devices == 1:
        return available, where
    ranks = (
        int(os.environ.get("LOCAL_WORLD_SIZE", cfg.trainer.devices)) if distributed.launched() else cfg.trainer.devices
    )
    ranks = max(1, ranks)
    return available // ranks, f"{where} shared by {ranks} ranks on this host"


def auto_strategy(cfg: Config, config: Any = None) -> tuple[str, str]:
    """trainer.parallel=auto's choice for a run over trainer.devices, and why: ddp when the replicated plan (each
    device holding the whole model) fits one device, else fsdp (each holding 1/N of it); ddp where FSDP2 is refused
    (distributed.fsdp_refusal: the memory check then says whether it fits); by method where no plan can be made (a
    model the meta device cannot build): fsdp for a method that trains every weight, else ddp. `config`: see
    plan_input."""
    refused = distributed.fsdp_refusal(cfg)
    if refused is not None:
        return "ddp", f"FSDP2 is refused here: {refused.split(';')[0]}"
    device = pick_device(cfg.trainer.device)
    try:
        replicated = plan(plan_input(cfg, device, config, sharded=False))
    except (RuntimeError, NotImplementedError) as exc:
        by_method = "fsdp" if adaptations.of(cfg.method).trains_all else "ddp"
        return by_method, f"no memory plan ({first_line(exc, with_type=True)[:200]}): by method={cfg.method}"
    available, where = device_capacity(cfg, device)
    need = f"the model replicated on each device plans {gib(replicated.total)}, {where} offers {gib(available)}"
    return ("ddp", f"{need}: it fits") if replicated.total <= available else ("fsdp", f"{need}: sharded instead")


def free_memory_of(device: torch.device) -> tuple[int, str]:
    """Bytes a run can use on `device` and how they were read: CUDA's free memory (torch.cuda.mem_get_info), on the
    CPU the machine's available RAM (psutil: MemAvailable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"{torch.cuda.get_device_name(device)} (free of {total / 2**30:.1f} GiB)"
    import psutil

    return int(psutil.virtual_memory().available), "the CPU (available RAM)"


def check_fits(cfg: Config) -> Optional[Plan]:
    """The run's plan; raises DoesNotFit (the numbers and the settings that would fit) when its peak exceeds the
    device's free memory. trainer.memory_check=false skips the check (the plan is still returned). A model that does
    not build on the meta device (an operation meta tensors lack) is not refused: a warning, and None."""
    try:
        p, available, device = planned(cfg)  # settles trainer.parallel=auto for the run first (plan_input)
    except (RuntimeError, NotImplementedError) as exc:
        log.warning("memory plan unavailable for model.name=%r (%s): the run starts unchecked", cfg.model.name, exc)
        return None
    if cfg.trainer.memory_check and p.total > available:
        raise DoesNotFit(refusal(p, available, device, fitting_settings(p.inp, available)))
    return p


def saved_for_backward(model: nn.Module, **inputs: Any) -> int:
    """Bytes one forward of `model` on `inputs` saves for backward (torch.autograd.graph.saved_tensors_hooks; each
    storage once, the parameters' own not counted): what the plan's activations predict, measured."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(**inputs)
    return sum(saved.values())
