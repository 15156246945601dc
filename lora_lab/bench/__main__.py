"""The bench CLI: `python -m lora_lab.bench core|sweep|plan [...]`: args, print, JSON.

Exit codes: 0 done, 2 bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from lora_lab.bench import core, plan, sweep
from lora_lab.bench.tables import checkpointing_table, core_table, sweep_table
from lora_lab.files import atomic_write
from lora_lab.shapes import SHAPES


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_mem":  # internal: one contender's memory in a fresh process (core.peak_memory)
        kind, shape, steps, batch, seq = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        torch.set_num_threads(os.cpu_count() or 1)
        print(core.peak_memory_child(kind, shape, steps, batch, seq))
        return 0
    if argv and argv[0] == "_planmem":  # internal: one configuration's predicted and measured peak (plan.measure)
        print(json.dumps(plan.measure_child(json.loads(argv[2]), int(argv[1]))))
        return 0
    if argv and argv[0] == "_act":  # internal: one row's activation memory in a fresh process (core.activation_memory)
        kind, shape, batch, seq = argv[1], argv[2], int(argv[3]), int(argv[4])
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(core.activation_memory_child(kind, shape, batch, seq)))
        return 0
    if argv and argv[0] == "sweep":  # sweep throughput: its own options
        return sweep_main(argv[1:])
    if argv and argv[0] == "plan":  # the memory plan against measured peaks: its own options
        return plan_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m lora_lab.bench")
    ap.add_argument("suite", choices=["core", "sweep"])
    ap.add_argument(
        "--steps", type=int, default=None, help="timed rounds (after --warmup; default 8, 3 with --checkpointing)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, 1 with --checkpointing)")
    ap.add_argument("--out", help="write the results as JSON (atomically)")
    ap.add_argument("--tiny", action="store_true", help="tiny config: exercise the code path in seconds")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--shape", choices=SHAPES, default=None, help="model shape (default smollm2-135m; tiny with --tiny)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default 4, 8 with --checkpointing; 2 with --tiny)"
    )
    ap.add_argument(
        "--seq",
        type=int,
        default=None,
        help="tokens per sequence (default 128, 512 with --checkpointing; 16 with --tiny)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="add compiled rows (trainer.compile: regional torch.compile)"
    )
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="instead of the contenders: LoRA and full FT each with and without trainer.gradient_checkpointing "
        "(step time, activation memory; default batch 8 x 512, 3 timed steps after 1 warm-up)",
    )
    ap.add_argument(
        "--methods",
        default="lora_lab,full",
        help="with --checkpointing: the methods, each beside itself checkpointed (lora_lab, full; default both)",
    )
    ap.add_argument(
        "--quantize",
        action="append",
        choices=("nf4", "fp4", "int8"),
        default=[],
        help="add a row of LoRA on a bitsandbytes 4-bit / 8-bit frozen base (model.quantize); repeatable",
    )
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.checkpointing else 8
    if args.warmup is None:
        args.warmup = 1 if args.checkpointing else 3
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    for key in ("batch", "seq"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key} must be >= 1")
    if args.checkpointing:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not methods or any(m not in ("lora_lab", "full") for m in methods):
            ap.error(f"--methods: expected a comma list of lora_lab, full; got {args.methods!r}")
        return checkpointing_main(args, methods)
    shape = args.shape or ("tiny" if args.tiny else "smollm2-135m")
    res = core.run_core(
        steps=args.steps,
        warmup=args.warmup,
        shape=shape,
        compile=args.compile,
        batch=args.batch or (2 if shape == "tiny" else 4),
        seq=args.seq or (16 if shape == "tiny" else 128),
        memory=not args.no_memory,
        quantize=tuple(dict.fromkeys(args.quantize)),
    )
    print(core_table(res))
    if args.out:
        atomic_write(args.out, (json.dumps(res, indent=2) + "\n").encode())  # creates the folder too
    return 0


def checkpointing_main(args: argparse.Namespace, methods: tuple[str, ...]) -> int:
    """``python -m lora_lab.bench core --checkpointing``: the checkpointing rows beside their unchecked ones."""
    shape = args.shape or ("tiny" if args.tiny else "smollm2-135m")
    res = core.run_checkpointing(
        shape=shape,
        batch=args.batch or (2 if shape == "tiny" else 8),
        seq=args.seq or (16 if shape == "tiny" else 512),
        steps=args.steps,
        warmup=args.warmup,
        memory=not args.no_memory,
        compile=args.compile,
        methods=methods,
    )
    print(checkpointing_table(res))
    if args.out:
        atomic_write(args.out, (json.dumps(res, indent=2) + "\n").encode())
    return 0


def sweep_main(argv: Optional[list[str]] = None) -> int:
    """``python -m lora_lab.bench sweep``: both modes of the fixed study, printed side by side."""
    ap = argparse.ArgumentParser(prog="python -m lora_lab.bench sweep", description=sweep.DESCRIPTION)
    ap.add_argument("--trials", type=int, default=16, help="trials in each of the two runs (default 16)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per trial (default: the study's 24)")
    ap.add_argument("--out", help="write the results as JSON (atomically)")
    ap.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder, removed)")
    ap.add_argument("--cpu", action="store_true", help="the CPU study (tiny model) even where CUDA is available")
    args = ap.parse_args(argv)
    if args.trials < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--trials and --steps must be >= 1")
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        res = sweep.run_bench(args.trials, args.steps, Path(args.keep), args.cpu)
    else:
        with tempfile.TemporaryDirectory(prefix="lora_lab-bench-sweep-") as tmp:
            res = sweep.run_bench(args.trials, args.steps, Path(tmp), args.cpu)
    print(sweep_table(res))
    if args.out:
        atomic_write(args.out, (json.dumps(res, indent=2) + "\n").encode())
    return 0


def plan_main(argv: Optional[list[str]] = None) -> int:
    """``python -m lora_lab.bench plan``: the memory plan's prediction beside the measured peak, per configuration."""
    ap = argparse.ArgumentParser(prog="python -m lora_lab.bench plan", description=plan.DESCRIPTION)
    ap.add_argument("--steps", type=int, default=3, help="training steps measured per configuration (default 3)")
    ap.add_argument("--shape", action="append", choices=list(plan.SHAPES), help="only these shapes (repeatable)")
    ap.add_argument("--method", action="append", choices=list(plan.METHODS), help="only these methods (repeatable)")
    ap.add_argument(
        "--allocator",
        choices=["fixed", "default"],
        default="fixed",
        help="fixed: glibc returns freed large blocks (MALLOC_MMAP_THRESHOLD_); default: glibc's own heuristics",
    )
    ap.add_argument("--published", action="store_true", help="plan the published configurations only (no training)")
    ap.add_argument("--out", help="write the results as JSON (atomically)")
    args = ap.parse_args(argv)
    if args.published:
        print(plan.published_table(plan.published_plans()))
        return 0
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the optimizer state exists from the second step on)")
    res = plan.run_plan_bench(args.steps, args.shape, args.method, args.allocator)
    print(plan.plan_table(res))
    if args.out:
        atomic_write(args.out, (json.dumps(res, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
