"""The command line `python -m lora_lab.train [overrides]`: compose, build, fit tracked, print the summary; exit codes.

Exit 0 when the run completes, 2 on bad input (nothing logged, no folder made; a resume whose config changes what
its checkpoint trained, checkpoint.ResumeMismatch, too) and on an output_dir a live run owns (owner.FolderBusy,
naming its PID), 3 when it diverged, 128 + the signal
number when SIGINT/SIGTERM stopped it (its checkpoints stay: the same command resumes it). The CLI lives here, not
in __main__.py, so that the package can re-export `main` without runpy importing __main__ twice.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from lora_lab.records import RunRecord
from lora_lab.train import owner
from lora_lab.train.build import build
from lora_lab.train.checkpoint import check_resume
from lora_lab.train.finish import RunRole
from lora_lab.train.runtime import Interrupted, interruptible
from lora_lab.train.tracked import fit_tracked

# What --help prints (the text `python -m lora_lab.train --help` has always printed).
HELP = """The training loop: LoRA or full fine-tuning on the same data, with the same evaluation.

`python -m lora_lab.train [overrides]` trains one model; every sweep trial runs the same code. The loop imports neither
Optuna nor MLflow: it reports through one callback per evaluation (`on_eval`), and the entry point wires that callback
to MLflow (lora_lab/tracking.py), the sweep to Optuna as well.

    session = build(cfg)            # loads model and data, applies LoRA: every input error surfaces here
    result = session.fit(on_eval)   # trains, evaluates, merges, writes metrics.json, config.yaml, adapter
"""


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m lora_lab.train [overrides]`: exit 0 when the run completes, 2 on bad input, 3 when it diverged."""
    from omegaconf import OmegaConf

    from lora_lab import tracking
    from lora_lab.config import compose

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    try:
        resolved, cfg = compose(argv)
        session = build(cfg, role=RunRole(overrides=tuple(argv)))
        if cfg.trainer.resume:  # a config that changes what the checkpoint trained is bad input: nothing made
            check_resume(session.output_dir / "checkpoints", cfg)
        if cfg.tracking.enabled:
            tracking.connect(cfg.tracking)  # an unreachable tracking store is bad input too: fail before training
        claim = owner.claim(session.output_dir)  # before any MLflow run: a folder a live run owns is refused
    # ConfigError (checkpoint.ResumeMismatch too), ModelError, DataError, bad targets; a folder a live run owns
    except (ValueError, TypeError, owner.FolderBusy) as exc:
        print(f"lora_lab.train: error: {exc}", file=sys.stderr)
        return 2
    with claim:
        try:
            with interruptible():  # SIGINT/SIGTERM: the MLflow run ends KILLED with the reason; checkpoints stay
                result = fit_tracked(session, OmegaConf.to_container(resolved, resolve=True))
        except Interrupted as exc:
            print(f"lora_lab.train: {exc} (trainer.resume=true output_dir={session.output_dir})", file=sys.stderr)
            return 128 + exc.signum
    print(summary(result))
    if cfg.tracking.enabled:
        print(f"\nSee it in MLflow:  {tracking.ui_command(cfg.tracking)}")
    if result.status != "completed":
        print(f"lora_lab.train: run {result.status}: {result.reason}", file=sys.stderr)
        return 3
    return 0


def summary(result: RunRecord) -> str:
    """A short human-readable table of the run's headline numbers."""
    rows = [
        ("status", result.status),
        ("steps", result.steps),
        ("val loss", f"{_fmt(result.val_loss)}  (base model {_fmt(result.base_val_loss)})"),
        ("accuracy", f"{_fmt(result.accuracy)}  (base model {_fmt(result.base_accuracy)})"),
        ("merged val loss", _fmt(result.merged_val_loss)),
        (
            "max |logit diff| merged",
            _fmt(result.max_abs_logit_diff, "{:.2e}")
            + (
                ""
                if result.merge_ok is None
                else f"  ({'ok' if result.merge_ok else 'FAILED'}: tolerance {result.merge_tol:.1e})"
            ),
        ),
        (
            "trainable params",
            f"{result.trainable_params:,} of {result.total_params:,} "
            f"({100 * result.trainable_params / max(1, result.total_params):.3f}%)",
        ),
        ("time/step", f"{result.time_per_step_s:.3f} s"),
        ("tokens/s", f"{result.tokens_per_s:.0f}"),
        ("peak memory", f"{result.peak_mem_bytes / 2**20:.0f} MiB"),
        ("output", result.identity.output_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(value: Optional[float], spec: str = "{:.4f}") -> str:
    return "-" if value is None else spec.format(value)
