"""Evaluation: validation loss and accuracy, with one scorer per data format; the probe rows; sequence log-probs.

`Evaluator.evaluate(model)` walks the validation rows in batches of similar length and hands each batch to the
scorer of the task's data format (`SCORERS`): classification (a head's logits), prompted (the label words'
log-probabilities), chat and text (the labelled tokens' log-probabilities). The sums stay on the device, so an
evaluation costs one host sync. Each evaluation keeps the logits of its first rows (the probe): the merge check
compares the final evaluation's probe with the merged model's, at no extra forward.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from lora_lab.train import distributed
from lora_lab.train.batches import prompt_batch, to_device
from lora_lab.train.loss import head_returns_hidden
from lora_lab.train.runtime import Clock, autocast, eager_when

PROBE_ROWS = 8  # validation rows whose logits the merged-vs-unmerged check compares


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label token) over positions whose label is not -100, and how many such positions.

    logits (B, T, V) predict the next token, so position t scores labels[:, t + 1], as in transformers' loss.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (logp * mask).sum(dim=1), mask.sum(dim=1)


class Sums:
    """One evaluation's running sums, on the device: summed loss, the tokens (or rows) it is over, correct rows."""

    def __init__(self, device: torch.device) -> None:
        self.loss, self.tokens, self.correct = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))


# ----------------------------------------------------------------------------------------------- scorers


def score_classes(ev: Evaluator, model: torch.nn.Module, rows: list[dict], sums: Sums) -> None:
    """classification: cross-entropy of the head's logits per row; correct when the argmax is the label."""
    from lora_lab.data import collate

    batch = to_device(collate(rows, ev.data.pad_id), ev.device)
    logits = ev.forward_logits(model, batch).float()  # (B, K)
    ev.keep_probe(logits)
    sums.loss += F.cross_entropy(logits, batch["labels"], reduction="sum")
    sums.tokens += len(rows)
    sums.correct += (logits.argmax(-1) == batch["labels"]).sum()


def score_label_words(ev: Evaluator, model: torch.nn.Module, rows: list[dict], sums: Sums) -> None:
    """prompted: the log-probability of each label word after the prompt; the true word's is the loss (no extra
    forward), the most likely word the answer."""
    truth = torch.tensor([r["class_label"] for r in rows]).to(ev.device, non_blocking=True)  # (B,)
    if all(len(w) == 1 for w in ev.data.label_token_ids):
        _score_one_token_words(ev, model, rows, truth, sums)
    else:
        _score_word_sequences(ev, model, rows, truth, sums)


def _score_one_token_words(
    ev: Evaluator, model: torch.nn.Module, rows: list[dict], truth: torch.Tensor, sums: Sums
) -> None:
    # One-token label words: one forward over the prompts scores them all. Left padding puts every prompt's last
    # token at the same position, so the head runs on that position only (the vocabulary projection dominates small
    # models' cost).
    words = torch.tensor([w[0] for w in ev.data.label_token_ids]).to(ev.device, non_blocking=True)  # (K,)
    logits = ev.last_token_logits(model, rows)  # (B, V)
    ev.keep_probe(logits)
    logp = torch.log_softmax(logits, dim=-1)[:, words]  # (B, K)
    sums.loss -= logp.gather(1, truth[:, None]).sum()
    sums.tokens += len(rows)
    sums.correct += (logp.argmax(1) == truth).sum()


def _score_word_sequences(
    ev: Evaluator, model: torch.nn.Module, rows: list[dict], truth: torch.Tensor, sums: Sums
) -> None:
    # Label words of several tokens: one right-padded forward per word, prompt + word, loss on the word's tokens.
    from lora_lab.data import collate

    scores = []
    for k, word_ids in enumerate(ev.data.label_token_ids):
        batch = to_device(collate(rows, ev.data.pad_id, candidate=word_ids), ev.device)
        lp, cnt = ev.token_logprobs(model, batch, probe=k == 0)  # (B,), (B,)
        scores.append(lp)
        is_true = truth == k
        sums.loss -= torch.where(is_true, lp, 0.0).sum()
        sums.tokens += torch.where(is_true, cnt, 0).sum()
    sums.correct += (torch.stack(scores, dim=1).argmax(1) == truth).sum()


def score_tokens(ev: Evaluator, model: torch.nn.Module, rows: list[dict], sums: Sums) -> None:
    """chat, text: the log-probability of every labelled token (token-weighted); no accuracy."""
    from lora_lab.data import collate

    batch = to_device(collate(rows, ev.data.pad_id), ev.device)
    lp, cnt = ev.token_logprobs(model, batch)
    sums.loss -= lp.sum()
    sums.tokens += cnt.sum()


@dataclass(frozen=True)
class Scorer:
    """How one data format's validation rows are scored: `score` adds a batch of rows to the sums; `accuracy` says
    whether the format has classes to be right about (then the evaluation reports accuracy too)."""

    score: Callable[[Evaluator, torch.nn.Module, list[dict], Sums], None]
    accuracy: bool


SCORERS: dict[str, Scorer] = {
    "classification": Scorer(score_classes, accuracy=True),
    "prompted": Scorer(score_label_words, accuracy=True),
    "chat": Scorer(score_tokens, accuracy=False),
    "text": Scorer(score_tokens, accuracy=False),
}


# ----------------------------------------------------------------------------------------------- evaluator


class Evaluator:
    """Evaluates a model on a task's validation rows, with the scorer of the task's data format.

    Holds no model (each call gets it), only what the rows and the run fix: the device and autocast dtype, the
    batch size, the rows in length order (computed on first use), the latest evaluation's probe logits, and the
    session's clock, which every evaluation and latency measurement adds its time to. `compiled`: the model's
    blocks are compiled for training; evaluations run eager (runtime.eager_when).
    """

    def __init__(
        self,
        data: Any,
        device: torch.device,
        dtype: Optional[torch.dtype],
        batch_size: int,
        compiled: bool,
        clock: Clock,
        loss_chunk: int = 0,
    ) -> None:
        if data.format not in SCORERS:
            raise ValueError(f"data.format: no scorer for {data.format!r}; expected one of {sorted(SCORERS)}")
        self.data, self.device, self.dtype, self.batch_size, self.compiled = data, device, dtype, batch_size, compiled
        self.scorer = SCORERS[data.format]
        self.clock = clock
        self.loss_chunk = loss_chunk  # trainer.loss_chunk: token scoring computes this many positions' logits at once
        # Logits of the first validation rows from the latest evaluation: the merged-vs-unmerged check compares the
        # final evaluation's probe with the merged evaluation's, so the check costs no forward of its own.
        self.probe_logits: Optional[torch.Tensor] = None
        self._order: Optional[list[int]] = None  # validation rows by length, computed on first use
        self._rows: list[dict] = []
        self._probe_inputs_differ = False  # whether the probe rows are not all the same input (set with the order)

    def forward_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits for a collated batch on the device, under the run's autocast."""
        with autocast(self.device, self.dtype):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def token_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], probe: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sequence_logprobs of the model on a collated batch, keeping the batch's probe when `probe`. Under
        trainer.loss_chunk the head runs on `loss_chunk` labelled positions at a time, so the batch's (B, T, V)
        logits never exist at once, and the probe is the last loss_chunk // rows positions of each probe row."""
        if not self.loss_chunk:
            logits = self.forward_logits(model, batch)  # (B, T, V)
            if probe:
                self.keep_probe(logits)
            return sequence_logprobs(logits, batch["labels"])
        labels = batch["labels"]
        with head_returns_hidden(model) as (head, seen):
            self.forward_logits(model, batch)
        # (B, T, H): the head's input at the input's positions (prompt tuning's virtual tokens dropped, as the
        # model's own logits drop them)
        hidden = seen.input[:, -labels.shape[1] :]
        b, t, _ = hidden.shape
        if probe and self.probe_logits is None:
            # The last positions of each probe row: a causal LM's output there depends on the whole row (its first
            # positions see the same few prompt tokens in every row, which would read as a collapsed model).
            rows = min(PROBE_ROWS, b)
            with autocast(self.device, self.dtype):
                self.keep_probe(head(hidden[:rows, -max(1, self.loss_chunk // rows) :]))  # (rows, P, V)
        target = labels[:, 1:].reshape(-1)  # position t scores token t + 1
        row = torch.arange(b, device=hidden.device).repeat_interleave(t - 1)
        scored = (target != -100).nonzero().squeeze(1)
        states = hidden[:, :-1].reshape(b * (t - 1), -1).index_select(0, scored)  # (N, H)
        target, row = target.index_select(0, scored), row.index_select(0, scored)
        lp = torch.zeros(b, dtype=torch.float32, device=hidden.device)
        for start in range(0, target.numel(), self.loss_chunk):
            end = start + self.loss_chunk
            with autocast(self.device, self.dtype):
                logits = head(states[start:end])  # (n, V)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[start:end, None]).squeeze(-1)
            lp.index_add_(0, row[start:end], logp)
        return lp, (labels[:, 1:] != -100).sum(dim=1)

    def last_token_logits(self, model: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
        """Next-token logits after each row's prompt, (B, V) in fp32: prompts left-padded, positions from the mask."""
        ids, mask, positions = prompt_batch(rows, self.data.pad_id, self.device)
        with autocast(self.device, self.dtype):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    def keep_probe(self, logits: torch.Tensor) -> None:
        """Keep the first evaluation batch's logits (at most PROBE_ROWS rows, fp32) as this evaluation's probe."""
        if self.probe_logits is None:
            self.probe_logits = logits[:PROBE_ROWS].detach().float().clone()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation loss (token-weighted mean) and, where the task has labels, accuracy."""
        t0 = time.perf_counter()
        try:
            with eager_when(self.compiled):
                return self._evaluate(model)
        finally:
            self.clock.eval_s += time.perf_counter() - t0

    @torch.no_grad()
    def _evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        sums = Sums(self.device)
        n_rows = 0
        self.probe_logits = None
        if self._order is None:
            # Rows as plain dicts once (a datasets row lookup per row per evaluation adds up); batches of similar
            # lengths pad less (a quarter fewer tokens on the default task); the sums do not depend on the order.
            self._rows = list(self.data.val)
            lengths = [len(r["input_ids"]) for r in self._rows]
            self._order = sorted(range(len(lengths)), key=lengths.__getitem__)
            probe = [self._rows[i] for i in self._order[: min(PROBE_ROWS, self.batch_size)]]
            self._probe_inputs_differ = len({tuple(r.get("prompt_ids") or r["input_ids"]) for r in probe}) > 1
        order, bs = self._order, self.batch_size
        starts = list(range(0, len(order), bs))
        # Across ranks each scores every world-th batch (rank 0 the first: its probe is the 1-process run's), and
        # the sums are reduced once. A sharded model all-gathers in every forward, so there every rank runs as many
        # batches: one that has run out scores batch 0 again into sums it drops (as does a rank left without any
        # batch, so that it has a probe too).
        world, rank = distributed.world_size(), distributed.rank()
        mine = starts[rank::world]
        n_batches = -(-len(starts) // world) if distributed.is_sharded(model) else max(1, len(mine))
        for k in range(n_batches if starts else 0):
            real = k < len(mine)
            start = mine[k] if real else starts[0]
            rows = [self._rows[i] for i in order[start : start + bs]]
            n_rows += len(rows) if real else 0
            self.scorer.score(self, model, rows, sums if real else Sums(self.device))
        model.train(was_training)
        totals = torch.stack([sums.loss, sums.tokens, sums.correct, torch.full_like(sums.loss, n_rows)])
        loss_sum, n_tokens, correct, n_rows = distributed.all_reduce_sum(totals).tolist()  # the one sync
        out = {"val_loss": loss_sum / max(1, n_tokens)}
        if self.scorer.accuracy:
            out["accuracy"] = correct / max(1, n_rows)
        return out

    def collapsed(self) -> bool:
        """Whether the latest evaluation gave every probe row the same logits although the rows are different
        inputs: the model's output no longer depends on its input (weights blown up into constant activations).
        Any working model, the random tiny one included, tells different inputs apart."""
        probe = self.probe_logits
        if probe is None or not self._probe_inputs_differ or probe.shape[0] < 2:
            return False
        spread = (probe - probe[:1]).abs().max().item()
        return spread <= 1e-6 * max(1.0, probe.abs().max().item())

    def latency(self, model: torch.nn.Module, repeats: int = 3) -> float:
        """Median seconds of one eval-mode forward over the first batch_size validation rows (right-padded, full
        logits): the inference cost of the model as it stands (merged where the caller merged it). Counted as
        evaluation time, so a sweep's share of time outside training and evaluation keeps meaning overhead."""
        t0 = time.perf_counter()
        try:
            with eager_when(self.compiled):
                return self._latency(model, repeats)
        finally:
            self.clock.eval_s += time.perf_counter() - t0

    @torch.no_grad()
    def _latency(self, model: torch.nn.Module, repeats: int) -> float:
        from lora_lab.data import collate

        rows = [row for _, row in zip(range(self.batch_size), self.data.val)]
        batch = to_device(collate(rows, self.data.pad_id), self.device)
        batch.pop("labels", None)
        was_training = model.training
        model.eval()
        times = []
        try:
            for _ in range(repeats + 1):  # the first call warms caches and is left out
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self.forward_logits(model, batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
        finally:
            model.train(was_training)
        return statistics.median(times[1:])
