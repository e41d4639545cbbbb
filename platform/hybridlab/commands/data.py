"""Data commands: `hybridlab data prepare`."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Datasets: tokenized shards for language modeling.")


@app.command("prepare")
def prepare(
    files: List[str] = typer.Argument(..., help="UTF-8 text files (one document each)."),
    out: str = typer.Option(..., "--out", help="Output folder for the shards."),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="byte (vocab 257) or bpe (trained here with `tokenizers`)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocabulary size (>= 260)."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Share of tokens held out for the val split."),
):
    """Tokenize text files into memory-mapped token shards (task `lm`, data.path: OUT)."""
    from hybridlab.jobs.tasks import TaskError, prepare_shards

    from ..errors import UserError

    try:
        shards = prepare_shards(files, out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction)
    except TaskError as e:
        raise UserError(str(e)) from None
    desc = getattr(shards, "describe", None)
    info = desc() if callable(desc) else {}
    print(f"wrote shards to {out}" + (f": {info}" if info else ""))
    print(f"train on them with  data: {{task: lm, path: {out}, seq_len: 512}}")
