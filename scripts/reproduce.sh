#!/usr/bin/env bash
# "LoRA Without Regret" reproduced on SmolLM2-135M (BBC News text, 64-token blocks), then the report.
# Usage: scripts/reproduce.sh            (about 60-90 minutes on 2 free CPU cores; each study resumes where it stopped)
# Outputs: $LORA_LAB_OUTPUTS (default outputs/repro: Optuna db, MLflow db, study folders); report -> docs/results/.
# Phases can be skipped with PHASES="lr targets batch seeds report" (default: all, in this order).
set -euo pipefail
cd "$(dirname "$0")/.."
export LORA_LAB_OUTPUTS="${LORA_LAB_OUTPUTS:-$PWD/outputs/repro}"
PHASES="${PHASES:-lr targets batch seeds report}"
RUN="nice -n 10 python -m lora_lab.sweep"
COMMON="trainer.progress=false"
has() { [[ " $PHASES " == *" $1 "* ]]; }
# The best LR of a study (argmin of final val loss over COMPLETE trials; optional filter KEY=VALUE on a param).
best_lr() { python -m lora_lab.report best-lr --study "$1" ${2:+--where "$2"}; }

date; echo "outputs: $LORA_LAB_OUTPUTS"
if has lr; then
  $RUN sweep=wr_lr_lora $COMMON        # findings 1 and 3: rank x LR, alpha=32
  $RUN sweep=wr_lr_full $COMMON        # finding 2: full-FT LR U-curve
fi
if has targets || has batch || has seeds; then
  LORA_LR=$(best_lr wr_lr_lora); FULL_LR=$(best_lr wr_lr_full)  # LoRA: lowest val loss averaged over ranks
  echo "best LoRA LR (pooled over ranks): $LORA_LR; best full-FT LR: $FULL_LR"
fi
if has targets; then                   # finding 4, seed 0
  $RUN sweep=wr_targets sweep.n_trials=6 optim.ref_lr="$LORA_LR" $COMMON
fi
if has batch; then                     # finding 5
  $RUN sweep=wr_batch sweep.name=wr_batch_lora optim.lr="$LORA_LR" $COMMON
  $RUN sweep=wr_batch sweep.name=wr_batch_full method=full optim.lr="$FULL_LR" $COMMON
fi
if has seeds; then                     # finding 4, seed 1 (replicates)
  $RUN sweep=wr_targets sweep.n_trials=12 optim.ref_lr="$LORA_LR" $COMMON
fi
if has report; then
  python -m lora_lab.report --experiment without_regret --out docs/results \
    --study wr_lr_lora --study wr_lr_full --study wr_targets --study wr_batch_lora --study wr_batch_full
fi
date
