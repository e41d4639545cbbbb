"""The GPU checks of ``ssm_scan_fused`` on one GPU, each case in its own process, several at once.

    python scripts/device/fused_gpu_check.py [--jobs 3] [--cases NAME,NAME] [--timeout 300]

Runs every case of ``tests/test_ssm_fused.py::GPU_CASES`` (the layer's shapes in bf16 and fp32, SISO and MIMO
R=4, packed documents, the forced fallback to the unfused chain, whole float32 Mamba-3 layers at d_model 2048)
as ``gpu_case_main(name)`` in a fresh Python with CUDA_LAUNCH_BLOCKING=1: a fault names its kernel and poisons
only its own process; guard zones on the device catch out-of-range writes. Prints one line per case and exits
1 if any failed (their output follows). Success: every line ``ok`` and "all N cases passed".
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
    ap.add_argument("--jobs", type=int, default=3, help="cases at once (each compiles its kernels: CPU-bound)")
    ap.add_argument("--cases", default=",".join(t.GPU_CASES), help="comma-separated case names")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
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
