#!/usr/bin/env bash
# Issue 16 on one H200: a reduced Zoology MQAR sweep (seq 64, d_model 64; 4 mixers x 4 learning rates = 16
# runs), all 16 at once on one GPU (resources.concurrent_runs=16, gpus_per_worker=1/16), through
# `hybridlab run` (Ray Train workers, DeepSpeed, MLflow). The training stack must be unpacked first
# (../shared/device/README.md, "The training stack").
#
#   bash scripts/device/concurrent_sweep.sh                # call 1: start the sweep
#   bash scripts/device/concurrent_sweep.sh PARENT_RUN_ID  # a later call: --resume-sweep (carry sweep16/)
#
# It stops itself cleanly (SIGINT) after $BUDGET_S seconds (default 420) so that one device call of 10
# minutes closes every run (KILLED with a checkpoint, or FINISHED) and prints the one `--resume-sweep` line;
# the MLflow store and its artifacts (sweep16/mlruns.db, sweep16/mlruns/) are copied to $OUT. Checkpoints stay
# on the machine (16 x ~16 MB is over the carry limit): in a later call on a fresh machine the KILLED runs
# start anew as new children (their old runs are tagged hybridlab.superseded), FINISHED ones are skipped.
#
# Success: exit 0 (all 16 finished) or 130 (stopped at the budget, one `--resume-sweep` line), 16 lines
# `[model.layout=…, train.lr=…] MLflow run id: … status: …` in the summary, attention's runs at acc ~1.0.
set -uo pipefail
mkdir -p sweep16
export MLFLOW_TRACKING_URI="sqlite:///$PWD/sweep16/mlruns.db" HYBRIDLAB_STOP_GRACE_S=60
ARGS=(jobs/recipes/zoology-mqar.yaml
      --set 'sweep={model.layout: [attn attn, m2 m2, m3 m3, m3r4 m3r4], train.lr: [1.0e-4, 4.64e-4, 2.15e-3, 1.0e-2]}'
      --set resources.concurrent_runs=16 --set resources.gpus_per_worker=0.0625 --set resources.cpus_per_worker=0.5
      --set train.precision=bf16 --set "storage.path=$PWD/sweep16/runs")
[ -n "${1:-}" ] && ARGS+=(--resume-sweep "$1")
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m hybridlab run "${ARGS[@]}" --dry-run | head -3
start=$(date +%s)
(cd sweep16 && timeout -s INT "${BUDGET_S:-420}" python3 -m hybridlab run "${ARGS[@]/#jobs\//../jobs/}" --plain \
    > run.log 2>&1); rc=$?
echo "exit $rc after $(( $(date +%s) - start )) s"
grep -v " step [0-9]*/" sweep16/run.log | tail -60
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/sweep16" && cp -r sweep16/mlruns.db sweep16/run.log "$OUT/sweep16/"
  [ -d sweep16/mlruns ] && cp -r sweep16/mlruns "$OUT/sweep16/"
fi
exit $rc
