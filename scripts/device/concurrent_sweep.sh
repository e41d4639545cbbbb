#!/usr/bin/env bash
# Issue 16 on one H200: a reduced Zoology MQAR sweep (seq 64, d_model 64; 4 mixers x 4 learning rates = 16
# runs), all 16 at once on one GPU (resources.concurrent_runs=16, gpus_per_worker=1/16), through
# `hybridlab run` (Ray Train workers, DeepSpeed, MLflow), in calls of $BUDGET_S seconds (sweep_calls.sh:
# the first call starts it, each later call on the same folder continues it with --resume-sweep).
#
#   bash scripts/device/concurrent_sweep.sh     # call 1, then again for call 2, 3, ... (carry sweep16/)
#
# Success: exit 0 (all 16 finished) or 130 (stopped at the budget: call again), 16 lines
# `[model.layout=…, train.lr=…] MLflow run id: … status: …` in the summary, attention's runs at acc ~1.0.
set -uo pipefail
cd "$(dirname "$0")/../.."
exec bash scripts/device/sweep_calls.sh sweep16 jobs/recipes/zoology-mqar.yaml \
  --set 'sweep={model.layout: [attn attn, m2 m2, m3 m3, m3r4 m3r4], train.lr: [1.0e-4, 4.64e-4, 2.15e-3, 1.0e-2]}' \
  --set resources.concurrent_runs=16 --set resources.gpus_per_worker=0.0625 --set resources.cpus_per_worker=0.5 \
  --set train.precision=bf16
