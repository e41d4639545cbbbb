#!/bin/bash
# Pack what scripts/device/official_parity.py needs on the GPU machine (no network there) into DIR (default .parity):
#   DIR/src/mamba_ssm, DIR/src/tests   the official state-spaces/mamba code at the mirror's HEAD (to run it, never
#                                       committed: DIR goes into .git/info/exclude)
#   DIR/whl/safetensors-*.whl          hybridlab's model folders need it; the device image lacks it
# Usage, from the repo root:  bash scripts/device/pack_official_parity.sh [DIR]
set -euo pipefail
DIR=${1:-.parity}
MIRROR=${MAMBA_MIRROR:-/work/.mirror/state-spaces+mamba/repo}
rm -rf "$DIR" && mkdir -p "$DIR/src" "$DIR/whl"
git -C "$MIRROR" archive HEAD mamba_ssm tests | tar -x -C "$DIR/src"
git -C "$MIRROR" log -1 --format='official source: state-spaces/mamba %H %cs' > "$DIR/SOURCE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$DIR/whl" "safetensors==0.8.0"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$DIR/" "$EXCLUDE" 2>/dev/null || echo "/$DIR/" >> "$EXCLUDE"
du -sh "$DIR"; cat "$DIR/SOURCE"; ls "$DIR/whl"
