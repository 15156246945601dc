"""The run's runtime: device, precision (autocast), memory peaks, signals, RNG state, block hooks, time spent.

What a run asks of the machine it runs on, apart from the model's math: which device and precision, how much memory
it peaked at (and handing memory back), how SIGINT/SIGTERM end it, the RNG states a checkpoint keeps, the hooks
applied to the model's repeated blocks (regional compilation, activation checkpointing; frozen weights stored in
bf16) and the clock of its training and evaluation time. The process group of a multi-process run, and the loop's
helpers for it, are in lora_lab.train.distributed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import signal
import threading
import types
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.utils.checkpoint

from lora_lab import targets
from lora_lab.config import ConfigError
from lora_lab.train import distributed

log = logging.getLogger("lora_lab")


# ----------------------------------------------------------------------------------------------- device, precision


def pick_device(name: str) -> torch.device:
    """trainer.device as a torch.device: auto is CUDA when torch sees one, else the CPU. Raises ConfigError for
    'cuda' without a CUDA device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.active():
        return torch.device("cuda", distributed.local_rank())  # one GPU per rank: the launcher's LOCAL_RANK
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype trainer.precision autocasts to on `device`, or None for fp32 (no autocast)."""
    # auto: bf16 on a GPU that computes in it natively (Ampere on); older cards only emulate it, slower than fp32.
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """The autocast block of every forward: to `dtype` on the device, off when dtype is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def eager_when(compiled: bool) -> contextlib.AbstractContextManager:
    """Run eager inside the block when the blocks are compiled (trainer.compile), else change nothing.

    Compiled blocks serve the training steps; evaluations and latency run eager (no_grad, other shapes, the merged
    model) instead of adding compiled variants that each cost seconds and a slot of dynamo's cache."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def set_use_cache(model: torch.nn.Module, on: bool) -> None:
    """Switch the model's KV cache (config.use_cache) on or off, where its config has one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = on


# ----------------------------------------------------------------------------------------------- memory


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


def free_memory() -> None:
    """Collect garbage (a model's cycles) and hand cached CUDA blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
def interruptible() -> Iterator[None]:
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


# ----------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's RNG states (CUDA's for the current device), as tensors and plain values that
    torch.load(weights_only=True) reads back."""
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


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNG states that rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------- block hooks


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile, in place, each block of the model's repeated layer list (targets.repeated_blocks: Llama's
    `model.layers`, GPT-2's `h`, BERT's `encoder.layer`; at least two blocks). Regional compilation: the blocks share
    one compiled graph (parameters are its inputs), so compile time is one block's, not the model's. Returns how many
    blocks were compiled; raises ValueError when the model has no such list."""
    try:
        best = [block for _, block in targets.repeated_blocks(model, min_blocks=2)]
    except ValueError as exc:
        raise ValueError(f"trainer.compile: {exc} to compile") from None
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


# Set on a block whose forward checkpoint_blocks wrapped; the forward it wrapped is kept beside it.
CHECKPOINTED = "lora_lab_checkpointed"
PLAIN_FORWARD = "lora_lab_plain_forward"


def _checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward under activation checkpointing: while training with gradients on, keep only the block's
    inputs and recompute its inside during backward; otherwise (evaluation, no_grad) the plain forward."""
    plain = getattr(self, PLAIN_FORWARD)
    if not (self.training and torch.is_grad_enabled()):
        return plain(*args, **kwargs)
    # Keyword arguments travel positionally: checkpoint finds the device whose RNG state it stashes (so dropout
    # draws the same masks again) from its positional tensors only, and a block may get every tensor by keyword.
    n, names = len(args), tuple(kwargs)

    def run(*flat: Any) -> Any:
        return plain(*flat[:n], **dict(zip(names, flat[n:])))

    # Non-reentrant: gradients reach inputs that need none (layer 0's under LoRA) and tensors the block reads from
    # outside its arguments (prefix tuning's cache).
    return torch.utils.checkpoint.checkpoint(run, *args, *kwargs.values(), use_reentrant=False)


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing (trainer.gradient_checkpointing), in place, of each block of the model's repeated
    layer list (targets.repeated_blocks, the blocks compile_blocks compiles): training keeps each block's input and
    recomputes the rest during backward, so activations cost one hidden state per token and layer, plus one block's
    worth while it is recomputed. Any model, base-layer kind and method: only the block's forward is wrapped.

    Idempotent: a block already wrapped (flag CHECKPOINTED) is left as it is. Returns how many blocks are
    checkpointed; raises ValueError when the model has no such list. Apply before compile_blocks: the compiled block
    then holds the checkpoint (dynamo traces it as one region that its partitioner recomputes)."""
    try:
        blocks = [block for _, block in targets.repeated_blocks(model)]
    except ValueError as exc:
        raise ValueError(f"trainer.gradient_checkpointing: {exc} to checkpoint") from None
    for block in blocks:
        if not getattr(block, CHECKPOINTED, False):
            # Bound methods as instance attributes: a deep copy of the model rebinds them to the copied block.
            setattr(block, PLAIN_FORWARD, block.forward)
            block.forward = types.MethodType(_checkpointed_forward, block)
            setattr(block, CHECKPOINTED, True)
    return len(blocks)


def uncheckpoint_blocks(model: torch.nn.Module) -> int:
    """Undo checkpoint_blocks: every wrapped block gets its plain forward back. Returns how many were unwrapped."""
    n = 0
    for block in model.modules():
        if getattr(block, CHECKPOINTED, False):
            block.forward = getattr(block, PLAIN_FORWARD)
            if block.forward == types.MethodType(type(block).forward, block):
                del block.forward  # it was the class's own: no instance attribute left behind
            delattr(block, PLAIN_FORWARD)
            delattr(block, CHECKPOINTED)
            n += 1
    return n


def is_checkpointed(model: torch.nn.Module) -> bool:
    """Whether any block of the model runs under checkpoint_blocks."""
    return any(getattr(m, CHECKPOINTED, False) for m in model.modules())


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


# ----------------------------------------------------------------------------------------------- time


class Clock:
    """Seconds a session spent in optimizer steps (train_s) and in evaluation (eval_s: evaluations, the merge check,
    latency), summed over its fit. The loop and the evaluator add to the session's one clock as they go, so the
    totals are readable after a fit that ended in an exception (a pruned trial)."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.eval_s = 0.0
