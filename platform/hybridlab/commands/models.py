"""Model commands: check, zoo, generate."""

from __future__ import annotations

from typing import List, Optional

import typer

from .options import SetOpt

app = typer.Typer()


@app.command()
def check(
    spec: str = typer.Argument(..., help="Spec file, zoo:NAME, a model folder, or a job file (its model is checked, with the job's limits)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    seq_len: int = typer.Option(2048, "--seq-len", min=1, help="Sequence length for FLOPs and cache bytes."),
    set_: Optional[List[str]] = SetOpt,
):
    """Validate a spec; print its layers, params, FLOPs/token, cache bytes and kernel backends."""
    from ..check import run_check

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
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text (a model folder's tokenizer.json, else bytes); repeat for a batch (rows may differ in length)."),
    tokens: Optional[List[str]] = typer.Option(None, "--tokens", help="A prompt as token ids, e.g. 1,2,3 (any vocabulary: synthetic-task models); repeat for a batch. Prints token ids."),
    task_prompts: int = typer.Option(0, "--task-prompts", min=0, help="N prompts drawn from the run's own task (its eval batches), cut before the first answer; prints tokens and the expected answer."),
    model: Optional[str] = typer.Option(None, "--model", help="Model spec for a checkpoint that does not name one."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=0),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0: greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass, in (0, 1]."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Decode eagerly on CUDA."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Generate from a checkpoint or model folder: text (its tokenizer.json, else bytes) or token ids; chunked prefill, cached decode (CUDA graph on GPU)."""
    from ..generate import Prompts, run_generate

    run_generate(checkpoint, Prompts(text=prompt or [], tokens=tokens or [], from_task=task_prompts), model,
                 max_new_tokens, temperature, top_k, top_p, seed, device, dtype, not no_cuda_graph, json_out)
