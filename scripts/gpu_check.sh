#!/usr/bin/env bash
# One prepared run on the lent CUDA machine (issue #10: GPU path): bench rows at the three shapes of the issue with
# compiled rows, the train loop with trainer=gpu (LoRA and full FT), the CUDA-visible tests. Prepare here with
# `bash ../shared/device/prepare.sh`, copy this file to .gpu/, then one device call: `bash .gpu/gpu_check.sh`, carry
# [".gpu"], timeout_s 590. It was prepared and dry-run on the CPU; its first device call was refused (no machine lent).
set -u
export PYTHONUNBUFFERED=1
S=$(date +%s); log(){ echo "=== [$(( $(date +%s) - S ))s] $*"; }
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site LORA_LAB_OUTPUTS=/tmp/out LORA_LAB_CACHE=/tmp/cache OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tail -1
SHAPE="model=tiny model.tiny.hidden_size=576 model.tiny.num_layers=30 model.tiny.num_heads=9 model.tiny.num_kv_heads=3 model.tiny.intermediate_size=1536 data=tiny_sentiment trainer.progress=false"
T="tracking.uri=sqlite:////tmp/out/mlflow.db"
B="python3 -m lora_lab.bench core --compile --no-memory --steps 6 --warmup 3"
log bench-16x1024; timeout 95 $B --batch 16 --seq 1024 --out "$OUT/b16x1024.json" 2>&1 | grep -v "^W1\|Warning" | tail -34
log bench-1b; timeout 95 $B --shape llama-1b --batch 8 --seq 1024 --out "$OUT/b1b.json" 2>&1 | grep -v "^W1\|Warning" | tail -34
log train-lora; timeout 75 python3 -m lora_lab.train $SHAPE trainer=gpu $T output_dir=/tmp/out/lora 2>&1 | grep -v "^W1\|Warning" | tail -16
cp /tmp/out/lora/metrics.json "$OUT/lora_metrics.json"
log train-full; timeout 65 python3 -m lora_lab.train $SHAPE trainer=gpu method=full optim.lr=1e-4 $T output_dir=/tmp/out/full 2>&1 | grep -v "^W1\|Warning" | tail -14
cp /tmp/out/full/metrics.json "$OUT/full_metrics.json"
log bench-64x48; timeout 60 $B --batch 64 --seq 48 --out "$OUT/b64x48.json" 2>&1 | grep -v "^W1\|Warning" | tail -20
log bench-4x128; timeout 75 python3 -m lora_lab.bench core --compile --steps 6 --warmup 3 --out "$OUT/b4x128.json" 2>&1 | grep -v "^W1\|Warning" | tail -34
log tests; timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_path.py tests/test_train.py 2>&1 | tail -15
log done
