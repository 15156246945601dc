"""lora_lab.train: one training run, the code every sweep trial runs; `python -m lora_lab.train [overrides]`.

Owns: the runtime (device, precision, memory peaks, signals, RNG, block hooks:
runtime), progress bars and log lines (progress), training batches (batches), evaluation with one scorer per data
format (evaluate), when a run has diverged (divergence), the loop (loop), checkpoints (checkpoint), finishing a run:
merge check, export, record (finish), the Session (session) and how it is built (build), warm sweep workers
(warm), the memory plan of a run before it loads (memory), the MLflow-tracked run (tracked) and the command line
(cli, __main__).

May import: torch, the leaves (config, records, files, errors), the torch core (lora, methods, targets, optim and the
table of methods, adaptations) and the io modules (models, data, tracking); never sweep, report or bench. Inside
the package each module imports only those left of it:
runtime <- progress <- batches <- evaluate <- divergence <- checkpoint <- loop <- finish <- session <- warm
<- build <- memory <- tracked <- cli.

The names other packages use are re-exported here; new code imports them from their module.
"""

from lora_lab.train.build import build, build_and_fit, default_output_dir, prefix_cache_factory
from lora_lab.train.cli import main
from lora_lab.train.finish import RunRole, merge_tolerance, settings_of
from lora_lab.train.loop import EvalEvent
from lora_lab.train.runtime import Interrupted, compile_blocks, free_memory, interruptible, pick_device
from lora_lab.train.session import Session
from lora_lab.train.tracked import completion_verdict, fit_tracked
from lora_lab.train.warm import Warm

__all__ = [
    "EvalEvent",
    "Interrupted",
    "RunRole",
    "Session",
    "Warm",
    "build",
    "build_and_fit",
    "compile_blocks",
    "completion_verdict",
    "default_output_dir",
    "fit_tracked",
    "free_memory",
    "interruptible",
    "main",
    "merge_tolerance",
    "pick_device",
    "prefix_cache_factory",
    "settings_of",
]
