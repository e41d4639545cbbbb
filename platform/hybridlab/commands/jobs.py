"""Training-job commands: run, mlflow-replay."""

from __future__ import annotations

from typing import List, Optional

import typer

from .options import SetOpt, UriOpt, time_limit_option

app = typer.Typer()


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec (YAML)."),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id of a stopped run to continue (its unsent MLflow writes are replayed first)."),
    resume_sweep: Optional[str] = typer.Option(None, "--resume-sweep", help="MLflow parent run id of a sweep to continue: only its combinations without a FINISHED run are trained (KILLED/FAILED ones from their checkpoints); the job's sweep must be the parent's."),
    plain: Optional[bool] = typer.Option(None, "--plain/--bar", help="Plain progress lines / a progress bar (default: bar in a terminal, lines in CI)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the workers' own logs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate (limits included) and print the plan (workers, ZeRO, memory, model table); start nothing."),
    time_limit: Optional[float] = time_limit_option("from now"),
):
    """Train a job here: a local Ray (or $RAY_ADDRESS), DeepSpeed workers, MLflow tracking. Ctrl-C/SIGTERM stop it cleanly."""
    from ..runner import dry_run as plan, run_job

    if dry_run:
        plan(job, overrides=set_ or [])
        return
    run_job(job, overrides=set_ or [], resume=resume, plain=plain, verbose=verbose, resume_sweep=resume_sweep,
            time_limit_s=time_limit)


@app.command("mlflow-replay")
def mlflow_replay(
    files: List[str] = typer.Argument(..., help="mlflow_unsent_*.jsonl files written when the tracking server was away."),
    uri: Optional[str] = UriOpt,
):
    """Send the MLflow writes a run could not deliver into that run (each file is renamed *.replayed after)."""
    from ..tracking import replay_file

    for f in files:
        n, runs = replay_file(f, uri)
        print(f"replayed {n} writes from {f} into run(s) {', '.join(sorted(runs))}")
