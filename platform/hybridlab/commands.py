"""Platform commands beyond `check`: run, submit, status, logs, stop, ui, eval, compare, bench, data, generate.

Each command is a thin shell over the module that owns the concept. Heavy
imports (ray, deepspeed, mlflow) happen inside the command functions so that
`hybridlab check` stays fast.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .cli import SetOpt, app

AddressOpt = typer.Option(None, "--address", help="Ray dashboard URL of the cluster (default: $RAY_ADDRESS, else http://127.0.0.1:8265).")


# ---------------------------------------------------------------- training jobs


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec (YAML)."),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id of a stopped run to continue."),
    plain: Optional[bool] = typer.Option(None, "--plain/--bar", help="Plain progress lines / a progress bar (default: bar in a terminal, lines in CI)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the workers' own logs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan (workers, ZeRO, model table); start nothing."),
):
    """Train a job here: a local Ray (or $RAY_ADDRESS), DeepSpeed workers, MLflow tracking."""
    from .runner import dry_run as plan, run_job

    if dry_run:
        plan(job, overrides=set_ or [])
        return
    run_job(job, overrides=set_ or [], resume=resume, plain=plain, verbose=verbose)


@app.command()
def submit(
    job: str = typer.Argument(..., help="Job spec (YAML)."),
    address: Optional[str] = AddressOpt,
    set_: Optional[List[str]] = SetOpt,
    wait: bool = typer.Option(False, "--wait", help="Follow the logs until the job ends."),
):
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the job id."""
    from .cluster import submit_job

    submit_job(job, address=address, overrides=set_ or [], wait=wait)


@app.command()
def status(job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."), address: Optional[str] = AddressOpt):
    """Status of a submitted job."""
    from .cluster import job_status

    job_status(job_id, address)


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."),
    address: Optional[str] = AddressOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
):
    """Logs of a submitted job."""
    from .cluster import job_logs

    job_logs(job_id, address, follow)


@app.command()
def stop(job_id: str = typer.Argument(..., help="Ray job id from `hybridlab submit`."), address: Optional[str] = AddressOpt):
    """Stop a submitted job (its checkpoints stay; continue it with `run --resume`)."""
    from .cluster import stop_job

    stop_job(job_id, address)


@app.command()
def ui(
    uri: Optional[str] = typer.Option(None, "--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (127.0.0.1 unless you mean to expose it)."),
    port: int = typer.Option(5000, "--port", help="Port to listen on (1-65535)."),
):
    """Start the MLflow UI on the tracking store."""
    import subprocess
    import sys

    from .errors import UserError
    from .tracking import client, tracking_uri

    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: not a TCP port (1-65535)")
    store = tracking_uri(uri)
    if store.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {store}")
        return
    client(store)  # a store MLflow cannot open: one line here, not the child's traceback
    print(f"MLflow UI for {store} at http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port)]
    try:
        code = subprocess.call(cmd)
    except KeyboardInterrupt:
        code = 0
    raise SystemExit(code)  # the UI's own exit status is the command's


# ---------------------------------------------------------------- data

data_app = typer.Typer(no_args_is_help=True, help="Datasets: tokenized shards for language modeling.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
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

    from .errors import UserError

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
