"""The Session: a built model with its data, device and role, ready to train; `fit()` runs the loop, then finishes.

session = build(cfg)            # lora_lab.train.build: model, data, method applied; every input error here
result = session.fit(on_eval)   # lora_lab.train.loop, then lora_lab.train.finish: merge check, export, record
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from lora_lab import lora
from lora_lab.config import Config
from lora_lab.records import Identity, RunRecord, Settings
from lora_lab.train import distributed
from lora_lab.train.evaluate import Evaluator
from lora_lab.train.finish import RunRole, assemble_record, conclude, identity_of, settings_of, write_metrics
from lora_lab.train.loop import EvalCallback, TrainingLoop, make_optimizer
from lora_lab.train.runtime import Clock, autocast_dtype, free_memory


class Session:
    """A model, its data and its optimizer, ready to train. Built by `build()`; `fit()` runs it once.

    `role` says who the run is (a plain run, a sweep trial, a comparison run) and which overrides made it: given
    when the session is made, never set on it afterwards."""

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
        role: Optional[RunRole] = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.device = device
        self.wrapped = wrapped
        self.setup_time_s = setup_time_s
        self.output_dir = output_dir
        self.role = role or RunRole()
        self.counts = lora.count_parameters(model)
        self.autocast_dtype = autocast_dtype(cfg.trainer.precision, device)
        self.clock = Clock()
        t = cfg.trainer
        self.evaluator = Evaluator(
            data, device, self.autocast_dtype, t.eval_batch_size, t.compile, self.clock, loss_chunk=t.loss_chunk
        )

    @property
    def train_time_s(self) -> float:
        """Seconds of optimizer steps so far: readable after a fit that ended in an exception (pruned)."""
        return self.clock.train_s

    @property
    def eval_time_s(self) -> float:
        """Seconds of evaluation so far (evaluations, the merge check, latency)."""
        return self.clock.eval_s

    def evaluate(self) -> dict[str, float]:
        """Validation loss (token-weighted mean) and, where the task has labels, accuracy."""
        return self.evaluator.evaluate(self.model)

    def inference_latency(self, repeats: int = 3) -> float:
        """Median seconds of one eval-mode forward over the first eval_batch_size validation rows."""
        return self.evaluator.latency(self.model, repeats)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The run's optimizer and LR schedule (lora_lab.train.loop.make_optimizer)."""
        return make_optimizer(self.model, self.cfg)

    def fit(self, on_eval: Optional[EvalCallback] = None) -> RunRecord:
        """Train for trainer.max_steps (resuming from the last checkpoint if asked), evaluate every eval_every steps,
        then merge and evaluate the merged model (LoRA), write the run's files and return what was measured."""
        loop = TrainingLoop(self.cfg, self.model, self.data, self.evaluator, self.clock, self.output_dir)
        trained = loop.run(on_eval)
        ending = conclude(self.cfg, self.model, self.tokenizer, self.evaluator, trained, self.output_dir)
        record = assemble_record(
            trained,
            ending,
            counts=self.counts,
            clock=self.clock,
            setup_time_s=self.setup_time_s,
            identity=self.identity(),
            settings=self.settings(),
        )
        if distributed.is_main():  # one metrics.json per run, whatever the number of processes
            write_metrics(record, self.output_dir)
        return record

    def identity(self) -> Identity:
        """The run's identity record (records.Identity)."""
        return identity_of(self.cfg, self.role, self.device, self.output_dir)

    def settings(self) -> Settings:
        """The settings a person chose (records.Settings)."""
        return settings_of(self.cfg, list(self.role.overrides))

    def close(self) -> None:
        """Free the model, optimizer state and caches (a sweep runs many sessions in one process)."""
        self.model = None
        free_memory()
