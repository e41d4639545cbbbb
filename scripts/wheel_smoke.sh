#!/usr/bin/env bash
# CI: hybridlab as users install it. Build the wheel, install it NON-editable into a fresh environment outside
# the repo, and run `hybridlab check` and a short quickstart from there (a module missing from the wheel fails
# here, not on a user's cluster).
#   bash scripts/wheel_smoke.sh          # after scripts/install.sh (uses .venv's torch, Ray, DeepSpeed, MLflow)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/hlwheel-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
DEPS=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .
.venv/bin/python -m venv --without-pip "$WORK/venv"
PY=$WORK/venv/bin/python
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The fresh environment holds the wheel alone (--no-deps); its dependencies come from .venv's site-packages
# through a plain path line in a .pth file. Python adds that folder but runs none of the .pth files inside it,
# so .venv's editable hybridlab (an import hook installed by a .pth file there) stays invisible.
echo "$DEPS" > "$SITE/hybridlab-deps.pth"
.venv/bin/python -m pip --python "$PY" install -q --no-deps --no-index "$WORK"/dist/hybridlab-*.whl
cd "$WORK"  # outside the repo: nothing can come from the checkout
"$PY" - "$WORK" <<'PY'
import importlib, pkgutil, sys
import hybridlab
assert hybridlab.__file__.startswith(sys.argv[1]), f"hybridlab imported from {hybridlab.__file__}, not the wheel"
for m in pkgutil.walk_packages(hybridlab.__path__, "hybridlab."):
    if m.ispkg:
        importlib.import_module(m.name)
print("wheel imports from", hybridlab.__path__[0])
PY
HL=$WORK/venv/bin/hybridlab
"$HL" --help >/dev/null
"$HL" check zoo:tiny-hybrid >/dev/null
RECIPE=$("$PY" -c "import hybridlab.jobs, os; print(os.path.join(os.path.dirname(hybridlab.jobs.__file__), 'recipes', 'quickstart.yaml'))")
CI=1 MLFLOW_TRACKING_URI="sqlite:///$WORK/mlruns.db" "$HL" run "$RECIPE" --set train.steps=2 --set train.log_every=1 \
  --set resources.workers=1 --set 'eval=[]' --set storage.path="$WORK/runs" >"$WORK/run.log" 2>&1 \
  || { tail -20 "$WORK/run.log"; exit 1; }
grep -q "status: finished" "$WORK/run.log" || { tail -20 "$WORK/run.log"; exit 1; }
echo "wheel smoke: check and a 2-step quickstart ran from the installed wheel"
