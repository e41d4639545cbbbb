#!/usr/bin/env bash
# On a GPU machine without network (the device tool): install the carried wheels (.whl: deepspeed and
# its small deps), make hybridlab importable, and measure training throughput of the zoo's 440M
# models on 1 GPU (and 2 with torchrun when there are 2). Output: $OUT/train_bench.jsonl + one log per run.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device_env.sh
J=$OUT/train_bench.jsonl
ARGS="--seq-len 2048 --steps ${STEPS:-10} --warmup 3 --json $J"
nvidia-smi --query-gpu=name,memory.total --format=csv
# each argument: NGPUS:SPEC [options], e.g. "2:zoo:hybrid-1in4-440m --zero 3"
i=0
for run in "$@"; do
  i=$((i+1)); n=${run%%:*}; rest=${run#*:}
  echo "=== $n GPU: $rest"
  if [ "$n" = 1 ]; then launcher="python3 -m"; else launcher="torchrun --standalone --nproc-per-node $n -m"; fi
  eval "timeout ${RUN_TIMEOUT:-200} $launcher hybridlab.cli bench train $rest $ARGS" >"$OUT/run$i.log" 2>&1
  echo "rc=$?"; grep -E '^\{|Error|error' "$OUT/run$i.log" | tail -3
done
