"""The command line `python -m lora_lab.plan [overrides]`: the memory plan of the run `python -m lora_lab.train
[overrides]` would start, printed as a table; nothing is loaded or written.

Exit 0 when the plan is printed (whether the run fits or not: the table says); 2 on bad input (a bad override, a
model whose config cannot be read), one line on stderr as train prints it.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

HELP = """The memory plan: `python -m lora_lab.plan [--shape NAME] [the overrides of python -m lora_lab.train]`.

--shape NAME plans a named shape of lora_lab/shapes.py (its real dims and vocabulary: llama-3.1-8b, llama-65b, ...)
in place of model.name: configurations too large to train here.

Builds the run's model on the meta device (no weight loads: seconds, even for a 70B config), applies its method and
prints the predicted peak memory by part (frozen weights, trainable weights, gradients, AdamW state, activations,
logits and loss, workspace), the device's free memory (CUDA's, or the CPU's available RAM) and whether it fits, with
the settings that would make it fit (model.quantize=nf4, trainer.gradient_checkpointing=true, a smaller
trainer.batch_size with trainer.grad_accum keeping the effective batch). The train and sweep commands run the same
check before they load anything (trainer.memory_check=false skips it).

With trainer.devices=N the plan is one device's: under DDP each holds the whole model, under FSDP2 the weights,
gradients and optimizer state are divided by N (plus the units FSDP2 gathers whole while it computes);
trainer.parallel=auto is planned as the run would choose it (ddp when the replicated plan fits the device, else fsdp).
"""


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m lora_lab.plan [overrides]`: exit 0 with the table printed, 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    from lora_lab.config import compose
    from lora_lab.memplan import fitting_settings, gib, table
    from lora_lab.shapes import SHAPES, shape_config
    from lora_lab.train.memory import auto_strategy, planned

    t0 = time.perf_counter()
    shape = None
    if argv and argv[0] == "--shape":
        if len(argv) < 2 or argv[1] not in SHAPES:
            print(f"lora_lab.plan: error: --shape: expected one of {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        shape, argv = argv[1], argv[2:]
    auto = ""
    try:
        _, cfg = compose(argv)
        config = shape_config(shape) if shape else None
        sharded = None
        if cfg.trainer.devices > 1 and cfg.trainer.parallel == "auto":  # what the run would pick, and why
            choice, why = auto_strategy(cfg, config)
            sharded, auto = choice == "fsdp", f"trainer.parallel=auto picks {choice}: {why}\n"
        p, available, device = planned(cfg, config, sharded)
    except (ValueError, TypeError) as exc:  # ConfigError, ModelError (a config it cannot read)
        print(f"lora_lab.plan: error: {exc}", file=sys.stderr)
        return 2
    what = f"{cfg.method} on {shape or cfg.model.name}"
    shape = f"{p.inp.layers} layers, d={p.inp.hidden}, MLP {p.inp.intermediate}, vocab {p.inp.vocab}"
    settings = (
        f"batch {p.inp.batch} x {p.inp.seq} tokens, {8 * p.inp.compute_bytes}-bit activations, "
        f"quantize={p.inp.quantize}, checkpointing={'on' if p.inp.checkpointing else 'off'}"
    )
    if p.inp.devices > 1:
        how = "FSDP2: weights, gradients and optimizer state sharded" if p.inp.sharded else "DDP: replicated"
        settings += f"; per device of {p.inp.devices}, {how} (trainer.parallel={cfg.trainer.parallel})"
    print(f"memory plan: {what} ({shape}); {settings}\n{auto}")
    print(table(p, available, device))
    if p.total > available:
        fixes = fitting_settings(p.inp, available)
        print("\nsettings that fit:" if fixes else "\nno setting tried fits: a smaller model or data.max_length")
        for overrides, peak in fixes:
            print(f"  {overrides}    ({gib(peak)})")
    print(f"\nplanned in {time.perf_counter() - t0:.1f} s from the meta device (no weight loaded)")
    return 0
