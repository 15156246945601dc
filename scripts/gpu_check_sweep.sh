#!/usr/bin/env bash
# One prepared run on the lent CUDA machine for issue #14 (sweeps that fill a GPU): `python -m lora_lab.bench sweep`
# (the default study's space on the SmolLM2-135M shape with trainer=gpu, cold with 1 trial per device vs warm with
# trials_per_device=auto) and the several-trials-per-device tests with CUDA visible. Prepare here with
# `bash ../shared/device/prepare.sh`, copy this file to .gpu/, then one device call: `bash .gpu/gpu_check_sweep.sh`,
# carry [".gpu"], timeout_s 590 (a session separate from scripts/gpu_check.sh's: the device budget is 15 minutes).
set -u
export PYTHONUNBUFFERED=1
S=$(date +%s); log(){ echo "=== [$(( $(date +%s) - S ))s] $*"; }
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site LORA_LAB_OUTPUTS=/tmp/out LORA_LAB_CACHE=/tmp/cache OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
log bench-sweep; timeout 460 python3 -m lora_lab.bench sweep --trials 24 --out "$OUT/bench_sweep.json" 2>&1 | grep -v "^W1\|Warning" | tail -20
log tests; timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_sweep_devices.py 2>&1 | tail -8
log done
