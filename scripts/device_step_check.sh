#!/usr/bin/env bash
# Issue 14 item 1 on one GPU: `hybridlab bench train` runs the job's step, so its tokens/s and a real
# `hybridlab run`'s train/tokens_per_s agree at the same settings; and the per-step time of a 2M-parameter
# model at 1k tokens per step (the overhead of the loop: Ray reporting, MLflow logging and checkpoint
# bookkeeping are off the hot path). Needs Ray + MLflow + DeepSpeed importable (device/train-stack-pack.sh).
#   run from the repo root:  bash scripts/device_step_check.sh
# Prints two JSON lines (bench, run) and a last line "ratio run/bench tokens_per_s: X; step_ms bench A run B".
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device_env.sh
SPEC=${SPEC:-zoo:tiny-hybrid}; SEQ=${SEQ:-1024}; MB=${MB:-1}; STEPS=${STEPS:-200}
python3 -m hybridlab.cli bench train "$SPEC" --seq-len "$SEQ" --micro-batch "$MB" --steps "$STEPS" --warmup 20 \
  --zero 2 --precision bf16 --log-every 10 --json "$OUT/bench.jsonl" | tail -1
cat > "$OUT/job.yaml" <<YAML
experiment: step-check
model: $SPEC
data: {task: mqar, vocab: 8192, seq_len: $SEQ, num_kv_pairs: 8}
train: {steps: $((STEPS + 20)), micro_batch: $MB, precision: bf16, zero_stage: 2, log_every: 10, warmup: 0, lr: 1.0e-4}
resources: {workers: 1, gpus_per_worker: 1}
storage: {path: $OUT/runs}
YAML
CI=1 MLFLOW_TRACKING_URI="sqlite:///$OUT/mlruns.db" timeout 900 python3 -m hybridlab run "$OUT/job.yaml" > "$OUT/run.log" 2>&1
echo "run rc=$?"; tail -3 "$OUT/run.log"
python3 - "$OUT" <<'PY'
import json, statistics, sys
from mlflow import MlflowClient
out = sys.argv[1]
bench = json.loads(open(f"{out}/bench.jsonl").read().splitlines()[-1])
c = MlflowClient(f"sqlite:///{out}/mlruns.db")
run = c.search_runs([c.get_experiment_by_name("step-check").experiment_id])[0]
def med(key):
    h = sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)[2:]  # past the first log points
    return statistics.median(m.value for m in h)
tps, step_s = med("train/tokens_per_s"), med("train/step_time_s")
print(json.dumps({"run_tokens_per_s": tps, "run_step_ms": step_s * 1e3}))
print(f"ratio run/bench tokens_per_s: {tps / bench['tokens_per_s']:.3f}; step_ms bench {bench['step_ms']:.2f} run {step_s * 1e3:.2f}")
PY
