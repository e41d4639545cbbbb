#!/bin/bash
# Issue 7 on the GPU machine: CuTe DSL decode tests + `bench decode`, in one device call.
# Needs nvidia-cutlass-dsl unpacked into /tmp/site (../shared/device/README.md: part a in the call before,
# part b here). scripts/device_env.sh makes the repo importable as `hybridlab` (no pip install there).
#   run from the repo root:  bash scripts/device_decode_bench.sh [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -f .cute/b/install.sh ]; then bash .cute/b/install.sh || exit 1; fi
source scripts/device_env.sh
export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, cutlass, tvm_ffi; print('torch', torch.__version__, torch.cuda.get_device_name(), 'tvm_ffi', tvm_ffi.__version__)"
echo "== tests"
timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -m gpu tests/test_decode.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -30
echo "== bench"
timeout ${BENCH_TIMEOUT:-140} python3 -m hybridlab.bench_decode --out "$OUT" --quick "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
