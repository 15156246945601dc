"""The command line `python -m lora_lab.train [overrides]`: compose, build, fit tracked, print the summary; exit codes.

Exit 0 when the run completes; 2 on bad input (nothing logged, no folder made), on a run whose memory plan exceeds
the device's free memory (lora_lab.train.memory: before any weight loads, naming the settings that would fit), on an
output_dir a live run owns
(files.FolderBusy, naming its PID) and on a resume whose config changes what its checkpoint trained
(checkpoint.ResumeMismatch, naming the keys); 1 when the machine failed the run: a write that failed (a full disk:
files.WriteError names the path and what was kept), a tracking server gone past tracking.deadline_s
(tracking.TrackingUnreachable), memory run out; 3 when it diverged; 128 + the signal number when SIGINT/SIGTERM
stopped it (its checkpoints stay: the same command resumes it). Every error is one line on stderr,
`lora_lab.train: error: <message>`, never a traceback. trainer.devices=N outside a launcher: the command starts N
ranks of itself (lora_lab.train.distributed.launch) and exits with theirs (0, 2, 3 when they all end alike), 1 with
a message naming the rank when one fails (every other is ended), 128 + the signal when the launcher is stopped.
The CLI lives here, not in __main__.py, so that the package can re-export `main` without runpy importing __main__
twice.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from lora_lab import files
from lora_lab.config import Config, ConfigError
from lora_lab.errors import first_line
from lora_lab.files import WriteError
from lora_lab.records import RunRecord
from lora_lab.train import distributed
from lora_lab.train.build import build, default_output_dir
from lora_lab.train.checkpoint import check_resume
from lora_lab.train.finish import RunRole
from lora_lab.train.memory import check_fits
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
    """`python -m lora_lab.train [overrides]`: exit 0 when the run completes, 2 on bad input, 1 when the machine
    failed it (disk, tracking server, memory), 3 when it diverged (the module docstring has them all)."""
    # One rank of a multi-process run says which one it is on every line.
    who = f"[rank {os.environ['RANK']}] " if distributed.launched() else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    distributed.follow_host()  # a rank lora_lab started ends with the process that started it
    try:
        return _run(argv)
    except Exception as exc:  # noqa: BLE001 - the failures a user can act on, each as one line (machine_failure)
        message = machine_failure(exc) or distributed.group_failure(exc)
        if message is None:
            raise
    finally:
        distributed.leave()
    print(f"lora_lab.train: error: {message}", file=sys.stderr)
    return 1


def _launch(argv: list[str], cfg: Config) -> int:
    """trainer.devices=N outside a launcher: check what can be checked without the model (a resume's checkpoint),
    then start N ranks of this command on this host (distributed.launch) and return their exit code."""
    if cfg.output_dir is None:  # every rank must write to one folder: the launcher names it
        argv = [*argv, f"output_dir={default_output_dir(cfg)}"]
    else:
        folder = Path(cfg.output_dir).resolve()
        if cfg.trainer.resume:  # a checkpoint of another N (or other settings) is refused here, before any rank starts
            check_resume(folder / "checkpoints", cfg)
        if folder.is_dir():  # a folder a live run owns is refused here too (rank 0 claims it for the run)
            files.claim_folder(folder).release()
    return distributed.launch(argv, cfg.trainer.devices)


def _run(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from lora_lab import tracking
    from lora_lab.config import compose

    try:
        resolved, cfg = compose(argv)
        if distributed.launched() and cfg.trainer.devices == 1 and distributed.launched_world_size() > 1:
            # Joined by an outside launcher (torchrun, srun) without trainer.devices: the group's size is the run's.
            argv = [*argv, f"trainer.devices={distributed.launched_world_size()}"]
            resolved, cfg = compose(argv)
        distributed.refuse(cfg)
        if cfg.trainer.devices > 1 and not distributed.launched():
            return _launch(argv, cfg)
        if distributed.launched():
            distributed.join(distributed.pick_type(cfg.trainer.device), cfg.trainer.collective_timeout_s)
        check_fits(cfg)  # the memory plan, from the meta device: a run that cannot fit stops before any weight loads
        session = build(cfg, role=RunRole(overrides=tuple(argv)))
        if cfg.trainer.resume:  # a config that changes what the checkpoint trained is bad input: nothing made
            check_resume(session.output_dir / "checkpoints", cfg)
        main_rank = distributed.is_main()  # the other ranks of a multi-process run write nothing, track nothing
        if cfg.tracking.enabled and main_rank:
            tracking.connect(cfg.tracking)  # an unreachable tracking store is bad input too: fail before training
        # before any MLflow run: a folder a live run owns is refused
        claim = files.claim_folder(session.output_dir) if main_rank else contextlib.nullcontext()
    # ConfigError (checkpoint.ResumeMismatch too), ModelError, DataError, bad targets; a folder a live run owns
    except (ValueError, TypeError, files.FolderBusy) as exc:
        print(f"lora_lab.train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the file system refuses (a name too long, no permission), before any write
        if isinstance(exc, WriteError):
            raise
        print(f"lora_lab.train: error: {path_error(exc)}", file=sys.stderr)
        return 2
    with claim:
        try:
            with interruptible():  # SIGINT/SIGTERM: the MLflow run ends KILLED with the reason; checkpoints stay
                result = fit_tracked(session, OmegaConf.to_container(resolved, resolve=True))
        except Interrupted as exc:
            print(f"lora_lab.train: {exc} (trainer.resume=true output_dir={session.output_dir})", file=sys.stderr)
            return 128 + exc.signum
        except distributed.StoppedByMain as exc:  # another rank: rank 0 ended the run and records how
            logging.getLogger("lora_lab").info("%s", exc)
            return 0
        except ConfigError as exc:  # checkpoint.ResumeMismatch from the checkpoint the loop loaded
            print(f"lora_lab.train: error: {exc}", file=sys.stderr)
            return 2
    if not distributed.is_main():
        return 0 if result.status == "completed" else 3
    print(summary(result))
    if cfg.tracking.enabled:
        print(f"\nSee it in MLflow:  {tracking.ui_command(cfg.tracking)}")
    if result.status != "completed":
        print(f"lora_lab.train: run {result.status}: {result.reason}", file=sys.stderr)
        return 3
    return 0


def machine_failure(exc: BaseException) -> Optional[str]:
    """The one-line message for a failure of the machine under the run (exit 1), or None for any other error.

    files.WriteError (its message names the path, the cause and what was kept), any other OSError, a tracking
    server gone past its deadline (tracking.TrackingUnreachable), host memory (MemoryError) or device memory
    (torch.OutOfMemoryError) run out."""
    import torch

    from lora_lab.tracking import TrackingUnreachable

    if isinstance(exc, MemoryError):
        return (
            "out of memory: the process ran out of host memory (RAM) "
            f"({first_line(exc, with_type=True)}); a smaller model, trainer.batch_size or data.max_length needs less"
        )
    if isinstance(exc, torch.OutOfMemoryError):
        return (
            f"out of memory: the GPU ran out of device memory ({first_line(exc)}); a smaller trainer.batch_size "
            "(with trainer.grad_accum for the same effective batch) or data.max_length needs less"
        )
    if isinstance(exc, TrackingUnreachable):
        return str(exc)
    if isinstance(exc, OSError):
        return str(exc) if isinstance(exc, WriteError) else path_error(exc)
    return None


def path_error(exc: OSError) -> str:
    """An OSError in one line, a very long file name in it shortened to its start and its length."""
    name = exc.filename if isinstance(exc.filename, str) else ""
    if exc.errno == errno.ENAMETOOLONG and name:
        longest = max(name.split(os.sep), key=len)
        return (
            f"{name[:60]}...: {exc.strerror} (a name of {len(os.fsencode(longest))} bytes; most file systems allow "
            "255): give a shorter output_dir"
        )
    if name:
        return f"{name}: {exc.strerror or first_line(exc)}"
    return first_line(exc, with_type=True)


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
        *(
            []
            if result.requant_merged_val_loss is None
            else [
                (
                    "merged, re-quantized",
                    f"val loss {_fmt(result.requant_merged_val_loss)}, max |logit diff| "
                    f"{_fmt(result.requant_max_abs_logit_diff, '{:.2e}')}  (the dense merge above is what to serve)",
                ),
                ("frozen linears", f"{result.frozen_bytes_per_param:.3f} bytes/parameter"),
            ]
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
