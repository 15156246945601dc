"""Checkpoints: resumable state every N steps, each folder with a manifest, written whole and verified on load.

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler state, the RNG states
(lora_lab.train.runtime.rng_state), the step with its history and the config it was trained with (config.json).
`Checkpointer` writes them, checks them against their manifest (size and SHA-256 of every file) and the weights'
names and shapes against the model, and restores the newest good one. A resume whose config changes what is trained
(`resume_changes`) is refused with `ResumeMismatch`, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from lora_lab import adaptations, lora, methods
from lora_lab.config import Config, ConfigError
from lora_lab.errors import first_line
from lora_lab.files import WriteError, atomic_dir, atomic_write_text
from lora_lab.train import distributed
from lora_lab.train.runtime import restore_rng_state, rng_state

log = logging.getLogger("lora_lab")

CONFIG = "config.json"  # in each checkpoint: the config it was trained with (config_record)
RANK_RNGS = "rng-ranks.pt"  # in a multi-process run's checkpoints: every rank's RNG states, in rank order

# Keys a resume may change: they say where or how the run goes, not what is trained. trainer.eval_* and
# trainer.eval_batch_size: evaluations read the model and draw no randomness; trainer.sync_every, compile,
# gradient_checkpointing, loss_chunk, pad_to_multiple, num_threads, device: how fast (or in how much memory) the same
# steps run (padding carries no loss; checkpointing and the chunked loss recompute the same values).
# trainer.max_steps is decided apart (resume_changes).
RESUME_FREE = (
    "output_dir",
    "trainer.resume",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.checkpoint_every",
    "trainer.eval_every",
    "trainer.eval_batch_size",
    "trainer.eval_at_start",
    "trainer.sync_every",
    "trainer.compile",
    "trainer.gradient_checkpointing",
    "trainer.loss_chunk",
    "trainer.pad_to_multiple",
    "trainer.device",
    "trainer.parallel",  # DDP or FSDP2 compute the same steps; a checkpoint holds the gathered whole either way
    "trainer.collective_timeout_s",  # how long a rank waits for the others, not what they compute
    "trainer.max_steps",
    # The examples per optimizer step are compared below, not how they are split into micro-batches: an
    # out-of-memory retry resumes with half the micro-batch and twice the accumulation (the same rows per step).
    "trainer.batch_size",
    "trainer.grad_accum",
)
RESUME_FREE_GROUPS = ("tracking", "export")  # where the run is recorded and what it writes at the end


class ResumeMismatch(ConfigError):
    """trainer.resume=true with a config that changes what the checkpoint was trained with: the keys that differ,
    the checkpoint's value and the new one. The command exits 2; nothing is trained."""


def config_record(cfg: Config) -> dict[str, Any]:
    """The typed config as the plain, JSON-safe dict a checkpoint keeps (config.json)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def resume_changes(saved: dict[str, Any], cfg: Config, step: int) -> list[str]:
    """What `cfg` changes against the config a checkpoint of `step` was trained with (config_record), as
    'key: checkpoint value -> new value'; [] when the resume continues the same run.

    Compared: everything that changes what is trained (method, model.*, data.*, seed, optim.*, the batch, precision,
    the method's own group; other methods' groups are unused). Free: RESUME_FREE and RESUME_FREE_GROUPS. The one
    exception is trainer.max_steps: extending a run (or ending it earlier) is a legitimate resume when the LR
    schedule does not depend on it, so a constant schedule may change it, as long as the checkpoint's step is not
    past it; under a cosine schedule every step's LR depends on it, so it must stay."""
    now, then = _flat(config_record(cfg)), _flat(saved)
    then.setdefault("trainer.devices", 1)  # a checkpoint from before trainer.devices ran on one process
    own = adaptations.of(cfg.method).group
    unused = adaptations.groups() - ({own} if own else set())
    changes = []
    for key in sorted(set(now) | set(then)):
        group = key.split(".", 1)[0]
        if key in RESUME_FREE or group in RESUME_FREE_GROUPS or (group in unused and key.count(".")):
            continue
        if now.get(key) != then.get(key):
            changes.append(f"{key}: {then.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}")
    # trainer.devices itself is compared above: each rank's share of the data and its RNG state depend on it.
    old_batch = (then.get("trainer.batch_size") or 0) * (then.get("trainer.grad_accum") or 0)
    if old_batch != cfg.trainer.batch_size * cfg.trainer.grad_accum:
        changes.append(
            f"trainer.batch_size x trainer.grad_accum: {old_batch} -> "
            f"{cfg.trainer.batch_size * cfg.trainer.grad_accum} examples per optimizer step (per process)"
        )
    old_steps, new_steps = then.get("trainer.max_steps"), cfg.trainer.max_steps
    if old_steps != new_steps:
        if cfg.optim.schedule != "constant":
            changes.append(
                f"trainer.max_steps: {old_steps!r} -> {new_steps!r} (optim.schedule={cfg.optim.schedule} sets every "
                "step's LR from max_steps; only a constant schedule may be extended)"
            )
        elif step > new_steps:
            changes.append(f"trainer.max_steps: {new_steps} is below the checkpoint's step {step}")
    return changes


def mismatch(root: Path, changes: list[str]) -> ResumeMismatch:
    """The ResumeMismatch for `changes` of the checkpoints under `root`."""
    return ResumeMismatch(
        f"trainer.resume=true: the checkpoint in {root} was trained with other settings: {'; '.join(changes)}. "
        "Resume with the checkpoint's settings, or give another output_dir to start afresh"
    )


def check_resume(root: Path, cfg: Config) -> None:
    """Before a resumed run starts anything: raise ResumeMismatch when `cfg` changes what the newest checkpoint
    under `root` (that has a readable config.json and manifest) was trained with. Checkpoints from before
    config.json, or none at all, pass (the loop decides again on the one it loads)."""
    for path in Checkpointer.candidates_in(root):
        try:
            saved = json.loads((path / CONFIG).read_text())
            step = int(json.loads((path / Checkpointer.MANIFEST).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        changes = resume_changes(saved, cfg, step)
        if changes:
            raise mismatch(root, changes)
        return


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
        cfg: Optional[Config] = None,
    ) -> None:
        self.root, self.model, self.optimizer, self.scheduler, self.full = root, model, optimizer, scheduler, full
        self.cfg = cfg  # the run's config: kept in each checkpoint, compared on resume (None: neither)
        self.loaded: Optional[Path] = None  # the checkpoint load_latest() resumed from
        # FSDP2 (lora_lab.train.distributed.wrap): every rank holds a shard; a checkpoint holds the gathered whole
        self.sharded = distributed.is_sharded(model)

    def latest_path(self) -> Optional[Path]:
        """The checkpoint resumed from, else the one LATEST names (None when there is none)."""
        if self.loaded is not None:
            return self.loaded
        marker = self.root / "LATEST"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def _weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model (`_held`), whole on the rank that writes it. Sharded (FSDP2): a
        collective, every rank calls it, {} on the other ranks: under full fine-tuning the full state dict gathered
        on rank 0's CPU (every key of the model's state dict), else the trainable parameters gathered whole on rank
        0 (distributed.whole_trainable), the keys of a 1-process run's checkpoint."""
        if self.sharded and self.full:
            return distributed.gathered_state_dict(self.model)
        if not self.sharded:
            return self._held()
        with distributed.whole_trainable(self.model):
            return self._held() if distributed.is_main() else {}

    def _held(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the model, as the model has it: every tensor under full fine-tuning (tied ones
        once), else what trains (under FSDP2 each a DTensor of its global shape, unless gathered whole)."""
        if self.full:  # tied weights share storage; safetensors wants each stored once
            seen, unique = set(), {}
            for k, v in self.model.state_dict().items():
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    unique[k] = v.detach().contiguous()
            return unique
        if methods.method_of(self.model) is not None:  # BitFit, IA3, adapters, prompt, prefix: what trains
            return {k: v.detach().contiguous() for k, v in self.model.named_parameters() if v.requires_grad}
        return {k: v.detach().contiguous() for k, v in lora.lora_state_dict(self.model).items()}

    def save(self, step: int, history: list, evals: list, rank_rngs: Optional[list[dict[str, Any]]] = None) -> Path:
        """Write the checkpoint of `step` (with the run's history and evaluations so far), point LATEST at it and
        remove the previous one; returns its folder. `rank_rngs`: every rank's RNG states, in rank order (a
        multi-process run; rank 0 writes). On a full disk: a WriteError that says which checkpoint is kept (the
        previous one stays whole, no temp file is left)."""
        from safetensors.torch import save_file

        weights, optimizer = self._weights(), self._optimizer_state()  # collectives when sharded: on every rank
        if rank_rngs is None:
            rank_rngs = distributed.gather_to_main(rng_state())  # every rank's (None for one process)
        if not distributed.is_main():  # every rank's state is gathered: rank 0 writes it
            return self.root / f"step-{step:07d}"
        name = f"step-{step:07d}"
        previous = self.latest_path()
        try:
            with atomic_dir(self.root / name) as tmp:
                save_file(weights, str(tmp / "weights.safetensors"))
                torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}, tmp / "optim.pt")
                torch.save(rng_state(), tmp / "rng.pt")
                if rank_rngs is not None:  # each rank draws its own dropout masks: each resumes its own stream
                    torch.save({"ranks": rank_rngs}, tmp / RANK_RNGS)
                (tmp / "state.json").write_text(json.dumps({"step": step, "history": history, "evals": evals}))
                if self.cfg is not None:
                    (tmp / CONFIG).write_text(json.dumps(config_record(self.cfg), indent=1))
                files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
                (tmp / self.MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        except WriteError as exc:
            kept = (
                f"the last good checkpoint {previous} is kept: trainer.resume=true resumes from it"
                if previous is not None
                else "no earlier checkpoint was kept"
            )
            raise WriteError(self.root / name, exc.cause, kept) from None
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
        try:
            atomic_write_text(dest / "REASON", reason + "\n")
        except WriteError as exc:  # a full disk: the rename already keeps it from being loaded again
            log.warning("checkpoint %s: could not write its REASON (%s)", dest, exc)
        log.warning("checkpoint %s: %s; set aside as %s", path, reason, dest)
        return dest

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: the one LATEST names, then any other complete one left behind."""
        return self.candidates_in(self.root)

    @staticmethod
    def candidates_in(root: Path) -> list[Path]:
        """Checkpoint folders under `root`, newest first: the one LATEST names, then any other complete one."""
        named = []
        marker = root / "LATEST"
        if marker.is_file():
            named = [root / marker.read_text().strip()]
        others = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)
        return [p for p in dict.fromkeys(named + others) if p.is_dir()]

    def load_latest(self) -> Optional[dict[str, Any]]:
        """Restore the newest good checkpoint (weights, optimizer, scheduler, RNG) and return its state.json; None
        when there is none (start at step 0). Bad ones on the way are set aside. Raises ResumeMismatch when the
        run's config changes what that checkpoint was trained with (the checkpoint is good: it stays)."""
        for path in self.candidates():
            problem = self.verify(path)
            if not problem:
                self._check_config(path)
                try:
                    state = self._load(path)
                except Exception as exc:  # noqa: BLE001 - a checkpoint that passes its manifest but does not load
                    problem = f"does not load: {first_line(exc, with_type=True)[:300]}"
                else:
                    self.loaded = path
                    return state
            self.set_aside(path, problem)
        return None

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict; sharded, the full one gathered on rank 0 (keyed by parameter name)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer, options=distributed.full_state())
        return self.optimizer.state_dict()

    def resume(self) -> Optional[dict[str, Any]]:
        """load_latest() for a run of any number of processes: rank 0 picks the newest good checkpoint (setting bad
        ones aside, refusing another config), every rank then loads that one. None: start at step 0."""
        if not distributed.active():
            return self.load_latest()
        chosen = self.choose() if distributed.is_main() else None
        chosen = distributed.from_main(chosen)
        return None if chosen is None else self.load(chosen, verified=True)

    def choose(self) -> Optional[Path]:
        """The newest checkpoint that passes its manifest (failing ones set aside), checked against the run's
        config (ResumeMismatch); None when there is none."""
        for path in self.candidates():
            problem = self.verify(path)
            if not problem:
                self._check_config(path)
                return path
            self.set_aside(path, problem)
        return None

    def load(self, path: Path, verified: bool = False) -> dict[str, Any]:
        """Restore the checkpoint at `path` (the one rank 0 chose: the other ranks of a multi-process run load the
        same; `verified`: rank 0 checked its manifest and config already); ValueError when it fails its manifest or
        does not load."""
        if not verified:
            problem = self.verify(path)
            if problem:
                raise ValueError(f"checkpoint {path}: {problem}")
            self._check_config(path)
        state = self._load_sharded(path) if self.sharded else self._load(path)
        self.loaded = path
        return state

    def _check_config(self, path: Path) -> None:
        if self.cfg is None or not (path / CONFIG).is_file():
            return  # a checkpoint from before config.json: nothing to compare with
        saved = json.loads((path / CONFIG).read_text())
        changes = resume_changes(saved, self.cfg, int(json.loads((path / self.MANIFEST).read_text())["step"]))
        if changes:
            raise mismatch(self.root, changes)

    def fit_problem(self, weights: dict[str, torch.Tensor]) -> str:
        """'' when `weights` (a checkpoint's) are exactly what this model's checkpoint holds, names and shapes;
        else what differs (the missing tensors first: a checkpoint missing a layer must not load)."""
        # sharded: the parameters' global shapes, without gathering them
        held = self.model.state_dict() if self.sharded and self.full else self._held()
        want = {k: tuple(v.shape) for k, v in held.items()}
        got = {k: tuple(v.shape) for k, v in weights.items()}
        missing = [k for k in want if k not in got]
        unexpected = [k for k in got if k not in want]
        shapes = [f"{k} {got[k]} (the model's {want[k]})" for k in want if k in got and got[k] != want[k]]
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:3])}{more}")
        return "does not fit this model: " + "; ".join(parts) if parts else ""

    def _load(self, path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        # Everything is checked before the model is touched: a checkpoint that fails half-way must not leave its
        # weights in a model that then resumes from an older one (or from step 0).
        weights = load_file(str(path / "weights.safetensors"))
        problem = self.fit_problem(weights)
        if problem:
            raise ValueError(problem)
        state = torch.load(path / "optim.pt", weights_only=True)  # never unpickle arbitrary objects
        rng = torch.load(path / "rng.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])  # checks its groups against the optimizer's first
        self.scheduler.load_state_dict(state["scheduler"])
        self.model.load_state_dict(weights, strict=False)  # strict on what the checkpoint holds: fit_problem
        restore_rng_state(rng)
        self._restore_rank_rng(path)
        return json.loads((path / "state.json").read_text())

    def _restore_rank_rng(self, path: Path) -> None:
        if (path / RANK_RNGS).is_file():
            ranks = torch.load(path / RANK_RNGS, weights_only=True)["ranks"]
            if len(ranks) == distributed.world_size():  # another count is refused before (trainer.devices)
                restore_rng_state(ranks[distributed.rank()])

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """Load a gathered checkpoint into the FSDP2-sharded model: rank 0 reads the whole and checks it, every rank
        takes its shards of it (broadcast from rank 0), then its own RNG state. A frozen base's checkpoint holds what
        trains only (fit_problem checked its names and shapes): the base keeps its weights."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        main = distributed.is_main()
        weights = load_file(str(path / "weights.safetensors")) if main else {}
        state = torch.load(path / "optim.pt", weights_only=True) if main else {"optimizer": {}, "scheduler": None}
        problem = distributed.from_main(self.fit_problem(weights) if main else "")
        if problem:
            raise ValueError(problem)
        options = distributed.full_state(broadcast_from_rank0=True, strict=self.full)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(distributed.from_main(state["scheduler"]))
        restore_rng_state(torch.load(path / "rng.pt", weights_only=True))
        self._restore_rank_rng(path)
        return json.loads((path / "state.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
