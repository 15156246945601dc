"""Model shapes and the FLOP model: named Llama shapes as transformers configs, the one tiny shape, FLOPs per step.

A leaf (transformers configs, lora_lab.config): bench builds its models from these shapes, report counts parameters
and FLOPs with them, models builds `model=tiny` from `tiny_config`; the memory plan reads the published shapes
(PUBLISHED_SHAPES) on the meta device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from lora_lab.config import TinyModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig

# The tiny model's vocabulary: models.tiny_tokenizer's 256 byte ids, then <|endoftext|>, <|im_start|>, <|im_end|>
# (tests/test_shapes.py holds the two to each other).
TINY_VOCAB_SIZE = 259
TINY_MAX_POSITIONS = 512
TINY_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")  # model.tiny.<key>


def tiny_fields(tiny: Optional[TinyModelConfig] = None, vocab_size: int = TINY_VOCAB_SIZE) -> dict[str, Any]:
    """LlamaConfig fields of `model=tiny` with the shape `tiny` (default: conf/model/tiny.yaml's)."""
    t = tiny or TinyModelConfig()
    return dict(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=TINY_MAX_POSITIONS,
    )


def tiny_config(tiny: Optional[TinyModelConfig] = None, vocab_size: int = TINY_VOCAB_SIZE, **extra: Any) -> LlamaConfig:
    """The LlamaConfig of `model=tiny` (models builds the tiny model from it); `extra`: token ids, num_labels."""
    from transformers import LlamaConfig

    return LlamaConfig(**tiny_fields(tiny, vocab_size), **extra)


_SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)
_LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
# LlamaConfig fields of each named shape (random weights: speed, not quality). deep-narrow is SmolLM2's 30 layers at
# width 64, where host work dominates the step as it does on a GPU: the CPU proxy for launch-bound training.
SHAPE_FIELDS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _SMOLLM2,
    "deep-narrow": {
        **_SMOLLM2,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "llama-1b": _LLAMA_1B,  # Llama-3.2-1B
    "llama-8b": {
        **_LLAMA_1B,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "tie_word_embeddings": False,
    },  # Llama-3.1-8B
    "tiny": tiny_fields(),  # model=tiny's shape, vocabulary and context
}
_LLAMA_1 = dict(  # LLaMA-1 / Llama-2: multi-head attention (kv heads = heads), a 32,000-token vocabulary, untied head
    vocab_size=32000,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
# The published configurations of the QLoRA and torchtune memory figures (docs/memory.md): their real dims, for the
# memory plan (built on the meta device only: nothing this size is ever materialised here).
PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        **_LLAMA_1,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama-65b": {  # LLaMA-65B (Touvron et al. 2023), QLoRA's largest
        **_LLAMA_1,
        "max_position_embeddings": 2048,
        "hidden_size": 8192,
        "intermediate_size": 22016,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
    },
    "llama-3.2-3b": {
        **_LLAMA_1B,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
    },
    "llama-3.1-70b": {
        **_LLAMA_1B,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}
SHAPE_FIELDS.update(PUBLISHED_SHAPES)
SHAPES = tuple(SHAPE_FIELDS)


def shape_config(shape: str) -> LlamaConfig:
    """A LlamaConfig of a named shape (SHAPE_FIELDS)."""
    from transformers import LlamaConfig

    if shape not in SHAPE_FIELDS:
        raise ValueError(f"--shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    return LlamaConfig(**SHAPE_FIELDS[shape], hidden_act="silu", attn_implementation="sdpa")


def smollm2_135m_config(tiny: bool = False) -> LlamaConfig:
    """SmolLM2-135M-Instruct's shape (or the tiny one for tests), as a transformers LlamaConfig."""
    return shape_config("tiny" if tiny else "smollm2-135m")


def named_config(name: str, tiny: Optional[TinyModelConfig] = None) -> LlamaConfig:
    """The shape of a model by its `model.name`: `tiny` (with the shape `tiny`), SmolLM2-135M, Llama-3.1-8B.

    Raises ValueError for a model whose shape is not known here (built in code: nothing is downloaded)."""
    if name == "tiny":
        return tiny_config(tiny)
    if "smollm2" in name.lower():
        return smollm2_135m_config()
    if "llama-3.1-8b" in name.lower():
        return shape_config("llama-8b")
    raise ValueError(f"no config known for model {name!r}")


def tiny_overrides(shape: str) -> list[str]:
    """Training overrides that build a named shape (SHAPE_FIELDS) as `model=tiny` with random weights; the tiny
    model's vocabulary is its tokenizer's."""
    f = SHAPE_FIELDS[shape]
    return [
        "model=tiny",
        f"model.tiny.hidden_size={f['hidden_size']}",
        f"model.tiny.num_layers={f['num_hidden_layers']}",
        f"model.tiny.num_heads={f['num_attention_heads']}",
        f"model.tiny.num_kv_heads={f['num_key_value_heads']}",
        f"model.tiny.intermediate_size={f['intermediate_size']}",
    ]


def step_flops(cfg: LlamaConfig, batch: int, seq: int, r: Optional[int]) -> float:
    """Matmul FLOPs of one training step (forward + backward), full fine-tuning if r is None, else LoRA on all linears.

    Per token and per weight matrix (d_in x d_out): forward d_in*d_out multiply-adds, backward input-grad
    d_in*d_out and weight-grad d_in*d_out. Full FT: 3 * d_in*d_out. LoRA: the frozen W needs forward and
    input-grad only (2 * d_in*d_out); A and B need all three: 3 * r * (d_in + d_out). The tied lm_head is trained
    in full FT (3x) and frozen under LoRA (2x). Attention scores/values (no weights) cost 3x in both.
    """
    h, i, n_l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    mats = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (d_in, d_out) per layer
    tokens = batch * seq
    layer_w = sum(a * b for a, b in mats) * n_l
    head = h * cfg.vocab_size
    attn = 2 * seq * h * n_l  # QK^T and AV per token (full square, as SDPA computes without a mask-skip)
    if r is None:
        macs = 3 * (layer_w + head) + 3 * attn
    else:
        adapters = sum(r * (a + b) for a, b in mats) * n_l
        macs = 2 * (layer_w + head) + 3 * adapters + 3 * attn
    return 2.0 * macs * tokens
