"""Adapter files in peft's layout, both ways, for LoRA and the methods peft has (lora_lab's own types for the rest).

adapter_config.json + adapter_model.safetensors: LoRA, prompt tuning, prefix tuning and IA3 as peft writes them;
BitFit and bottleneck adapters under lora_lab's own peft_type.

This module knows the file format only: the config keys and their values, the tensor key names (peft's
``base_model.model.`` prefix, the ``.default`` adapter names some peft versions keep), the tensor layouts peft expects
(IA3's (out, 1) / (1, in) vectors), reading with errors that name the file, writing atomically, and loading tensors
with shape checks. Walking a model (which layers exist, what they hold) stays with lora_lab.lora and lora_lab.methods,
which call these functions with plain values.

Torch, safetensors, the standard library and lora_lab.files only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors
import safetensors.torch
import torch

from lora_lab.files import atomic_write

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "PEFT_PREFIX",
    "PEFT_TYPES",
    "OWN_TYPES",
    "PROMPT_KEY",
    "peft_key",
    "lora_key",
    "normalize_key",
    "read_config",
    "read_lora_config",
    "read_weights",
    "read_shapes",
    "write_adapter",
    "lora_task_type",
    "method_task_type",
    "lora_config",
    "lora_apply_kwargs",
    "check_shapes",
    "load_tensors",
    "copy_tensor",
    "ia3_config",
    "ia3_tensor",
    "ia3_parameter",
    "prompt_config",
    "prefix_config",
    "own_config",
    "method_files",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's keys: the PeftModel's base_model (a tuner) holds the model as `.model`
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ia3": "IA3"}
OWN_TYPES = {"bitfit": "LORA_LAB_BITFIT", "adapter": "LORA_LAB_ADAPTER"}
PROMPT_KEY = "prompt_embeddings"  # prompt and prefix tuning: one (n, width) tensor
LORA_INITS = ("gaussian", "pissa", "olora")  # init_lora_weights strings lora_lab reads (besides true / false)


def peft_key(name: str) -> str:
    """The file key of a model's tensor `name` ('model.layers.0.q_proj.lora_A.weight' -> 'base_model.model.' + it)."""
    return PEFT_PREFIX + name


def lora_key(state_key: str) -> str:
    """The file key of a LoRA state key (lora.lora_state_dict's): peft's prefix, and '.weight' after lora_A / lora_B
    (peft's are Linear modules); magnitudes and modules_to_save keep their names."""
    if state_key.endswith((".lora_A", ".lora_B")):
        state_key += ".weight"
    return peft_key(state_key)


def normalize_key(key: str) -> str:
    """peft keys as lora_lab writes them: some peft versions keep the adapter name ('.default') or a '.weight'."""
    key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
    key = re.sub(r"\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$", ".lora_magnitude_vector", key)
    return key.replace(".modules_to_save.default.", ".")


# ---------------------------------------------------------------------------------------------- read / write


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json as a dict; ValueError naming the file when it is missing, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: adapter config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def read_lora_config(path: str | os.PathLike) -> dict[str, Any]:
    """A LORA adapter_config.json, refused (ValueError naming the file and the key) where lora_lab cannot honour it:
    per-module ranks, target_parameters, biases, unknown inits, no r or target_modules."""
    cfg = read_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} (per-module ranks) is not supported")
    if cfg.get("target_parameters"):
        raise ValueError(
            f"{path}: target_parameters={cfg['target_parameters']!r} (LoRA on fused expert weights) is not supported"
        )
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in LORA_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} is not supported (true, 'gaussian', 'pissa', 'olora')")
    if "r" not in cfg or "target_modules" not in cfg:
        raise ValueError(f"{path}: missing 'r' or 'target_modules'")
    return cfg


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors as CPU tensors (safetensors only: never unpickle); ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: adapter weights not found") from None
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends: corrupt or truncated
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes of a safetensors file, from its header (no tensor is read); ValueError naming the file."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: adapter weights not found")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file (expected the adapter weights)")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError and friends: corrupt or truncated
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def write_adapter(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    metadata: dict[str, str] | None = None,
    final_newline: bool = True,
) -> None:
    """Write the two files into `folder` (created if missing), each atomically. Tensors are saved from the CPU,
    contiguous. `metadata` and `final_newline` keep each writer's files as they have always been: LoRA adapters carry
    safetensors' {"format": "pt"} and a final newline, the other methods' files neither."""
    os.makedirs(folder, exist_ok=True)
    data = safetensors.torch.save(dict(tensors), metadata=metadata)
    atomic_write(os.path.join(folder, ADAPTER_WEIGHTS), data)
    text = json.dumps(config, indent=2) + ("\n" if final_newline else "")
    atomic_write(os.path.join(folder, ADAPTER_CONFIG), text.encode())


def method_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of a saved method; ValueError naming the one missing."""
    folder = Path(folder)
    paths = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: missing (expected a saved method: {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    return paths


def check_shapes(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], path: Any) -> None:
    """The file's keys and shapes (`found`, keys normalized) against the model's (`expected`); ValueError naming the
    file and the keys when any is missing, unexpected or mis-shaped, with both shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: missing keys {missing[:5]} ({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})"
        )
    bad = [
        f"{k}: file {tuple(found[k])} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if tuple(found[k]) != tuple(shape)
    ]
    if bad:
        raise ValueError(f"{path}: mis-shaped keys: {bad[:5]}")


def load_tensors(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """Copy `tensors` (file keys, normalized) into the `expected` model tensors (same keys), cast to their dtype and
    device. ValueError as check_shapes says when any is missing, unexpected or mis-shaped; nothing is copied then."""
    check_shapes({k: p.shape for k, p in expected.items()}, {k: t.shape for k, t in tensors.items()}, path)
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))


def copy_tensor(dst: torch.Tensor, src: torch.Tensor, path: Any) -> None:
    """Copy one file tensor into a model tensor (cast to its dtype); ValueError naming the file when shapes differ."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{path}: tensor of shape {tuple(src.shape)} where the model expects {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


# ----------------------------------------------------------------------------------------------------- LoRA


def lora_task_type(model_class: str, heads_saved: bool) -> str | None:
    """peft's task_type of a LoRA adapter for a model of class `model_class`. SEQ_CLS makes peft add
    'classifier'/'score' to modules_to_save: only said when a head is saved with the adapter."""
    if model_class.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "SEQ_CLS" if model_class.endswith("ForSequenceClassification") and heads_saved else None


def lora_config(
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    rslora: bool,
    init: str,
    fan_in_fan_out: bool,
    modules_to_save: Sequence[str],
    use_dora: bool,
    task_type: str | None,
    base_model_name: str | None,
    layers: Sequence[int] | None = None,
    layers_pattern: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A LORA adapter_config.json: exact module names as target_modules (peft matches them as-is)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(target_modules),
        "use_rslora": rslora,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": list(modules_to_save) or None,
        "use_dora": use_dora,
        "inference_mode": True,
    }
    if layers is not None:
        config["layers_to_transform"] = layers
        if layers_pattern:
            config["layers_pattern"] = layers_pattern
    return config


def lora_apply_kwargs(cfg: Mapping[str, Any], path: Any) -> tuple[dict[str, Any], list[str]]:
    """A read LORA config as lora.apply_lora's keyword arguments, and its modules_to_save specs. target_modules as a
    string is peft's regex (full match), except 'all-linear'; an unconverted PiSSA / OLoRA adapter keeps its init."""
    tm = cfg["target_modules"]
    if isinstance(tm, str) and tm != "all-linear":
        targets, regex = None, tm
    else:
        targets, regex = ([tm] if isinstance(tm, str) else list(tm)), None
    init = cfg.get("init_lora_weights", True)
    exclude = cfg.get("exclude_modules") or ()
    if isinstance(exclude, str):
        raise ValueError(f"{path}: exclude_modules as a regex is not supported")
    kwargs = {
        "r": cfg["r"],
        "alpha": cfg.get("lora_alpha", 8),
        "dropout": cfg.get("lora_dropout", 0.0),
        "targets": targets,
        "target_regex": regex,
        "exclude": exclude,
        "layers": cfg.get("layers_to_transform"),
        "layers_pattern": cfg.get("layers_pattern") or None,
        "rslora": bool(cfg.get("use_rslora", False)),
        "init": init if init in LORA_INITS else "kaiming",
        "variant": "dora" if cfg.get("use_dora") else "lora",
    }
    return kwargs, list(cfg.get("modules_to_save") or ())


# ---------------------------------------------------------------------------------------- the other methods


def method_task_type(model_class: str) -> str:
    """task_type of a prompt / prefix / IA3 / BitFit / adapter file."""
    return "SEQ_CLS" if "ForSequenceClassification" in model_class else "CAUSAL_LM"


def _common(base_model_name: str | None, task_type: str) -> dict[str, Any]:
    return {"base_model_name_or_path": base_model_name, "task_type": task_type, "inference_mode": True}


def own_config(
    method: str, settings: Mapping[str, Any], added: Sequence[str], *, base_model_name: str | None, task_type: str
) -> dict[str, Any]:
    """lora_lab's own types (BitFit, adapters): the method's settings and the biases it added."""
    return {
        "peft_type": OWN_TYPES[method],
        **_common(base_model_name, task_type),
        **settings,
        "added_biases": list(added),
    }


def ia3_config(targets: Sequence[tuple[str, bool]], *, base_model_name: str | None, task_type: str) -> dict[str, Any]:
    """peft's IA3 config from (module name, feedforward) pairs: target and feedforward modules by their last name."""
    return {
        "peft_type": "IA3",
        **_common(base_model_name, task_type),
        "target_modules": sorted({n.rpartition(".")[2] for n, _ in targets}),
        "feedforward_modules": sorted({n.rpartition(".")[2] for n, ff in targets if ff}),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }


def ia3_tensor(name: str, vector: torch.Tensor, feedforward: bool) -> tuple[str, torch.Tensor]:
    """peft's key and layout of an IA3 vector: (out, 1) for output scaling, (1, in) for input scaling."""
    return peft_key(name), vector[None, :] if feedforward else vector[:, None]


def ia3_parameter(key: str) -> str:
    """The model parameter ('<module>.ia3_l') of an IA3 file key (with or without peft's prefix and '.default')."""
    name = key.removeprefix(PEFT_PREFIX)
    if not name.endswith(".ia3_l"):
        name = name.rpartition(".")[0] + ".ia3_l"
    return name


def prompt_config(
    *, n_tokens: int, token_dim: int, heads: int, layers: int, base_model_name: str | None, task_type: str
) -> dict[str, Any]:
    """peft's PROMPT_TUNING config (random init: the embeddings are in the file)."""
    return {
        "peft_type": "PROMPT_TUNING",
        **_common(base_model_name, task_type),
        "num_virtual_tokens": n_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }


def prefix_config(
    *,
    n_tokens: int,
    kv_heads: int,
    head_dim: int,
    layers: int,
    hidden: int,
    base_model_name: str | None,
    task_type: str,
) -> dict[str, Any]:
    """peft's PREFIX_TUNING config, in its grouped-query convention: token_dim and num_attention_heads of the
    key/value heads. The saved prefix is the projection's output (as peft saves it), so prefix_projection is false."""
    return {
        "peft_type": "PREFIX_TUNING",
        **_common(base_model_name, task_type),
        "num_virtual_tokens": n_tokens,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": kv_heads,
        "num_layers": layers,
        "encoder_hidden_size": hidden,
        "prefix_projection": False,
    }
