"""The options of the benchmark entry points, with their defaults in one place (torch-free).

``hybridlab bench ssm`` / ``bench decode`` (typer) and the scripts' own ``main()``s
(``python -m hybridlab.kernels.bench.ssm``, ``python -m hybridlab.bench_decode``,
argparse: :func:`parse`) both read these dataclasses, so the two never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SsmBench:
    out: str = "bench-results"  # folder for ssm_bench.json and ssm_bench.md
    ranks: str = "1,4"  # MIMO ranks to time, comma-separated
    shapes: str = ""  # indices into the default shapes, e.g. 1,2 (empty: all)
    check: bool = True  # compare against the torch reference first
    reference: bool = True  # also time the torch reference
    peers: bool = True  # also time SDPA / flash-attn-4 / FLA peers
    io: bool = True  # also time the fused pre/post stages (ssm_io) vs their reference
    fused: bool = True  # also time the fused scan (ssm_scan_fused) vs the unfused chain
    quick: bool = False  # the first shape only (the layer rows: the first d_state)
    kernels: bool = True  # the kernel rows (ssm_bench.json); off: only the layer rows
    layers: bool = False  # also the whole Mamba-3 layer rows (layer_bench.json): ours eager/compiled, official
    d_states: str = "128,64"  # d_state values of the layer rows, comma-separated
    compile: bool = True  # the layer rows: also our layer under torch.compile


@dataclass(frozen=True)
class DecodeBench:
    out: str = "bench-results"  # folder for decode.json and decode.md
    batches: str = "1,16,128"  # batch sizes, comma-separated
    contexts: str = "4096,16384"  # KV-cache contexts of the attention rows
    models: str = "hybrid-1in4-1.5b,transformer-1.5b"  # zoo models timed whole (empty: none)
    model_shapes: str = "1x16384,16x16384"  # BATCHxCONTEXT of the model rows
    parts: str = "mamba,attention,models"
    variants: str = "cute,cute-unfused,triton,torch"  # Mamba-3 step backends
    quick: bool = False  # shorter timing runs


HELP = {
    (SsmBench, "out"): "Folder for the JSON and the table.",
    (SsmBench, "ranks"): "MIMO ranks to time, comma-separated.",
    (SsmBench, "shapes"): "Indices into the default shapes, e.g. 1,2 (default: all).",
    (SsmBench, "check"): "Compare against the torch reference first.",
    (SsmBench, "reference"): "Also time the torch reference.",
    (SsmBench, "peers"): "Also time SDPA / flash-attn-4 / FLA peers.",
    (SsmBench, "io"): "Also time the fused pre/post stages (ssm_io) vs their reference.",
    (SsmBench, "fused"): "Also time the fused scan (ssm_scan_fused) vs the unfused chain.",
    (SsmBench, "quick"): "The first shape only (layer rows: the first d_state).",
    (SsmBench, "kernels"): "The kernel rows (off: only the layer rows).",
    (SsmBench, "layers"): "Also time whole Mamba-3 layers, eager and compiled, vs the official mamba_ssm layer "
                          "(with --peers) -> layer_bench.json / .md.",
    (SsmBench, "d_states"): "d_state values of the layer rows, comma-separated.",
    (SsmBench, "compile"): "Layer rows: also our layer under torch.compile.",
    (DecodeBench, "out"): "Folder for decode.json and decode.md.",
    (DecodeBench, "batches"): "Comma-separated batch sizes.",
    (DecodeBench, "contexts"): "KV-cache contexts for attention, comma-separated.",
    (DecodeBench, "models"): "Zoo models timed whole, comma-separated (empty: none).",
    (DecodeBench, "model_shapes"): "BATCHxCONTEXT of the whole-model rows, comma-separated.",
    (DecodeBench, "parts"): "Which parts: mamba, attention, models.",
    (DecodeBench, "variants"): "Mamba-3 step backends.",
    (DecodeBench, "quick"): "Shorter timing runs.",
}


def help_of(cls, name: str) -> str:
    return HELP.get((cls, name), "")


def int_list(text: str) -> tuple[int, ...]:
    """``"1,16,128"`` -> ``(1, 16, 128)``; ValueError on anything else."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise ValueError(f"expected comma-separated integers, got {text!r}")
    try:
        return tuple(int(p) for p in items)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def batch_contexts(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x16384,16x16384"`` -> ``((1, 16384), (16, 16384))``; ValueError on anything else."""
    out = []
    for item in names(text):
        b, sep, c = item.partition("x")
        if not sep or not b.strip().isdigit() or not c.strip().isdigit():
            raise ValueError(f"expected BATCHxCONTEXT,..., got {text!r}")
        out.append((int(b), int(c)))
    return tuple(out)


def parse(cls, argv: Sequence[str] | None, description: str):
    """An argparse front end over an options dataclass: ``--name VALUE``; a bool that is on by default
    becomes ``--no-name``, one that is off ``--name``."""
    ap = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            if f.default:
                ap.add_argument(f"--no-{flag}", dest=f.name, action="store_false",
                                help=f"turn off (on by default): {help_of(cls, f.name)}")
            else:
                ap.add_argument(f"--{flag}", dest=f.name, action="store_true", help=help_of(cls, f.name))
        else:
            ap.add_argument(f"--{flag}", dest=f.name, default=f.default, help=help_of(cls, f.name))
    return cls(**vars(ap.parse_args(argv)))
