"""Whole Mamba-3 layer fwd / fwd+bwd on one GPU: hybridlab's layer (eager and torch.compile'd) next to the
official ``mamba_ssm`` Mamba3 layer when it imports (issue 14's layer targets).

    python scripts/bench_mamba3_layer.py [--out DIR] [--d-states 128,64] [--ranks 1,4] [--batch 8] [--seqlen 2048]
                                         [--no-compile] [--no-official]

d_model 2048, 64 heads x 64, expand 2, no output norm (the official layer's defaults), bf16 weights and
activations, the backend ``auto`` (on CUDA: the fused Triton scan, q/k/v built in the kernels; run with
HYBRIDLAB_SSM_FUSED=0 for the unfused chain qk_prep -> rank_expand -> ssm_scan instead). Writes
layer_bench.json / layer_bench.md into --out (default bench-results) and prints the table. The timing
code is ``hybridlab.kernels.bench.ssm.run_layer_bench``; this script only supplies the layer (kernels
imports nothing of the model code).
"""

from __future__ import annotations

import argparse
import sys

import torch

from hybridlab.arch import bench_layer as make_layer
from hybridlab.kernels.bench.ssm import layer_markdown, run_layer_bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--d-states", default="128,64")
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows")
    ap.add_argument("--no-official", action="store_true", help="skip the official mamba_ssm layer")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mamba3_layer: needs a CUDA GPU (none is visible here)", file=sys.stderr)
        return 2
    rows = run_layer_bench(
        make_layer, a.out, d_model=a.d_model, batch=a.batch, seqlen=a.seqlen,
        d_states=tuple(int(x) for x in a.d_states.split(",")), ranks=tuple(int(x) for x in a.ranks.split(",")),
        compile_too=not a.no_compile, official=not a.no_official,
    )
    print(layer_markdown(rows, rows[0]["device"] if rows else "?", rows[0]["date"] if rows else "?"))
    return 0 if all("error" not in r for r in rows if r["impl"] == "hybridlab") else 1


if __name__ == "__main__":
    sys.exit(main())
