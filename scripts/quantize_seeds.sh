#!/usr/bin/env bash
# [JOBS=2] [RUNS=folder] bash scripts/quantize_seeds.sh [STEPS] [OUT] [OVERRIDE ...]
# Issue 21's accuracy check on the default model and task (SmolLM2-135M, VADER sentiment): LoRA (all linear, r=16,
# alpha=32, lr 3e-4) on the fp32 base and on an NF4 base, the same budget, seeds 0-2; prints one table (val loss per
# seed, means, NF4 - fp32) and writes it to OUT (docs/results/quantize.md by default). Further training overrides
# (optim.schedule=cosine, data.max_val_examples=512) go to every run alike. No MLflow: metrics.json only. JOBS runs
# that many at once (give each trainer.num_threads=1 on a small machine); RUNS keeps the runs in that folder, and a
# run already finished there (its metrics.json) is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-8}
OUT=${2:-docs/results/quantize.md}
EXTRA=("${@:3}")
if [[ -n "${RUNS:-}" ]]; then
  mkdir -p "$RUNS"
else
  RUNS=$(mktemp -d)
  trap 'rm -rf "$RUNS"' EXIT
fi
one() {  # one run: model.quantize=$1 seed=$2
  [[ -f "$RUNS/$1-$2/metrics.json" ]] && return 0
  python3 -m lora_lab.train model.quantize="$1" seed="$2" lora.r=16 lora.alpha=32 optim.lr=3e-4 \
    trainer.max_steps="$STEPS" trainer.eval_every="$STEPS" data.max_val_examples=128 trainer.progress=false \
    tracking=off "${EXTRA[@]}" output_dir="$RUNS/$1-$2" > "$RUNS/$1-$2.log" 2>&1
  echo "done: model.quantize=$1 seed=$2" >&2
}
export -f one
export RUNS STEPS
printf '%s\n' none:0 none:1 none:2 nf4:0 nf4:1 nf4:2 \
  | xargs -P "${JOBS:-1}" -I{} bash -c 'set -euo pipefail; EXTRA=("$@"); one "${0%%:*}" "${0##*:}"' {} "${EXTRA[@]}"
python3 - "$RUNS" "$STEPS" "$OUT" "${EXTRA[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path
from lora_lab.files import atomic_write
from lora_lab.markdown import table
runs, steps, out, extra = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
m = {(q, s): json.loads((runs / f"{q}-{s}" / "metrics.json").read_text()) for q in ("none", "nf4") for s in range(3)}
rows = []
for q in ("none", "nf4"):
    v = [m[q, s]["val_loss"] for s in range(3)]
    row = {f"s{s}": v[s] for s in range(3)}
    row.update(
        base="fp32" if q == "none" else q,
        mean=statistics.fmean(v),
        acc=statistics.fmean(m[q, s]["accuracy"] for s in range(3)),
        frozen=m[q, 0].get("frozen_bytes_per_param") or 4.0,
        step=statistics.median(m[q, s]["time_per_step_s"] for s in range(3)),
        dense=max(m[q, s]["max_abs_logit_diff"] for s in range(3)),
        dense_loss=max(abs(m[q, s]["merged_val_loss"] - m[q, s]["val_loss"]) for s in range(3)),
        requant=None if q == "none" else max(abs(m[q, s]["requant_merged_val_loss"] - m[q, s]["val_loss"]) for s in range(3)),
    )
    rows.append(row)
diff = [m["nf4", s]["val_loss"] - m["none", s]["val_loss"] for s in range(3)]
cols = [("base", "base", ""), ("s0", "val loss seed 0", "{:.4f}"), ("s1", "seed 1", "{:.4f}"), ("s2", "seed 2", "{:.4f}"),
        ("mean", "mean", "{:.4f}"), ("acc", "accuracy", "{:.3f}"), ("frozen", "frozen B/param", "{:.4f}"),
        ("step", "s/step (median)", "{:.2f}"), ("dense", "dense merge max |logit diff|", "{:.1e}"),
        ("dense_loss", "dense merge max |val loss diff|", "{:.1e}"),
        ("requant", "re-quantized merge max |val loss diff|", "{:.3f}")]
command = " ".join(["bash scripts/quantize_seeds.sh", str(steps), str(out), *extra])
text = (f"# NF4 vs fp32 LoRA on SmolLM2-135M (default task), {steps} steps, 3 seeds\n\n"
        f"`{command}` (LoRA all linear r=16 alpha=32, lr 3e-4, batch 8, fp32 compute on the CPU; validation examples: "
        "128 unless the command says otherwise).\n\n" + table(rows, cols) +
        f"\n\nNF4 - fp32 val loss per seed: {', '.join(f'{d:+.4f}' for d in diff)}; mean {statistics.fmean(diff):+.4f} "
        "nats (target: within 0.02).\n")
atomic_write(out, text.encode())
print(text)
PY
