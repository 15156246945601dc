"""The training loop: LoRA or full fine-tuning on the same data, with the same evaluation.

`python -m lora_lab.train [overrides]` trains one model; every sweep trial runs the same code. The loop imports neither
Optuna nor MLflow: it reports through one callback per evaluation (`on_eval`), and the entry point wires that callback
to MLflow (lora_lab/tracking.py), the sweep to Optuna as well.

    session = build(cfg)            # loads model and data, applies LoRA: every input error surfaces here
    result = session.fit(on_eval)   # trains, evaluates, merges, writes metrics.json, config.yaml, adapter
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lora_lab import lora, methods, optim, targets
from lora_lab.config import Config, ConfigError, LoraConfig, outputs_root
from lora_lab.files import atomic_dir, atomic_write_text
from lora_lab.records import EvalPoint, Identity, RunRecord, Settings, TrainPoint
from lora_lab.records import build as build_record

if TYPE_CHECKING:
    from lora_lab.warm import Warm

log = logging.getLogger("lora_lab")
PROBE_ROWS = 8  # validation rows whose logits the merged-vs-unmerged check compares


# ----------------------------------------------------------------------------------------------- results


@dataclass
class EvalEvent:
    """What the loop reports at each evaluation: the only hook out of the loop."""

    step: int  # optimizer steps done
    max_steps: int
    metrics: dict[
        str, float
    ]  # val_loss, accuracy (labelled tasks), train_loss (mean since last eval), lr, tokens_per_s
    train_points: list[dict[str, float]]  # per-step {step, train_loss, lr} since the previous event


EvalCallback = Callable[[EvalEvent], None]


# What a run measured, who it is and what was chosen: lora_lab.records. `RunResult` is the record fit() returns.
RunResult = RunRecord


# ----------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class PeakMemory:
    """Peak memory of this run: CUDA's allocator peak, or on the CPU the process RSS sampled every 50 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self._stop.wait(0.05)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `step`: linear warmup, then constant or cosine to zero."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label token) over positions whose label is not -100, and how many such positions.

    logits (B, T, V) predict the next token, so position t scores labels[:, t + 1], as in transformers' loss.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (logp * mask).sum(dim=1), mask.sum(dim=1)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TrainBatches:
    """Training micro-batches as tensors, in the order `batch_rows` gives.

    The rows are padded once into (N, T) tables, so a batch is an index_select and a trim instead of a Python
    collate per step; on CUDA each batch is built in pinned memory and copied without blocking the host.

    `padding_mask=False` leaves the attention mask out, for causal LMs: the rows are right-padded, so the causal
    mask alone keeps every real token from seeing the padding after it, and the padded positions' outputs carry no
    label. Without a padding mask transformers neither reads the mask back to the host to decide whether it can be
    skipped (a device sync in every forward on CUDA) nor keeps SDPA off its flash kernel.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seed: int,
        device: torch.device,
        pad_to_multiple: int = 1,
        padding_mask: bool = True,
    ) -> None:
        from lora_lab.data import IGNORE

        rows = data.train["input_ids"]
        labels = data.train["labels"]
        self.n, self.batch_size, self.seed, self.device, self.multiple = (
            len(rows),
            batch_size,
            seed,
            device,
            pad_to_multiple,
        )
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (N,)
        width = -(-int(self.lengths.max()) // pad_to_multiple) * pad_to_multiple
        self.ids = torch.full((self.n, width), data.pad_id, dtype=torch.long)  # (N, T)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        self.mask = (torch.arange(width)[None, :] < self.lengths[:, None]).long()  # (N, T)
        self.per_token = bool(labels) and isinstance(labels[0], (list, tuple))
        if self.per_token:
            self.labels = torch.full((self.n, width), IGNORE, dtype=torch.long)  # (N, T)
            for i, lab in enumerate(labels):
                self.labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        else:
            self.labels = torch.tensor([int(v) for v in labels], dtype=torch.long)  # (N,)
        self._perm: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))
        self.pin = device.type == "cuda"
        self.padding_mask = padding_mask

    def rows(self, micro: int) -> torch.Tensor:
        """Row indices of micro-batch number `micro`: a seeded permutation per epoch, last partial batch dropped,
        so the data order is a pure function of (seed, micro) and a resumed run sees the same batches."""
        per_epoch = max(1, self.n // self.batch_size)
        epoch, j = divmod(micro, per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        perm = self._perm[1]
        return perm[j * self.batch_size : (j + 1) * self.batch_size] if self.n >= self.batch_size else perm

    def get(self, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        """Micro-batch `micro` on the device, and its number of real (unpadded) tokens (known without a sync)."""
        idx = self.rows(micro)
        lengths = self.lengths[idx]
        width = -(-int(lengths.max()) // self.multiple) * self.multiple
        batch = {
            "input_ids": self.ids[idx, :width],
            "labels": self.labels[idx, :width] if self.per_token else self.labels[idx],
        }
        if self.padding_mask:
            batch["attention_mask"] = self.mask[idx, :width]
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, int(lengths.sum())


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile, in place, each block of the model's repeated layer list (the ModuleList of identical blocks
    holding the most parameters: Llama's `model.layers`, GPT-2's `h`, BERT's `encoder.layer`). Regional compilation:
    the blocks share one compiled graph (parameters are its inputs), so compile time is one block's, not the
    model's. Returns how many blocks were compiled; raises ValueError when the model has no such list."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if sum(p.numel() for p in module.parameters()) > sum(p.numel() for b in best for p in b.parameters()):
                best = list(module)
    if not best:
        raise ValueError(f"trainer.compile: {type(model).__name__} has no list of repeated layers to compile")
    # Training sees a few variants per block (layer 0's input needs no grad under LoRA, an encoder's batches with and
    # without padding, then dynamic lengths): room for them, so no block falls back to eager.
    import torch._dynamo as dynamo

    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 32))
    # Each run compiles afresh. Variants kept from earlier runs in this process (a sweep worker's previous trials:
    # other ranks, scales and targets, each a guarded constant; ~4 per rank) would count against that limit, past
    # which dynamo silently runs the blocks eager.
    dynamo.reset()
    for block in best:
        block.compile()
    return len(best)


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point parameters to `dtype` in place (trainable ones, buffers stay); returns how many.

    Under LoRA with bf16 autocast the base weights never change: kept in bf16 they need half the memory and no
    per-step cast (autocast recasts a frozen fp32 weight at every call; it caches casts of trainable leaves only).
    """
    n = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------- session


class Session:
    """A model, its data and its optimizer, ready to train. Built by `build()`; `fit()` runs it once."""

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        tokenizer: Any,
        data: Any,
        device: torch.device,
        wrapped: list[str],
        setup_time_s: float,
        output_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.device = device
        self.wrapped = wrapped
        self.setup_time_s = setup_time_s
        self.output_dir = output_dir
        self.counts = lora.count_parameters(model)
        self.autocast_dtype = _autocast_dtype(cfg.trainer.precision, device)
        self.eval_time_s = 0.0
        self.train_time_s = 0.0  # optimizer steps so far: readable after a fit that ended in an exception (pruned)
        # Logits of the first validation rows from the latest evaluation: the merged-vs-unmerged check compares the
        # final evaluation's probe with the merged evaluation's, so the check costs no forward of its own.
        self.probe_logits: Optional[torch.Tensor] = None
        self._val_order: Optional[list[int]] = None  # validation rows by length, computed on first use
        self._val_rows: list[dict] = []

    # -- evaluation ------------------------------------------------------------------------------------------

    def _forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def evaluate(self) -> dict[str, float]:
        """Validation loss (token-weighted mean) and, where the task has labels, accuracy."""
        t0 = time.perf_counter()
        try:
            with self._eager():
                return self._evaluate()
        finally:
            self.eval_time_s += time.perf_counter() - t0

    def _eager(self) -> contextlib.AbstractContextManager:
        # Compiled blocks serve the training steps; evaluations and latency run eager (no_grad, other shapes, the
        # merged model) instead of adding compiled variants that each cost seconds and a slot of dynamo's cache.
        return torch.compiler.set_stance("force_eager") if self.cfg.trainer.compile else contextlib.nullcontext()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        from lora_lab.data import collate

        was_training = self.model.training
        self.model.eval()
        data, fmt, dev = self.data, self.data.format, self.device
        # Sums stay on the device: one host sync per evaluation, not several per batch.
        loss_sum, n_tokens, correct = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3))
        n_rows = 0
        bs = self.cfg.trainer.eval_batch_size
        self.probe_logits = None
        if self._val_order is None:
            # Rows as plain dicts once (a datasets row lookup per row per evaluation adds up); batches of similar
            # lengths pad less (a quarter fewer tokens on the default task); the sums do not depend on the order.
            self._val_rows = list(data.val)
            lengths = [len(r["input_ids"]) for r in self._val_rows]
            self._val_order = sorted(range(len(lengths)), key=lengths.__getitem__)
        order = self._val_order
        for start in range(0, len(order), bs):
            rows = [self._val_rows[i] for i in order[start : start + bs]]
            n_rows += len(rows)
            if fmt == "classification":
                batch = _to(collate(rows, data.pad_id), dev)
                logits = self._forward_logits(batch).float()  # (B, K)
                self._keep_probe(logits)
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum")
                n_tokens += len(rows)
                correct += (logits.argmax(-1) == batch["labels"]).sum()
            elif fmt == "prompted" and all(len(w) == 1 for w in data.label_token_ids):
                # One-token label words: one forward over the prompts scores them all, and the true word's
                # log-probability is the loss. Left padding puts every prompt's last token at the same position, so
                # the head runs on that position only (the vocabulary projection dominates small models' cost).
                truth = torch.tensor([r["class_label"] for r in rows]).to(dev, non_blocking=True)  # (B,)
                words = torch.tensor([w[0] for w in data.label_token_ids]).to(dev, non_blocking=True)  # (K,)
                logits = self._last_token_logits(rows)  # (B, V)
                self._keep_probe(logits)
                logp = torch.log_softmax(logits, dim=-1)[:, words]  # (B, K)
                loss_sum -= logp.gather(1, truth[:, None]).sum()
                n_tokens += len(rows)
                correct += (logp.argmax(1) == truth).sum()
            elif fmt == "prompted":
                # Score every label word; the true one's log-probability is also the loss (no extra forward).
                truth = torch.tensor([r["class_label"] for r in rows]).to(dev, non_blocking=True)  # (B,)
                scores = []
                for k, word_ids in enumerate(data.label_token_ids):
                    batch = _to(collate(rows, data.pad_id, candidate=word_ids), dev)
                    logits = self._forward_logits(batch)  # (B, T, V)
                    if k == 0:
                        self._keep_probe(logits)
                    lp, cnt = sequence_logprobs(logits, batch["labels"])  # (B,), (B,)
                    scores.append(lp)
                    is_true = truth == k
                    loss_sum -= torch.where(is_true, lp, 0.0).sum()
                    n_tokens += torch.where(is_true, cnt, 0).sum()
                correct += (torch.stack(scores, dim=1).argmax(1) == truth).sum()
            else:
                batch = _to(collate(rows, data.pad_id), dev)
                logits = self._forward_logits(batch)  # (B, T, V)
                self._keep_probe(logits)
                lp, cnt = sequence_logprobs(logits, batch["labels"])
                loss_sum -= lp.sum()
                n_tokens += cnt.sum()
        self.model.train(was_training)
        loss_sum, n_tokens, correct = torch.stack([loss_sum, n_tokens, correct]).tolist()  # the one sync
        out = {"val_loss": loss_sum / max(1, n_tokens)}
        if fmt in ("prompted", "classification"):
            out["accuracy"] = correct / max(1, n_rows)
        return out

    def _last_token_logits(self, rows: list[dict]) -> torch.Tensor:
        """Next-token logits after each row's prompt, (B, V) in fp32: prompts left-padded, positions from the mask."""
        seqs = [list(r["prompt_ids"]) for r in rows]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), self.data.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        for i, q in enumerate(seqs):
            ids[i, width - len(q) :] = torch.tensor(q, dtype=torch.long)
            mask[i, width - len(q) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1, as with right padding
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _keep_probe(self, logits: torch.Tensor) -> None:
        """Keep the first evaluation batch's logits (at most PROBE_ROWS rows, fp32) as this evaluation's probe."""
        if self.probe_logits is None:
            self.probe_logits = logits[:PROBE_ROWS].detach().float().clone()

    # -- training --------------------------------------------------------------------------------------------

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        o = self.cfg.optim
        lr_ratio = self.cfg.lora.lr_ratio if self.cfg.method == "lora" else 1.0
        groups = optim.param_groups(self.model, lr=o.peak_lr, lr_ratio=lr_ratio, weight_decay=o.weight_decay)
        # fused on CUDA and CPU (optim.adamw): one kernel for a LoRA model's hundreds of small tensors
        optimizer = optim.adamw(groups, lr=o.peak_lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.schedule, o.warmup_steps, self.cfg.trainer.max_steps)
        )
        return optimizer, scheduler

    def fit(self, on_eval: Optional[EvalCallback] = None) -> RunResult:
        """Train for trainer.max_steps (resuming from the last checkpoint if asked), evaluate every eval_every steps,
        then merge and evaluate the merged model (LoRA), write the run's files and return what was measured.

        The host never waits for the device inside a step: batches are tensors copied one ahead without blocking,
        and the losses are read back every trainer.sync_every steps, at evaluations and checkpoints (one sync each).
        Step times are the wall time between two such points, shared among its steps.
        """
        cfg, t = self.cfg, self.cfg.trainer
        model, device = self.model, self.device
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model.to(device)
        model.train()
        # No KV cache in training or scoring: nothing reuses it, and a cache object in the call makes compiled
        # blocks recompile per layer (its layer index is a guarded constant). Restored for the exported model.
        _set_use_cache(model, False)
        if t.compile:
            log.info("compiled %d repeated blocks (regional torch.compile)", compile_blocks(model))
        optimizer, scheduler = self.make_optimizer()
        trainable = [p for p in model.parameters() if p.requires_grad]  # what clipping sees, listed once
        ckpt = Checkpointer(self.output_dir / "checkpoints", model, optimizer, scheduler, full=cfg.method == "full")
        start_step, history, evals = 0, [], []
        if t.resume:
            state = ckpt.load_latest()
            if state is not None:
                start_step, history, evals = state["step"], state["history"], state["evals"]
                log.info("resumed from %s at step %d", ckpt.latest_path(), start_step)
        status, reason = "completed", ""
        pending: list[dict[str, float]] = []  # points since the last evaluation event
        step_times: list[float] = []
        tokens = 0
        if t.eval_at_start and start_step == 0:
            # Step 0 is the base model (LoRA starts as an exact no-op): the yardstick for "did it learn".
            metrics = self.evaluate()
            evals.append({"step": 0, **metrics})
            if on_eval is not None:
                on_eval(EvalEvent(0, t.max_steps, metrics, []))
        causal = cfg.model.task == "causal_lm"  # right-padded rows need no padding mask there (TrainBatches)
        batches = TrainBatches(self.data, t.batch_size, cfg.seed, device, t.pad_to_multiple, padding_mask=not causal)
        bar = _progress(t.max_steps, start_step, enabled=t.progress, desc=f"{cfg.method} {cfg.model.name}")
        window: list[tuple[int, torch.Tensor, float]] = []  # steps since the last sync: (step, loss on device, lr)
        window_start = time.perf_counter()

        def sync() -> Optional[int]:
            """Read the window's losses back (one host sync); time its steps. Returns the first non-finite step."""
            nonlocal window, window_start
            if not window:
                return None
            losses = torch.stack([loss for _, loss, _ in window]).tolist()
            dt = (time.perf_counter() - window_start) / len(window)
            self.train_time_s += dt * len(window)
            bad = None
            for (step, _, lr), loss in zip(window, losses):
                if not math.isfinite(loss):
                    bad = step
                    break
                point = {"step": step, "train_loss": loss, "lr": lr}
                history.append(point)
                pending.append(point)
                step_times.append(dt)
            window = []
            bar.set_postfix(
                loss=f"{history[-1]['train_loss']:.4f}" if history else "-",
                tok_s=f"{tokens / max(self.train_time_s, 1e-9):.0f}",
            )
            window_start = time.perf_counter()
            return bad

        with PeakMemory(device) as peak:
            try:
                batch, n_tok = batches.get(start_step * t.grad_accum)
                for step in range(start_step, t.max_steps):
                    loss_total = torch.zeros(())
                    for i in range(t.grad_accum):
                        micro = step * t.grad_accum + i
                        # Copy the next batch now (non-blocking): the device takes it in stream order, the host goes on.
                        following = batches.get(micro + 1) if micro + 1 < t.max_steps * t.grad_accum else (batch, 0)
                        with torch.autocast(
                            device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                        ):
                            loss = model(**batch).loss / t.grad_accum
                        loss.backward()
                        loss_total = loss.detach() if i == 0 else loss_total + loss.detach()
                        tokens += n_tok
                        batch, n_tok = following
                    if cfg.optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    done = step + 1
                    window.append((done, loss_total, lr))
                    bar.update(1)
                    evaluate_now = done % t.eval_every == 0 or done == t.max_steps
                    checkpoint_now = bool(t.checkpoint_every) and done % t.checkpoint_every == 0 and done < t.max_steps
                    # Sync after the first step (it pays for allocations and warm-up: kept out of the steady
                    # step time), every sync_every steps, and before evaluations and checkpoints.
                    if done == start_step + 1 or done % t.sync_every == 0 or evaluate_now or checkpoint_now:
                        bad = sync()
                        if bad is not None:
                            status, reason = "diverged", f"non-finite training loss at step {bad}"
                            optimizer.zero_grad(set_to_none=True)
                            break
                    if evaluate_now:
                        metrics = self.evaluate()
                        if not math.isfinite(metrics["val_loss"]):
                            status, reason = "diverged", f"non-finite validation loss at step {done}"
                            break
                        metrics.update(
                            train_loss=sum(p["train_loss"] for p in pending) / len(pending),
                            lr=lr,
                            tokens_per_s=tokens / max(self.train_time_s, 1e-9),
                        )
                        evals.append({"step": done, **metrics})
                        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", val=f"{metrics['val_loss']:.4f}")
                        if on_eval is not None:
                            on_eval(EvalEvent(done, t.max_steps, metrics, pending))
                        pending = []
                        window_start = time.perf_counter()  # evaluation time is not training time
                    if checkpoint_now:
                        ckpt.save(done, history, evals)
                        window_start = time.perf_counter()
            finally:
                bar.close()
        # After the with-block: PeakMemory reads CUDA's peak on exit (inside it, the peak was still 0).
        return self._finish(status, reason, history, evals, step_times, tokens, peak)

    def _finish(
        self,
        status: str,
        reason: str,
        history: list,
        evals: list,
        step_times: list[float],
        tokens: int,
        peak: PeakMemory,
    ) -> RunResult:
        cfg, out = self.cfg, self.output_dir
        # A diverged run has no final loss: the last finite evaluation would read as a result.
        last = evals[-1] if evals and status == "completed" else {"val_loss": float("nan")}
        base = evals[0] if evals and evals[0]["step"] == 0 else {}
        merged_val, merged_acc, logit_diff, adapter_bytes, ckpt_bytes = None, None, None, None, None
        merge_tol: Optional[float] = None
        latency: Optional[float] = None
        mergeable = cfg.method == "lora" or cfg.method == "ia3"
        if status == "completed" and mergeable:
            if not evals or evals[-1]["step"] != len(history) or self.probe_logits is None:
                self.evaluate()  # no evaluation of the final weights yet (a run resumed at its end): take the probe
            before = self.probe_logits
            t0 = time.perf_counter()
            merge, unmerge = (lora.merge, lora.unmerge) if cfg.method == "lora" else (methods.merge, methods.unmerge)
            merge(self.model)  # fp32 inside, whatever the weight dtype
            self.eval_time_s += time.perf_counter() - t0  # the merge is part of the merged evaluation
            merged = self.evaluate()
            latency = self.inference_latency()  # merged: what serving the adapted model costs
            logit_diff = (self.probe_logits - before).abs().max().item()
            merge_tol = merge_tolerance(self.autocast_dtype or methods.frozen_dtype(self.model), before)
            merged_val, merged_acc = merged["val_loss"], merged.get("accuracy")
            t0 = time.perf_counter()
            unmerge(self.model)
            self.eval_time_s += time.perf_counter() - t0
        if status == "completed" and cfg.method not in ("lora", "full"):
            if not mergeable:
                latency = self.inference_latency()  # prompt/prefix/adapters/bitfit: as trained, nothing to fold in
            if cfg.export.adapter:
                with atomic_dir(out / "adapter") as tmp:
                    methods.save(self.model, tmp, base_model_name=cfg.model.name)
                adapter_bytes = ckpt_bytes = dir_bytes(out / "adapter")
        elif status == "completed" and cfg.method == "lora":
            if cfg.export.adapter:
                with atomic_dir(out / "adapter") as tmp:
                    lora.save_adapter(self.model, tmp, base_model_name=cfg.model.name)
                adapter_bytes = ckpt_bytes = dir_bytes(out / "adapter")
            if cfg.export.merged:
                self.export_merged(out / "merged")
        elif status == "completed":
            latency = self.inference_latency()
            # What a full fine-tune leaves behind is every weight: its size is the checkpoint a user keeps.
            ckpt_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        # The first step pays for allocations, kernel warm-up and compilation; the median keeps a later recompile
        # (a new batch shape under trainer.compile) out of the typical step.
        steady = step_times[1:] or step_times
        result = RunRecord(
            status=status,
            reason=reason,
            steps=len(history),
            val_loss=last["val_loss"],
            accuracy=last.get("accuracy"),
            base_val_loss=base.get("val_loss"),
            base_accuracy=base.get("accuracy"),
            merged_val_loss=merged_val,
            merged_accuracy=merged_acc,
            max_abs_logit_diff=logit_diff,
            merge_ok=None if logit_diff is None else bool(logit_diff <= merge_tol),
            merge_tol=merge_tol,
            trainable_params=self.counts.trainable,
            total_params=self.counts.total,
            adapter_bytes=adapter_bytes,
            checkpoint_bytes=ckpt_bytes,
            peak_mem_bytes=peak.peak,
            time_per_step_s=statistics.median(steady) if steady else 0.0,
            tokens_per_s=tokens / max(self.train_time_s, 1e-9),
            train_time_s=self.train_time_s,
            eval_time_s=self.eval_time_s,
            setup_time_s=self.setup_time_s,
            inference_latency_s=latency,
            identity=self.identity(),
            settings=self.settings(),
            history=[build_record(TrainPoint, p, "history") for p in history],
            evals=[build_record(EvalPoint, e, "evals") for e in evals],
        )
        atomic_write_text(out / "metrics.json", json.dumps(result.to_json(), indent=2, default=float))
        return result

    @torch.no_grad()
    def inference_latency(self, repeats: int = 3) -> float:
        """Median seconds of one eval-mode forward over the first eval_batch_size validation rows (right-padded,
        full logits): the inference cost of the model as it stands (merged where the caller merged it). Counted as
        evaluation time, so a sweep's share of time outside training and evaluation keeps meaning overhead."""
        t0 = time.perf_counter()
        try:
            with self._eager():
                return self._inference_latency(repeats)
        finally:
            self.eval_time_s += time.perf_counter() - t0

    @torch.no_grad()
    def _inference_latency(self, repeats: int) -> float:
        from lora_lab.data import collate

        rows = [row for _, row in zip(range(self.cfg.trainer.eval_batch_size), self.data.val)]
        batch = _to(collate(rows, self.data.pad_id), self.device)
        batch.pop("labels", None)
        was_training = self.model.training
        self.model.eval()
        times = []
        try:
            for _ in range(repeats + 1):  # the first call warms caches and is left out
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self._forward_logits(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
        finally:
            self.model.train(was_training)
        return statistics.median(times[1:])

    # Who the run is and which overrides made it: run_tracked sets them; a bare fit() is a plain run.
    run_kind, run_name, study, trial, overrides = "run", None, "", None, ()

    def identity(self) -> Identity:
        """The run's identity record (records.Identity)."""
        cfg = self.cfg
        name = self.run_name or cfg.tracking.run_name or f"{cfg.method}-{Path(cfg.model.name).name}-{cfg.data.name}"
        return Identity(
            kind=self.run_kind,
            name=name,
            study=self.study,
            trial=self.trial,
            model=cfg.model.name,
            data=cfg.data.name,
            device=str(self.device),
            output_dir=str(self.output_dir),
        )

    def settings(self) -> Settings:
        """The settings a person chose (records.Settings)."""
        return settings_of(self.cfg, list(self.overrides))

    def export_merged(self, path: Path) -> None:
        """Write the merged model as a plain transformers folder: no lora_lab needed to load it."""
        import copy

        plain = copy.deepcopy(self.model).cpu()
        lora.unwrap(plain)
        _set_use_cache(plain, True)
        with atomic_dir(path) as tmp:
            plain.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

    def close(self) -> None:
        """Free the model, optimizer state and caches (a sweep runs many sessions in one process)."""
        self.model = None
        free_memory()


def free_memory() -> None:
    """Collect garbage (a model's cycles) and hand cached CUDA blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_tolerance(eval_dtype: Optional[torch.dtype], logits: torch.Tensor) -> float:
    """How far merged logits may sit from unmerged ones when the merge is right.

    fp32 evaluation: 1e-4 (measured merges stay near 2e-4 of that on the default task). Under bf16/fp16 the merged
    weight is rounded once more than W0 + BA, and each logit carries that rounding through every layer: allow 8 units
    in the last place of the dtype at the scale of the largest logit (bf16: 6% of it). A merge that folds the
    update in twice moves logits by the whole update, far above either.
    """
    if eval_dtype is None or eval_dtype == torch.float32:
        return 1e-4
    return float(8 * torch.finfo(eval_dtype).eps * logits.abs().max().clamp(min=1.0))


def _set_use_cache(model: torch.nn.Module, on: bool) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = on


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    # auto: bf16 on a GPU that computes in it natively (Ampere on); older cards only emulate it, slower than fp32.
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return torch.bfloat16
    return None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "class_label"}


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Resumable state every N steps: trainable weights (safetensors), optimizer, scheduler, RNG states, step.

    Each checkpoint is a folder written whole under a temp name and renamed; `LATEST` (written atomically) names
    the newest, so a crash at any point leaves the previous checkpoint intact and no truncated file. Each folder
    holds `manifest.json` (size and SHA-256 of every file); a checkpoint that fails it (a file missing, truncated
    or changed) or does not load is set aside under `bad/` with the reason, and the run resumes from the newest
    good one, or from step 0.
    """

    MANIFEST = "manifest.json"

    def __init__(
        self,
        root: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        full: bool,
    ) -> None:
        self.root, self.model, self.optimizer, self.scheduler, self.full = root, model, optimizer, scheduler, full
        self.loaded: Optional[Path] = None  # the checkpoint load_latest() resumed from

    def latest_path(self) -> Optional[Path]:
        if self.loaded is not None:
            return self.loaded
        marker = self.root / "LATEST"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def _weights(self) -> dict[str, torch.Tensor]:
        if self.full:
            return {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if methods.method_of(self.model) is not None:  # BitFit, IA3, adapters, prompt, prefix: what trains
            return {k: v.detach().contiguous() for k, v in self.model.named_parameters() if v.requires_grad}
        return {k: v.detach().contiguous() for k, v in lora.lora_state_dict(self.model).items()}

    def save(self, step: int, history: list, evals: list) -> Path:
        from safetensors.torch import save_file

        name = f"step-{step:07d}"
        with atomic_dir(self.root / name) as tmp:
            weights = self._weights()
            if self.full:  # tied weights share storage; safetensors wants each stored once
                seen, unique = set(), {}
                for k, v in weights.items():
                    if v.data_ptr() not in seen:
                        seen.add(v.data_ptr())
                        unique[k] = v
                weights = unique
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, tmp / "optim.pt"
            )
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "history": history, "evals": evals}))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
            (tmp / self.MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        previous = self.latest_path()
        atomic_write_text(self.root / "LATEST", name)
        if previous is not None and previous.name != name:
            shutil.rmtree(previous, ignore_errors=True)
        self.loaded = None
        return self.root / name

    def verify(self, path: Path) -> str:
        """'' if the checkpoint at `path` matches its manifest, else what is wrong."""
        try:
            manifest = json.loads((path / self.MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"no readable {self.MANIFEST} ({type(exc).__name__})"
        for name in ("weights.safetensors", "optim.pt", "rng.pt", "state.json"):
            if name not in files:
                return f"{name} is not in the manifest"
        for name, want in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
            if _sha256(f) != want["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
        return ""

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move a bad checkpoint to bad/<name>-<time> with a REASON file: kept to look at, never loaded again."""
        dest = self.root / "bad" / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
        atomic_write_text(dest / "REASON", reason + "\n")
        log.warning("checkpoint %s: %s; set aside as %s", path, reason, dest)
        return dest

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: the one LATEST names, then any other complete one left behind."""
        named = []
        marker = self.root / "LATEST"
        if marker.is_file():
            named = [self.root / marker.read_text().strip()]
        others = sorted((p for p in self.root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)
        return [p for p in dict.fromkeys(named + others) if p.is_dir()]

    def load_latest(self) -> Optional[dict[str, Any]]:
        """Restore the newest good checkpoint (weights, optimizer, scheduler, RNG) and return its state.json; None
        when there is none (start at step 0). Bad ones on the way are set aside."""
        for path in self.candidates():
            problem = self.verify(path)
            if not problem:
                try:
                    state = self._load(path)
                except Exception as exc:  # noqa: BLE001 - a checkpoint that passes its manifest but does not load
                    problem = f"does not load: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                else:
                    self.loaded = path
                    return state
            self.set_aside(path, problem)
        return None

    def _load(self, path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        weights = load_file(str(path / "weights.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        needed = {k for k, v in self.model.named_parameters() if v.requires_grad} if not self.full else set()
        if unexpected or (not self.full and (any("lora_" in k for k in missing) or needed & set(missing))):
            raise ValueError(f"checkpoint {path}: does not fit this model (unexpected keys {unexpected[:5]})")
        state = torch.load(path / "optim.pt", weights_only=True)  # never unpickle arbitrary objects
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- signals


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run: it ends as interrupted (MLflow KILLED, with this message as the reason); its
    checkpoints stay, so the same command resumes it."""

    run_state = "FAIL"

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}: checkpoints kept; run the same command again to resume"
        )


@contextlib.contextmanager
def interruptible() -> Any:
    """Inside the block, SIGINT and SIGTERM raise `Interrupted` (once: a second signal while the run closes is
    ignored, so its MLflow run and trial still get their reason). Only in the main thread; handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            log.warning("%s again: already stopping", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # The run's device only (the current one): get_rng_state_all() would list every GPU this process sees, and a
        # resume in a process that sees fewer (a sweep worker pinned to one) could not restore it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------- build


def default_output_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return outputs_root() / "runs" / f"{stamp}-{cfg.method}-{os.getpid()}"


def lora_kwargs(model: torch.nn.Module, c: LoraConfig, task: str) -> dict[str, Any]:
    """The typed LoraConfig as lora.apply_lora's plain keyword values (also what targets.resolve_targets takes, less
    r/alpha/dropout/rslora/init/variant). modules_to_save=null means the task head for seq_cls: a freshly initialised
    classifier must train, or LoRA learns against a random head."""
    saved = c.modules_to_save
    if saved is None:
        saved = targets.head_modules(model) if task == "seq_cls" else []
    return dict(
        r=c.r,
        alpha=c.alpha,
        dropout=c.dropout,
        targets=tuple(c.targets),
        target_regex=c.target_regex,
        exclude=tuple(c.exclude),
        layers=tuple(c.layers) if c.layers is not None else None,
        layers_pattern=tuple(c.layers_pattern) if c.layers_pattern else None,
        rslora=c.rslora,
        init=c.init,
        variant=c.variant,
        modules_to_save=tuple(saved),
    )


def lora_targets(model: torch.nn.Module, c: LoraConfig, task: str = "causal_lm") -> list[str]:
    """The modules apply_lora_config would wrap, without wrapping (the sweep checks each trial's targets with it)."""
    kw = lora_kwargs(model, c, task)
    for key in ("r", "alpha", "dropout", "rslora", "init", "variant"):
        del kw[key]
    return targets.resolve_targets(model, **kw)


def apply_lora_config(model: torch.nn.Module, c: LoraConfig, task: str = "causal_lm") -> list[str]:
    """Wrap `model` as the config says (the one place a LoraConfig becomes lora.apply_lora's arguments)."""
    return lora.apply_lora(model, **lora_kwargs(model, c, task))


def prefix_cache_factory(model: torch.nn.Module) -> Callable[[], Any]:
    """A fresh transformers DynamicCache for `model` per call: how prefix tuning hands its keys/values to attention."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    return lambda: DynamicCache(config=config)


def apply_method(model: torch.nn.Module, cfg: Config) -> list[str]:
    """Apply cfg.method (bitfit, ia3, adapter, prompt, prefix: lora_lab.methods) to `model` as the config says; for
    seq_cls the task head trains too. Returns the modules it changed. Raises ConfigError for a combination the loop
    cannot serve (prompt tuning shifts a classifier's pooled token)."""
    from lora_lab import methods

    if cfg.method == "prompt" and cfg.model.task == "seq_cls":
        raise ConfigError(
            "method=prompt: needs model.task=causal_lm (virtual tokens shift a classifier's pooled token)"
        )
    heads = targets.head_modules(model) if cfg.model.task == "seq_cls" else []
    try:
        if cfg.method == "bitfit":
            return methods.apply_bitfit(model, add_missing=cfg.bitfit.add_missing, heads=heads)
        if cfg.method == "ia3":
            return methods.apply_ia3(model, heads=heads)
        if cfg.method == "adapter":
            a = cfg.adapter
            return methods.apply_adapter(
                model, bottleneck=a.bottleneck, placement=a.placement, activation=a.activation, heads=heads
            )
        if cfg.method == "prompt":
            return methods.apply_prompt(model, n_tokens=cfg.prompt.n_tokens, init=cfg.prompt.init, seed=cfg.seed)
        if cfg.method == "prefix":
            c = cfg.prefix
            return methods.apply_prefix(
                model,
                n_tokens=c.n_tokens,
                projection=c.projection,
                hidden=c.hidden,
                cache_factory=prefix_cache_factory(model),
                seed=cfg.seed,
                heads=heads,
            )
    except ValueError as exc:
        raise ConfigError(f"method={cfg.method} on model.name={cfg.model.name}: {exc}") from None
    raise ConfigError(f"method: no such method {cfg.method!r}")


def build(cfg: Config, warm: Optional["Warm"] = None) -> Session:
    """Load the model and data and apply LoRA (or unfreeze everything): every input error surfaces here, before
    anything is logged. Raises ConfigError, models.ModelError, data.DataError or ValueError (bad targets).

    `warm` (a sweep worker's lora_lab.warm.Warm): take the model, tokenizer and data from it when they are kept
    already; the caller hands them back with `warm.give_back()` once the session is done. Same seeding either way."""
    from lora_lab.data import load_data
    from lora_lab.models import load_model

    t0 = time.perf_counter()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    if warm is None:
        model, tokenizer = load_model(cfg.model)
        data = load_data(cfg.data, tokenizer, seed=cfg.seed)
    else:
        model, tokenizer, data = warm.take(cfg)
    try:
        wrapped = _prepare(cfg, model, data, device)
    except BaseException:
        if warm is not None:
            warm.give_back()
        raise
    seed_everything(cfg.seed)
    # Nothing is written yet: the folder appears when the run starts (fit, run_tracked), not on a bad input.
    output_dir = Path(cfg.output_dir).resolve() if cfg.output_dir else default_output_dir(cfg)
    return Session(cfg, model, tokenizer, data, device, wrapped, time.perf_counter() - t0, output_dir)


def _prepare(cfg: Config, model: torch.nn.Module, data: Any, device: torch.device) -> list[str]:
    """Apply the method to the loaded model (seeded as the run's seed says) and check the data against it; returns
    the modules the method changed."""
    if cfg.method == "lora":
        torch.manual_seed(cfg.seed)  # LoRA init is part of the run's seed, independent of model loading
        wrapped = apply_lora_config(model, cfg.lora, cfg.model.task)
    elif cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        wrapped = []
    else:
        torch.manual_seed(cfg.seed)  # the method's init is part of the run's seed, as LoRA's
        wrapped = apply_method(model, cfg)
    if cfg.method != "full" and _autocast_dtype(cfg.trainer.precision, device) == torch.bfloat16:
        store_frozen_in(model, torch.bfloat16)
    if cfg.data.format == "classification":
        labels = set(data.train["labels"]) | set(data.val["labels"])
        if max(labels) >= cfg.model.num_labels:
            raise ConfigError(
                f"model.num_labels={cfg.model.num_labels}: the data has class {max(labels)}; "
                f"expected labels 0..{cfg.model.num_labels - 1}"
            )
    return wrapped


def run(cfg: Config, on_eval: Optional[EvalCallback] = None) -> RunResult:
    """Build and fit in one call (no MLflow): for tests and notebooks."""
    session = build(cfg)
    try:
        return session.fit(on_eval)
    finally:
        session.close()


def run_tracked(
    session: Session,
    resolved: dict[str, Any],
    overrides: list[str],
    *,
    kind: str = "run",
    study: str = "",
    trial: Optional[int] = None,
    run_name: Optional[str] = None,
    searched: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    on_eval: Optional[EvalCallback] = None,
    verdict: Optional[Callable[[RunRecord], tuple[str, str]]] = None,
) -> RunRecord:
    """Write the resolved config.yaml, fit inside an MLflow run (when tracking is on), close the session.

    The one sequence behind `python -m lora_lab.train`, every sweep trial and every comparison run. `resolved` is the
    composed config as a plain dict, `overrides` the ones that made it (the settings a person chose); kind, study,
    trial and run_name say who the run is (records.Identity), `searched` what a sweep sampled for it. `verdict` names
    the run's final state (COMPLETE, PRUNED, FAIL) and reason (default: COMPLETE when training completed), and an
    exception with a `run_state` attribute (a pruned trial) ends the run in that state.
    """
    import yaml

    from lora_lab import tracking
    from lora_lab.records import Results

    session.run_kind, session.run_name, session.study, session.trial = kind, run_name, study, trial
    session.overrides = tuple(overrides)
    try:
        resolved = {**resolved, "output_dir": str(session.output_dir)}
        atomic_write_text(session.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        counts = {
            Results.field_of("trainable_params").metadata["key"]: session.counts.trainable,
            Results.field_of("total_params").metadata["key"]: session.counts.total,
        }
        with tracking.TrainingRun(
            session.cfg.tracking,
            session.identity(),
            session.settings(),
            searched=searched,
            parent_run_id=parent_run_id,
            start_metrics=counts,
        ) as run_log:

            def hook(event: EvalEvent) -> None:
                run_log.on_eval(event)
                if on_eval is not None:
                    on_eval(event)

            result = session.fit(hook)
            run_log.finish(result)
            run_log.set_outcome(*(verdict or run_verdict)(result))
        return result
    finally:
        session.close()


def run_verdict(result: RunRecord) -> tuple[str, str]:
    """A plain run's state: COMPLETE when training completed, FAIL with the reason otherwise."""
    return ("COMPLETE", "") if result.completed else ("FAIL", f"{result.status}: {result.reason}")


# Overrides that say where or how to run, not what: never a run's settings.
NOT_SETTINGS = ("output_dir", "trainer.resume", "trainer.progress", "trainer.num_threads", "trainer.checkpoint_every")


def settings_of(cfg: Config, overrides: list[str]) -> Settings:
    """The settings a person chose (records.Settings): the ones every run has, the method's own fields (LoRA's;
    none for full fine-tuning) and every other override given, with the value it resolved to."""
    from dataclasses import is_dataclass

    from lora_lab.records import SETTINGS_PARAMS

    own_group = cfg.method if cfg.method in ("lora", "bitfit", "adapter", "prompt", "prefix") else None
    own = {f"{own_group}.{k}": v for k, v in asdict(getattr(cfg, own_group)).items()} if own_group else {}
    common = set(SETTINGS_PARAMS.values())
    chosen: dict[str, Any] = {}
    for o in overrides:
        key, _, text = o.partition("=")
        key = key.lstrip("+~")
        if key in NOT_SETTINGS or key.startswith("tracking") or key in common or key in own:
            continue
        if cfg.method != "lora" and (key == "lora" or key.startswith("lora.")):
            continue  # full fine-tuning has no LoRA settings, whatever the study's base overrides say
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        chosen[key] = text if is_dataclass(node) or node is None else node  # a config group: its option's name
    t = cfg.trainer
    # 6 significant digits: lr_mult x ref_lr carries float noise (10 x 3e-4 = 0.0030000000000000005), and runs at
    # "3e-3" must group as one LR wherever it came from; no LR grid is that fine.
    lr = float(f"{cfg.optim.peak_lr:.6g}")
    return Settings(
        method=cfg.method,
        model=cfg.model.name,
        data=cfg.data.name,
        seed=cfg.seed,
        lr=lr,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        max_steps=t.max_steps,
        max_length=cfg.data.max_length,
        precision=t.precision,
        device=t.device,
        method_fields=own,
        overrides=chosen,
    )


# ----------------------------------------------------------------------------------------------- CLI


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
        print(__doc__)
        return 0
    try:
        resolved, cfg = compose(argv)
        session = build(cfg)
        if cfg.tracking.enabled:
            tracking.connect(cfg.tracking)  # an unreachable tracking store is bad input too: fail before training
    except (ValueError, TypeError) as exc:  # ConfigError, ModelError, DataError, bad LoRA targets
        print(f"lora_lab.train: error: {exc}", file=sys.stderr)
        return 2
    try:
        with interruptible():  # SIGINT/SIGTERM: the MLflow run ends KILLED with the reason; checkpoints stay
            result = run_tracked(session, OmegaConf.to_container(resolved, resolve=True), argv)
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


if __name__ == "__main__":
    sys.exit(main())
