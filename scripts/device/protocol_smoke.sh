#!/usr/bin/env bash
# GPU check of the protocol options (issue 16, part A), after the training stack is unpacked
# (shared/device/README.md, "The training stack"): run from the repo root on one H200.
#   1. the gpu-marked tests of rope: standard (Triton prefill + unfused step + CUDA graphs = forward);
#   2. one short combination of each recipe through `hybridlab run` on the GPU (curriculum stages of
#      50 steps, the scaled metric at 256), printing its wall time and evals.
# Success: "passed" from pytest, two "status: finished" lines, and eval lines with scaled_acc.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export CI=1 MLFLOW_TRACKING_URI=sqlite:///$OUT/mlruns.db
python3 -m pytest -q -m gpu tests/test_rope_standard.py 2>&1 | tail -3
t0=$(date +%s)
python3 -m hybridlab run jobs/recipes/paper-state-tracking.yaml \
  --set 'sweep=[{model.layout: m3_std, train.lr: 0.003}]' --set train.steps=200 --set train.warmup=20 \
  --set data.curriculum.steps_per_stage=50 --set train.checkpoint_every=0 --set resources.gpus_per_worker=1 \
  --set storage.path=$OUT/runs >"$OUT/state_tracking.log" 2>&1
echo "state-tracking rc=$? wall=$(( $(date +%s) - t0 ))s"; grep -E "status:|eval " "$OUT/state_tracking.log"
t0=$(date +%s)
python3 -m hybridlab run jobs/recipes/zoology-mqar.yaml \
  --set 'sweep=[{model.layout: m3r4 m3r4, train.lr: 0.00215}]' --set resources.gpus_per_worker=1 \
  --set storage.path=$OUT/runs >"$OUT/zoology.log" 2>&1
echo "zoology rc=$? wall=$(( $(date +%s) - t0 ))s"; grep -E "status:|eval " "$OUT/zoology.log"
