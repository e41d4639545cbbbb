#!/bin/bash
# Issue 14 (kernels) + 17 (packed documents) on one H200. Three parts, each well inside one 10-minute
# device call (run them as separate calls, or together when time allows):
#   tests  the GPU tests of every Triton op against its reference at full size, bf16 and fp32 (fused scan,
#          plain scan incl. packed documents, ssm_io stages, torch.compile of HybridLM on CUDA, flash-attn-4
#          as a custom op, chunked cross-entropy)                                               (~4 min)
#   bench  `bench ssm` on the first shape: scan, fused scan vs the unfused chain (+ peak memory), checks (~3 min)
#   layer  whole Mamba-3 layers: ours eager / compiled vs the official mamba_ssm Mamba3 (when carried) (~5 min)
#   layer-unfused  ours eager with HYBRIDLAB_SSM_FUSED=0 (qk_prep -> rank_expand -> ssm_scan): the A/B (~2 min)
#   fusedcheck     scripts/device/fused_gpu_check.py: the fused scan's GPU cases, each in its own process (~2-3 min);
#                  success: "all 8 cases passed"
#   resources      python -m hybridlab.kernels.bench.triton_resources --set layer: every layer class's kernels'
#                  shared memory / registers / spills (ptxas and the driver's), ~3 min; success: "all within the limits"
#   run from the repo root:  bash scripts/device_fused_bench.sh tests bench     # then: ... layer
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${*:-tests bench layer}
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -c "import mamba_ssm; print('official mamba_ssm', mamba_ssm.__version__)" 2>/dev/null || echo "official mamba_ssm: not importable (layer rows skip it)"
for part in $PARTS; do
  case $part in
    tests) echo "== tests"
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
        tests/test_ssm_fused.py tests/test_ssm_scan.py tests/test_ssm_io.py tests/test_compile.py 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
    bench) echo "== bench ssm (first shape)"
      timeout ${BENCH_TIMEOUT:-240} python3 -m hybridlab.kernels.bench.ssm --out "$OUT" --quick --no-peers 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    layer) echo "== layer bench"
      timeout ${LAYER_TIMEOUT:-420} python3 scripts/bench_mamba3_layer.py --out "$OUT" 2>&1 | tee "$OUT/layer.log" | tail -20 ;;
    layer-unfused) echo "== layer bench, unfused chain"
      HYBRIDLAB_SSM_FUSED=0 timeout ${LAYER_TIMEOUT:-420} python3 scripts/bench_mamba3_layer.py --out "$OUT/unfused" \
        --no-compile --no-official 2>&1 | tee "$OUT/layer_unfused.log" | tail -12 ;;
    fusedcheck) echo "== ssm_scan_fused GPU cases, one process each (CUDA_LAUNCH_BLOCKING=1, guard zones)"
      timeout ${CHECK_TIMEOUT:-420} python3 scripts/device/fused_gpu_check.py 2>&1 | tee "$OUT/fusedcheck.log" | tail -40 ;;
    resources) echo "== fused kernels' resources per class (compiled here; the driver's figures from this GPU)"
      timeout ${RES_TIMEOUT:-420} python3 -m hybridlab.kernels.bench.triton_resources --set layer \
        --json "$OUT/resources.json" 2>/dev/null | tee "$OUT/resources.log" | tail -80 ;;
    *) echo "unknown part $part (fusedcheck | resources | tests | bench | layer | layer-unfused)"; exit 2 ;;
  esac
done
