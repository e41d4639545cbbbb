"""The GPU checks of ``ssm_scan_fused`` on one GPU, each case in its own process, several at once.

    python scripts/device/fused_gpu_check.py [--jobs 4] [--cases NAME,NAME] [--timeout 240]

Runs every case of ``tests/test_ssm_fused.py::GPU_CASES`` as ``gpu_case_main(name)`` in a fresh Python with
CUDA_LAUNCH_BLOCKING=1 (an illegal memory access then names the kernel that made it, and poisons only its own
process), with every kernel of the fused op run inside NaN guard zones on the device (tests/guard_zones.py:
an out-of-range write or unmasked read that does not fault is reported as a "guard violation"):

  siso-bf16, mimo4-bf16, siso-fp32, mimo4-fp32   the layer's scan shapes: 2 x 1000 tokens (a chunk tail), 64 heads,
                                                 d_state 128 (32 angles), headdim 64, norm + bias, a carried state;
                                                 values and gradients vs the float64 reference; the fused kernels
                                                 must fit (no fallback warning)
  packed-mimo4-fp32                              packed documents (a 1-token document, a chunk-straddling one)
  fallback-mimo4-bf16                            HYBRIDLAB_SSM_FUSED_MAX_SHARED=1024: every class "does not fit", so
                                                 the op must take the unfused chain, with exactly one warning
  layer-siso-fp32, layer-mimo4-fp32              a whole float32 Mamba-3 layer at d_model 2048 (the first H200 run's
                                                 OutOfResources), vs the same layer on the torch backend: it must
                                                 not crash, and may take either path (the line says which)

Each line reads "ok|FAIL <case> <seconds> <case>: <path>; max rel err ...; guard violations [...]". Exit 0 and
"all N cases passed" is success; a failed case's last 60 lines follow the summary (a fault shows
"<kernel> (grid ..., {...}) failed: ... illegal memory access"). "pre-check could not run" lines mean the
launch pre-check's machinery failed on this triton (the launch-time OutOfResources net still applies).
About 2-3 minutes on one H200 (most of it compiling, cached on disk by triton for a second run).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path.insert(0, str(TESTS))


def main(argv=None) -> int:
    import test_ssm_fused as t  # noqa: E402  (tests/ on the path)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=4, help="cases at once (each compiles its kernels: CPU-bound)")
    ap.add_argument("--cases", default=",".join(t.GPU_CASES), help="comma-separated case names")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per case (then it counts as failed)")
    args = ap.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in t.GPU_CASES]
    if unknown:
        print(f"fused_gpu_check: unknown case(s) {unknown}; choose from {', '.join(t.GPU_CASES)}", file=sys.stderr)
        return 2
    t0 = time.time()

    def one(name):
        start = time.time()
        try:
            proc = t.run_gpu_case(name, timeout=args.timeout)
            return name, proc.returncode, proc.stdout + proc.stderr, time.time() - start
        except Exception as e:  # noqa: BLE001 - a timeout: report it as a failed case
            return name, -1, f"{type(e).__name__}: {e}", time.time() - start

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, rc, out, secs in pool.map(one, names):
            line = next((ln for ln in out.splitlines() if ln.startswith(name + ":")), out.strip().splitlines()[-1:] or [""])
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {name:22s} {secs:6.1f} s  {line if isinstance(line, str) else line[0]}",
                  flush=True)
            if rc != 0:
                failed.append((name, out))
    for name, out in failed:
        print(f"\n===== {name} (last 60 lines)\n" + "\n".join(out.splitlines()[-60:]))
    print(f"\n{len(names) - len(failed)} of {len(names)} cases passed in {time.time() - t0:.0f} s"
          if failed else f"\nall {len(names)} cases passed in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
