#!/bin/bash
# On the GPU machine, from the repo root, carrying [".parity"] (scripts/device/pack_official_parity.sh made it):
#   bash scripts/device/official_parity.sh [--quick] [--skip-kernels] ...
# With nvidia-cutlass-dsl unpacked in the same warm machine (shared/device/README.md) the CuTe checks run too.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .parity/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
source scripts/device_env.sh
cat .parity/SOURCE 2>/dev/null
timeout ${PARITY_TIMEOUT:-560} python3 scripts/device/official_parity.py --mamba-src .parity/src --out "$OUT" "$@" 2>&1 | tee "$OUT/official_parity.log"
exit ${PIPESTATUS[0]}
