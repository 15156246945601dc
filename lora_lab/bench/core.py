"""The core benchmark: training-step time, FLOPs, ops and peak memory of lora_lab, peft, full FT and the floor.

``python -m lora_lab.bench core [--shape S] [--batch B --seq T] [--compile] [--quantize nf4|fp4|int8] [--out F]``.
One process, contenders interleaved round-robin, medians reported. Model: SmolLM2-135M-Instruct's exact shape from a
LlamaConfig (random init; lora_lab.shapes), LoRA r=16 alpha=32 on all linear layers, batch 4 x 128, fp32 on CPU
(bf16 on CUDA). Contenders: lora_lab, peft (optional: skipped if not importable), full fine-tuning, and the floor that
bounds every LoRA implementation from below (frozen model, gradients through every layer, no adapter, no optimizer).
Peak memory on CPU = in a fresh subprocess per contender, the RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs after the model is built) during the training steps minus the RSS before them, i.e. the
memory the training steps add (activations, grads, optimizer state); on CUDA = torch.cuda.max_memory_allocated over
the steps minus the memory before them. ``--quantize`` adds lora_lab's LoRA on a bitsandbytes 4-bit / 8-bit frozen
base (``lora_lab@nf4``: lora_lab.quant, as model.quantize) beside the float LoRA row, with the frozen linear weights'
bytes per parameter measured from the tensors.
With --checkpointing (run_checkpointing), instead of the contenders above: LoRA and full fine-tuning each beside
itself under trainer.gradient_checkpointing, step time and activation memory as ratios.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lora_lab import lora, optim, targets
from lora_lab.shapes import shape_config, step_flops

R, ALPHA = 16, 32
CONTENDERS = ("full", "lora_lab", "peft", "floor", "dora")
# "floor" is no contender but the bound every LoRA implementation sits above: the frozen model's forward and its
# input-gradient backward through every layer (what LoRA cannot skip), with no adapter and no optimizer.


def _have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:
        return False
    return True


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _base_model(cfg, seed: int, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False  # as the trainer runs: no KV cache (and no per-layer recompiles of compiled blocks)
    return AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)


def _make(kind: str, base, *, copy_base: bool = True):
    """A contender model (deep copy of base) in train mode; `<kind>+compile` compiles its blocks as trainer.compile
    does, `<kind>+ckpt` checkpoints them as trainer.gradient_checkpointing does (`+ckpt+compile`: both),
    `<kind>@nf4` quantizes its frozen base first (`lora_lab+ckpt@nf4`: checkpointed on a 4-bit base)."""
    model = copy.deepcopy(base) if copy_base else base
    kind, _, how = kind.partition("@")  # lora_lab@nf4: LoRA on a quantized frozen base (model.quantize)
    if how:
        from lora_lab import quant

        quant.quantize_model(model, how)
    kind, *extras = kind.split("+")
    for extra in extras:
        if extra not in ("ckpt", "compile"):
            raise ValueError(f"unknown contender suffix {extra!r}")
    if "ckpt" in extras:  # before compiling, as the loop applies them
        from lora_lab.train.runtime import checkpoint_blocks

        checkpoint_blocks(model)
    if "compile" in extras:
        from lora_lab.train import compile_blocks

        compile_blocks(model)
    if kind == "lora_lab":
        lora.apply_lora(model, r=R, alpha=ALPHA, targets=("all-linear",))
    elif kind == "dora":  # lora_lab's DoRA: the magnitude vector's cost beside plain LoRA
        lora.apply_lora(model, r=R, alpha=ALPHA, targets=("all-linear",), variant="dora")
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    elif kind == "floor":
        model.requires_grad_(False)
    elif kind != "full":
        raise ValueError(f"unknown contender {kind!r}")
    return model.train()


def _stepper(model, ids) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # the floor: gradients flow from the loss down to the embeddings' output, through frozen layers
        embed = model.get_input_embeddings()

        def frozen_step() -> None:
            x = embed(ids).detach().requires_grad_(True)  # (B, T, d): the only tensor that wants a gradient
            model(inputs_embeds=x, labels=ids).loss.backward()

        return frozen_step
    opt = optim.adamw(params, lr=1e-5)  # as the trainer builds it (fused)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _round_robin(
    kinds: list[str], steppers: dict[str, Callable[[], None]], warmup: int, steps: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Training steps, interleaved round-robin (who goes first rotates); warm-up rounds excluded (they also pay for
    compilation). Returns the timed seconds per kind and the compiled rows that failed here (no compiler,
    unsupported op: dropped and reported; any other row's failure raises)."""
    step_times: dict[str, list[float]] = {k: [] for k in kinds}
    failed: dict[str, str] = {}
    for rep in range(warmup + steps):
        for k in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:
            if k in failed:
                continue
            try:
                t = _timed(steppers[k], device)
            except Exception as exc:  # noqa: BLE001 - only a compiled row may fail, and it is reported
                if "+compile" not in k:
                    raise
                failed[k] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"bench: {k} dropped: {failed[k]}", file=sys.stderr)
                continue
            if rep >= warmup:
                step_times[k].append(t)
    return step_times, failed


def ops_per_step(step: Callable[[], None], device: torch.device) -> int:
    """What one step asks of the device, counted by torch.profiler: GPU kernels and copies on CUDA (each one a launch
    the host pays for), aten operator calls on the CPU (nested calls included)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps GFLOP/s of an n x n matmul: the machine's practical matmul peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def peak_memory_child(kind: str, shape: str, steps: int, batch: int, seq: int) -> int:
    """Runs in a fresh process: bytes the training steps add on top of the built model."""
    device, dtype = _device_dtype()
    cfg = shape_config(shape)
    model = _make(kind, _base_model(cfg, 0, device, dtype), copy_base=False)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    step = _stepper(model, ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    if reset_hwm():
        before = proc_status_kib("VmRSS")
        for _ in range(steps):
            step()
        return (proc_status_kib("VmHWM") - before) * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: high-water since start (coarser)
    for _ in range(steps):
        step()
    return int((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # ru_maxrss is KiB on Linux


def reset_hwm() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_kib(key: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(kind: str, shape: str, steps: int, batch: int, seq: int) -> int:
    """Peak memory of kind's training steps, measured in a fresh subprocess so contenders do not share a high-water
    mark."""
    cmd = [sys.executable, "-m", "lora_lab.bench", "_mem", kind, shape, str(steps), str(batch), str(seq)]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])  # the folder that holds lora_lab/: this code, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {kind} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def run_core(
    tiny: bool = False,
    steps: int = 8,
    warmup: int = 3,
    batch: int = 4,
    seq: int = 128,
    memory: bool = True,
    shape: str | None = None,
    compile: bool = False,
    quantize: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the core benchmark and return the results dict (what --out writes). `shape` names a shapes.SHAPES entry
    (default SmolLM2-135M, or tiny); `compile` adds compiled rows (lora_lab, full, floor) as trainer.compile runs;
    `quantize` ('nf4', 'fp4', 'int8') adds a lora_lab@<how> row each: LoRA on that quantized frozen base."""
    torch.set_num_threads(os.cpu_count() or 1)
    device, dtype = _device_dtype()
    shape = shape or ("tiny" if tiny else "smollm2-135m")
    cfg = shape_config(shape)
    have_peft = _have_peft()
    kinds = [k for k in CONTENDERS if k != "peft" or have_peft]
    if compile:
        kinds += ["lora_lab+compile", "full+compile", "floor+compile"]
    kinds += [f"lora_lab@{how}" for how in quantize]
    base = _base_model(cfg, 0, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=None)
    models = {k: _make(k, base) for k in kinds}
    pristine = base.eval().requires_grad_(False)  # the untouched base model, for forward timing
    steppers = {k: _stepper(m, ids) for k, m in models.items()}

    step_times, failed = _round_robin(kinds, steppers, warmup, steps, device)
    kinds = [k for k in kinds if k not in failed]
    ops = {k: ops_per_step(steppers[k], device) for k in kinds}
    del steppers
    frozen = {k: _frozen_bytes_per_param(models[k]) for k in kinds if k.startswith("lora_lab")}
    for k in [k for k in models if "+" in k or "@" in k or k == "dora"]:  # training rows only
        del models[k]
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Forward (inference) times: the untouched base; lora_lab unmerged and merged; peft unmerged.
    fwd_kinds = ["base", "lora_lab_unmerged", "lora_lab_merged"] + (["peft_unmerged"] if have_peft else [])
    for m in models.values():
        m.eval()
    del models["full"]
    lora_model = models["lora_lab"]
    # merge/unmerge happen outside the timed region: time only the forward.
    fwd_times: dict[str, list[float]] = {k: [] for k in fwd_kinds}
    merged_now = False
    for rep in range(warmup + steps):
        for k in fwd_kinds[rep % len(fwd_kinds) :] + fwd_kinds[: rep % len(fwd_kinds)]:
            model = {"base": pristine, "peft_unmerged": models.get("peft")}.get(k, lora_model)
            want_merged = k == "lora_lab_merged"
            with torch.inference_mode():
                if model is lora_model and merged_now != want_merged:
                    (lora.merge if want_merged else lora.unmerge)(lora_model)
                    merged_now = want_merged
                    # The first forward after a merge or unmerge ran ~3% slower in a measured run (the allocator is
                    # left in another state by the merge's temporaries); a served model is merged once, so that
                    # forward is not timed.
                    model(input_ids=ids)
                t = _timed(lambda m=model: m(input_ids=ids), device)
            if rep >= warmup:
                fwd_times[k].append(t)
    lora.unmerge(lora_model)

    # The chip's practical peak needs a large GEMM: an H200 reaches ~790 TFLOP/s bf16 at 8192^3, ~400 at 2048^3.
    peak = matmul_peak_gflops(device, dtype, n=256 if shape == "tiny" else 8192 if device.type == "cuda" else 2048)
    counts = lora.count_parameters(lora_model)
    med = {k: statistics.median(v) for k, v in step_times.items()}
    fmed = {k: statistics.median(v) for k, v in fwd_times.items()}
    flops = {"full": step_flops(cfg, batch, seq, None)}
    flops["lora_lab"] = flops["peft"] = flops["dora"] = step_flops(cfg, batch, seq, R)  # DoRA: + a row norm per layer
    flops["floor"] = step_flops(cfg, batch, seq, 0)
    flops.update({k: flops[k.split("+")[0].split("@")[0]] for k in kinds if "+" in k or "@" in k})
    mem = {k: (peak_memory(k, shape, 2, batch, seq) if memory and "+" not in k else None) for k in kinds}

    result: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": shape,
        "tiny": shape == "tiny",
        "batch": batch,
        "seq": seq,
        "r": R,
        "alpha": ALPHA,
        "tokens_per_step": batch * seq,
        "ops_per_step_means": "CUDA kernels and copies" if device.type == "cuda" else "aten operator calls",
        "failed": failed,
        "steps_timed": steps,
        "warmup": warmup,
        "peft": have_peft,
        "lora_trainable_params": counts.trainable,
        "total_params": counts.total,
        "matmul_peak_gflops": peak,
        "memory_method": "cuda max_memory_allocated delta"
        if device.type == "cuda"
        else "subprocess RSS high-water mark (VmHWM, reset via /proc/self/clear_refs after model build) during steps "
        "minus RSS (VmRSS) before them; ru_maxrss delta only where /proc is unavailable",
        "step": {
            k: {
                "median_s": med[k],
                "times_s": step_times[k],
                "gflop": flops[k] / 1e9,
                "gflops": flops[k] / med[k] / 1e9,
                "mfu": flops[k] / med[k] / 1e9 / peak,
                "peak_mem_bytes": mem[k],
                "ops_per_step": ops[k],
                "tokens_per_s": batch * seq / med[k],
                "frozen_bytes_per_param": frozen.get(k),
            }
            for k in kinds
        },
        "forward": {k: {"median_s": fmed[k], "times_s": fwd_times[k]} for k in fwd_kinds},
        "ratios": {
            "flops_lora_over_full_theory": flops["lora_lab"] / flops["full"],
            "time_lora_lab_over_full": med["lora_lab"] / med["full"],
            "merged_fwd_over_base": fmed["lora_lab_merged"] / fmed["base"],
            "unmerged_fwd_over_base": fmed["lora_lab_unmerged"] / fmed["base"],
        },
    }

    # Paired ratios: each round's lora_lab step over the same round's peft step (run back to back), so a slow
    # stretch of a shared machine hits both sides of a pair; their spread says how far one verdict can be trusted.
    def paired(a: str, b: str, times: dict[str, list[float]]) -> dict[str, float]:
        return _spread([x / y for x, y in zip(times[a], times[b])])

    pairs = [("lora_lab", "full"), ("lora_lab", "floor"), ("dora", "lora_lab")] + (
        [("lora_lab", "peft"), ("peft", "floor"), ("floor", "peft")] if have_peft else []
    )
    pairs += [(k, "lora_lab") for k in kinds if "@" in k]
    if compile and "lora_lab+compile" in kinds and "full+compile" in kinds and "floor+compile" in kinds:
        pairs += [
            ("lora_lab+compile", "floor"),
            ("lora_lab+compile", "full"),
            ("lora_lab+compile", "full+compile"),
            ("lora_lab+compile", "floor+compile"),
        ] + ([("lora_lab+compile", "peft")] if have_peft else [])
    result["paired"] = {f"{a}_over_{b}": paired(a, b, step_times) for a, b in pairs}
    for k in ("lora_lab_merged", "lora_lab_unmerged"):
        result["paired"][f"{k.split('_')[-1]}_fwd_over_base"] = paired(k, "base", fwd_times)
    if have_peft:
        result["ratios"].update(
            {
                "step_lora_lab_over_peft": med["lora_lab"] / med["peft"],
                "step_floor_over_peft": med["floor"] / med["peft"],  # the best any LoRA implementation could reach
                "time_peft_over_full": med["peft"] / med["full"],
                "peft_unmerged_fwd_over_base": fmed["peft_unmerged"] / fmed["base"],
            }
        )
        if memory:
            result["ratios"]["peak_mem_lora_lab_over_peft"] = mem["lora_lab"] / max(mem["peft"], 1)
    for k in (k for k in kinds if "@" in k):  # a quantized base beside the float one: what it saves and costs
        result["ratios"][f"step_{k}_over_lora_lab"] = med[k] / med["lora_lab"]
        result["ratios"][f"frozen_bytes_{k}_over_lora_lab"] = frozen[k] / frozen["lora_lab"]
        if memory:
            result["ratios"][f"peak_mem_{k}_over_lora_lab"] = mem[k] / max(mem["lora_lab"], 1)
    return result


def _frozen_bytes_per_param(model) -> float:
    """Bytes per parameter of the frozen linear weights a LoRA row keeps (the layers LoRA wraps, and any other linear
    but the head): packed weights and their quantization state where quantized (lora_lab.quant.frozen_bytes), the
    dense weights' element size otherwise."""
    from lora_lab import bases

    if bases.quantized_modules(model):
        from lora_lab import quant

        nbytes, n = quant.frozen_bytes(model)
        return nbytes / n
    weights = [layer.base.weight for _, layer in ((n, model.get_submodule(n)) for n in lora.wrapped_modules(model))]
    return sum(w.numel() * w.element_size() for w in weights) / max(1, sum(w.numel() for w in weights))


def _spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max of per-round ratios."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ----------------------------------------------------------------------------------------------- checkpointing

CHECKPOINTING = ("lora_lab", "lora_lab+ckpt", "full", "full+ckpt")  # each method beside itself checkpointed


def saved_bytes_per_token_layer(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Bytes autograd keeps for backward inside one block (the middle one) of a training forward, per token: distinct
    storages saved while the block runs, the model's parameters left out (a frozen weight kept for the input
    gradient is no activation). Checkpointed, that is what the block keeps for its recompute: its input."""
    blocks = [b for _, b in targets.repeated_blocks(model)]
    middle = blocks[len(blocks) // 2]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside: dict[int, int] = {}
    active: list[bool] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if active and s.data_ptr() not in params:
            inside[s.data_ptr()] = s.nbytes()
        return t

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        active.pop()

    hooks = [middle.register_forward_pre_hook(lambda m, a: active.append(True)), middle.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    del loss  # the graph goes unused: only what it saved was counted
    return sum(inside.values()) / ids.numel()


def _stack_stepper(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A training step of the layer stack alone: embeddings, blocks, final norm; loss = mean square of the last
    hidden state (no lm_head, no logits), backward down to the first block's trainable weights only (so no other
    gradient buffer is allocated: what remains is the blocks' activations and their backward's temporaries)."""
    first = [p for p in targets.repeated_blocks(model)[0][1].parameters() if p.requires_grad]

    def step() -> None:
        hidden = model.base_model(input_ids=ids).last_hidden_state  # (B, T, d)
        hidden.float().square().mean().backward(inputs=first)
        for p in first:
            p.grad = None

    return step


def activation_memory_child(kind: str, shape: str, batch: int, seq: int) -> dict[str, int]:
    """Runs in a fresh process: after one training step (so the optimizer state is in the baseline), the bytes a
    training step adds on top of the model and optimizer (`step`: activations, logits and loss buffers, gradients),
    and the bytes a step of the layer stack alone adds (`stack`: the blocks' activations, what checkpointing acts
    on; _stack_stepper). CPU: RSS high-water (VmHWM, reset) minus RSS before; CUDA: max_memory_allocated delta."""
    device, dtype = _device_dtype()
    cfg = shape_config(shape)
    model = _make(kind, _base_model(cfg, 0, device, dtype), copy_base=False)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    steps = {"step": _stepper(model, ids), "stack": _stack_stepper(model, ids)}
    steps["step"]()  # optimizer state, compiled graphs: allocated before anything is measured
    out: dict[str, int] = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            out[name] = int(torch.cuda.max_memory_allocated() - before)
        else:
            if not reset_hwm():
                raise RuntimeError("activation memory on the CPU needs /proc/self/clear_refs (Linux)")
            before = proc_status_kib("VmRSS")
            step()
            out[name] = (proc_status_kib("VmHWM") - before) * 1024
    return out


def activation_memory(kind: str, shape: str, batch: int, seq: int) -> dict[str, int]:
    """activation_memory_child in a fresh subprocess (no shared high-water mark). glibc is told to map every
    allocation over 64 KiB on its own, so a freed tensor leaves the RSS at once and the high-water mark follows
    the live tensors (by default it raises that threshold as it frees, and freed heap stays in the RSS: a step
    then reuses the previous step's memory unseen, measured 114 MiB where the blocks keep 300)."""
    cmd = [sys.executable, "-m", "lora_lab.bench", "_act", kind, shape, str(batch), str(seq)]
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"activation-memory subprocess for {kind} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_checkpointing(
    shape: str = "smollm2-135m",
    batch: int = 8,
    seq: int = 512,
    steps: int = 3,
    warmup: int = 1,
    memory: bool = True,
    compile: bool = False,
    methods: tuple[str, ...] = ("lora_lab", "full"),
) -> dict[str, Any]:
    """trainer.gradient_checkpointing side by side with the same method unchecked (`methods`: LoRA r=16 all-linear
    and full fine-tuning; with `compile`, compiled LoRA with and without too): step times interleaved round-robin
    within each pair (one pair's models in memory at a time: at 8 x 512 one unchecked step alone takes GBs),
    activation memory of the layer stack and the whole step's added memory (fresh subprocesses), and the bytes per
    token a block keeps for backward (saved-tensor hooks). Returns the results dict (what --out writes)."""
    torch.set_num_threads(os.cpu_count() or 1)
    device, dtype = _device_dtype()
    cfg = shape_config(shape)
    for m in methods:
        if m not in ("lora_lab", "full"):
            raise ValueError(f"--methods: expected lora_lab or full, got {m!r}")
    groups = [[m, f"{m}+ckpt"] for m in methods]
    if compile and "lora_lab" in methods:
        groups.append(["lora_lab+compile", "lora_lab+ckpt+compile"])
    # Memory first, while this process holds no model: a child's unchecked step takes GBs at 8 x 512, and what
    # this process freed after timing would stay in its RSS beside it.
    mem: dict[str, Any] = {}
    for k in [k for group in groups for k in group]:
        try:
            mem[k] = activation_memory(k, shape, batch, seq) if memory else None
        except RuntimeError as exc:  # only a compiled row may fail (no compiler here): its memory is n/a
            if "+compile" not in k:
                raise
            print(f"bench: {k} memory not measured: {str(exc)[-300:]}", file=sys.stderr)
            mem[k] = None
    base = _base_model(cfg, 0, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    # Counted on a short batch: per token, what a block saves does not depend on the length (SDPA keeps no T x T).
    probe = ids[:1, : min(seq, 128)]
    kinds: list[str] = []
    saved: dict[str, float] = {}
    step_times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for group in groups:
        models = {k: _make(k, base) for k in group}
        saved.update({k: saved_bytes_per_token_layer(m, probe) for k, m in models.items() if "+compile" not in k})
        for m in models.values():
            m.zero_grad(set_to_none=True)
        steppers = {k: _stepper(m, ids) for k, m in models.items()}
        times, lost = _round_robin(group, steppers, warmup, steps, device)
        step_times.update(times)
        failed.update(lost)
        kinds += [k for k in group if k not in lost]
        del steppers, models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del base
    med = {k: statistics.median(v) for k, v in step_times.items() if v}
    result: dict[str, Any] = {
        "suite": "checkpointing",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "r": R,
        "alpha": ALPHA,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "tokens_per_step": batch * seq,
        "steps_timed": steps,
        "warmup": warmup,
        "failed": failed,
        "memory_method": "cuda max_memory_allocated delta"
        if device.type == "cuda"
        else "fresh subprocess per row, glibc mmap threshold 64 KiB: RSS high-water mark (VmHWM, reset via "
        "/proc/self/clear_refs) during one step minus RSS (VmRSS) before it, after a first step",
        "step": {
            k: {
                "median_s": med[k],
                "times_s": step_times[k],
                "tokens_per_s": batch * seq / med[k],
                "step_mem_bytes": mem[k]["step"] if mem[k] else None,
                "stack_mem_bytes": mem[k]["stack"] if mem[k] else None,
                "saved_per_token_layer_bytes": saved.get(k),
            }
            for k in kinds
        },
    }
    pairs = [(k, k.replace("+ckpt", "")) for k in kinds if "+ckpt" in k and k.replace("+ckpt", "") in kinds]
    ratios: dict[str, float] = {}
    for checked, plain in pairs:
        ratios[f"time_{checked}_over_{plain}"] = med[checked] / med[plain]
        if memory:
            for what in ("stack", "step"):
                ratios[f"{what}_mem_{plain}_over_{checked}"] = mem[plain][what] / max(mem[checked][what], 1)
    result["ratios"] = ratios
    result["paired"] = {
        f"{a}_over_{b}": _spread([x / y for x, y in zip(step_times[a], step_times[b])]) for a, b in pairs
    }
    return result
