#!/usr/bin/env bash
# Issue 14 item 5 / issue 16 on one GPU: the step time of small models (the paper recipes' parity and MQAR
# models, tiny-hybrid) by torch.compile mode — eager, compiled, compiled with CUDA graphs (reduce-overhead) —
# for the plain PyTorch loop (jobs/baseline.py) and, with DeepSpeed importable, the job's step
# (`hybridlab bench train`, which runs the job's own step function; tiny-mixed: precision bf16-mixed).
#   run from the repo root:  bash scripts/device_small_steps.sh [--plain-only]
# Prints one "SUMMARY" line per measurement; JSON lines go to $OUT/small_steps.jsonl.
set -uo pipefail
PLAIN_ONLY=0
for a in "$@"; do
  case "$a" in
    --plain-only) PLAIN_ONLY=1 ;;
    *) echo "unknown argument $a (use --plain-only)"; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device_env.sh
SPECS=/tmp/small_specs; mkdir -p $SPECS
# the recipes' models as spec files (layout and width as the sweeps set them)
python3 - "$SPECS" <<'PY'
import sys, yaml
out = sys.argv[1]
def write(recipe, name, **over):
    model = yaml.safe_load(open(f"jobs/recipes/{recipe}.yaml"))["model"]
    model.update(over, name=name)
    with open(f"{out}/{name}.yaml", "w") as f:
        yaml.safe_dump(model, f, sort_keys=False)
write("paper-state-tracking", "parity-m3", layout="m3", d_model=32)
write("zoology-mqar", "mqar-m3-d128", layout="m3 m3", d_model=128)
write("zoology-mqar", "mqar-attn-d128", layout="attn attn", d_model=128)
PY
# name  spec  seq  micro-batch  precision
CASES="tiny zoo:tiny-hybrid 1024 1 bf16
tiny-mixed zoo:tiny-hybrid 1024 1 bf16-mixed
parity $SPECS/parity-m3.yaml 40 256 fp32
mqar-m3 $SPECS/mqar-m3-d128.yaml 64 512 fp32
mqar-attn $SPECS/mqar-attn-d128.yaml 64 512 fp32"
STEPS=${STEPS:-100}

echo "$CASES" | while read -r name spec seq mb prec; do
  [ "$prec" = bf16-mixed ] && continue  # the plain loop is bf16 autocast over fp32 parameters already
  python3 - "$name" "$spec" "$seq" "$mb" "$STEPS" "$OUT/small_steps.jsonl" <<'PY'
import json, sys, torch
from hybridlab.jobs.baseline import measure_baseline
name, spec, seq, mb, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
for compile, mode in ((False, "default"), (True, "default"), (True, "reduce-overhead")):
    try:
        r = measure_baseline(spec, seq, mb, steps=steps, warmup=10, compile=compile, compile_mode=mode)
    except Exception as e:  # a mode that fails is a result too
        print(f"SUMMARY plain {name} compile={compile} mode={mode}: FAILED {type(e).__name__}: {str(e)[:300]}")
        continue
    torch._dynamo.reset()
    r.update(case=name, spec=spec, seq_len=seq, micro_batch=mb)
    open(out, "a").write(json.dumps(r) + "\n")
    print(f"SUMMARY plain {name} seq {seq} x mb {mb} compile={compile} mode={mode}: {r['step_ms']:.2f} ms/step "
          f"({r['tokens_per_s']:,.0f} tokens/s, warmup {r['warmup_s']:.1f} s)", flush=True)
PY
done
[ "$PLAIN_ONLY" = 1 ] && exit 0

echo "$CASES" | while read -r name spec seq mb prec; do
  zero=$([ "$prec" = fp32 ] && echo 0 || echo 2)
  for mode in eager default reduce-overhead; do
    if [ $mode = eager ]; then c="--no-compile"; m=default; else c="--compile"; m=$mode; fi
    python3 -m hybridlab.cli bench train "$spec" --seq-len "$seq" --micro-batch "$mb" --steps "$STEPS" --warmup 10 \
      --zero $zero --precision "$prec" --log-every 50 $c --compile-mode $m --json "$OUT/bench_$name.jsonl" \
      > "$OUT/bench_${name}_$mode.log" 2>&1
    rc=$?
    python3 - "$OUT/bench_$name.jsonl" "$name" "$mode" "$rc" "$OUT/bench_${name}_$mode.log" <<'PY'
import json, sys
path, name, mode, rc, log = sys.argv[1:]
if rc != "0":
    print(f"SUMMARY job-step {name} {mode}: FAILED rc={rc}: " + open(log).read()[-400:].replace("\n", " | "))
else:
    r = json.loads(open(path).read().splitlines()[-1])
    print(f"SUMMARY job-step {name} seq {r['seq_len']} x mb {r['micro_batch']} {r['precision']} zero {r['zero_stage']} "
          f"{mode}: {r['step_ms']:.2f} ms/step ({r['tokens_per_s']:,.0f} tokens/s, compile_s {r['compile_s']})")
PY
  done
done
