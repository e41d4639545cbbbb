# Source on a GPU machine without network (the device tool) from the repo root: installs the carried
# wheels in .whl (if any) and makes `hybridlab` importable without pip (a shim of symlinks).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r platform/hybridlab /tmp/shim/hybridlab
for d in arch kernels jobs; do ln -sfn "$PWD/$d" /tmp/shim/hybridlab/$d; done
export PYTHONPATH=/tmp/shim:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
