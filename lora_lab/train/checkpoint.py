"""Checkpoints: resumable state every N steps, each folder with a manifest, written whole and verified on load.

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler state, the RNG states
(lora_lab.train.runtime.rng_state) and the step with its history. `Checkpointer` writes them, checks them against
their manifest (size and SHA-256 of every file) and restores the newest good one.
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

from lora_lab import lora, methods
from lora_lab.files import atomic_dir, atomic_write_text
from lora_lab.train.runtime import restore_rng_state, rng_state

log = logging.getLogger("lora_lab")


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
        """The checkpoint resumed from, else the one LATEST names (None when there is none)."""
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
        """Write the checkpoint of `step` (with the run's history and evaluations so far), point LATEST at it and
        remove the previous one; returns its folder."""
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
            torch.save(rng_state(), tmp / "rng.pt")
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
        restore_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
