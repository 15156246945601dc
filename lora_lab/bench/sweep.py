"""The sweep benchmark: one fixed study's trials/hour, cold with 1 trial per device vs warm with N per device.

``python -m lora_lab.bench sweep [--trials N] [--steps S] [--out F.json] [--cpu]``.

One fixed study run twice through the real CLI (`python -m lora_lab.sweep`), each in its own temporary outputs
folder with journal storage: once with one trial per device and cold workers (sweep.warm=false, every trial loads
the model and data), once with several trials per device (2 on the CPU, `auto` on CUDA) and warm workers. The study
is the default one's space with a random sampler and no pruner, so both runs train the same trials (trial n gets
the same parameters whichever process runs it) and do the same work. Model: the tiny model on the CPU; on CUDA the
SmolLM2-135M shape with trainer=gpu, not compiled (a warm worker does not keep a compiled model). Printed side by
side: trials, wall time, trials per hour, the share of trial time outside training steps and evaluations, the
seconds outside per trial, and the ratios (warm+N / cold).

trials/hour counts the trial phase (first trial start to last trial end); `command_s` adds process start,
imports, preflight and the final summary. Timings taken while other jobs share the machine are not final: the
JSON records the load average before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from lora_lab.shapes import tiny_overrides

DESCRIPTION = __doc__.split("\n\n")[2]  # what the benchmark runs: `python -m lora_lab.bench sweep --help` says it


def study_args(trials: int, steps: Optional[int], cuda: bool) -> list[str]:
    """The fixed study both runs share: the default study's space, random sampler, no pruner, no comparison."""
    # trainer=gpu without compile: a warm worker drops a compiled model (warm.py), so warm and cold would both load.
    model = [*tiny_overrides("smollm2-135m"), "trainer=gpu", "trainer.compile=false"] if cuda else ["model=tiny"]
    args = [
        "sweep=default",
        f"sweep.n_trials={trials}",
        "sweep.sampler=random",
        "sweep.pruner=none",
        "sweep.compare_full=false",
        *model,
        "data=tiny_sentiment",
        "trainer.progress=false",
    ]
    if not cuda:
        args.append("trainer.device=cpu")  # also on a CUDA host when asked (--cpu)
    if steps is not None:  # fewer steps (tests): evaluate and checkpoint within them
        args += [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}"]
    return args


MODES = {
    # name: (sweep overrides on the CPU, on CUDA)
    "cold_1": (["sweep.warm=false", "sweep.trials_per_device=1"], ["sweep.warm=false", "sweep.trials_per_device=1"]),
    "warm_n": (["sweep.warm=true", "sweep.trials_per_device=2"], ["sweep.warm=true", "sweep.trials_per_device=auto"]),
}


def run_mode(name: str, args: list[str], root: Path) -> dict[str, Any]:
    """One sweep command in a fresh outputs folder under `root`; its trials read back from the journal."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = root / name
    journal = out / "study.journal"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out))
    env.pop("LORA_LAB_SWEEP_WORKER", None)
    log = root / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "lora_lab.sweep", *args, f"sweep.storage=journal:///{journal}"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    command_s = time.time() - t0
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"bench sweep: mode {name} exited with {code}:\n{text[-3000:]}")
    study = optuna.load_study(study_name="default", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    timed = [t for t in trials if "overhead_s" in t.user_attrs]
    start = min(t.datetime_start for t in trials).timestamp()
    end = max(t.datetime_complete for t in trials).timestamp()
    wall = max(end - start, 1e-9)
    trial_s = sum(t.user_attrs["wall_s"] for t in timed)
    outside = sum(t.user_attrs["overhead_s"] for t in timed)
    return {
        "mode": name,
        "args": args,
        "trials": len(trials),
        "states": sorted({t.state.name for t in trials}),
        "wall_s": wall,
        "command_s": command_s,
        "trials_per_hour": 3600.0 * len(trials) / wall,
        "outside_share": outside / trial_s if trial_s > 0 else None,
        "outside_s_per_trial": outside / len(timed) if timed else None,
        "trial_s_mean": trial_s / len(timed) if timed else None,
        "warm_trials": sum(1 for t in trials if t.user_attrs.get("warm")),
        "workers": len({t.user_attrs.get("worker") for t in trials}),
        "auto_per_device": study.user_attrs.get("trials_per_device"),  # set by sweep.resolve_per_device (CUDA)
        "values": {t.number: t.values[0] for t in trials if t.values},
    }


def run_bench(trials: int, steps: Optional[int], root: Path, cpu: bool = False) -> dict[str, Any]:
    """Both modes of the study in `root` (the CPU study with `cpu`) and their ratios: the results dict (--out)."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    base = study_args(trials, steps, cuda)
    load_before = os.getloadavg()
    results = {name: run_mode(name, [*base, *(gpu if cuda else cpu)], root) for name, (cpu, gpu) in MODES.items()}
    cold, warm = results["cold_1"], results["warm_n"]
    same = sorted(set(cold["values"]) & set(warm["values"]))
    diffs = [abs(cold["values"][n] - warm["values"][n]) for n in same]
    return {
        "bench": "sweep",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "trials": trials,
        "steps": steps,
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "modes": results,
        "ratios": {
            "trials_per_hour_warm_n_over_cold_1": warm["trials_per_hour"] / cold["trials_per_hour"],
            "outside_share_warm_n_over_cold_1": (
                warm["outside_share"] / cold["outside_share"] if cold["outside_share"] else None
            ),
        },
        "max_abs_val_loss_diff": max(diffs) if diffs else None,  # same trials, same parameters: same numbers?
    }
