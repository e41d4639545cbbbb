#!/usr/bin/env bash
# Issue 14 on one GPU (items 1, 3, 5, 6): `hybridlab bench train` runs the job's step, so its tokens/s and a
# real `hybridlab run`'s train/tokens_per_s agree at the same settings (within 5 %); the per-step time of a
# 2M-parameter model at 1k tokens per step through `hybridlab run` (target <= 10 ms) and through the Worker
# loop without Ray (scripts/profile_step.py: the loop's own cost); with --big, transformer-440m and
# hybrid-1in4-440m at seq 2048 x micro-batch 8 with --baseline (the plain PyTorch loop in the same process).
# Needs Ray + MLflow + DeepSpeed importable (device/train-stack-pack.sh).
#   run from the repo root:  bash scripts/device_step_check.sh [--big] [--no-compile]
#   (tiny part ~3-4 min, mostly Ray/DeepSpeed start-up and the first compile; --big adds ~4-6 min)
# Prints one line starting "SUMMARY" per measurement (JSON lines and logs are in $OUT).
set -uo pipefail
BIG=0; COMPILE=--compile
for a in "$@"; do
  case "$a" in
    --big) BIG=1 ;;
    --no-compile) COMPILE=--no-compile ;;
    *) echo "unknown argument $a (use --big, --no-compile)"; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device_env.sh
SPEC=${SPEC:-zoo:tiny-hybrid}; SEQ=${SEQ:-1024}; MB=${MB:-1}; STEPS=${STEPS:-200}
JOB_COMPILE=$([ "$COMPILE" = --compile ] && echo true || echo false)

# 1. bench train: the job's step on random tokens
python3 -m hybridlab.cli bench train "$SPEC" --seq-len "$SEQ" --micro-batch "$MB" --steps "$STEPS" --warmup 20 \
  --zero 2 --precision bf16 --log-every 10 $COMPILE --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -1 "$OUT/bench.log" | cut -c1-400

# 2. the same model and shapes through the Worker loop without Ray (its own host-side cost)
python3 scripts/profile_step.py --spec "$SPEC" --seq-len "$SEQ" --micro-batch "$MB" --steps "$STEPS" --device cuda \
  --compile "$JOB_COMPILE" > "$OUT/worker.log" 2>&1
echo "worker rc=$?"
grep "worker loop" "$OUT/worker.log" | sed 's/^/SUMMARY /'

# 3. a real `hybridlab run` (Ray, MLflow) at the same settings
cat > "$OUT/job.yaml" <<YAML
experiment: step-check
model: $SPEC
data: {task: mqar, vocab: 8192, seq_len: $SEQ, num_kv_pairs: 8}
train: {steps: $((STEPS + 20)), micro_batch: $MB, precision: bf16, zero_stage: 2, log_every: 10, warmup: 0, lr: 1.0e-4, compile: $JOB_COMPILE}
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
print(f"SUMMARY bench train {bench['spec']} seq {bench['seq_len']} x mb {bench['micro_batch']}: "
      f"{bench['tokens_per_s']:,.0f} tokens/s, {bench['step_ms']:.2f} ms/step (compile {bench['compile']}, "
      f"compile_s {bench['compile_s']}, optimizer {bench['optimizer']})")
c = MlflowClient(f"sqlite:///{out}/mlruns.db")
run = c.search_runs([c.get_experiment_by_name("step-check").experiment_id])[0]
def med(key):
    h = sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)[2:]  # past the first log points
    return statistics.median(m.value for m in h)
tps, step_s = med("train/tokens_per_s"), med("train/step_time_s")
comp = run.data.metrics.get("train/compile_s")
print(json.dumps({"run_tokens_per_s": tps, "run_step_ms": step_s * 1e3, "run_compile_s": comp}))
ratio = tps / bench["tokens_per_s"]
print(f"SUMMARY hybridlab run {bench['spec']}: {tps:,.0f} tokens/s, {step_s * 1e3:.2f} ms/step (target <= 10 ms: "
      f"{'met' if step_s * 1e3 <= 10 else 'MISSED'}), train/compile_s {comp}")
print(f"SUMMARY ratio run/bench tokens_per_s: {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} 5 %); "
      f"step_ms bench {bench['step_ms']:.2f} run {step_s * 1e3:.2f}")
PY

# 4. --big: the 440M models at seq 2048 x micro-batch 8, each with the plain PyTorch loop in the same process
if [ "$BIG" = 1 ]; then
  for M in transformer-440m hybrid-1in4-440m; do
    python3 -m hybridlab.cli bench train "zoo:$M" --seq-len 2048 --micro-batch 8 --steps 20 --warmup 5 --zero 2 \
      --precision bf16 $COMPILE --baseline --json "$OUT/big.jsonl" > "$OUT/big-$M.log" 2>&1
    echo "bench $M rc=$?"
    grep -E "ratio [0-9]" "$OUT/big-$M.log" | tail -1 | sed 's/^/SUMMARY /' || tail -5 "$OUT/big-$M.log"
  done
  python3 - "$OUT" <<'PY'
import json, sys
for line in open(f"{sys.argv[1]}/big.jsonl"):
    r = json.loads(line); b = r["baseline"]
    mfu = lambda x: f"{100 * x:.1f} %" if x else "n/a"
    print(f"SUMMARY {r['spec']} seq {r['seq_len']} x mb {r['micro_batch']}: step {r['tokens_per_s']:,.0f} tokens/s "
          f"(MFU {mfu(r['mfu'])}, {r['peak_memory_gib']:.1f} GiB) vs plain loop {b['tokens_per_s']:,.0f} "
          f"(MFU {mfu(b['mfu'])}, {b['peak_memory_gib']:.1f} GiB), compile {r['compile']}: ratio {r['ratio']:.3f}")
PY
fi
