"""The benchmarks' printed tables: fixed-width text of a core result and of a sweep result (one row writer for both)."""

from __future__ import annotations

from typing import Any, Sequence

from lora_lab.markdown import text

STEP_WIDTHS = (22, 10, 9, 9, 7, 10, 10, 10)  # train step, median s, GFLOP, GFLOP/s, MFU, peak MiB, tok/s, ops/step
RATIO_WIDTHS = (34, 7)  # indented two spaces: name, value
SWEEP_WIDTHS = (32, 16, 18, 11)  # label, cold, warm, warm/cold
RATIO_TARGETS = {
    "step_lora_lab_over_peft": "<= 0.90",
    "step_floor_over_peft": "(zero-cost adapters)",
    "peak_mem_lora_lab_over_peft": "<= 1.00",
    "merged_fwd_over_base": "within 2%",
    "unmerged_fwd_over_base": "<= 1.08",
}


def fixed_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One line of a fixed-width table: the first cell left-aligned in its width, the others right-aligned in theirs."""
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(rest, widths[1:]))


def core_table(res: dict[str, Any]) -> str:
    """What `python -m lora_lab.bench core` prints: step rows, forward rows, ratios, paired per-round ratios."""
    lines = [
        f"shape {res['shape']}, device {res['device']} {res['dtype']}, {res['threads']} threads, "
        f"batch {res['batch']}x{res['seq']}, "
        f"LoRA r={res['r']} alpha={res['alpha']} all-linear, median of {res['steps_timed']} (warm-up {res['warmup']})",
        f"matmul peak (measured): {res['matmul_peak_gflops']:.1f} GFLOP/s",
        fixed_row(["train step", "median s", "GFLOP", "GFLOP/s", "MFU", "peak MiB", "tok/s", "ops/step"], STEP_WIDTHS)
        + f"  ({res['ops_per_step_means']})",
    ]
    for k, s in res["step"].items():
        mem = "n/a" if s["peak_mem_bytes"] is None else f"{s['peak_mem_bytes'] / 2**20:.0f}"
        cells = [k, f"{s['median_s']:.4f}", f"{s['gflop']:.1f}", f"{s['gflops']:.1f}", f"{s['mfu']:.0%}", mem]
        frozen = s.get("frozen_bytes_per_param")
        extra = f"  frozen linears {frozen:.3f} B/param" if frozen is not None and "@" in k else ""
        lines.append(fixed_row([*cells, f"{s['tokens_per_s']:.0f}", str(s["ops_per_step"])], STEP_WIDTHS) + extra)
    if not res["peft"]:
        lines.append("peft not importable: its rows are skipped (pip install lora_lab[bench])")
    lines.append(fixed_row(["forward (inference)", "median s"], STEP_WIDTHS[:2]))
    for k, s in res["forward"].items():
        lines.append(fixed_row([k, f"{s['median_s']:.3f}"], STEP_WIDTHS[:2]))
    lines.append("ratios")
    for k, v in res["ratios"].items():
        lines.append("  " + fixed_row([k, f"{v:.3f}"], RATIO_WIDTHS) + f"  {RATIO_TARGETS.get(k, '')}")
    lines.append("paired per-round ratios (median [min, max] over rounds)")
    for k, v in res.get("paired", {}).items():
        spread = f"  [{v['min']:.3f}, {v['max']:.3f}] n={v['n']}"
        lines.append("  " + fixed_row([k, f"{v['median']:.3f}"], RATIO_WIDTHS) + spread)
    return "\n".join(lines)


CKPT_WIDTHS = (24, 10, 9, 12, 12, 14)  # row, median s, tok/s, stack MiB, step MiB, saved B/token/layer
CKPT_TARGETS = {"time_lora_lab+ckpt_over_lora_lab": "<= 1.35", "stack_mem_lora_lab_over_lora_lab+ckpt": ">= 3"}


def checkpointing_table(res: dict[str, Any]) -> str:
    """What `python -m lora_lab.bench core --checkpointing` prints: each row beside its checkpointed one, ratios."""

    def mib(v: Any) -> str:
        return "n/a" if v is None else f"{v / 2**20:.0f}"

    lines = [
        f"activation checkpointing: shape {res['shape']} ({res['layers']} layers, d={res['hidden_size']}), "
        f"device {res['device']} {res['dtype']}, {res['threads']} threads, batch {res['batch']}x{res['seq']}, "
        f"LoRA r={res['r']} alpha={res['alpha']} all-linear, median of {res['steps_timed']} (warm-up {res['warmup']})",
        fixed_row(["train step", "median s", "tok/s", "stack MiB", "step MiB", "saved B/tok/l"], CKPT_WIDTHS),
    ]
    for k, s in res["step"].items():
        saved = s["saved_per_token_layer_bytes"]
        cells = [k, f"{s['median_s']:.3f}", f"{s['tokens_per_s']:.0f}", mib(s["stack_mem_bytes"])]
        lines.append(
            fixed_row([*cells, mib(s["step_mem_bytes"]), "-" if saved is None else f"{saved:.0f}"], CKPT_WIDTHS)
        )
    lines.append(
        "stack: what a step of the layer stack alone adds (the blocks' activations); step: what a whole training step "
        "adds over the model and optimizer state (logits, loss, gradients too); saved: bytes per token one block "
        "keeps for backward"
    )
    lines.append("ratios")
    for k, v in res["ratios"].items():
        lines.append("  " + fixed_row([k, f"{v:.3f}"], (40, 7)) + f"  {CKPT_TARGETS.get(k, '')}")
    lines.append("paired per-round ratios (median [min, max] over rounds)")
    for k, v in res["paired"].items():
        spread = f"  [{v['min']:.3f}, {v['max']:.3f}] n={v['n']}"
        lines.append("  " + fixed_row([k, f"{v['median']:.3f}"], (40, 7)) + spread)
    return "\n".join(lines)


SWEEP_ROWS = (  # (label, format, key of a mode's results)
    ("trials", "{:d}", "trials"),
    ("trial phase wall (s)", "{:.1f}", "wall_s"),
    ("command wall (s)", "{:.1f}", "command_s"),
    ("trials/hour", "{:.0f}", "trials_per_hour"),
    ("outside train+eval (share)", "{:.1%}", "outside_share"),
    ("outside train+eval (s/trial)", "{:.2f}", "outside_s_per_trial"),
    ("mean trial (s)", "{:.2f}", "trial_s_mean"),
    ("trials that came warm", "{:d}", "warm_trials"),
    ("worker processes", "{:d}", "workers"),
)


def sweep_table(res: dict[str, Any]) -> str:
    """What `python -m lora_lab.bench sweep` prints: cold, 1 per device beside warm, N per device, and their ratio."""
    cold, warm = res["modes"]["cold_1"], res["modes"]["warm_n"]
    per_device = warm["auto_per_device"] or warm["workers"]
    lines = [
        f"sweep benchmark on {res['device']}, load avg before {res['load_avg_before'][0]:.1f}",
        fixed_row(["", "cold, 1/device", f"warm, {per_device}/device", "warm/cold"], SWEEP_WIDTHS),
    ]
    for label, spec, key in SWEEP_ROWS:
        a, b = cold[key], warm[key]
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"
        lines.append(fixed_row([label, text(a, spec), text(b, spec), ratio], SWEEP_WIDTHS))
    lines.append(
        f"max |val_loss(warm) - val_loss(cold)| over the same trials: {text(res['max_abs_val_loss_diff'], '{:.2e}')}"
    )
    return "\n".join(lines)
