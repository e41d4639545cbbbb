"""Result commands: eval, compare, ui."""

from __future__ import annotations

from typing import List, Literal, Optional

import typer

from ..compare import METRIC_CHOICES, SELECT_MODES, STATUS_CHOICES
from .options import UriOpt

app = typer.Typer()

MetricChoice = Literal[METRIC_CHOICES]
StatusChoice = Literal[STATUS_CHOICES]
SelectMode = Literal[SELECT_MODES]


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
    limit: Optional[float] = typer.Option(None, "--limit", min=0, help="lm-eval: examples per task (< 1: a fraction)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="lm-eval: few-shot examples."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer for text evals (default: the run's data.tokenizer or the model folder's)."),
    batches: int = typer.Option(2, "--batches", min=1, help="Batches per length."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sequences per batch."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Task option key=value (repeatable), e.g. depth=0.5."),
    child: bool = typer.Option(False, "--child", help="Log into a nested child run instead of the run itself."),
    no_log: bool = typer.Option(False, "--no-log", help="Print only; log nothing to MLflow."),
    uri: Optional[str] = UriOpt,
):
    """Evaluate a run, checkpoint or model folder: tasks at chosen lengths, NIAH / per-position perplexity, lm-eval."""
    from ..evaluate import evaluate

    evaluate(target, task, lengths, batches=batches, batch_size=batch_size, options=option or [], child=child,
             log=not no_log, uri=uri, lm_eval=lm_eval, lm_eval_include=lm_eval_include or [], limit=limit,
             num_fewshot=num_fewshot, tokenizer=tokenizer)


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="MLflow experiment name (a job's `experiment`)."),
    runs: Optional[List[str]] = typer.Option(None, "--runs", help="Run ids, names or a sweep's parent run id (repeatable or comma-separated); default: all."),
    metric: MetricChoice = typer.Option("auto", "--metric", help="Eval metric: auto (final_acc where reported, else acc), or one of " + ", ".join(METRIC_CHOICES[1:]) + "."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: comparisons/EXPERIMENT)."),
    latest: bool = typer.Option(False, "--latest", help="Only the newest sweep's runs (or the newest run)."),
    status: StatusChoice = typer.Option("finished", "--status", help="Which runs: finished (default), failed, killed, running, or all."),
    all_runs: bool = typer.Option(False, "--all", help="Runs of every status (= --status all)."),
    no_log: bool = typer.Option(False, "--no-log", help="Write the files only; no comparison run in MLflow."),
    best_of: Optional[List[str]] = typer.Option(None, "--best-of", help="Swept key(s) to choose over, e.g. train.lr "
                                                "(repeatable or comma-separated): one row per group of the other sweep "
                                                "values, its run with the best --select metric."),
    select: Optional[str] = typer.Option(None, "--select", help="With --best-of: the metric that picks each group's run, "
                                         "e.g. eval/parity/len_256/scaled_acc or best/eval/mqar/len_256/acc."),
    select_mode: SelectMode = typer.Option("max", "--select-mode", help="With --best-of: max (default) or min (e.g. a loss)."),
    x: Optional[str] = typer.Option(None, "--x", help="A numeric swept key for the x axis, e.g. model.d_model: "
                                    "eval_vs_<key>.png, one subplot per eval column, one line per other sweep value."),
    uri: Optional[str] = UriOpt,
):
    """Runs side by side: a table (with each run's status), PNG plots, CSV/JSON, MLflow artifacts."""
    from ..compare import compare as run_compare

    run_compare(experiment, runs=runs or [], metric=metric, out=out, uri=uri, latest=latest, log=not no_log,
                status="all" if all_runs else status, best_of=best_of or [], select=select, select_mode=select_mode,
                x=x)


@app.command()
def ui(
    uri: Optional[str] = UriOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (127.0.0.1 unless you mean to expose it)."),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port to listen on (1-65535)."),
):
    """Start the MLflow UI on the tracking store (Ctrl-C or SIGTERM stops it and its workers)."""
    from ..tracking import client, run_ui, tracking_uri

    store = tracking_uri(uri)
    if store.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {store}")
        return
    client(store)  # a store MLflow cannot open: one line here, not the child's traceback
    raise SystemExit(run_ui(store, host, port))  # the UI's own exit status (128 + signal when stopped)
