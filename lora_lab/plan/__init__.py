"""lora_lab.plan: `python -m lora_lab.plan [the overrides of train]`, a run's predicted peak memory before it loads.

A command beside train's: it composes the config as train does (lora_lab.config.compose), plans the run from the meta
device (lora_lab.train.memory) and prints lora_lab.memplan's table, the device's free memory and the verdict.
"""
