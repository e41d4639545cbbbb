#!/usr/bin/env bash
# Create .venv (if missing) and install hybridlab with the CPU training stack and test tools.
#   bash scripts/install.sh            # CPU: torch 2.13 CPU build, Ray, DeepSpeed, MLflow, triton (interpreter)
#   EXTRAS=train,gpu bash scripts/install.sh   # on a CUDA machine: see README "GPU install"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HYBRIDLAB_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-train,test}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# pip >= 23.1 is all this needs; upgrading only when older keeps a current install quiet and offline
if ! "$VENV/bin/python" -c "import sys, pip; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (23, 1))" 2>/dev/null; then
  $PIP install -q --upgrade pip
fi
# Pin torch first: an unpinned torch pulls GBs of CUDA wheels on a CPU machine.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# setuptools' editable install always adds an informational notice ("Editable installation. Please be careful
# with folders ... with the same name as your package"): not a problem here (no folder is named hybridlab), so
# that one notice is filtered; every other warning still shows.
PYTHONWARNINGS="ignore:Editable installation:UserWarning" $PIP install -q -e ".[${EXTRAS}]"
"$VENV/bin/hybridlab" --help >/dev/null
echo "installed: $("$VENV/bin/python" -c 'import torch, hybridlab; print("hybridlab", hybridlab.__version__, "torch", torch.__version__)')"
