"""Data commands: `hybridlab data prepare`."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Datasets: tokenized shards for language modeling.")


@app.command("prepare")
def prepare(
    files: Optional[List[str]] = typer.Argument(None, help="UTF-8 text files (one document each), or with --format the dataset's files/folders/globs."),
    out: str = typer.Option(..., "--out", help="Output folder for the shards."),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="byte (vocab 257), bpe (trained here with `tokenizers`), "
                                  "or a tokenizer.json / HF tokenizer folder / HF name."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocabulary size (>= 260)."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Share of tokens held out for the val split."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Read through HF datasets: hf | json | jsonl | parquet | text (as data.dataset.format)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="The dataset path or HF name (instead of FILES)."),
    name: Optional[str] = typer.Option(None, "--name", help="HF dataset config name."),
    split: str = typer.Option("train", "--split", help="HF dataset split."),
    text_field: str = typer.Option("text", "--text-field", help="The records' text column."),
):
    """Tokenize text into memory-mapped token shards (task `lm`, data.path: OUT) from files or any data.dataset source."""
    from hybridlab.jobs.tasks import TaskError, prepare_shards

    from ..errors import UserError

    try:
        if fmt or dataset:
            from hybridlab.jobs.tasks.lm import prepare_shards_from_dataset

            path = dataset or (files[0] if files and len(files) == 1 else files)
            if not path:
                raise UserError("data prepare: give the dataset's files (or --dataset PATH_OR_NAME)")
            ds = {"format": fmt or "hf", "path": path, "split": split, "text_field": text_field}
            if name:
                ds["name"] = name
            shards = prepare_shards_from_dataset(ds, out, tokenizer=tokenizer, vocab_size=vocab_size,
                                                 val_fraction=val_fraction)
        else:
            if not files:
                raise UserError("data prepare: give text files, or --format FMT with the dataset's files")
            if tokenizer not in ("byte", "bpe"):
                raise UserError(f"--tokenizer {tokenizer!r}: plain text files take byte or bpe; "
                                f"use --format text to tokenize them with your tokenizer")
            shards = prepare_shards(files, out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction)
    except TaskError as e:
        raise UserError(str(e)) from None
    desc = getattr(shards, "describe", None)
    info = desc() if callable(desc) else {}
    print(f"wrote shards to {out}" + (f": {info}" if info else ""))
    print(f"train on them with  data: {{task: lm, path: {out}, seq_len: 512}}")
