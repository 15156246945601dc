"""`python -m lora_lab.bench`: speed and memory side by side (core: one training step; sweep: a study's trials/hour).

Owns: core (the step benchmark's contenders, timings, ops, peak memory), sweep (the fixed study run cold and warm),
tables (what both print), __main__ (the CLI). May import: the leaves (shapes, files, markdown, config), the torch
core (lora), train's `compile_blocks`, and the `lora_lab.sweep` CLI only as a subprocess; never report.
"""

from lora_lab.shapes import step_flops  # noqa: F401 - the compute table's caption names lora_lab.bench.step_flops
