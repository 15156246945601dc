"""One run over several processes (trainer.devices=N): the launcher, the process group and the loop's small helpers.

`python -m lora_lab.train trainer.devices=N` starts N copies of itself through torch.distributed's elastic launcher
(`launch`: torchrun's agent, max_restarts=0, rendezvous on 127.0.0.1); a process that finds the rendezvous
environment already set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR: torchrun, srun with its variables, or our own
launcher) joins the group as it is (`join`). NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU.

The training loop is the same for 1 and N processes: it asks these helpers, each a no-op without a process group,
whether it is the main process (`is_main`), for the sums over ranks (`all_reduce_sum`), for its shard of the data
(`rank`, `world_size`), to skip the gradient reduction of all but the last micro-batch (`gradient_sync`) and for the
model as trained (`wrap`: DDP for a model that fits one device, FSDP2's fully_shard for one that does not: `strategy`).
With devices=1 there is no process group and no wrapper: nothing changes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from lora_lab import adaptations, processes, targets
from lora_lab.config import Config, ConfigError
from lora_lab.errors import first_line

log = logging.getLogger("lora_lab")

T = TypeVar("T")

# What a launcher (torchrun, srun with these exported, our own `launch`) sets for each process it starts.
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# 127.0.0.1:<port> of the store a lora_lab launcher (`launch`, `hosted`) serves on loopback: its ranks join there.
STORE_ENV = "LORA_LAB_STORE"
GROUP_PREFIX = "lora_lab/group"  # the group's keys in that store (the elastic agent's rendezvous keeps its own there)
CHECK_IN = "joined"  # the key a rank sets (CHECK_IN/<rank>) before it joins: a host sees it arrive
HOST_ENV = "LORA_LAB_GROUP_HOST"  # the pid of the process that started this rank (launch, hosted): it dies with it


# ----------------------------------------------------------------------------------------------- the group


def launched() -> bool:
    """Whether this process was started by a launcher: the rendezvous environment is set, so it joins, never
    launches again."""
    return all(k in os.environ for k in RENDEZVOUS_ENV)


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 when there is no launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def active() -> bool:
    """Whether this process is one rank of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes train this run (1 without a group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes the run's files and talks to MLflow: rank 0, or the only process."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its host: which GPU it uses (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def join(device_type: str, timeout_s: float) -> None:
    """Join the process group the launcher set up: NCCL when the run is on CUDA (this rank on cuda:LOCAL_RANK),
    gloo on the CPU. The rendezvous is the launcher's: lora_lab's own (`launch`, `hosted`) serve a store on loopback
    (STORE_ENV), where the rank checks in first so that a host sees it arrive; any other (torchrun, srun) sets
    MASTER_ADDR and MASTER_PORT. A collective waits `timeout_s` for the other ranks (trainer.collective_timeout_s),
    then fails."""
    if dist.is_initialized():
        return
    _end_with_the_launcher()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend_for(device_type)
    if os.environ.get(STORE_ENV):
        host, port = os.environ[STORE_ENV].rsplit(":", 1)
        store = dist.PrefixStore(GROUP_PREFIX, dist.TCPStore(host, int(port), is_master=False, timeout=timeout))
        rank_, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store.set(f"{CHECK_IN}/{rank_}", str(os.getpid()))
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=size, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())


def follow_host() -> None:
    """In a rank started by lora_lab (`launch`'s agent, or a sweep worker's `hosted` group): end with the process
    that started it, even when that one is SIGKILLed. Its connections would break at the next collective anyway, but
    a rank still loading, or waiting at the dead store, would wait out its timeout first (JOIN_S,
    trainer.collective_timeout_s)."""
    host = os.environ.get(HOST_ENV, "")
    if host.isdigit():
        processes.die_with(int(host))


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def _end_with_the_launcher(every_s: float = 1.0) -> None:
    """A launcher that dies without ending its ranks (SIGKILL) must not leave them training as orphans: a daemon
    thread sends this rank SIGTERM (ending it as an interruption) once its parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        log.warning("the launcher (pid %d) is gone: ending this rank", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lora_lab-launcher-watch", daemon=True).start()


def leave() -> None:
    """Leave the process group (at the end of a rank's run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- the loop's helpers


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank (in place; `t` itself without a group)."""
    if not active():
        return t
    where = _collective_device()
    if t.device == where:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    moved = t.to(where)  # a host-side count under NCCL: reduced on the GPU, copied back
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return t.copy_(moved)


def agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank: a decision (a collapsed model) that must end every rank's loop alike."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank (a picklable value: a folder name); `value` itself without a group."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StoppedByMain(Exception):
    """Rank 0 stopped the run at an evaluation (its callback raised: a pruned trial, a trial taken away, the tracking
    server gone, a signal): this rank ends there too, instead of waiting in a collective rank 0 will never join. It
    writes nothing: rank 0 records how the run ended."""


def decided_by_main(callback: Any) -> None:
    """Call `callback()` (the loop's evaluation hook); across ranks, rank 0's outcome is every rank's: when it
    raises, rank 0 re-raises it and every other rank raises StoppedByMain with its first line. One broadcast per
    evaluation; without a group the callback just runs."""
    stop: Optional[BaseException] = None
    try:
        callback()
    except BaseException as exc:
        if not active():
            raise
        stop = exc
    try:
        told = from_main(None if stop is None else first_line(stop, with_type=True))
    except Exception:
        if stop is not None:  # the group broke too (a rank gone): rank 0's own reason comes first
            raise stop from None
        raise
    if stop is not None:
        raise stop
    if told is not None:
        raise StoppedByMain(f"rank 0 stopped the run: {told}")


def gather_to_main(value: T) -> Optional[list[T]]:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others and without a group."""
    if not active():
        return None
    box: Optional[list[T]] = [value] * world_size() if is_main() else None
    dist.gather_object(value, box, dst=0)
    return box


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2: every rank must then run each of its forwards (they all-gather)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(**kwargs: Any) -> Any:
    """torch.distributed.checkpoint's options for a whole (unsharded) state dict on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded (FSDP2) model's every weight, gathered on rank 0's CPU ({} on the other ranks). A collective: every
    rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=full_state())


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of `model` back to its shards (nothing for a model that is not sharded). The root stays
    gathered after a forward without backward (an evaluation: FSDP2 does not reshard the root after its forward),
    and its parameters are then transient copies: whoever reads or writes the weights between steps (a merge, a
    checkpoint) starts from the shards, which are what the next forward gathers."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def whole_trainable(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, rank 0's `model` holds each of its sharded (FSDP2) trainable parameters whole, as a plain
    tensor on its device, so code written for one process (an adapter's save, a checkpoint's trainable state) reads
    it as it is; the shards are put back on the way out. A collective: every rank enters (each parameter is gathered
    from every rank's shard); the other ranks' models are unchanged. Nothing changes for a model that is not sharded.
    The trainable parameters are the method's (small: LoRA's, a prompt's); the frozen base stays sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor

    reshard(model)  # every parameter is then its shard (a DTensor): the same order of gathers on every rank
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.requires_grad or not isinstance(param, DTensor):
                    continue
                whole = param.full_tensor().detach()  # a collective
                if is_main():
                    # as FSDP2 itself swaps a module's parameters between their shards and the gathered whole
                    module._parameters[name] = torch.nn.Parameter(whole, requires_grad=True)
                    swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Inside the block, backward reduces gradients across ranks only when `sync` (the last micro-batch of a step):
    the others accumulate locally. No-op for an unwrapped model."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    yield


# ----------------------------------------------------------------------------------------------- the wrapper


# trainer.parallel=auto's choice and why, per config, once per process (`settle_strategy`); in a process group rank 0's
# is every rank's from `wrap` on (`_agreed_strategy`).
_CHOSEN: dict[str, tuple[str, str]] = {}


def _config_key(cfg: Config) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(cfg), sort_keys=True, default=str)


def strategy(cfg: Config) -> str:
    """How the model is spread over the processes, ddp or fsdp: trainer.parallel as given; for auto the choice
    `settle_strategy` made from the memory plan in this process (the memory check makes it before the model is
    built), else by method: fsdp for a method that trains every weight (its gradients and optimizer state are the
    model's size again, twice), ddp otherwise."""
    t = cfg.trainer
    if t.parallel != "auto":
        return t.parallel
    settled = _CHOSEN.get(_config_key(cfg)) if t.devices > 1 else None
    if settled is not None:
        return settled[0]
    return "fsdp" if adaptations.of(cfg.method).trains_all else "ddp"


def settle_strategy(cfg: Config, choose: Callable[[Config], tuple[str, str]]) -> str:
    """strategy(cfg), with trainer.parallel=auto over several devices decided by `choose` (the memory plan's choice
    and why: lora_lab.train.memory.auto_strategy; this module plans nothing itself) and kept for the rest of the run
    in this process. No collective: each rank decides from its own free memory, and `wrap` makes rank 0's choice every
    rank's. Outside a group (the plan command, a launcher before its ranks start) it is decided afresh each time."""
    t = cfg.trainer
    if t.parallel != "auto" or t.devices == 1:
        return strategy(cfg)
    if not active():
        return choose(cfg)[0]
    key = _config_key(cfg)
    if key not in _CHOSEN:
        _CHOSEN[key] = choose(cfg)
    return _CHOSEN[key][0]


def _agreed_strategy(cfg: Config) -> str:
    """strategy(cfg) as every rank of the group uses it: for auto rank 0's choice (a collective, in `wrap`, where
    every rank passes at the same point), logged once with its reason. Ranks that chose differently (each measures
    its own free memory) would wrap the model differently and hang in their first collective. A rank that made no
    plan (a sweep worker hosting a trial's group runs no memory check of its own) goes by method."""
    t = cfg.trainer
    if t.parallel != "auto":
        return t.parallel
    key = _config_key(cfg)
    mine = _CHOSEN.get(key) or (strategy(cfg), f"no memory plan made by rank 0: by method={cfg.method}")
    choice, why = from_main(mine)
    _CHOSEN[key] = (choice, why)
    if is_main():
        log.info("trainer.parallel=auto: %s (%s)", choice, why)
    return choice


def fsdp_refusal(cfg: Config) -> Optional[str]:
    """Why FSDP2 cannot run `cfg` (the message trainer.parallel=fsdp is refused with), or None when it can: a
    quantized base (bitsandbytes' packed weights are no floating-point parameters FSDP2 can shard) and the chunked
    loss (it applies the output head outside the model's forward). trainer.parallel=auto never picks it then."""
    t = cfg.trainer
    if cfg.model.quantize != "none":
        return (
            f"trainer.parallel=fsdp with model.quantize={cfg.model.quantize}: FSDP2 shards floating-point "
            "parameters, and bitsandbytes' packed weights are not; use trainer.parallel=ddp"
        )
    if t.loss_chunk:
        return (
            f"trainer.parallel=fsdp with trainer.loss_chunk={t.loss_chunk}: the chunked loss applies the output head "
            "outside the model's forward, where FSDP2 has resharded it; set trainer.loss_chunk=0"
        )
    return None


def refuse(cfg: Config) -> None:
    """Raise ConfigError for a multi-process run that cannot work, before any weight loads (exit 2)."""
    t = cfg.trainer
    if launched() and t.devices != launched_world_size():
        raise ConfigError(
            f"trainer.devices={t.devices}: the launcher started WORLD_SIZE={launched_world_size()} processes; "
            "give the same number (or leave trainer.devices out)"
        )
    if t.devices == 1:
        return
    if t.parallel == "fsdp":  # auto never picks fsdp where it is refused
        why = fsdp_refusal(cfg)
        if why is not None:
            raise ConfigError(why)
    if pick_type(t.device) == "cuda" and not launched() and t.devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={t.devices}: torch sees {torch.cuda.device_count()} CUDA device(s) on this host"
        )


def pick_type(name: str) -> str:
    """The device type trainer.device names ('auto': cuda where torch sees one)."""
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def wrap(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """The model as the training steps call it: unchanged without a group; DDP (the model replicated, only the
    trainable gradients reduced) or FSDP2 (fully_shard on each repeated block, the one list targets.repeated_blocks
    finds, then on the root: parameters, gradients and optimizer state sharded). FSDP2 shards in place: build the
    optimizer after this. A frozen base shards beside the method's trainable parameters in the same units: FSDP2
    keeps requires_grad per parameter, gathers frozen and trainable weights together (of mixed dtypes under bf16: a
    frozen bf16 base, fp32 adapters) and reduce-scatters the gradients of the trainable ones only."""
    if not active():
        return model
    if _agreed_strategy(cfg) == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = targets.repeated_blocks(model)  # the blocks compile and checkpointing use too
        for _, block in blocks:
            fully_shard(block)
        fully_shard(model)  # what is left (embeddings, head, final norm): one group of its own
        log.info("FSDP2: %d repeated blocks and the root sharded over %d ranks", len(blocks), world_size())
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def group_broke(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank ended or stopped answering: its connection
    closed or reset (gloo), the group reported broken (NCCL, torch's DistError), or a wait past the group's
    timeout."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("closed by peer", "reset by peer", TIMED_OUT))
    )


TIMED_OUT = "Timed out waiting"  # gloo's words for a collective that waited past the group's timeout


def group_failure(exc: BaseException) -> Optional[str]:
    """The one-line message for a collective that failed because another rank of this run ended or stopped
    answering (group_broke), or None for any other error."""
    if not launched() or not group_broke(exc):
        return None
    how = "stopped answering" if TIMED_OUT in str(exc) else "ended first"
    return f"rank {os.environ['RANK']}: the process group broke: another rank {how} ({first_line(exc)[:300]})"


# ----------------------------------------------------------------------------------------------- the launcher


def loopback_store(timeout: datetime.timedelta) -> Any:
    """A store server (torch's TCPStore) on 127.0.0.1 and a free port, where a group's ranks meet. Given a port
    alone, TCPStore's server binds every interface: it takes a loopback socket instead, which it then owns and closes
    (detached, so that Python does not close it a second time)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fd = listener.detach()
    return dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timeout, master_listen_fd=fd
    )


def launch(argv: list[str], nprocs: int) -> int:
    """Run `python -m lora_lab.train argv` as `nprocs` processes on this host, through torch.distributed's elastic
    agent (torchrun's): no restarts, so a rank that dies ends the whole group. Everything listens on loopback: the
    agent's rendezvous and the ranks' group use a store this process serves on 127.0.0.1 (loopback_store; the agent's
    own would bind every interface), their connections the loopback interface. Returns the exit code: the ranks' own
    when they all ended alike (0, 2, 3), 128 + the signal when the launcher was interrupted (every rank is ended), 2
    when a rank refused its input first, else 1 with a message naming the rank that failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    store = loopback_store(datetime.timedelta(seconds=JOIN_S))
    environ = {
        STORE_ENV: f"127.0.0.1:{store.port}",  # the ranks join there (join), not at the agent's MASTER_PORT
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # so the agent serves no store of its own for them
        HOST_ENV: str(os.getpid()),  # the agent's ranks are this process's children: they end with it
        **LOOPBACK,
    }
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"lora_lab-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{store.port}",
        rdzv_configs={"is_host": False},  # a client of this process's store
        local_addr="127.0.0.1",  # the ranks' MASTER_ADDR: this host's loopback, never an outside interface
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        with _environment(environ):  # what the agent passes on to the ranks, for the launch only
            elastic_launch(config, entrypoint=sys.executable)("-m", "lora_lab.train", *argv)
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        if len(exc.failures) == nprocs and len(codes) == 1 and next(iter(codes)) > 0:
            return next(iter(codes))  # every rank ended the same way (bad input, diverged): its own message said why
        first = min(exc.failures.values(), key=lambda f: f.timestamp)
        if first.exitcode == 2:  # bad input one rank found first (a folder a live run owns): its message said why
            return 2
        print(f"lora_lab.train: error: {failure_message(exc)}; every other rank was ended", file=sys.stderr)
        return 1
    except SignalException as exc:
        print(
            f"lora_lab.train: interrupted by {signal.Signals(exc.sigval).name}: every rank was ended", file=sys.stderr
        )
        return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` inside the block, as it was after it: a process that goes on after a launch (a test,
    a notebook) must not hand the launch's store and host to processes it starts later."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failure_message(exc: BaseException) -> str:
    """Which rank failed first and how (an exit code, or the signal that killed it)."""
    failures = getattr(exc, "failures", {})
    if not failures:
        return str(exc)
    first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    rank_, failure = first
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    others = sorted(r for r in failures if r != rank_)
    also = f" (rank(s) {', '.join(map(str, others))} ended non-zero after it)" if others else ""
    return f"rank {rank_} (pid {failure.pid}) {how}{also}"


# ----------------------------------------------------------------------------------------------- a hosted group


# After an error, how long the hosted ranks have to end by themselves before SIGKILL: those told to stop (a pruned
# trial) end within it. One blocked in a collective may not: the wrapped model of the error's frames (DDP) still holds
# the group and its connections open, and a rank blocked in C++ takes no signal.
END_GRACE_S = 3.0
# A hosted group lives on one host: its ranks' connections (gloo's pairs, NCCL's bootstrap) listen on loopback, not on
# whatever interface the host name resolves to. Where the user set an interface, theirs stands.
LOOPBACK = {k: os.environ.get(k, "lo") for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
# How long a hosted rank may take to start and join (imports, compose) when trainer.collective_timeout_s is shorter:
# one that dies while it starts is seen at once; this bounds one that never comes.
JOIN_S = 300.0


class RankFailed(RuntimeError):
    """A rank of a hosted group died, hung or never joined while its run went on: which rank, how, and the last line
    it wrote. Raised in rank 0 (the host), from the error its own collective met."""


@contextlib.contextmanager
def hosted(argv: list[str], size: int, device_type: str, logs: Path, timeout_s: float) -> Iterator[None]:
    """Run the block as rank 0 of a `size`-process group whose other ranks are `python -m lora_lab.train argv`
    processes started here (RANK = LOCAL_RANK 1..size-1 on this host's first `size` visible devices; each writes
    its log to logs/rank-<r>.log): how a sweep trial trains over several devices while this process, its worker,
    keeps the Optuna trial and the MLflow run. Build and fit the run inside the block (trainer.devices=size).

    The ranks check in at this process's store before the group forms, so one that dies while it starts is seen at
    once; one that never checks in fails the run after JOIN_S (or `timeout_s`, if longer); a collective that waits
    `timeout_s` fails it too (a hung rank). An error in the block that a rank's end explains (the group broke)
    becomes RankFailed naming that rank; any other error passes as it is. On the way out the group is closed and
    every rank that does not end by itself (within END_GRACE_S after an error, `timeout_s` after a run that went
    well) is SIGKILLed: one blocked in a collective cannot take a signal."""
    if active():
        raise RuntimeError("hosted: this process is in a process group already")
    timeout = datetime.timedelta(seconds=timeout_s)
    server = loopback_store(timeout)
    store = dist.PrefixStore(GROUP_PREFIX, server)
    logs.mkdir(parents=True, exist_ok=True)
    ranks: dict[int, subprocess.Popen] = {}
    ok = False
    try:
        for r in range(1, size):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(size),
                "LOCAL_WORLD_SIZE": str(size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(server.port),
                STORE_ENV: f"127.0.0.1:{server.port}",
                HOST_ENV: str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
                **LOOPBACK,
                # as many threads as this rank has: the trial's share of the host's cores (sweep.workers)
                "OMP_NUM_THREADS": str(torch.get_num_threads()),
            }
            with open(logs / f"rank-{r}.log", "ab") as out:
                ranks[r] = subprocess.Popen(
                    [sys.executable, "-m", "lora_lab.train", *argv], env=env, stdout=out, stderr=subprocess.STDOUT
                )
        _await_check_in(store, ranks, logs, max(timeout_s, JOIN_S))
        if device_type == "cuda":
            torch.cuda.set_device(0)
            # NCCL's watchdog tears the whole process down on a timeout by default (3): here that is the sweep's
            # worker. 2 aborts the group's communicators only, so the collective raises and the trial fails.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        for key, value in LOOPBACK.items():
            os.environ.setdefault(key, value)
        dist.init_process_group(backend=backend_for(device_type), store=store, rank=0, world_size=size, timeout=timeout)
        log.info(
            "hosting a group of %d ranks (%s): rank 0 here, %s",
            size,
            dist.get_backend(),
            ", ".join(f"rank {r} pid {p.pid}" for r, p in ranks.items()),
        )
        try:
            yield
        except Exception as exc:
            failed = _rank_failure(exc, ranks, logs, timeout_s)
            if failed is not None:
                raise RankFailed(failed) from exc
            raise
        ok = True
    finally:
        leave()
        _end_ranks(ranks, logs, ran_well=ok, wait_s=timeout_s if ok else END_GRACE_S)
        del store, server


def group_for(cfg: Config, argv: list[str], logs: Path) -> contextlib.AbstractContextManager:
    """Where a run of `cfg` (composed from the overrides `argv`) trains when this process builds it: alone for
    trainer.devices=1; for K > 1 as rank 0 of a hosted group whose K-1 other ranks run `python -m lora_lab.train
    argv` (hosted; their logs in `logs`): a sweep's trials and comparison runs over several devices."""
    if cfg.trainer.devices == 1:
        return contextlib.nullcontext()
    return hosted(argv, cfg.trainer.devices, pick_type(cfg.trainer.device), logs, cfg.trainer.collective_timeout_s)


def _await_check_in(store: Any, ranks: dict[int, subprocess.Popen], logs: Path, timeout_s: float) -> None:
    """Wait until every rank has checked in (join), failing at once with RankFailed when one ends first, or after
    `timeout_s` naming those that never came."""
    deadline = time.monotonic() + timeout_s
    waiting = set(ranks)
    while waiting:
        waiting = {r for r in waiting if not store.check([f"{CHECK_IN}/{r}"])}
        for r in sorted(waiting):
            if ranks[r].poll() is not None:
                raise RankFailed(f"rank {r} {_how_it_ended(r, ranks[r], logs)} before it joined the group")
        if waiting and time.monotonic() > deadline:
            raise RankFailed(
                f"rank(s) {', '.join(map(str, sorted(waiting)))} did not join the group within {timeout_s:g} s "
                f"(see {logs}/rank-<r>.log)"
            )
        if waiting:
            time.sleep(0.05)


def _rank_failure(
    exc: BaseException, ranks: dict[int, subprocess.Popen], logs: Path, timeout_s: float
) -> Optional[str]:
    """Why the group broke under rank 0's error `exc`, naming the rank, when a rank's end (or silence) explains it:
    a rank that exited or was killed first, or, for a collective that timed out, the ranks still running (hung).
    None when `exc` is rank 0's own (out of memory, a pruned trial, a lost tracking server...)."""
    if not group_broke(exc):
        return None
    deadline = time.monotonic() + 2.0  # a rank that died: its exit is seen within moments of the broken connection
    while time.monotonic() < deadline:
        ended = [(r, p) for r, p in ranks.items() if p.poll() is not None]
        if ended:
            r, p = min(ended, key=lambda rp: rp[0])
            return f"rank {r} {_how_it_ended(r, p, logs)}: the trial's process group broke"
        time.sleep(0.05)
    if TIMED_OUT in str(exc) or "timed out" in str(exc).lower():
        alive = ", ".join(map(str, sorted(ranks)))
        return (
            f"rank(s) {alive} did not answer a collective within trainer.collective_timeout_s={timeout_s:g} s "
            "(hung): the trial's process group was ended"
        )
    return None


def _how_it_ended(r: int, proc: subprocess.Popen, logs: Path) -> str:
    """'(pid N) was killed by SIGKILL' or '(pid N) exited with code 1: <its last line>'."""
    code = proc.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
    last = _last_line(logs / f"rank-{r}.log")
    return f"(pid {proc.pid}) {how}" + (f": {last}" if last and code is not None and code > 0 else "")


def _last_line(path: Path) -> str:
    """The last non-empty line of a rank's log, for a message (at most 300 characters)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _end_ranks(ranks: dict[int, subprocess.Popen], logs: Path, ran_well: bool, wait_s: float) -> None:
    """Let each rank end on its own for up to `wait_s` seconds, then SIGKILL what is left and reap every one. A rank
    that ended badly after a run that went well is told in the log (the run's results are rank 0's)."""
    deadline = time.monotonic() + wait_s
    for r, p in ranks.items():
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("rank %d (pid %d) did not end within %g s: killing it", r, p.pid, wait_s)
        if p.poll() is None:
            p.kill()
        p.wait()
        if ran_well and p.returncode != 0:
            log.warning("rank %d %s after its run", r, _how_it_ended(r, p, logs))
