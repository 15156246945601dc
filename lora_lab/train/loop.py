"""The training loop: optimizer steps with deferred loss reads, evaluations reported through `on_eval`, checkpoints.

The loop imports neither Optuna nor MLflow: it reports through one callback per evaluation (an `EvalEvent`), which
the entry point wires to MLflow and the sweep to Optuna as well. The host never waits for the device inside a step:
batches are tensors copied one ahead without blocking, and the losses stay on the device (`PendingLosses`) until
they are read back every trainer.sync_every steps, at evaluations and checkpoints (one sync each).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lora_lab import adaptations, optim
from lora_lab.config import Config
from lora_lab.train import distributed
from lora_lab.train.batches import TrainBatches
from lora_lab.train.checkpoint import Checkpointer
from lora_lab.train.distributed import gradient_sync
from lora_lab.train.divergence import Divergence, answer_count
from lora_lab.train.evaluate import Evaluator
from lora_lab.train.loss import training_loss
from lora_lab.train.progress import progress_bar
from lora_lab.train.runtime import (
    Clock,
    PeakMemory,
    autocast,
    checkpoint_blocks,
    compile_blocks,
    set_use_cache,
)

log = logging.getLogger("lora_lab")


@dataclass
class EvalEvent:
    """What the loop reports at each evaluation: the only hook out of the loop."""

    step: int  # optimizer steps done
    max_steps: int
    # val_loss, accuracy (labelled tasks), train_loss (mean since last eval), lr, tokens_per_s
    metrics: dict[str, float]
    train_points: list[dict[str, float]]  # per-step {step, train_loss, lr} since the previous event


EvalCallback = Callable[[EvalEvent], None]


def make_optimizer(
    model: torch.nn.Module, cfg: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The run's optimizer (fused AdamW over optim.param_groups: LoRA+'s ratio for B, no decay on norms and biases)
    and its LR schedule, as cfg.optim says."""
    o = cfg.optim
    lr_ratio = adaptations.of(cfg.method).lr_ratio(cfg)
    groups = optim.param_groups(model, lr=o.peak_lr, lr_ratio=lr_ratio, weight_decay=o.weight_decay)
    # fused on CUDA and CPU (optim.adamw): one kernel for a LoRA model's hundreds of small tensors
    optimizer = optim.adamw(groups, lr=o.peak_lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, optim.lr_lambda(o.schedule, o.warmup_steps, cfg.trainer.max_steps)
    )
    return optimizer, scheduler


@dataclass
class Trained:
    """How the loop ended and what it measured: what finishing the run (lora_lab.train.finish) starts from."""

    status: str  # completed or diverged
    reason: str
    history: list[dict[str, float]]  # every optimizer step: {step, train_loss, lr}
    evals: list[dict[str, float]]  # every evaluation: {step, val_loss, ...}
    step_times: list[float] = field(default_factory=list)  # seconds per step, the steps of a sync window sharing one
    tokens: int = 0  # real (unpadded) training tokens seen in this fit
    peak_mem_bytes: int = 0


class PendingLosses:
    """The optimizer steps since the last host sync, their losses still on the device, and when that window began.

    `read()` brings the losses back in one sync; the window's wall time is shared among its steps."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr)
        self.since = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.steps.append((step, loss, lr))

    def restart_clock(self) -> None:
        """The window's time starts now (time spent evaluating or checkpointing is not training time)."""
        self.since = time.perf_counter()

    def read(self) -> tuple[list[dict[str, float]], float, Optional[int]]:
        """Read the losses back (one host sync; at least one step pending) and empty the window. Returns the points
        {step, train_loss, lr} up to the first non-finite loss, the seconds per step of the window, and that first
        non-finite step (None when every loss is finite)."""
        stacked = torch.stack([loss for _, loss, _ in self.steps])
        # Each rank's loss is the mean over its micro-batches: the mean over ranks is the global batch's.
        losses = (distributed.all_reduce_sum(stacked) / distributed.world_size()).tolist()
        per_step = (time.perf_counter() - self.since) / len(self.steps)
        points: list[dict[str, float]] = []
        bad = None
        for (step, _, lr), loss in zip(self.steps, losses):
            if not math.isfinite(loss):
                bad = step
                break
            points.append({"step": step, "train_loss": loss, "lr": lr})
        self.steps = []
        return points, per_step, bad


def report(on_eval: Optional[EvalCallback], event: EvalEvent) -> None:
    """Hand an evaluation to `on_eval`. Across ranks rank 0's callback decides for all (distributed.decided_by_main):
    when it stops the run (a pruned trial raises), every other rank stops at the same step."""
    distributed.decided_by_main(lambda: on_eval(event) if on_eval is not None else None)


class TrainingLoop:
    """One fit: train the model for trainer.max_steps (resuming from the last checkpoint if asked), evaluating every
    eval_every steps and checkpointing every checkpoint_every steps; `run(on_eval)` returns how it ended.

    Step times are the wall time between two syncs, shared among its steps; the training time goes to the session's
    clock as it accrues (readable after a fit that ended in an exception, as a pruned trial's)."""

    def __init__(
        self, cfg: Config, model: torch.nn.Module, data: Any, evaluator: Evaluator, clock: Clock, output_dir: Path
    ) -> None:
        self.cfg, self.model, self.data, self.evaluator, self.clock = cfg, model, data, evaluator, clock
        self.output_dir = output_dir
        self.device = evaluator.device  # the evaluator's device and autocast dtype are the run's
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.since_event: list[dict[str, float]] = []  # points since the last evaluation event
        self.step_times: list[float] = []
        self.tokens = 0  # over every rank, as of the last sync
        self.window_tokens = 0  # this rank's since the last sync
        self.pending = PendingLosses()
        self.bar: Any = None
        self.divergence = Divergence(answer_count(model, data.format), data.format)

    def sync(self) -> str:
        """Read the pending losses back (one host sync) into the history; time their steps. Returns why the run
        diverged ('' while it has not): a non-finite training loss, or one far above knowing nothing."""
        if not self.pending.steps:
            return ""
        n = len(self.pending.steps)
        points, per_step, bad = self.pending.read()
        tokens = distributed.all_reduce_sum(torch.tensor([self.window_tokens], dtype=torch.float64))
        self.tokens += int(tokens.item())
        self.window_tokens = 0
        self.clock.train_s += per_step * n
        self.history.extend(points)
        self.since_event.extend(points)
        self.step_times.extend([per_step] * len(points))
        self.bar.set_postfix(
            loss=f"{self.history[-1]['train_loss']:.4f}" if self.history else "-",
            tok_s=f"{self.tokens / max(self.clock.train_s, 1e-9):.0f}",
        )
        self.pending.restart_clock()
        if bad is not None:
            return f"non-finite training loss at step {bad}"
        return self.divergence.training(points)

    def run(self, on_eval: Optional[EvalCallback] = None) -> Trained:
        """Train; report each evaluation to `on_eval`; return how the loop ended (completed or diverged)."""
        cfg, t = self.cfg, self.cfg.trainer
        model, device = self.model, self.device
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model.to(device)
        model.train()
        # No KV cache in training or scoring: nothing reuses it, and a cache object in the call makes compiled
        # blocks recompile per layer (its layer index is a guarded constant). Restored for the exported model.
        set_use_cache(model, False)
        if t.gradient_checkpointing:  # before compiling: each compiled block then holds its checkpoint
            log.info("activation checkpointing of %d repeated blocks", checkpoint_blocks(model))
        if t.compile:
            log.info("compiled %d repeated blocks (regional torch.compile)", compile_blocks(model))
        # What the steps call: the model itself, or across ranks DDP around it or FSDP2 sharding it in place (then
        # the optimizer, built next, holds the shards). Evaluations and checkpoints read `model`.
        stepped = distributed.wrap(model, cfg, device)
        optimizer, scheduler = make_optimizer(model, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]  # what clipping sees, listed once
        ckpt = Checkpointer(
            self.output_dir / "checkpoints",
            model,
            optimizer,
            scheduler,
            full=adaptations.of(cfg.method).trains_all,
            cfg=cfg,
        )
        start_step = 0
        if t.resume:
            state = ckpt.resume()  # across ranks: the checkpoint rank 0 picks, loaded by every rank
            if state is not None:
                start_step, self.history, self.evals = state["step"], state["history"], state["evals"]
                log.info("resumed from %s at step %d", ckpt.latest_path(), start_step)
        status, reason = "completed", ""
        if t.eval_at_start and start_step == 0:
            # Step 0 is the base model (LoRA starts as an exact no-op): the yardstick for "did it learn".
            metrics = self.evaluator.evaluate(model)
            self.evals.append({"step": 0, **metrics})
            report(on_eval, EvalEvent(0, t.max_steps, metrics, []))
        if self.evals and self.evals[0]["step"] == 0:  # the base model's loss (also from a checkpoint): a yardstick
            self.divergence.set_base(self.evals[0]["val_loss"])
        causal = cfg.model.task == "causal_lm"  # right-padded rows need no padding mask there (TrainBatches)
        batches = TrainBatches(
            self.data,
            t.batch_size,
            cfg.seed,
            device,
            t.pad_to_multiple,
            padding_mask=not causal,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        self.bar = progress_bar(
            t.max_steps, start_step, enabled=t.progress and distributed.is_main(), desc=f"{cfg.method} {cfg.model.name}"
        )
        self.pending.restart_clock()
        loss_of = training_loss(t.loss_chunk)  # config: chunking only for causal LMs
        with PeakMemory(device) as peak:
            try:
                batch, n_tok = batches.get(start_step * t.grad_accum)
                for step in range(start_step, t.max_steps):
                    loss_total = torch.zeros(())
                    for i in range(t.grad_accum):
                        micro = step * t.grad_accum + i
                        # Copy the next batch now (non-blocking): the device takes it in stream order, the host goes on.
                        following = batches.get(micro + 1) if micro + 1 < t.max_steps * t.grad_accum else (batch, 0)
                        # Across ranks, gradients are reduced once per step: in the last micro-batch's backward.
                        with gradient_sync(stepped, i == t.grad_accum - 1):
                            with autocast(device, self.evaluator.dtype):
                                loss = loss_of(stepped, model, batch) / t.grad_accum
                            loss.backward()
                        loss_total = loss.detach() if i == 0 else loss_total + loss.detach()
                        self.window_tokens += n_tok
                        batch, n_tok = following
                    if cfg.optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    done = step + 1
                    self.pending.add(done, loss_total, lr)
                    self.bar.update(1)
                    evaluate_now = done % t.eval_every == 0 or done == t.max_steps
                    checkpoint_now = bool(t.checkpoint_every) and done % t.checkpoint_every == 0 and done < t.max_steps
                    # Sync after the first step (it pays for allocations and warm-up: kept out of the steady
                    # step time), every sync_every steps, and before evaluations and checkpoints.
                    if done == start_step + 1 or done % t.sync_every == 0 or evaluate_now or checkpoint_now:
                        why = self.sync()
                        if why:
                            status, reason = "diverged", why
                            optimizer.zero_grad(set_to_none=True)
                            break
                    if evaluate_now:
                        metrics = self.evaluator.evaluate(model)
                        # rank 0's probe is the 1-process run's (the first rows): its verdict is every rank's
                        collapsed = distributed.agree(self.evaluator.collapsed())
                        why = self.divergence.validation(done, metrics["val_loss"], collapsed)
                        if why:
                            status, reason = "diverged", why
                            break
                        since = self.since_event
                        metrics.update(
                            train_loss=sum(p["train_loss"] for p in since) / len(since),
                            lr=lr,
                            tokens_per_s=self.tokens / max(self.clock.train_s, 1e-9),
                        )
                        self.evals.append({"step": done, **metrics})
                        self.bar.set_postfix(
                            loss=f"{self.history[-1]['train_loss']:.4f}", val=f"{metrics['val_loss']:.4f}"
                        )
                        report(on_eval, EvalEvent(done, t.max_steps, metrics, since))
                        self.since_event = []
                        self.pending.restart_clock()  # evaluation time is not training time
                    if checkpoint_now:  # on every rank (it gathers what is sharded); rank 0 alone writes
                        ckpt.save(done, self.history, self.evals)
                        self.pending.restart_clock()
            finally:
                self.bar.close()
        # After the with-block: PeakMemory reads CUDA's peak on exit (inside it, the peak was still 0).
        return Trained(status, reason, self.history, self.evals, self.step_times, self.tokens, peak.peak)
