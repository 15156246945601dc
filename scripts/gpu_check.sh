#!/usr/bin/env bash
# One prepared run on the lent CUDA machine. Prepare here with `bash ../shared/device/prepare.sh`, then one device call
# with carry [".gpu"], timeout_s 590 (the device budget is 15 minutes a session: one mode per session):
#   bash scripts/gpu_check.sh        issue #10 (GPU path): bench rows at the issue's three shapes with compiled rows,
#                                    the train loop with trainer=gpu (LoRA and full FT), the CUDA-visible tests.
#   bash scripts/gpu_check.sh sweep  issue #14 (sweeps that fill a GPU): `python -m lora_lab.bench sweep` (the default
#                                    study's space, SmolLM2-135M shape, trainer=gpu uncompiled: cold with 1 trial per
#                                    device vs warm with trials_per_device=auto), the trials_per_device tests.
#   bash scripts/gpu_check.sh qlora  issue #21 (QLoRA, memory plan): Llama-1B shape 8 x 1024, LoRA on a bf16 base
#                                    beside LoRA on an NF4 base (step time and peak, targets <= 1.3x and <= 0.5x), with
#                                    --checkpointing; the memory plan beside torch.cuda.max_memory_allocated (10%).
#   bash scripts/gpu_check.sh dist   issue #22 (one GPU): the same run alone and as one NCCL rank under torchrun
#                                    (DDP over 1 device): time per step, target <= 2% more; the NCCL path trains.
# Prepared on the CPU; no device was lent when they were written (qlora and dist: not run anywhere yet).
set -u
export PYTHONUNBUFFERED=1
S=$(date +%s); log(){ echo "=== [$(( $(date +%s) - S ))s] $*"; }
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site LORA_LAB_OUTPUTS=/tmp/out LORA_LAB_CACHE=/tmp/cache OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tail -1
if [ "${1:-path}" = qlora ]; then
  log bench-1b-nf4; timeout 200 python3 -m lora_lab.bench core --shape llama-1b --batch 8 --seq 1024 --steps 6 --warmup 3 \
    --quantize nf4 --out "$OUT/b1b_nf4.json" 2>&1 | grep -v "^W1\|Warning" | tail -30
  log bench-ckpt; timeout 120 python3 -m lora_lab.bench core --checkpointing --methods lora_lab --batch 8 --seq 512 \
    --steps 4 --warmup 2 --out "$OUT/ckpt.json" 2>&1 | grep -v "^W1\|Warning" | tail -20
  log plan; timeout 200 python3 -m lora_lab.bench plan --steps 3 --out "$OUT/plan.json" 2>&1 | grep -v "^W1\|Warning" | tail -30
  log done; exit 0
fi
if [ "${1:-path}" = dist ]; then
  SHAPE="$(python3 -c 'from lora_lab.shapes import tiny_overrides; print(*tiny_overrides("smollm2-135m"))') data=tiny_sentiment"
  RUN="$SHAPE trainer=gpu trainer.progress=false trainer.max_steps=60 trainer.eval_every=60 tracking=off"
  for i in 1 2; do  # alternate, twice each: the median of each side
    log alone-$i; timeout 90 python3 -m lora_lab.train $RUN output_dir=/tmp/out/alone$i 2>&1 | tail -3
    log nccl-$i; timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m lora_lab.train $RUN output_dir=/tmp/out/nccl$i 2>&1 | grep -i "nccl\|error\|ddp" | tail -5
  done
  python3 - <<'PY'
import json
t = {k: [json.load(open(f"/tmp/out/{k}{i}/metrics.json"))["time_per_step_s"] for i in (1, 2)] for k in ("alone", "nccl")}
print("time per step alone", t["alone"], "one NCCL rank", t["nccl"], "ratio %.3f (target <= 1.02)" % (min(t["nccl"]) / min(t["alone"])))
PY
  log done; exit 0
fi
if [ "${1:-path}" = sweep ]; then
  log bench-sweep; timeout 460 python3 -m lora_lab.bench sweep --trials 24 --out "$OUT/bench_sweep.json" 2>&1 | grep -v "^W1\|Warning" | tail -20
  log tests; timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_sweep_devices.py 2>&1 | tail -8
  log done; exit 0
fi
# The SmolLM2-135M shape as model=tiny overrides, from the shape table (lora_lab/shapes.py SHAPE_FIELDS).
SHAPE="$(python3 -c 'from lora_lab.shapes import tiny_overrides; print(*tiny_overrides("smollm2-135m"))') data=tiny_sentiment trainer.progress=false"
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
