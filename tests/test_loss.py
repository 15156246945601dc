"""trainer.loss_chunk (lora_lab/train/loss.py): the causal-LM loss computed a chunk of labelled positions at a time
gives the model's own loss and gradients, never keeps the whole batch's logits for backward, trains a run to the
same losses, and is refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TINY_RUN

from lora_lab.config import ConfigError, compose
from lora_lab.train.build import build, build_and_fit
from lora_lab.train.loss import chunked_loss, model_loss

TINY = [*TINY_RUN, "tracking=off", "trainer.max_steps=4", "trainer.eval_every=4"]


def _session(tmp_path: Path, *extra: str):
    _, cfg = compose([*TINY, f"output_dir={tmp_path / 'run'}", *extra])
    return build(cfg)


def _batch(vocab: int, b: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -3:] = 0  # a padded row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[1, :5] = -100  # a prompt that carries no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("method", ["lora", "full", "prompt"])
def test_the_chunked_loss_is_the_models_own_loss_with_the_same_gradients(method: str, tmp_path: Path) -> None:
    session = _session(tmp_path, f"method={method}")
    model = session.model.train()
    batch = _batch(model.config.vocab_size)
    torch.manual_seed(1)
    want, want_grads = _loss_and_grads(model, lambda m, b: model_loss(m, m, b), batch)
    torch.manual_seed(1)
    got, got_grads = _loss_and_grads(model, lambda m, b: chunked_loss(m, b, chunk=5), batch)
    assert got == pytest.approx(want, rel=1e-6)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-5, atol=1e-7), name
    if method == "full":  # the head trains (tied to the embedding): its gradient came through the chunks
        assert any("embed" in n or "lm_head" in n for n in got_grads)
    # The head is back in place after each call.
    assert type(model.get_output_embeddings()).__name__ != "Identity"
    session.close()


def test_no_tensor_of_the_whole_batchs_logits_is_kept_for_backward(tmp_path: Path) -> None:
    session = _session(tmp_path)
    model = session.model.train()
    batch = _batch(model.config.vocab_size, b=4, t=32)
    whole = 4 * 32 * model.config.vocab_size  # (B, T, V)

    vocab = model.config.vocab_size

    def largest_logits_saved(fn) -> int:
        """Values of the largest tensor over the vocabulary that backward keeps."""
        sizes = [0]

        def pack(x: torch.Tensor) -> torch.Tensor:
            if x.dim() and x.shape[-1] == vocab:
                sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(model, batch)
        return max(sizes)

    assert (
        largest_logits_saved(lambda m, b: model_loss(m, m, b)) >= whole
    )  # transformers keeps the fp32 logits (and their log-softmax)
    assert largest_logits_saved(lambda m, b: chunked_loss(m, b, chunk=16)) == 0  # each chunk's are recomputed
    session.close()


@pytest.mark.parametrize("fmt", ["prompted", "text"])
def test_a_run_with_a_chunked_loss_trains_and_evaluates_to_the_same_numbers(fmt: str, tmp_path: Path) -> None:
    # prompted: the tiny task's label words are several tokens each (one forward per word, token scoring); text:
    # every position scored. Training and evaluation both chunk; the merge check's probe is chunked too.
    runs = {}
    for chunk in (0, 7):
        args = [*TINY, f"data.format={fmt}", f"trainer.loss_chunk={chunk}", f"output_dir={tmp_path / str(chunk)}"]
        runs[chunk] = build_and_fit(compose(args)[1])
    assert runs[7].completed and len(runs[7].history) == len(runs[0].history) == 4
    for a, b in zip(runs[0].history, runs[7].history):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
    assert runs[7].val_loss == pytest.approx(runs[0].val_loss, rel=1e-5)
    assert runs[7].merged_val_loss == pytest.approx(runs[0].merged_val_loss, rel=1e-5)
    assert runs[7].merge_ok and runs[7].max_abs_logit_diff < 1e-4
    if fmt == "prompted":
        assert runs[7].accuracy == runs[0].accuracy


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_token_scoring_in_chunks_gives_the_full_logits_scores(method: str, tmp_path: Path) -> None:
    session = _session(tmp_path, f"method={method}")
    model, ev = session.model.eval(), session.evaluator
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        want_lp, want_n = ev.token_logprobs(model, batch, probe=False)
        ev.loss_chunk = 5
        rows: list[int] = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0][..., 0].numel()))
        got_lp, got_n = ev.token_logprobs(model, batch, probe=False)
        hook.remove()
    assert torch.equal(got_n, want_n) and int(want_n.sum()) > 5
    assert torch.allclose(got_lp, want_lp, rtol=1e-5, atol=1e-6)
    assert rows and max(rows) <= 5  # the head never saw more than one chunk of positions
    session.close()


def test_a_chunked_loss_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.loss_chunk=8: .*model.task=seq_cls"):
        compose([*TINY, "model.task=seq_cls", "data.format=classification", "trainer.loss_chunk=8"])
    with pytest.raises(ConfigError, match="trainer.loss_chunk: an integer >= 0|trainer.loss_chunk.*>= 0"):
        compose([*TINY, "trainer.loss_chunk=-1"])
    # A model whose forward transforms the head's output (Gemma 2's soft-capping) is refused before training.
    from lora_lab.train.loss import check_chunkable

    session = _session(tmp_path)
    session.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        check_chunkable(session.model)
    session.close()
