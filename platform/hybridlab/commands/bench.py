"""Benchmark commands: bench ssm, bench decode, bench train (defaults shared with the scripts' main()s)."""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from hybridlab.jobs.spec import TrainSpec
from hybridlab.kernels.bench.options import DecodeBench, SsmBench, help_of

from ..errors import UserError
from .options import CompileMode, Precision, SetOpt, SsmBackend, ZeroStage, ints_text, shapes_text

app = typer.Typer(no_args_is_help=True, help="Benchmarks: kernels, decode, training throughput.")
S, D = SsmBench, DecodeBench


def _need_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"hybridlab bench {what} needs a CUDA GPU (none is visible here)")


@app.command("ssm")
def ssm(
    out: str = typer.Option(S.out, "--out", help=help_of(S, "out")),
    ranks: str = typer.Option(S.ranks, "--ranks", parser=ints_text, help=help_of(S, "ranks")),
    shapes: str = typer.Option(S.shapes, "--shapes", help=help_of(S, "shapes")),
    check: bool = typer.Option(S.check, "--check/--no-check", help=help_of(S, "check")),
    reference: bool = typer.Option(S.reference, "--reference/--no-reference", help=help_of(S, "reference")),
    peers: bool = typer.Option(S.peers, "--peers/--no-peers", help=help_of(S, "peers")),
    io: bool = typer.Option(S.io, "--io/--no-io", help=help_of(S, "io")),
    fused: bool = typer.Option(S.fused, "--fused/--no-fused", help=help_of(S, "fused")),
    quick: bool = typer.Option(S.quick, "--quick", help=help_of(S, "quick")),
    kernels: bool = typer.Option(S.kernels, "--kernels/--no-kernels", help=help_of(S, "kernels")),
    layers: bool = typer.Option(S.layers, "--layers", help=help_of(S, "layers")),
    d_states: str = typer.Option(S.d_states, "--d-states", parser=ints_text, help=help_of(S, "d_states")),
    compile_: bool = typer.Option(S.compile, "--compile/--no-compile", help=help_of(S, "compile")),
):
    """Time the ssm_scan backends (forward, forward+backward) against the peers that import; --layers: whole Mamba-3 layers."""
    if not kernels and not layers:
        raise UserError("bench ssm --no-kernels leaves nothing to time: add --layers")
    _need_cuda("ssm")
    from hybridlab.arch import bench_layer
    from hybridlab.kernels.bench.ssm import run_options

    raise SystemExit(run_options(SsmBench(out=out, ranks=ranks, shapes=shapes, check=check, reference=reference,
                                          peers=peers, io=io, fused=fused, quick=quick, kernels=kernels, layers=layers,
                                          d_states=d_states, compile=compile_), make_layer=bench_layer))


@app.command("decode")
def decode(
    out: str = typer.Option(D.out, "--out", help=help_of(D, "out")),
    batches: str = typer.Option(D.batches, "--batches", parser=ints_text, help=help_of(D, "batches")),
    contexts: str = typer.Option(D.contexts, "--contexts", parser=ints_text, help=help_of(D, "contexts")),
    models: str = typer.Option(D.models, "--models", help=help_of(D, "models")),
    no_models: bool = typer.Option(False, "--no-models", help="Skip the whole-model rows (= --models '')."),
    model_shapes: str = typer.Option(D.model_shapes, "--model-shapes", parser=shapes_text, help=help_of(D, "model_shapes")),
    parts: str = typer.Option(D.parts, "--parts", help=help_of(D, "parts")),
    variants: str = typer.Option(D.variants, "--variants", help=help_of(D, "variants")),
    quick: bool = typer.Option(D.quick, "--quick", help=help_of(D, "quick")),
):
    """Per-token decode latency: Mamba-3 layers (cute vs torch step) and Transformer layers/models, CUDA graphs."""
    _need_cuda("decode")
    from ..bench_decode import run_options

    run_options(DecodeBench(out=out, batches=batches, contexts=contexts, models="" if no_models else models,
                            model_shapes=model_shapes, parts=parts, variants=variants, quick=quick))


@app.command("train")
def train(
    spec: str = typer.Argument(..., help="Spec file or zoo:NAME."),
    seq_len: int = typer.Option(2048, "--seq-len", min=1),
    micro_batch: int = typer.Option(8, "--micro-batch", min=1),
    steps: int = typer.Option(20, "--steps", min=1),
    warmup: int = typer.Option(5, "--warmup", min=0),
    zero_stage: ZeroStage = typer.Option(2, "--zero"),
    precision: Precision = typer.Option("bf16", "--precision"),
    ssm_backend: SsmBackend = typer.Option("auto", "--ssm-backend"),
    checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
    log_every: int = typer.Option(TrainSpec.log_every, "--log-every", min=1, help="Sync the step statistics every N steps, as a job does."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Append the result as a JSON line to this file."),
    profile: int = typer.Option(0, "--profile", min=0, help="Print the N most expensive CUDA kernels of one step."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the step (train.compile); default: auto (on for CUDA)."),
    compile_mode: CompileMode = typer.Option("default", "--compile-mode",
                                             help="torch.compile mode (train.compile_mode): reduce-overhead replays "
                                                  "the forward and backward as CUDA graphs."),
    baseline: bool = typer.Option(False, "--baseline", help="Also time the plain PyTorch loop over the same model in "
                                  "this process (bf16 autocast, fused AdamW, clip 1.0; compiled as the step is) and "
                                  "report ratio = step tokens/s per GPU / plain loop tokens/s."),
    set_: Optional[List[str]] = SetOpt,
):
    """Training throughput of a job's step function here (DeepSpeed, no Ray): tokens/s, MFU, peak memory."""
    import json

    from hybridlab.jobs.throughput import measure_training

    if ssm_backend in ("triton", "cute"):
        _need_cuda(f"train --ssm-backend {ssm_backend}")
    res = measure_training(spec, seq_len, micro_batch, steps, warmup, zero_stage, precision, ssm_backend,
                           set_ or [], checkpointing, profile_top=profile, log_every=log_every,
                           compile="auto" if compile_ is None else compile_, compile_mode=compile_mode)
    if baseline:
        import gc

        import torch

        from hybridlab.jobs.baseline import measure_baseline

        gc.collect()  # the job's engine is gone: give its memory back before the plain loop allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base = measure_baseline(spec, seq_len, micro_batch, steps, warmup, compile=res["compile"],
                                ssm_backend=ssm_backend, overrides=set_ or [], compile_mode=compile_mode)
        res["baseline"] = base
        res["ratio"] = res["tokens_per_s"] / res["world"] / base["tokens_per_s"]
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    if baseline:
        print(f"{res['spec']}: job step {res['tokens_per_s']:,.0f} tokens/s, plain PyTorch loop "
              f"{res['baseline']['tokens_per_s']:,.0f} tokens/s (compile {res['compile']}): ratio {res['ratio']:.3f}")
    print(json.dumps(res))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(res) + "\n")
