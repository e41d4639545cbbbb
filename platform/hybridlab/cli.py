"""The ``hybridlab`` command line.

Each command parses its arguments and hands off to the module that owns the
concept; user errors (bad specs, missing runs, unreachable clusters) surface
as :class:`UserError` / ``SpecError`` and are printed on one line with exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

from hybridlab.arch.specio import SpecError

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Design, train and compare hybrid Mamba-3 / attention language models.",
)

@app.callback()
def _root() -> None:
    """Design, train and compare hybrid Mamba-3 / attention language models."""


SetOpt = typer.Option(None, "--set", help="Override a spec field: key.path=value (repeatable).")


@app.command()
def check(
    spec: str = typer.Argument(..., help="Spec file, zoo:NAME, or a job file (its model is checked)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Sequence length for FLOPs and cache bytes."),
    set_: Optional[List[str]] = SetOpt,
):
    """Validate a spec; print its layers, params, FLOPs/token, cache bytes and kernel backends."""
    from .check import run_check

    run_check(spec, overrides=set_ or [], seq_len=seq_len, as_json=json_out)


@app.command()
def zoo():
    """List the zoo's specs (use them as zoo:NAME) with their parameter counts."""
    from hybridlab.arch import count_params, load_model_spec, zoo_names

    for name in zoo_names():
        spec = load_model_spec(f"zoo:{name}")
        print(f"zoo:{name:24s} {count_params(spec) / 1e6:9.2f}M  {spec.description}")


@app.command()
def generate(
    checkpoint: str = typer.Argument(..., help="Model folder, checkpoint folder/file, or zoo:NAME / a spec .yaml (random weights: smoke use)."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch (rows may differ in length)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model spec for a checkpoint that does not name one."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Decode eagerly on CUDA."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Generate text (a model folder's tokenizer.json, else bytes) from a checkpoint: chunked prefill, cached decode (CUDA graph on GPU)."""
    from .generate import run_generate

    run_generate(checkpoint, prompt, model, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                 not no_cuda_graph, json_out)


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="MLflow run id, a run folder, a checkpoint folder (step_N/), or a model folder."),
    task: Optional[str] = typer.Option(None, "--task", help="Eval task: mqar, passkey (needle), parity, modarith, copy, lm; "
                                       "on text: niah, ppl_by_pos."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Comma-separated eval lengths, e.g. 256,512,1024 "
                                          "(niah / ppl_by_pos default: multiples of the training length)."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks, comma-separated; "
                                          "metrics eval/lm_eval/<task>/<metric>."),
    lm_eval_include: Optional[List[str]] = typer.Option(None, "--lm-eval-include", help="Folder of lm-eval task YAMLs (repeatable)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval: examples per task (< 1: a fraction)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval: few-shot examples."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer for text evals (default: the run's data.tokenizer or the model folder's)."),
    batches: int = typer.Option(2, "--batches", help="Batches per length."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per batch."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Task option key=value (repeatable), e.g. depth=0.5."),
    child: bool = typer.Option(False, "--child", help="Log into a nested child run instead of the run itself."),
    no_log: bool = typer.Option(False, "--no-log", help="Print only; log nothing to MLflow."),
    uri: Optional[str] = typer.Option(None, "--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)."),
):
    """Evaluate a run, checkpoint or model folder: tasks at chosen lengths, NIAH / per-position perplexity, lm-eval."""
    from .evaluate import evaluate

    evaluate(target, task, lengths, batches=batches, batch_size=batch_size, options=option or [], child=child,
             log=not no_log, uri=uri, lm_eval=lm_eval, lm_eval_include=lm_eval_include or [], limit=limit,
             num_fewshot=num_fewshot, tokenizer=tokenizer)


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="MLflow experiment name (a job's `experiment`)."),
    runs: Optional[List[str]] = typer.Option(None, "--runs", help="Run ids, names or a sweep's parent run id (repeatable or comma-separated); default: all."),
    metric: str = typer.Option("auto", "--metric", help="Eval metric: auto (final_acc where reported, else acc), acc, final_acc, seq_acc, loss."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: comparisons/EXPERIMENT)."),
    latest: bool = typer.Option(False, "--latest", help="Only the newest sweep's runs (or the newest run)."),
    no_log: bool = typer.Option(False, "--no-log", help="Write the files only; no comparison run in MLflow."),
    uri: Optional[str] = typer.Option(None, "--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)."),
):
    """Runs side by side: a table, PNG plots (accuracy vs eval length, loss vs tokens), CSV/JSON, MLflow artifacts."""
    from .compare import compare as run_compare

    run_compare(experiment, runs=runs or [], metric=metric, out=out, uri=uri, latest=latest, log=not no_log)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: kernels, decode, training throughput.")
app.add_typer(bench_app, name="bench")


@bench_app.command("ssm")
def bench_ssm(
    out: str = typer.Option("bench-results", "--out", help="Folder for the JSON and the table."),
    ranks: str = typer.Option("1,4", "--ranks", help="MIMO ranks to time, comma-separated."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare against the torch reference first."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also time the torch reference."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also time SDPA / flash-attn-4 / FLA peers."),
    io: bool = typer.Option(True, "--io/--no-io", help="Also time the fused pre/post stages (ssm_io) vs their reference."),
):
    """Time the ssm_scan backends (forward, forward+backward) against the peers that import."""
    import torch

    from hybridlab.kernels.bench.ssm import run_ssm_bench

    if not torch.cuda.is_available():
        raise UserError("hybridlab bench ssm needs a CUDA GPU (none is visible here)")
    try:
        rank_list = tuple(int(r) for r in ranks.split(","))
    except ValueError:
        raise UserError(f"--ranks: expected comma-separated integers, got {ranks!r}") from None
    run_ssm_bench(out_dir=out, ranks=rank_list, check=check, reference=reference, peers=peers, io=io)


@bench_app.command("decode")
def bench_decode(
    out: str = typer.Option("bench-results", "--out", help="Folder for decode.json and decode.md."),
    batches: str = typer.Option("1,16,128", "--batches", help="Comma-separated batch sizes."),
    contexts: str = typer.Option("4096,16384", "--contexts", help="KV-cache contexts for attention."),
    models: bool = typer.Option(True, "--models/--no-models", help="Also time whole 1.5B models."),
    quick: bool = typer.Option(False, "--quick", help="Shorter timing runs."),
):
    """Per-token decode latency: Mamba-3 layers (cute vs torch step) and Transformer layers/models, CUDA graphs."""
    import torch

    from hybridlab.bench_decode import run_decode_bench

    if not torch.cuda.is_available():
        raise UserError("bench decode needs a CUDA GPU (none here)")
    try:
        bs = [int(x) for x in batches.split(",") if x.strip()]
        cs = [int(x) for x in contexts.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batches/--contexts take comma-separated integers, got {batches!r} / {contexts!r}") from None
    run_decode_bench(out_dir=out, batches=bs, contexts=cs, models=models, quick=quick)


@bench_app.command("train")
def bench_train(
    spec: str = typer.Argument(..., help="Spec file or zoo:NAME."),
    seq_len: int = typer.Option(2048, "--seq-len"),
    micro_batch: int = typer.Option(8, "--micro-batch"),
    steps: int = typer.Option(20, "--steps"),
    warmup: int = typer.Option(5, "--warmup"),
    zero_stage: int = typer.Option(2, "--zero"),
    precision: str = typer.Option("bf16", "--precision"),
    ssm_backend: str = typer.Option("auto", "--ssm-backend", help="auto, torch, triton"),
    checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
    json_out: Optional[str] = typer.Option(None, "--json", help="Append the result as a JSON line to this file."),
    profile: int = typer.Option(0, "--profile", help="Print the N most expensive CUDA kernels of one step."),
    set_: Optional[List[str]] = SetOpt,
):
    """Training throughput of one spec here (DeepSpeed, no Ray): tokens/s, MFU, peak memory."""
    import json

    from hybridlab.jobs.throughput import measure_training

    for name, v in (("--seq-len", seq_len), ("--micro-batch", micro_batch), ("--steps", steps)):
        if v < 1:
            raise UserError(f"{name} must be positive, got {v}")
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {zero_stage}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision must be bf16, fp16 or fp32, got {precision!r}")
    from hybridlab.kernels import BACKENDS

    if ssm_backend not in BACKENDS:
        raise UserError(f"--ssm-backend must be one of {', '.join(BACKENDS)}, got {ssm_backend!r}")
    import torch

    if ssm_backend in ("triton", "cute") and not torch.cuda.is_available():
        raise UserError(f"--ssm-backend {ssm_backend} needs a CUDA GPU (none is visible here)")
    res = measure_training(spec, seq_len, micro_batch, steps, warmup, zero_stage, precision, ssm_backend,
                           set_ or [], checkpointing, profile_top=max(profile, 0))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    print(json.dumps(res))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(res) + "\n")


# --- job commands (training platform) are registered below by their modules ---


def _register_optional_commands() -> None:
    """Commands whose modules import heavy optional deps lazily register here."""
    from . import commands, interop  # noqa: F401  (add run/submit/status/..., import/export to `app`)


def main(argv: list[str] | None = None) -> None:
    _register_optional_commands()
    try:
        app(args=argv, standalone_mode=False)
    except (SpecError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        raise SystemExit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors from typer's bundled click arrive here in non-standalone mode.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            raise SystemExit(e.exit_code or 2)
        raise


if __name__ == "__main__":
    # Run as `python -m hybridlab.cli`: this file is __main__, so go through the
    # importable module so that every command registers on the same app.
    from hybridlab.cli import main as _main

    _main()
