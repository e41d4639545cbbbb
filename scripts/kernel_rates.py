"""What limits each kernel of one Mamba-3 layer's forward + backward: achieved DRAM bandwidth and SM
throughput from Nsight Compute's counters (issue 14: the layer targets' gaps, kernel by kernel).

    python scripts/kernel_rates.py [--ranks 1,4] [--d-state 128] [--batch 8] [--seqlen 2048] [--d-model 2048]
                                   [--official [--mamba-src DIR]] [--out DIR] [--ncu PATH] [--from-csv]

For each layer (ours at each rank, the unfused chain or the fused scan as the backend picks it; with
--official also the official mamba_ssm Mamba3 SISO, when it imports) the script runs itself under
``ncu --profile-from-start off --clock-control none``: the child builds the layer (bf16, the layer bench's
sizes), runs two warm-up fwd+bwd passes, then one between cudaProfilerStart/Stop, which ncu profiles
kernel by kernel (each kernel replayed to read its counters; times are ncu's). Per kernel name: calls, time,
DRAM bytes read + written, achieved GB/s and DRAM throughput as % of the device's peak, SM throughput %,
achieved occupancy, registers per thread. Near 100 % DRAM is bandwidth-bound, near 100 % SM compute-bound;
low on both is latency-bound (serial chunk loops, occupancy, small grids). Writes kernel_rates.json / .md
into --out and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hybridlab.kernels.bench.ncu_rates import METRICS, TENSOR_METRICS, markdown, parse_ncu_csv, summarize


def _child(a) -> int:
    import torch

    from hybridlab.arch import bench_layer

    if a.impl == "official":
        from hybridlab.kernels.bench.ssm import official_layer, use_official_source

        if a.mamba_src:
            use_official_source(a.mamba_src)
        layer = official_layer(a.d_model, "siso", 1, a.d_state)
    else:
        layer = bench_layer(a.d_model, "mimo" if a.rank > 1 else "siso", a.rank, a.d_state)
    u = torch.randn(a.batch, a.seqlen, a.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(u)
    for _ in range(2):  # compile the Triton kernels and settle the allocator before the profiled pass
        layer(u).backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    layer(u).backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def _profile(a, impl: str, rank: int, out: Path) -> list[dict]:
    log = out / f"ncu_{impl}_r{rank}.csv"
    child = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--rank", str(rank),
             "--mamba-src", a.mamba_src, "--d-state", str(a.d_state), "--batch", str(a.batch), "--seqlen", str(a.seqlen), "--d-model", str(a.d_model)]
    for metrics in ({**METRICS, **TENSOR_METRICS}, METRICS):  # the second try: without the tensor-pipe counters
        cmd = [a.ncu, "--profile-from-start", "off", "--clock-control", "none", "--print-units", "base", "--csv",
               "--log-file", str(log), "--metrics", ",".join(metrics), *child]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        if p.returncode == 0:
            try:
                return _from_log(log)
            except RuntimeError:
                pass
        text = log.read_text() if log.exists() else ""
        print(f"kernel_rates: ncu {impl} r{rank} exit {p.returncode}: {(p.stderr or text)[-400:].strip()}", file=sys.stderr)
    raise RuntimeError(f"ncu found no kernels for {impl} rank {rank} (log: {log})")


def _from_log(log: Path) -> list[dict]:
    if not log.exists():
        raise RuntimeError(f"no ncu log {log}")
    launches = parse_ncu_csv(log.read_text(), {**METRICS, **TENSOR_METRICS})
    if not launches:
        raise RuntimeError(f"no kernels in {log}")
    return summarize(launches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--official", action="store_true", help="also the official mamba_ssm Mamba3 SISO layer")
    ap.add_argument("--mamba-src", default="", help="the official source tree (holding mamba_ssm/), when not installed")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--ncu", default=shutil.which("ncu") or "ncu")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per profiled layer")
    ap.add_argument("--from-csv", action="store_true",
                    help="no profiling: rebuild the tables from the ncu_*.csv logs an earlier run left in --out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="hybridlab", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a)
    if not a.from_csv and not shutil.which(a.ncu):
        print(f"kernel_rates: Nsight Compute not found ({a.ncu}); pass --ncu PATH", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = f"d_model {a.d_model}, d_state {a.d_state}, b{a.batch} l{a.seqlen}, bf16"
    layers = [("hybridlab", int(r)) for r in a.ranks.split(",")] + ([("official", 1)] if a.official else [])
    report, md = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"), "shape": shape, "layers": {}}, []
    for impl, rank in layers:
        title = f"{impl} {'SISO' if rank == 1 else f'MIMO R={rank}'} fwd+bwd ({shape})"
        try:
            rows = _from_log(out / f"ncu_{impl}_r{rank}.csv") if a.from_csv else _profile(a, impl, rank, out)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"kernel_rates: {title}: {e}", file=sys.stderr)
            continue
        report["layers"][f"{impl}_r{rank}"] = rows
        md.append(markdown(title, rows))
        print(md[-1] + "\n", flush=True)
    (out / "kernel_rates.json").write_text(json.dumps(report, indent=1))
    (out / "kernel_rates.md").write_text("\n\n".join(md) + "\n")
    return 0 if report["layers"] else 1


if __name__ == "__main__":
    sys.exit(main())
